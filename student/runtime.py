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
from collections.abc import Callable
from dataclasses import dataclass
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
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise FileNotFoundError(f"{export_dir}: no such directory; pass an ONNX export directory written by "
                                "`polyteacher export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        if (export_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{export_dir}: a Hugging Face model directory, not an ONNX export (no {MANIFEST}); export it "
                f"with `polyteacher export --model {export_dir} --out {export_dir}-onnx [--int8]` and pass "
                f"{export_dir}-onnx instead") from e
        raise FileNotFoundError(f"{path}: not an ONNX export directory (no {MANIFEST}); create one with `polyteacher export`") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path}{where}: invalid JSON: {e}; export the model again with `polyteacher export`") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object; export the model again with `polyteacher export`")
    for key in ("kind", "precision", "graphs", "size_bytes", "special_ids", "max_source_length"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    if data["kind"] not in GRAPH_KINDS:
        raise ValueError(f"{path}: kind {data['kind']!r} is not one of {', '.join(map(repr, GRAPH_KINDS))}")
    if data["precision"] not in ("fp32", "int8"):
        raise ValueError(f"{path}: precision {data['precision']!r} is not one of 'fp32', 'int8'")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {data.get('format_version')!r} is not supported (this runtime reads "
            f"{FORMAT_VERSION}); export the model again with `polyteacher export`"
        )
    if not isinstance(data["graphs"], dict) or not all(isinstance(g, dict) and isinstance(g.get("file"), str)
                                                       for g in data["graphs"].values()):
        raise ValueError(f"{path}: graphs must map each graph name to {{\"file\": ...}}")
    for name, info in data["graphs"].items():
        inside(export_dir, info["file"], f"graphs.{name}.file")
    if "tokenizer" in data:
        inside(export_dir, data["tokenizer"], "tokenizer")
    if isinstance(data.get("weights"), dict) and "file" in data["weights"]:
        inside(export_dir, data["weights"]["file"], "weights.file")
    return data


def inside(export_dir: str | os.PathLike, relative: Any, key: str) -> Path:
    """export_dir / relative, refused (ValueError naming the manifest key) unless it is a relative path
    that stays inside export_dir once symbolic links are resolved: a manifest must not make the
    runtime read files elsewhere."""
    export_dir = Path(export_dir)
    where = export_dir / MANIFEST
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise ValueError(f"{where}: {key} must be a file name inside the export directory, got {relative!r}")
    target = (export_dir / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(export_dir.resolve()):
        raise ValueError(f"{where}: {key} {relative!r} points outside the export directory {export_dir}; refusing "
                         "to read it (export the model again with `polyteacher export`)")
    return export_dir / relative


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

        tokenizer_path = inside(self.model_dir, self.manifest.get("tokenizer", "tokenizer.json"), "tokenizer")
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
            name: ort.InferenceSession(str(inside(self.model_dir, info["file"], f"graphs.{name}.file")), options,
                                       providers=providers)
            for name, info in self.manifest["graphs"].items()
        }
        self.graph_kind = GRAPH_KINDS[self.kind]
        self.graph_kind.read_manifest(self)

    def _read_seq2seq_manifest(self) -> None:
        self.num_layers = int(self.manifest["num_decoder_layers"])
        self._cross = [f"cross.{i}.{k}" for i in range(self.num_layers) for k in ("key", "value")]
        self._past = [f"past.{i}.self.{k}" for i in range(self.num_layers) for k in ("key", "value")]
        # The target order the model was fine-tuned on (data_prep.massive.INTENT_FIRST_KEY).
        self.intent_first = model_intent_first(self.manifest.get("model_config") or {})
        self.sentinels = model_sentinels(self.manifest.get("model_config") or {})
        self.spans = model_spans(self.manifest.get("model_config") or {})

    def _read_nlu_manifest(self) -> None:
        labels = self.manifest["labels"]
        self.intents: list[str] = labels["intents"]
        self.slot_labels: list[str] = labels["slot_labels"]

    def source_text(self, words: list[str]) -> str:
        """The text the export's tokenizer encodes for one utterance (its kind's input format)."""
        return self.graph_kind.source_text(self, words)

    def _seq2seq_source(self, words: list[str]) -> str:
        return t2t_source(words, self.sentinels)

    def _nlu_source(self, words: list[str]) -> str:
        return " ".join(words)

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

        ids, _, truncated = self.encode([self.source_text(words) for words in batch])
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

        ids, offsets, tokens, truncated = self.encode_with_tokens([self.source_text(words) for words in batch])
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
        run = self.graph_kind.predict
        for k in range(0, len(order), self.batch_size):
            chunk = order[k : k + self.batch_size]
            chunk_preds, chunk_flags = run(self, [batch[i] for i in chunk])
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


@dataclass(frozen=True)
class GraphKind:
    """How the predictor runs the export of one model kind (the manifest's "kind"). The model kinds
    themselves are registered in student/kinds.py; this table stays here because the runtime must
    not import torch or transformers, which the registry's PyTorch side needs."""

    read_manifest: Callable[[OnnxPredictor], None]
    """Reads the kind's own manifest entries into the predictor."""
    source_text: Callable[[OnnxPredictor, list[str]], str]
    """The text the tokenizer encodes for one utterance's words."""
    predict: Callable[[OnnxPredictor, list[list[str]]], tuple[list[NLUPrediction], list[bool]]]
    """Predictions and truncation flags of one batch of word lists."""
    decodes: bool
    """Whether the export decodes (an encoder and a decoder graph) or classifies (one "model" graph)."""


GRAPH_KINDS: dict[str, GraphKind] = {
    "seq2seq": GraphKind(OnnxPredictor._read_seq2seq_manifest, OnnxPredictor._seq2seq_source,
                         OnnxPredictor._predict_seq2seq, decodes=True),
    "encoder_nlu": GraphKind(OnnxPredictor._read_nlu_manifest, OnnxPredictor._nlu_source,
                             OnnxPredictor._predict_nlu, decodes=False),
}


# ----------------------------------------------------------------------------- CLI

# A progress bar is drawn (on a terminal's stderr) only for inputs longer than this many lines.
PROGRESS_MIN_LINES = 200
# At most this many per-line errors are printed to stderr; every one is in the output as a record.
MAX_ERROR_MESSAGES = 20


class LineError(ValueError):
    """One input line that cannot be answered (not UTF-8, malformed JSON, unknown locale, empty)."""


def parse_line(raw: bytes, default_locale: str | None) -> tuple[str, str | None, dict[str, Any]]:
    """One input line (without its newline) -> (utterance, locale, extra output fields).

    A line whose first non-blank character is `{` is a JSON object with "utt" (the utterance) and
    optionally "locale" (a MASSIVE locale, else `default_locale`) and "id" (copied to the output);
    any other line is the utterance itself in `default_locale`."""
    from massive.format import MASSIVE_LOCALES

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save the input as UTF-8") from None
    extra: dict[str, Any] = {}
    locale = default_locale
    if text.lstrip().startswith("{"):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise LineError(f"malformed JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("utt"), str):
            raise LineError('a JSON line needs a string "utt" (and optionally "locale", "id")')
        if "locale" in row and row["locale"] is not None:
            if row["locale"] not in MASSIVE_LOCALES:
                raise LineError(f"unknown locale {row['locale']!r}; use a MASSIVE locale such as en-US, de-DE, ja-JP")
            locale = row["locale"]
        if "id" in row:
            extra["id"] = row["id"]
        text = row["utt"]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise LineError('"utt" holds a lone surrogate escape (\\ud800-\\udfff), which is not text') from None
    if not text.strip():
        raise LineError("empty utterance")
    return text, locale, extra


def _argv_bytes(arg: str) -> bytes:
    """The bytes the user passed (Python decodes argv with surrogateescape: undecodable bytes survive)."""
    return os.fsencode(arg)


class _Output:
    """JSONL to stdout, or to a file written under a temporary name and renamed when complete."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        if self.path is None:
            self.stream = sys.stdout
        else:
            self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            self.stream = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self, keep: bool) -> None:
        if self.path is None:
            self.stream.flush()
            return
        self.stream.close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def serve(predictor: OnnxPredictor, lines: Any, output: Any, default_locale: str | None, source: str,
          chunk_lines: int, progress: Any = None) -> tuple[int, int]:
    """Answer `lines` ((line number, bytes) pairs) in chunks of `chunk_lines`: every good line's
    prediction (one batched predictor call per chunk) and every bad line's {"line", "error"} record,
    in input order. Bad lines are also reported on stderr as `source:line: message` (the first
    MAX_ERROR_MESSAGES). Returns (answered, failed)."""
    answered = failed = 0

    def flush(chunk: list[tuple[int, Any]]) -> None:
        nonlocal answered
        good = [(n, item) for n, item in chunk if not isinstance(item, LineError)]
        words = [split_words(text, locale) for _, (text, locale, _) in good]
        preds, flags = predictor.predict_words_with_flags(words) if words else ([], [])
        results = {n: (item, w, p, f) for (n, item), w, p, f in zip(good, words, preds, flags)}
        for n, item in chunk:
            if isinstance(item, LineError):
                output.write({"line": n, "error": str(item)})
                continue
            (text, locale, extra), w, pred, truncated = results[n]
            output.write({"line": n, **extra, "utterance": text, "locale": locale, "intent": pred.intent,
                          "slots": slot_spans(w, list(pred.slots), locale), "labels": list(pred.slots), "words": w,
                          "truncated": truncated})
            answered += 1
        output.flush()
        if progress is not None:
            progress.update(len(chunk))

    chunk: list[tuple[int, Any]] = []
    for number, raw in lines:
        try:
            chunk.append((number, parse_line(raw, default_locale)))
        except LineError as e:
            failed += 1
            if failed <= MAX_ERROR_MESSAGES:
                print(f"polyteacher predict: {source}:{number}: {e}", file=sys.stderr)
            chunk.append((number, e))
        if len(chunk) >= chunk_lines:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    if failed > MAX_ERROR_MESSAGES:
        print(f"polyteacher predict: {source}: {failed - MAX_ERROR_MESSAGES} more bad lines (each is an "
              '{"line", "error"} record in the output)', file=sys.stderr)
    return answered, failed


def _numbered_lines(stream: Any) -> Any:
    """(line number from 1, the line's bytes without its line ending or a leading UTF-8 BOM)."""
    for number, raw in enumerate(stream, start=1):
        raw = raw.rstrip(b"\r\n")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield number, raw


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _progress_bar(total: int | None, enabled: bool) -> Any:
    """A tqdm bar on stderr when it is a terminal and the input is long (tqdm is optional: the runtime
    install does not need it)."""
    if not enabled or not sys.stderr.isatty() or (total is not None and total <= PROGRESS_MIN_LINES):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="utt", desc="predict", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="ONNX export directory (written by `polyteacher export`)")
    p.add_argument("--locale", default=None,
                   help="MASSIVE locale of the utterances, e.g. ja-JP (ja-JP, zh-CN, zh-TW split words into characters); "
                   "a JSONL line's own \"locale\" wins")
    p.add_argument("--input", default=None,
                   help="file of utterances, one per line, or JSONL lines {\"utt\": ..., \"locale\": ..., \"id\": ...} "
                   "(the two may be mixed); '-' or no --input and no utterances: standard input")
    p.add_argument("--output", default=None, help="write the JSONL answers to this file (default: standard output)")
    p.add_argument("--batch-size", type=int, default=32, help="utterances per onnxruntime call (default 32)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    p.add_argument("utterances", nargs="*", help="utterances to annotate (quote each one)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict intent and slots of utterances with an ONNX export (onnxruntime, no torch)",
        description=PREDICT_DESCRIPTION,
    )
    add_arguments(p)
    p.set_defaults(func=run_cli)


PREDICT_DESCRIPTION = (
    "Print one JSON object per utterance: its input line number, intent, slot spans, per-word labels, "
    "words and whether the utterance was truncated to the export's max_source_length. Utterances come "
    "from the arguments, from --input, or one per line from standard input (plain text or JSONL with "
    "\"utt\" and \"locale\"), answered in batches. A line that cannot be answered (not UTF-8, malformed "
    "JSON, unknown locale, empty) gets an {\"line\", \"error\"} record and a message on stderr; the rest "
    "are answered. Exit status: 0 when something was answered (or there was nothing to answer), 1 when "
    "every line was bad, 2 for a bad model or option."
)


def run_cli(args: argparse.Namespace) -> int:
    """`predict`: errors of the command itself (options, model) are one line on stderr and status 2."""
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python's exit from flushing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError) as e:
        print(f"polyteacher predict: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from massive.format import MASSIVE_LOCALES

    if args.threads < 1:
        raise ValueError(f"--threads: must be >= 1, got {args.threads}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.locale is not None and args.locale not in MASSIVE_LOCALES:
        raise ValueError(f"--locale: unknown locale {args.locale!r}; allowed: {', '.join(MASSIVE_LOCALES)}")
    if args.utterances and args.input:
        raise ValueError("give utterances as arguments or --input, not both")
    predictor = OnnxPredictor(args.model, num_threads=args.threads, batch_size=args.batch_size)
    total = None
    if args.utterances:
        source, lines = "argument", ((i, _argv_bytes(a)) for i, a in enumerate(args.utterances, start=1))
        total, chunk_lines, stream = len(args.utterances), args.batch_size, None
    elif args.input and args.input != "-":
        path = Path(args.input)
        if not path.is_file():
            raise FileNotFoundError(f"--input {path}: no such file")
        total = _count_lines(path)
        stream = open(path, "rb")  # noqa: SIM115
        source, lines, chunk_lines = str(path), _numbered_lines(stream), 8 * args.batch_size
    else:
        stream = None
        interactive = sys.stdin.isatty()
        source, lines = "stdin", _numbered_lines(sys.stdin.buffer)
        # A person typing gets each answer at once; a pipe is answered in batches.
        chunk_lines = 1 if interactive else 8 * args.batch_size
    output = _Output(args.output)
    progress = _progress_bar(total if total is not None else None, not args.no_progress)
    ok = False
    try:
        answered, failed = serve(predictor, lines, output, args.locale, source, chunk_lines, progress)
        ok = True
    finally:
        output.close(keep=ok)
        if progress is not None:
            progress.close()
        if stream is not None:
            stream.close()
    if failed and not answered:
        print(f"polyteacher predict: nothing answered: all {failed} lines of {source} were bad", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`polyteacher-predict`: the predict command alone (the runtime install, no torch)."""
    p = argparse.ArgumentParser(prog="polyteacher-predict", description=PREDICT_DESCRIPTION)
    add_arguments(p)
    try:
        return run_cli(p.parse_args(argv))
    except KeyboardInterrupt:
        print("polyteacher-predict: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
