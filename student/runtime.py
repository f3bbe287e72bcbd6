"""onnxruntime predictor for exported students, and `polyteacher predict`.

Serves a directory written by `polyteacher export` (student/export.py): reads manifest.json, the
graphs and tokenizer.json. Inference needs only onnxruntime, numpy and the `tokenizers` library:
this module never imports torch or transformers (tests/test_runtime.py checks it in a fresh process).

- seq2seq exports: `Annotate: w1 w2 ...` -> greedy decoding over the key/value cache (the encoder
  graph once, giving every decoder layer's cross-attention keys/values; then the decoder graph one
  token per step, starting from an empty self-attention cache, the whole batch at once; rows that
  reached eos are fed pad until every row is done) -> `parse_target`.
- encoder_nlu exports: one graph; the intent is the argmax of intent_logits, a word's slot label the
  argmax of slot_logits at the word's first sub-word (as student/nlu.py).

Utterances longer than the manifest's max_source_length tokens are truncated (words cut off are
labelled "Other"); `predict` says so with "truncated": true. Words are the whitespace-separated
words; in ja-JP, zh-CN and zh-TW every character of a non-ASCII chunk is a word (the MASSIVE
convention of data_prep.massive).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.modeldir import ONNX_MANIFEST

# A light module (no torch or datasets at import). split_words: MASSIVE words of a raw utterance
# (whitespace; ja/zh non-ASCII chunks split into characters), re-exported for `predict`.
from massive.format import OTHER, model_intent_first, model_sentinels, model_spans, split_words, t2t_source  # noqa: F401
from student.alignment import first_subword_indices, word_char_spans  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import numpy as np

    from massive.format import NLUPrediction

MANIFEST = ONNX_MANIFEST
# The manifest format this runtime reads (2: encoder + one decoder graph, weights in one shared file).
FORMAT_VERSION = 2


def read_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """manifest.json of an export directory, with its required keys checked."""
    path = Path(export_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not an ONNX export directory (no {MANIFEST}); create one with `polyteacher export`") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    for key in ("kind", "precision", "graphs", "size_bytes", "special_ids", "max_source_length"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    if data["kind"] not in ("seq2seq", "encoder_nlu"):
        raise ValueError(f"{path}: kind {data['kind']!r} is not one of 'seq2seq', 'encoder_nlu'")
    if data["precision"] not in ("fp32", "int8"):
        raise ValueError(f"{path}: precision {data['precision']!r} is not one of 'fp32', 'int8'")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {data.get('format_version')!r} is not supported (this runtime reads "
            f"{FORMAT_VERSION}); export the model again with `polyteacher export`"
        )
    return data


def slot_spans(words: list[str], labels: list[str], locale: str | None = None) -> list[dict[str, Any]]:
    """Runs of the same non-Other label as spans: {"slot", "value", "words", "start", "end"} (end exclusive)."""
    from massive.format import CHAR_SPLIT_LOCALES, slot_runs

    joiner = "" if locale in CHAR_SPLIT_LOCALES else " "
    return [{"slot": label, "value": joiner.join(words[i:j]), "words": words[i:j], "start": i, "end": j}
            for label, i, j in slot_runs(labels)]


class OnnxPredictor:
    """MASSIVE intent + slots from an ONNX export directory, with onnxruntime on the CPU.

    `num_threads`: onnxruntime intra-op threads (1 for latency measurements at batch 1).
    `batch_size`: utterances per encoder/decoder call in `predict_words`.
    `max_new_tokens`: generation budget per utterance (seq2seq); default the manifest's max_target_length.
    """

    def __init__(self, model_dir: str | os.PathLike, num_threads: int = 1, batch_size: int = 32,
                 max_new_tokens: int | None = None, providers: list[str] | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        self.kind: str = self.manifest["kind"]
        self.batch_size = batch_size
        self.max_source_length = int(self.manifest["max_source_length"])
        self.max_target_length = int(max_new_tokens or self.manifest.get("max_target_length") or 0)
        ids = self.manifest["special_ids"]
        self.pad_id, self.eos_id = int(ids["pad"]), int(ids["eos"])
        self.decoder_start_id = int(ids.get("decoder_start", self.pad_id))

        tokenizer_path = self.model_dir / self.manifest.get("tokenizer", "tokenizer.json")
        if not tokenizer_path.exists():
            raise FileNotFoundError(f"{tokenizer_path}: the export's tokenizer is missing")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_source_length)

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(str(self.model_dir / info["file"]), options, providers=providers)
            for name, info in self.manifest["graphs"].items()
        }
        if self.kind == "seq2seq":
            self.num_layers = int(self.manifest["num_decoder_layers"])
            self._cross = [f"cross.{i}.{k}" for i in range(self.num_layers) for k in ("key", "value")]
            self._past = [f"past.{i}.self.{k}" for i in range(self.num_layers) for k in ("key", "value")]
            # The target order the model was fine-tuned on (data_prep.massive.INTENT_FIRST_KEY).
            self.intent_first = model_intent_first(self.manifest.get("model_config") or {})
            self.sentinels = model_sentinels(self.manifest.get("model_config") or {})
            self.spans = model_spans(self.manifest.get("model_config") or {})
        else:
            labels = self.manifest["labels"]
            self.intents: list[str] = labels["intents"]
            self.slot_labels: list[str] = labels["slot_labels"]

    # ------------------------------------------------------------------ encoding

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]], list[bool]]:
        """Token ids (eos-terminated, truncated to max_source_length), offsets and whether each was truncated."""
        ids, offsets, _, truncated = self.encode_with_tokens(texts)
        return ids, offsets, truncated

    def encode_with_tokens(
        self, texts: list[str]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]], list[list[str]], list[bool]]:
        """As `encode`, plus each row's token strings (for word alignment)."""
        encodings = self.tokenizer.encode_batch(texts) if texts else []
        return ([e.ids for e in encodings], [e.offsets for e in encodings], [e.tokens for e in encodings],
                [bool(e.overflowing) for e in encodings])

    def pad(self, batch_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded input_ids and attention_mask [B, T] (int64)."""
        import numpy as np

        length = max((len(ids) for ids in batch_ids), default=1) or 1
        input_ids = np.full((len(batch_ids), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch_ids), length), dtype=np.int64)
        for b, ids in enumerate(batch_ids):
            input_ids[b, : len(ids)] = ids
            mask[b, : len(ids)] = 1
        return input_ids, mask

    # ------------------------------------------------------------------ seq2seq

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy decoding; returns each row's generated ids up to and including eos (no start token)."""
        import numpy as np

        max_new_tokens = max_new_tokens or self.max_target_length
        batch = input_ids.shape[0]
        cross = dict(zip(self._cross, self.sessions["encoder"].run(
            None, {"input_ids": input_ids, "attention_mask": attention_mask})))
        # Cross-attention K/V are fixed for the whole utterance; the self-attention cache starts empty
        # and grows by one per step.
        first = next(iter(cross.values()))
        empty = np.zeros((batch, first.shape[1], 0, first.shape[3]), dtype=first.dtype)
        past = dict.fromkeys(self._past, empty)
        next_ids = np.full(batch, self.decoder_start_id, dtype=np.int64)
        generated = np.full((batch, max_new_tokens), self.pad_id, dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        for step in range(max_new_tokens):
            outputs = self.sessions["decoder"].run(
                None, {"decoder_input_ids": next_ids[:, None], "encoder_attention_mask": attention_mask, **past, **cross}
            )
            next_ids = np.where(finished, self.pad_id, outputs[0][:, -1].argmax(-1)).astype(np.int64)
            generated[:, step] = next_ids
            finished |= next_ids == self.eos_id
            if finished.all():
                break
            past = dict(zip(self._past, outputs[1:]))
        out = []
        for row in generated.tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            out.append([t for t in row[:cut] if t != self.pad_id])
        return out

    def _predict_seq2seq(self, batch: list[list[str]]) -> tuple[list[NLUPrediction], list[bool]]:
        from massive.format import parse_target

        ids, _, truncated = self.encode([t2t_source(words, self.sentinels) for words in batch])
        input_ids, mask = self.pad(ids)
        generated = self.generate(input_ids, mask)
        texts = self.tokenizer.decode_batch(generated, skip_special_tokens=True)
        return [parse_target(text, len(words), intent_first=self.intent_first, words=words if self.spans else None)
                for text, words in zip(texts, batch)], truncated

    # ------------------------------------------------------------------ encoder NLU

    def nlu_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """intent_logits [B, I], slot_logits [B, T, S]."""
        intent, slots = self.sessions["model"].run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        return intent, slots

    def _predict_nlu(self, batch: list[list[str]]) -> tuple[list[NLUPrediction], list[bool]]:
        from massive.format import NLUPrediction

        ids, offsets, tokens, truncated = self.encode_with_tokens([" ".join(words) for words in batch])
        input_ids, mask = self.pad(ids)
        intent_logits, slot_logits = self.nlu_logits(input_ids, mask)
        intent_ids = intent_logits.argmax(-1)
        slot_ids = slot_logits.argmax(-1)  # [B, T]
        out = []
        for b, words in enumerate(batch):
            starts = first_subword_indices(offsets[b], word_char_spans(words)[1], tokens[b])
            slots = [self.slot_labels[int(slot_ids[b, t])] if t >= 0 else OTHER for t in starts]
            out.append(NLUPrediction(intent=self.intents[int(intent_ids[b])], slots=slots))
        return out, truncated

    # ------------------------------------------------------------------ public interface

    def predict_words_with_flags(self, batch: list[list[str]]) -> tuple[list[NLUPrediction], list[bool]]:
        """Predictions and per-utterance truncation flags, in input order (batched by length)."""
        for i, words in enumerate(batch):
            bad = [w for w in words if not w or any(ch.isspace() for ch in w)]
            if bad:
                raise ValueError(f"utterance {i}: words must be non-empty and without whitespace, got {bad[:3]!r}")
        order = sorted(range(len(batch)), key=lambda i: sum(len(w) + 1 for w in batch[i]))
        preds: list[Any] = [None] * len(batch)
        flags = [False] * len(batch)
        run = self._predict_seq2seq if self.kind == "seq2seq" else self._predict_nlu
        for k in range(0, len(order), self.batch_size):
            chunk = order[k : k + self.batch_size]
            chunk_preds, chunk_flags = run([batch[i] for i in chunk])
            for i, p, f in zip(chunk, chunk_preds, chunk_flags):
                preds[i], flags[i] = p, f
        return preds, flags

    def predict_words(self, batch: list[list[str]]) -> list[NLUPrediction]:
        """The evaluation interface: one NLUPrediction (intent, one slot label per word) per word list."""
        return self.predict_words_with_flags(batch)[0]

    def predict(self, utterance: str, locale: str | None = None) -> dict[str, Any]:
        """One raw utterance -> {"intent", "slots": [{"slot", "value", "words", "start", "end"}], "labels",
        "words", "truncated", "locale", "utterance"}. Empty or whitespace-only input gives no words,
        no slots and the model's intent for an empty utterance."""
        words = split_words(utterance, locale)
        (pred,), (truncated,) = self.predict_words_with_flags([words])
        return {
            "utterance": utterance,
            "locale": locale,
            "intent": pred.intent,
            "slots": slot_spans(words, list(pred.slots), locale),
            "labels": list(pred.slots),
            "words": words,
            "truncated": truncated,
        }


# ----------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict intent and slots of utterances with an ONNX export (onnxruntime, no torch)",
        description=(
            "Print one JSON object per utterance: intent, slot spans, per-word labels, words and whether "
            "the utterance was truncated to the export's max_source_length. Utterances come from the "
            "arguments, or one per line from standard input when none is given."
        ),
    )
    p.add_argument("--model", required=True, help="ONNX export directory (written by `polyteacher export`)")
    p.add_argument("--locale", default=None,
                   help="MASSIVE locale of the utterances, e.g. ja-JP (ja-JP, zh-CN, zh-TW split words into characters)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("utterances", nargs="*", help="utterances to annotate (quote each one)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from core.config import ConfigError

    if args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    if args.locale is not None:
        from massive.format import MASSIVE_LOCALES

        if args.locale not in MASSIVE_LOCALES:
            raise ConfigError(f"--locale: unknown locale {args.locale!r}; allowed: {', '.join(MASSIVE_LOCALES)}")
    predictor = OnnxPredictor(args.model, num_threads=args.threads)
    utterances = args.utterances if args.utterances else (line.rstrip("\n") for line in sys.stdin)
    for utterance in utterances:
        print(json.dumps(predictor.predict(utterance, args.locale), ensure_ascii=False), flush=True)
    return 0
