"""Encoder-only MASSIVE NLU model: a T5 encoder with an intent head and a slot-tagging head.

The encoder is the encoder stack of a seq2seq model (our teachers and students, or any Hugging Face
T5-family checkpoint), rebuilt as a `T5EncoderModel` (or the mT5/umT5 equivalent) from the same
config and loaded with the seq2seq model's encoder weights. Two linear heads sit on top:

- intent: on the mean of the encoder states over the non-padding tokens -> [B, num_intents];
- slots: on every token -> [B, T, num_slot_labels]; training and prediction read it only at the
  first sub-word of each word (`word_starts`), as in the official per-word MASSIVE labels.

`forward(input_ids, attention_mask) -> (intent_logits, slot_logits)` has no data-dependent Python
control flow, so it traces to ONNX as is. The model directory is a Hugging Face-style directory:
`config.json` (the encoder's), `model.safetensors` (encoder + heads), `nlu_labels.json` and the
tokenizer files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.modeldir import NLU_LABELS
from massive.format import OTHER
from student.alignment import first_subword_indices, word_char_spans  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from massive.format import NLUPrediction

LABELS_FILE = NLU_LABELS
WEIGHTS_FILE = "model.safetensors"
# Label id that cross-entropy skips: padding words and words truncated away.
IGNORE_INDEX = -100


@dataclass
class NLULabels:
    """What the heads predict and how inputs were encoded; saved as nlu_labels.json."""

    intents: list[str]
    """Intent names, index = intent head output."""
    slot_labels: list[str]
    """Per-word slot labels, index = slot head output; "Other" (no slot) first."""
    max_length: int = 64
    """Maximum number of tokens (eos included) an utterance is encoded to."""
    source_model: str = ""
    """The seq2seq model (directory or scratch:<preset>) the encoder was taken from."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (fine-tuning run, step)."""
    ngram_buckets: int = 0
    """Hashed token n-gram embeddings (`TokenNgrams`): number of hash buckets, 0 = none."""
    ngram_orders: list[int] = field(default_factory=lambda: [2, 3])
    """The n-gram lengths hashed, in tokens (each >= 2: single tokens are the encoder's own embedding)."""
    ngram_inputs: bool = False
    """Also add each position's n-gram embeddings (the n-grams ending there) to the encoder's input embeddings."""
    members: list[str] = field(default_factory=list)
    """An ensemble (`NLUEnsemble`): the sub-directories holding its members, each a whole NLU model
    directory with these intents, slot labels and max_length; empty for a single model."""

    def __post_init__(self) -> None:
        if not self.slot_labels or self.slot_labels[0] != OTHER:
            raise ValueError(f"slot_labels must start with {OTHER!r}, got {self.slot_labels[:3]!r}")
        for name, values in (("intents", self.intents), ("slot_labels", self.slot_labels)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates")
        if self.ngram_buckets < 0:
            raise ValueError(f"ngram_buckets must be >= 0 (0 = no n-gram features), got {self.ngram_buckets}")
        if self.ngram_buckets and (not self.ngram_orders or any(n < 2 for n in self.ngram_orders)):
            raise ValueError(f"ngram_orders must be n-gram lengths >= 2, got {self.ngram_orders}")

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> NLULabels:
        path = Path(model_dir) / LABELS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: not an encoder NLU model directory (no {LABELS_FILE})") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed keys: {sorted(allowed)}")
        return cls(**data)

    def write(self, model_dir: str | os.PathLike) -> None:
        """Save as model_dir/nlu_labels.json (what `read` loads)."""
        (Path(model_dir) / LABELS_FILE).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- encoding


def _fast_tokenizer(tokenizer: Any) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"encode_words needs a fast (Rust) tokenizer for character offsets, got {type(tokenizer).__name__}"
        )
    return tokenizer


def encode_words(tokenizer: Any, batch_of_words: list[list[str]], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize word lists as the text `" ".join(words)` and locate each word's first sub-word.

    Returns `input_ids` and `attention_mask` ([B, T], T = longest encoded utterance <= max_length,
    right-padded with the tokenizer's pad id) and `word_starts` ([B, W], W = most words in the
    batch): the token index of word i's first sub-word, -1 for words truncated away and for the
    padding beyond an utterance's last word.
    """
    tokenizer = _fast_tokenizer(tokenizer)
    texts, all_spans = zip(*(word_char_spans(words) for words in batch_of_words)) if batch_of_words else ((), ())
    enc = tokenizer(
        list(texts),
        max_length=max_length,
        truncation=True,
        padding="longest",
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    num_words = max((len(w) for w in batch_of_words), default=0)
    word_starts = torch.full((len(batch_of_words), num_words), -1, dtype=torch.long)
    for b, spans in enumerate(all_spans):
        offsets = [tuple(pair) for pair in enc["offset_mapping"][b].tolist()]
        starts = first_subword_indices(offsets, spans, enc.tokens(b))
        word_starts[b, : len(starts)] = torch.tensor(starts, dtype=torch.long)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "word_starts": word_starts}


def slot_label_ids(batch_of_slots: list[list[str]], slot_labels: list[str], num_words: int) -> torch.Tensor:
    """Per-word slot label ids [B, num_words], IGNORE_INDEX beyond each utterance's words."""
    index = {label: i for i, label in enumerate(slot_labels)}
    out = torch.full((len(batch_of_slots), num_words), IGNORE_INDEX, dtype=torch.long)
    for b, slots in enumerate(batch_of_slots):
        for i, slot in enumerate(slots):
            if slot not in index:
                raise KeyError(f"slot label {slot!r} is not one of the model's {len(slot_labels)} slot labels")
            out[b, i] = index[slot]
    return out


# ----------------------------------------------------------------------------- model

# Rolling hash of a window of token ids: h = (h * _HASH_BASE + id) mod _HASH_MODULUS, started from
# the order n. Every intermediate value stays below 2**62, so int64 never overflows and PyTorch and
# ONNX (Mul, Add, Mod on int64) compute the same buckets.
_HASH_BASE = 1_000_003
_HASH_MODULUS = 2_147_483_647  # 2**31 - 1, prime


class TokenNgrams(nn.Module):
    """Embeddings of hashed token n-grams, fastText-style: what a TF-IDF classifier's word and
    character n-grams give it, for a model too small to learn every combination in its layers.

    A sub-word n-gram (a word pair, or the pieces of a rare word) is hashed into one of `num_buckets`
    rows; colliding n-grams share a row. `forward(input_ids [B, T], attention_mask [B, T])` returns
    per-position features [B, T, H] (the sum of the embeddings of the n-grams that end at each
    position and lie inside the utterance) and their count per utterance [B, 1].
    """

    def __init__(self, num_buckets: int, orders: list[int], hidden: int) -> None:
        super().__init__()
        self.orders = list(orders)
        self.embed = nn.Embedding(num_buckets, hidden)
        # Small start: unseen n-grams (test-time collisions aside) add little noise, as a linear
        # model's zero weight for a feature never seen in training.
        nn.init.normal_(self.embed.weight, std=0.1)

    def buckets(self, input_ids: torch.Tensor, order: int) -> torch.Tensor:
        """[B, T] -> [B, T - order + 1]: the bucket of the n-gram ending at positions order-1 .. T-1."""
        length = input_ids.shape[1] - order + 1
        h = torch.full_like(input_ids[:, :length], order)
        for k in range(order):
            h = (h * _HASH_BASE + input_ids[:, k : k + length]) % _HASH_MODULUS
        return h % self.embed.num_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq_len = input_ids.shape
        features = torch.zeros(batch, seq_len, self.embed.embedding_dim, dtype=self.embed.weight.dtype,
                               device=input_ids.device)
        count = torch.zeros(batch, 1, dtype=self.embed.weight.dtype, device=input_ids.device)
        mask = attention_mask.to(self.embed.weight.dtype)
        for order in self.orders:
            if seq_len < order:
                continue
            length = seq_len - order + 1
            inside = mask[:, :length]
            for k in range(1, order):
                inside = inside * mask[:, k : k + length]  # [B, length]: every token of the window is real
            vectors = self.embed(self.buckets(input_ids, order)) * inside.unsqueeze(-1)
            features = features + nn.functional.pad(vectors, (0, 0, order - 1, 0))
            count = count + inside.sum(dim=1, keepdim=True)
        return features, count



def _encoder_class(model_type: str) -> type:
    import transformers

    classes = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
    if model_type not in classes:
        raise ValueError(
            f"encoder NLU head supports seq2seq models of type {', '.join(sorted(classes))}; got {model_type!r}"
        )
    return getattr(transformers, classes[model_type])


class WordPredictor:
    """`predict_words` for a module whose forward is (input_ids, attention_mask) -> (intent_logits,
    slot_logits), with `labels` and `tokenizer` attributes: EncoderNLUModel and NLUEnsemble."""

    labels: NLULabels
    tokenizer: Any

    @torch.inference_mode()
    def predict_words(self, batch: list[list[str]], batch_size: int = 64) -> list[NLUPrediction]:
        """Intent and one slot label per word for each utterance (a list of words), in order.

        Runs in eval mode (no dropout) and restores the previous mode afterwards.
        """
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__}.predict_words needs model.tokenizer")
        device = next(self.parameters()).device  # type: ignore[attr-defined]
        was_training = self.training  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]
        try:
            return self._predict(batch, batch_size, device)
        finally:
            self.train(was_training)  # type: ignore[attr-defined]

    def _predict(self, batch: list[list[str]], batch_size: int, device: torch.device) -> list[NLUPrediction]:
        out: list[NLUPrediction] = []
        for i in range(0, len(batch), batch_size):
            chunk = batch[i : i + batch_size]
            enc = encode_words(self.tokenizer, chunk, self.labels.max_length)
            intent_logits, slot_logits = self(enc["input_ids"].to(device), enc["attention_mask"].to(device))  # type: ignore[operator]
            out.extend(
                decode_predictions(
                    intent_logits.cpu(), slot_logits.cpu(), enc["word_starts"], [len(w) for w in chunk], self.labels
                )
            )
        return out


class EncoderNLUModel(WordPredictor, nn.Module):
    """T5 encoder + intent head (masked mean pooling) + slot head (per token, read at first sub-words).

    `labels` sizes the heads and names their outputs; `tokenizer` (optional until predict_words or
    save_pretrained needs it) is a plain attribute, not part of the module's state.
    """

    def __init__(self, encoder: nn.Module, labels: NLULabels, tokenizer: Any = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.labels = labels
        self.tokenizer = tokenizer
        hidden = encoder.config.d_model
        self.dropout = nn.Dropout(getattr(encoder.config, "dropout_rate", 0.1))
        self.intent_head = nn.Linear(hidden, len(labels.intents))
        self.slot_head = nn.Linear(hidden, len(labels.slot_labels))
        self.ngrams = TokenNgrams(labels.ngram_buckets, labels.ngram_orders, hidden) if labels.ngram_buckets else None

    @property
    def config(self) -> Any:
        return self.encoder.config

    @classmethod
    def from_seq2seq(cls, seq2seq: nn.Module, labels: NLULabels, tokenizer: Any = None) -> EncoderNLUModel:
        """A fresh encoder model with `seq2seq`'s encoder weights (shared embeddings included) and new heads."""
        import copy

        config = copy.deepcopy(seq2seq.config)
        config.architectures = None
        encoder = _encoder_class(config.model_type)(config)
        source = seq2seq.state_dict()
        wanted = encoder.state_dict()
        missing = [k for k in wanted if k not in source]
        if missing:
            raise ValueError(f"seq2seq model lacks encoder weights {missing[:5]} (and {max(0, len(missing) - 5)} more)")
        mismatched = [k for k in wanted if source[k].shape != wanted[k].shape]
        if mismatched:
            raise ValueError(f"encoder weight shapes differ from the seq2seq model's: {mismatched[:5]}")
        encoder.load_state_dict({k: source[k] for k in wanted}, strict=True)
        return cls(encoder, labels, tokenizer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, T] -> intent_logits [B, I], slot_logits [B, T, S]."""
        if self.ngrams is not None:
            ngram_features, ngram_count = self.ngrams(input_ids, attention_mask)  # [B, T, H], [B, 1]
        if self.ngrams is not None and self.labels.ngram_inputs:
            embeds = self.encoder.get_input_embeddings()(input_ids) + ngram_features
            states = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        else:
            states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # [B, T, 1]
        # Mean over real tokens only; clamp keeps an all-padding row finite instead of NaN.
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, H]
        if self.ngrams is not None:
            pooled = pooled + ngram_features.sum(dim=1) / ngram_count.clamp(min=1.0)
        intent_logits = self.intent_head(self.dropout(pooled))
        slot_logits = self.slot_head(self.dropout(states))
        return intent_logits, slot_logits

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, model_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.json, model.safetensors, nlu_labels.json and the tokenizer, atomically.

        `state_dict` (default: this module's) lets a caller save gathered weights, e.g.
        core.checkpoint.export_hf with ZeRO-3's consolidated fp32 parameters.
        """
        from safetensors.torch import save_file

        from core.fsutil import atomic_dir

        if self.tokenizer is None:
            raise ValueError("EncoderNLUModel.save_pretrained: set model.tokenizer first (the directory must be self-contained)")
        state_dict = self.state_dict() if state_dict is None else state_dict
        # The tied embedding (encoder.shared is encoder.encoder.embed_tokens) is stored once, under
        # its first name; safetensors refuses shared storage and load_model re-ties it.
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, tensor in state_dict.items():
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen:
                continue
            seen.add(pointer)
            tensors[key] = tensor.detach().to("cpu").contiguous()
        with atomic_dir(model_dir) as tmp:
            config = self.encoder.config
            config.architectures = [type(self.encoder).__name__]
            config.save_pretrained(tmp)
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            self.labels.write(tmp)
            self.tokenizer.save_pretrained(str(tmp))
        return Path(model_dir)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> EncoderNLUModel:
        """Load a directory written by save_pretrained (labels and tokenizer included), in eval mode."""
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoTokenizer

        from core.modeldir import check_model_dir

        model_dir = check_model_dir(model_dir, "NLU model directory")
        labels = NLULabels.read(model_dir)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        model = cls(_encoder_class(config.model_type)(config), labels, tokenizer)
        # strict: any missing or extra weight is a broken directory (load_model accounts for the
        # tied embedding, stored once).
        load_model(model, str(model_dir / WEIGHTS_FILE), strict=True)
        model.eval()
        return model

class NLUEnsemble(WordPredictor, nn.Module):
    """Several EncoderNLUModels with the same labels, combined by averaging their log-probabilities
    (intent [B, I] and slots [B, T, S]); forward has the members' signature, so prediction, ONNX export
    and int8 quantization treat it as one model (one graph holding every member).

    Members trained from different starts or seeds make partly different errors, and the average of
    their distributions is right more often than any one of them, at members x the size and latency.
    Saved as a directory with nlu_labels.json (`members` lists the sub-directories), the tokenizer,
    the first member's config.json, and one whole model directory per member.
    """

    def __init__(self, members: list[EncoderNLUModel], labels: NLULabels, tokenizer: Any = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an NLU ensemble needs at least 2 members, got {len(members)}")
        for i, member in enumerate(members):
            mine, theirs = member.labels, labels
            if (mine.intents, mine.slot_labels, mine.max_length) != (theirs.intents, theirs.slot_labels, theirs.max_length):
                raise ValueError(f"ensemble member {i} has other intents, slot labels or max_length than member 0")
            if member.config.vocab_size != members[0].config.vocab_size:
                raise ValueError(f"ensemble member {i} has vocabulary size {member.config.vocab_size}, "
                                 f"member 0 {members[0].config.vocab_size}: they must share one tokenizer")
        self.members = nn.ModuleList(members)
        self.labels = labels
        self.tokenizer = tokenizer

    @property
    def config(self) -> Any:
        return self.members[0].config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, T] -> mean log-probabilities: intent [B, I], slots [B, T, S]."""
        intents, slots = [], []
        for member in self.members:
            intent_logits, slot_logits = member(input_ids, attention_mask)
            intents.append(intent_logits.float().log_softmax(dim=-1))
            slots.append(slot_logits.float().log_softmax(dim=-1))
        return torch.stack(intents).mean(dim=0), torch.stack(slots).mean(dim=0)

    def save_pretrained(self, model_dir: str | os.PathLike) -> Path:
        """Write the ensemble directory (members as member-0/, member-1/, ...), atomically."""
        from core.fsutil import atomic_dir

        if self.tokenizer is None:
            raise ValueError("NLUEnsemble.save_pretrained: set model.tokenizer first (the directory must be self-contained)")
        names = [f"member-{i}" for i in range(len(self.members))]
        # The members carry their own n-gram settings; the ensemble's file names them instead.
        labels = replace(self.labels, ngram_buckets=0, members=names)
        with atomic_dir(model_dir) as tmp:
            for name, member in zip(names, self.members):
                member.save_pretrained(tmp / name)
            self.config.save_pretrained(tmp)
            labels.write(tmp)
            self.tokenizer.save_pretrained(str(tmp))
        return Path(model_dir)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> NLUEnsemble:
        """Load a directory written by save_pretrained, in eval mode; member paths must stay inside it."""
        from transformers import AutoTokenizer

        from core.fsutil import safe_path
        from core.modeldir import check_model_dir

        model_dir = check_model_dir(model_dir, "NLU ensemble directory")
        labels = NLULabels.read(model_dir)
        if not labels.members:
            raise ValueError(f"{model_dir / LABELS_FILE}: no members; not an ensemble directory")
        members = [EncoderNLUModel.from_pretrained(safe_path(model_dir, name)) for name in labels.members]
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        return cls(members, labels, tokenizer).eval()


def nlu_loss(
    intent_logits: torch.Tensor,
    slot_logits: torch.Tensor,
    word_starts: torch.Tensor,
    intent_labels: torch.Tensor,
    slot_labels: torch.Tensor,
    slot_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Intent CE + slot_weight * slot CE over first sub-words of real (non-truncated) words.

    intent_logits [B, I], slot_logits [B, T, S], word_starts [B, W] (-1: no token), intent_labels [B],
    slot_labels [B, W] (IGNORE_INDEX for padding words). Returns (loss, {"intent_loss", "slot_loss"}).
    """
    word_logits = gather_word_logits(slot_logits, word_starts)  # [B, W, S]
    targets = slot_labels.masked_fill(word_starts < 0, IGNORE_INDEX)
    if bool((intent_labels != IGNORE_INDEX).any()):
        intent_loss = nn.functional.cross_entropy(intent_logits.float(), intent_labels, ignore_index=IGNORE_INDEX)
    else:  # a batch of teacher-labelled utterances only: no gold intent
        intent_loss = intent_logits.sum() * 0.0
    if bool((targets != IGNORE_INDEX).any()):
        slot_loss = nn.functional.cross_entropy(
            word_logits.float().reshape(-1, word_logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
    else:  # every word truncated away: no slot signal, but keep the graph connected
        slot_loss = word_logits.sum() * 0.0
    return intent_loss + slot_weight * slot_loss, {"intent_loss": intent_loss.detach(), "slot_loss": slot_loss.detach()}


def nlu_teacher_loss(
    intent_logits: torch.Tensor,
    slot_logits: torch.Tensor,
    teacher_intent: torch.Tensor,
    teacher_slots: torch.Tensor,
    word_starts: torch.Tensor,
    temperature: float = 2.0,
    slot_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher term of a distilled NLU student: T^2 KL(teacher_T || student_T) of the intent
    distributions, plus slot_weight x the same KL of the slot distributions averaged over the first
    sub-words of real words. Both models read the same input ids, so `word_starts` serves both."""
    t = temperature

    def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:  # [N, C] -> [N]
        p = nn.functional.log_softmax(teacher.float() / t, dim=-1)
        q = nn.functional.log_softmax(student.float() / t, dim=-1)
        return (p.exp() * (p - q)).sum(-1) * t * t

    intent_kd = kl(intent_logits, teacher_intent).mean()
    words = word_starts >= 0
    if bool(words.any()):
        student_words = gather_word_logits(slot_logits, word_starts)[words]
        teacher_words = gather_word_logits(teacher_slots, word_starts)[words]
        slot_kd = kl(student_words, teacher_words).mean()
    else:
        slot_kd = slot_logits.sum() * 0.0
    return intent_kd + slot_weight * slot_kd, {"intent_kd": intent_kd.detach(), "slot_kd": slot_kd.detach()}


def count_parameters(model: nn.Module) -> int:
    """Every parameter: encoder, heads and the n-gram table (an ensemble: all of its members)."""
    return int(sum(p.numel() for p in model.parameters()))


def gather_word_logits(slot_logits: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    """slot_logits [B, T, S] at word_starts [B, W] -> [B, W, S] (rows for -1 hold token 0's logits)."""
    index = word_starts.clamp(min=0).unsqueeze(-1).expand(-1, -1, slot_logits.shape[-1])
    return slot_logits.gather(1, index)


def decode_predictions(
    intent_logits: torch.Tensor,
    slot_logits: torch.Tensor,
    word_starts: torch.Tensor,
    num_words: list[int],
    labels: NLULabels,
) -> list[NLUPrediction]:
    """Argmax intent and per-word slot labels; words truncated away get "Other"."""
    from massive.format import NLUPrediction

    intent_ids = intent_logits.argmax(dim=-1).tolist()
    slot_ids = gather_word_logits(slot_logits, word_starts).argmax(dim=-1).tolist()
    starts = word_starts.tolist()
    out = []
    for b, n in enumerate(num_words):
        slots = [labels.slot_labels[slot_ids[b][i]] if starts[b][i] >= 0 else OTHER for i in range(n)]
        out.append(NLUPrediction(intent=labels.intents[intent_ids[b]], slots=slots))
    return out


# ----------------------------------------------------------------------------- fine-tuning pieces
# What student/finetune.py runs for `--head encoder` (student.kinds hands them over); cfg is a
# student.config.FinetuneConfig, `data` a student.finetune.FinetuneData.


def attach_nlu_heads(seq2seq: Any, cfg: Any, tokenizer: Any, data: Any) -> EncoderNLUModel:
    """An EncoderNLUModel on the encoder of `seq2seq` (the backbone finetune built), with fresh intent
    and slot heads over `data`'s labels."""
    labels = NLULabels(
        intents=data.intents,
        slot_labels=data.slot_labels,
        max_length=cfg.max_source_len,
        source_model=cfg.init,
        extra={"locales": data.train_locales, "setting": cfg.setting},
        ngram_buckets=cfg.ngram_buckets,
        ngram_orders=list(cfg.ngram_orders),
        ngram_inputs=cfg.ngram_inputs,
    )
    model = EncoderNLUModel.from_seq2seq(seq2seq, labels, tokenizer)
    if model.ngrams is not None:
        model.ngrams.embed.sparse = sparse_ngrams(cfg)
    return model


def sparse_ngrams(cfg: Any) -> bool:
    """Whether the n-gram table trains with sparse gradients. A batch touches ~5% of its rows: sparse
    gradients and Adafactor's update on those rows (core.optim.RowSparseAdafactor, the dense update
    exactly) halve an NLU step. AdamW's moments move untouched rows and ZeRO partitions flat dense
    gradients: dense there."""
    return cfg.ngram_buckets > 0 and cfg.train.optimizer == "adafactor" and cfg.train.zero_stage == 0


def examples_as_items(tokenizer: Any, examples: list[Any], cfg: Any) -> tuple[list[Any], dict[str, int]]:
    """The encoder's training items are the examples themselves (it tokenizes per batch); nothing is cut here."""
    return list(examples), {}


def example_length(example: Any) -> int:
    """Words of an example: what group_by_length sorts the encoder's items by."""
    return len(example.words)


def collate_encoder(examples: list[Any], tokenizer: Any, labels: NLULabels, max_length: int) -> dict[str, torch.Tensor]:
    """encode_words output plus intent_labels [B] and slot_labels [B, W] (-100 beyond the words)."""
    batch = encode_words(tokenizer, [ex.words for ex in examples], max_length)
    intent_index = {name: i for i, name in enumerate(labels.intents)}
    # Teacher-labelled utterances (intent None) have no gold label: the CE skips them.
    batch["intent_labels"] = torch.tensor([IGNORE_INDEX if ex.intent is None else intent_index[ex.intent]
                                           for ex in examples], dtype=torch.long)
    batch["slot_labels"] = slot_label_ids([ex.slots or () for ex in examples], labels.slot_labels,
                                          batch["word_starts"].shape[1])
    return batch


def collate_examples(examples: list[Any], tokenizer: Any, model: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """`collate_encoder` in the signature every kind's collate has (student.kinds.Training)."""
    return collate_encoder(examples, tokenizer, model.labels, cfg.max_source_len)


def encoder_nlu_loss(engine: Any, batch: dict[str, torch.Tensor], cfg: Any,
                     teacher: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Intent CE + slot CE of one batch; with a `teacher` (encoder NLU, frozen):
    (1 - w) * gold loss + w * teacher term (finetune.teacher_weight)."""
    intent_logits, slot_logits = engine(batch["input_ids"], batch["attention_mask"])
    loss, parts = nlu_loss(
        intent_logits, slot_logits, batch["word_starts"], batch["intent_labels"], batch["slot_labels"],
        slot_weight=cfg.slot_loss_weight,
    )
    if teacher is not None:
        with torch.inference_mode():
            t_intent, t_slots = teacher(batch["input_ids"], batch["attention_mask"])
        kd, kd_parts = nlu_teacher_loss(intent_logits, slot_logits, t_intent.clone(), t_slots.clone(),
                                        batch["word_starts"], cfg.teacher_temperature, cfg.slot_loss_weight)
        w = cfg.teacher_weight
        loss = (1.0 - w) * loss + w * kd
        parts = {**parts, **kd_parts}
    return loss, parts


def evaluate_examples(engine: Any, model: Any, tokenizer: Any, items: list[Any], examples: list[Any], cfg: Any,
                      device: str, synced: bool, intents: list[str] | None) -> tuple[float, float, list[NLUPrediction]]:
    """One dev batch: (loss times examples, examples, argmax predictions)."""
    batch = collate_encoder(examples, tokenizer, model.labels, cfg.max_source_len)
    batch = {k: v.to(device) for k, v in batch.items()}
    intent_logits, slot_logits = engine(batch["input_ids"], batch["attention_mask"])
    loss, _ = nlu_loss(intent_logits, slot_logits, batch["word_starts"], batch["intent_labels"],
                       batch["slot_labels"], slot_weight=cfg.slot_loss_weight)
    preds = decode_predictions(intent_logits.cpu(), slot_logits.cpu(), batch["word_starts"].cpu(),
                               [len(ex.words) for ex in examples], model.labels)
    return loss.item() * len(examples), float(len(examples)), preds
