"""The text-to-text (seq2seq) model kind: MASSIVE as `Annotate: w1 w2 ...` -> `s1 s2 ... intent`.

Its fine-tuning pieces (student/kinds.py hands them to student/finetune.py): the official-format
pairs and their batches, the label-token rows of a pretrained model, the token cross-entropy and
the dev predictions by greedy generation, parsed as the official scorer reads them. Its PyTorch
predictor (`Seq2SeqPredictor`, what `evaluate massive` runs on a Hugging Face seq2seq directory).
Its ONNX graphs are in student/onnx_graphs.py, their runtime in student/runtime.py.

Torch and transformers are imported inside the functions: importing this module stays cheap. A
`cfg` is a student.config.FinetuneConfig (not imported: the config asks the kinds registry, which
imports this module).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import ConfigError
from data_prep.tokenizer import num_word_sentinels
from massive.format import (
    INTENT_FIRST_KEY,
    OTHER,
    TargetFormat,
    has_label_tokens,
    label_text,
    label_token,
    parse_generations,
)

if TYPE_CHECKING:
    import torch

    from massive.format import MassiveExample, NLUPrediction


# ----------------------------------------------------------------------------- fine-tuning


def target_format(cfg: Any, tokenizer: Any) -> TargetFormat:
    """The text-to-text format this fine-tuning writes (sentinels: as many as the tokenizer has)."""
    return TargetFormat(cfg.intent_first, num_word_sentinels(tokenizer) if cfg.sentinels else 0, cfg.spans)


def encode_seq2seq(
    tokenizer: Any, examples: list[MassiveExample], cfg: Any
) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """(source ids, target ids) per example in the official text-to-text format, and how many
    sources/targets were cut to max_source_len/max_target_len (eos kept at the end)."""
    whole = has_label_tokens(tokenizer)
    if cfg.spans and not whole:
        raise ConfigError("finetune.spans needs a tokenizer with whole label tokens (data prep's tokenizer.label_tokens)")
    fmt = target_format(cfg, tokenizer)
    pairs = [fmt.pair(ex.words, ex.slots, ex.intent, whole) for ex in examples]
    sources = tokenizer([s for s, _ in pairs])["input_ids"]
    targets = tokenizer([t for _, t in pairs])["input_ids"]
    eos = tokenizer.eos_token_id

    def cut(ids: list[int], limit: int) -> list[int]:
        return ids if len(ids) <= limit else [*ids[: limit - 1], eos]

    counts = {
        "num_truncated_sources": sum(len(ids) > cfg.max_source_len for ids in sources),
        "num_truncated_targets": sum(len(ids) > cfg.max_target_len for ids in targets),
    }
    encoded = [(cut(src, cfg.max_source_len), cut(tgt, cfg.max_target_len)) for src, tgt in zip(sources, targets)]
    return encoded, counts


def collate_seq2seq(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask [B, S] (pad right), labels [B, T] with -100 on padding."""
    import torch

    src_len = max(len(s) for s, _ in pairs)
    tgt_len = max(len(t) for _, t in pairs)
    input_ids = torch.full((len(pairs), src_len), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), tgt_len), -100, dtype=torch.long)
    for b, (src, tgt) in enumerate(pairs):
        input_ids[b, : len(src)] = torch.tensor(src)
        labels[b, : len(tgt)] = torch.tensor(tgt)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


def init_label_embeddings(model: Any, tokenizer: Any, labels: list[str], how: str = "words", seed: int = 0) -> list[str]:
    """Set the embedding row of each label's whole token (`<alarm_set>`) to the mean of the rows of
    the label's words (`alarm set`), in the input embedding and, when untied, the output layer.

    A label token never occurs in pretraining text, so a pretrained model's softmax has pushed its
    row down at every position; fine-tuning then spends its first steps undoing that. Starting
    from its words gives it the scale of a seen token and the meaning of its name. `how="random"`
    draws each row afresh from a normal with the table's standard deviation instead (seeded by
    `seed` and the token id). Returns the labels whose token is not in the vocabulary (left as they are)."""
    import torch

    if how not in ("words", "random"):
        raise ValueError(f"label rows from {how!r}: expected 'words' or 'random'")
    vocab = tokenizer.get_vocab()
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != tables[0].data_ptr():
        tables.append(output.weight)
    missing = []
    with torch.no_grad():
        scales = [float(table.std()) for table in tables]  # before any row changes
        for label in labels:
            token_id = vocab.get(label_token(label))
            piece_ids = tokenizer(label_text(label), add_special_tokens=False)["input_ids"]
            if token_id is None or not piece_ids:
                missing.append(label)
                continue
            for table, scale in zip(tables, scales):
                if how == "random":
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + token_id)
                    table[token_id] = torch.randn(table.shape[1], generator=generator) * scale
                else:
                    table[token_id] = table[piece_ids].mean(dim=0)
    return missing


def prepare_text_to_text(model: Any, cfg: Any, tokenizer: Any, labels: list[str]) -> Any:
    """The seq2seq model `model` made ready for text-to-text fine-tuning (cfg: a FinetuneConfig):
    label rows set (label_init) when it is only pretrained, and its target format recorded.
    `labels`: the intents and slot labels whose whole tokens label_init may set."""
    # A model already trained on MASSIVE targets (fine-tuned or task-distilled: its config records
    # the target order) has learnt its label rows; only a pretrained one gets new ones (label_init).
    pretrained_only = not cfg.scratch_preset and getattr(model.config, INTENT_FIRST_KEY, None) is None
    if cfg.label_init != "keep" and pretrained_only and has_label_tokens(tokenizer):
        init_label_embeddings(model, tokenizer, labels, cfg.label_init, seed=cfg.train.seed)
    # Saved with the model (config.json, and the export manifest), so every predictor parses
    # the generated target in the order this model was trained on.
    target_format(cfg, tokenizer).record(model.config)
    return model


def pair_length(pair: tuple[list[int], list[int]]) -> int:
    """Tokens of a (source, target) pair: what group_by_length sorts by."""
    return len(pair[0]) + len(pair[1])


def collate_pairs(pairs: list[tuple[list[int], list[int]]], tokenizer: Any, model: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """`collate_seq2seq` in the signature every kind's collate has (student.kinds.Training)."""
    return collate_seq2seq(pairs, tokenizer.pad_token_id)


def text_to_text_loss(engine: Any, batch: dict[str, torch.Tensor], cfg: Any,
                      teacher: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token cross-entropy over the target (the model's own loss); no loss parts. `teacher` is
    always None: the teacher term trains the encoder head (FinetuneConfig refuses it here)."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, {}


def evaluate_pairs(engine: Any, model: Any, tokenizer: Any, pairs: list[tuple[list[int], list[int]]],
                   examples: list[MassiveExample], cfg: Any, device: str, synced: bool,
                   intents: list[str] | None) -> tuple[float, float, list[NLUPrediction]]:
    """One dev batch: (summed token loss, target tokens, greedy predictions)."""
    import torch

    batch = collate_seq2seq(pairs, tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    token_losses = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), batch["labels"], ignore_index=-100, reduction="sum"
    )
    preds = generate_predictions(model, tokenizer, batch, examples, cfg, synced, intents)
    return float(token_losses), float((batch["labels"] != -100).sum()), preds


def generate_predictions(
    model: Any, tokenizer: Any, batch: dict[str, torch.Tensor], examples: list[MassiveExample],
    cfg: Any, synced: bool, intents: list[str] | None = None,
) -> list[NLUPrediction]:
    """Greedy generation of the text-to-text target, parsed into intent + per-word slots (with its
    `GenerationCheck` when `intents` is given)."""
    output = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=cfg.max_target_len,
        num_beams=1,
        do_sample=False,
        synced_gpus=synced,
    )
    return parse_generations(output, tokenizer, [ex.words for ex in examples], intents or [], cfg.intent_first,
                             spans=cfg.spans)


# ----------------------------------------------------------------------------- predicting


def torch_device(name: str) -> Any:
    """The torch device of a --device value (auto: cuda when there is one)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; allowed: auto, cpu, cuda")
    return torch.device(name)


def load_text_to_text(model_dir: str | Path, device: str = "auto", dtype: str = "float32", load: Any = None):
    """(model in eval mode, tokenizer) from a Hugging Face seq2seq directory: on the device, or placed
    by accelerate's device map with CPU/disk offload when `load` (a `core.bigmodel.ModelLoadConfig`)
    says device_map=auto. dtype "auto": bf16/fp16 on GPU, float32 on CPU. Feed inputs on
    `core.bigmodel.input_device(model)`."""
    from core.bigmodel import load_model, resolve_dtype
    from core.modeldir import check_model_dir
    from data_prep.tokenizer import load_tokenizer

    model_dir = check_model_dir(model_dir, "--model")  # the loading rule every command shares
    tokenizer = load_tokenizer(model_dir)
    target = torch_device(device)
    model = load_model(model_dir, "--model", device=str(target), dtype=resolve_dtype(dtype, target.type == "cuda"),
                       load=load)
    return model, tokenizer


class Seq2SeqPredictor:
    """Text-to-text MASSIVE predictor: `Annotate: w1 w2 ...` -> `s1 s2 ... intent` (or intent first,
    as the model's config records), batched greedy generation, output parsed by
    `massive.format.parse_target`."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "float32",
        slot_labels: Sequence[str] = (),
        intents: Sequence[str] = (),
        max_new_tokens_margin: int = 4,
        max_new_tokens: int | None = None,
        load: Any = None,
    ) -> None:
        """`max_new_tokens`: a fixed generation budget (latency timing); None bounds each batch by
        its longest well-formed target instead. `load`: big-model placement (see `load_text_to_text`)."""
        from massive.format import (
            has_label_tokens,
            label_token,
            model_intent_first,
            model_sentinels,
            model_spans,
        )

        self.model, self.tokenizer = load_text_to_text(model_dir, device, dtype, load)
        self.max_new_tokens = max_new_tokens

        def longest(labels: Sequence[str], default: int) -> int:
            lengths = [len(self.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in labels]
            return max(lengths, default=default)

        # Upper bound of a well-formed target: one label per word plus the intent plus eos.
        spell = label_token if has_label_tokens(self.tokenizer) else str
        self.tokens_per_word = longest([spell(x) for x in [OTHER, *slot_labels]], 4)
        self.intent_tokens = longest([spell(x) for x in intents], 8)
        self.margin = max_new_tokens_margin
        self.intents = list(intents)
        self.intent_first = model_intent_first(self.model.config)
        self.sentinels = model_sentinels(self.model.config)
        if self.sentinels:  # each label follows its word's sentinel
            self.tokens_per_word += 1
        self.spans = model_spans(self.model.config)

    def predict_words(self, batch: list[list[str]]) -> list[Any]:
        import torch

        from massive.format import t2t_source

        sources = [t2t_source(words, self.sentinels) for words in batch]
        from core.bigmodel import input_device

        encoded = self.tokenizer(sources, padding=True, return_tensors="pt").to(input_device(self.model))
        max_words = max(len(words) for words in batch)
        if self.spans:  # at most every source piece copied, each word behind its own label token
            bound = encoded["input_ids"].shape[1] + max_words + self.intent_tokens + 1 + self.margin
        else:
            bound = max_words * self.tokens_per_word + self.intent_tokens + 1 + self.margin
        max_new_tokens = self.max_new_tokens or bound
        with torch.inference_mode():
            output = self.model.generate(**encoded, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        return parse_generations(output, self.tokenizer, batch, self.intents, self.intent_first, spans=self.spans)
