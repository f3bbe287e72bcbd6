"""SentencePiece unigram tokenizer with byte fallback, wrapped as a Hugging Face fast tokenizer.

Ids (docs/internals.md): <pad>=0, </s>=1, <unk>=2, [CLM]=3, <sep>=4, <extra_id_0>.. follow, then
the 256 byte pieces <0x00>..<0xFF>, then the learned pieces, then the whole MASSIVE label tokens
(`<Other>`, `<alarm_set>`, ...; not special, never matched inside other text).

Normalisation is the identity (`normalization_rule_name="identity"`, extra whitespace kept): the
SentencePiece default `nmt_nfkc` rewrites text (full-width forms, compatibility characters, runs of
spaces), and then `decode(encode(s)) != s`. With the identity rule and byte fallback every string
round-trips exactly and no input ever maps to <unk>.

The saved directory holds `tokenizer.json` (a `tokenizers` Unigram model built from the trained
SentencePiece pieces and scores: Metaspace pre-tokenizer, ByteFallback decoder, a post-processor
appending </s>), `tokenizer_config.json`, the original `spm.model` and
`training.json` (trainer settings and the training text's size).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import NO_SPACE_LOCALES
from core.fsutil import atomic_dir
from core.tables import markdown_table
from data_prep.config import RESERVED_TOKENS, TokenizerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, CLM, SEP = RESERVED_TOKENS
SPACE_PIECE = "\u2581"  # SentencePiece's visible space, "▁"
UNMATCHABLE_SCORE = -1e9


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the reserved tokens of a tokenizer."""

    pad: int
    eos: int
    unk: int
    clm: int
    sep: int
    sentinels: list[int]

    def all_ids(self) -> list[int]:
        return [self.pad, self.eos, self.unk, self.clm, self.sep, *self.sentinels]


def sentinel_tokens(num_sentinels: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(num_sentinels)]


def train_tokenizer(
    sentences: Iterable[str],
    out_dir: str | os.PathLike,
    cfg: TokenizerConfig | None = None,
    seed: int = 0,
    info: dict[str, Any] | None = None,
    label_tokens: Sequence[str] = (),
) -> Path:
    """Train a SentencePiece unigram model on `sentences` and save a HF fast tokenizer in `out_dir`.

    `sentences` is the already sampled training text (see data_prep.corpus); all of it is used, in
    the given order, so the result is a function of the text, the config and the seed. `info` is
    stored in training.json (e.g. sentences per language). `label_tokens` (`<alarm_set>`, ...) are
    appended after the learned pieces as whole tokens. Returns `out_dir`.
    """
    import sentencepiece as spm

    cfg = cfg or TokenizerConfig()
    texts = [s for s in sentences if s and not s.isspace()]
    if not texts:
        raise ValueError("train_tokenizer: no training text (all sentences empty)")
    spm.set_random_generator_seed(seed)
    model = _BytesSink()
    started = time.perf_counter()
    try:
        _train_spm(spm, texts, model, cfg)
    except RuntimeError as e:
        if "required_chars" in str(e):
            raise ValueError(
                f"tokenizer.vocab_size={cfg.vocab_size} cannot hold the characters that "
                f"tokenizer.character_coverage={cfg.character_coverage} requires for this text ({e}); "
                "raise vocab_size or lower character_coverage (rare characters fall back to bytes)"
            ) from e
        raise
    train_seconds = time.perf_counter() - started
    processor = spm.SentencePieceProcessor(model_proto=model.data)
    fast = _to_fast_tokenizer(processor, cfg.num_sentinels, label_tokens)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, kind="tokenizer") as tmp:
        fast.save_pretrained(str(tmp))
        (tmp / "spm.model").write_bytes(model.data)
        meta = {
            "config": asdict(cfg),
            "seed": seed,
            "num_training_sentences": len(texts),
            "num_training_chars": sum(len(t) for t in texts),
            "vocab_size": len(fast),
            "num_label_tokens": len(label_tokens),
            "train_seconds": round(train_seconds, 3),
            **(info or {}),
        }
        (tmp / "training.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def _train_spm(spm: Any, texts: list[str], model: _BytesSink, cfg: TokenizerConfig) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="unigram",
        vocab_size=cfg.vocab_size,
        hard_vocab_limit=cfg.hard_vocab_limit,
        character_coverage=cfg.character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=cfg.split_digits,
        max_sentence_length=cfg.max_sentence_length,
        # All given text is used: sampling already happened upstream, so the trainer must not
        # draw its own subset.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=cfg.num_threads,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece=PAD,
        eos_piece=EOS,
        unk_piece=UNK,
        control_symbols=[CLM, SEP, *sentinel_tokens(cfg.num_sentinels)],
        minloglevel=2,
    )


class _BytesSink:
    """File-like target for SentencePiece's `model_writer` (keeps the model in memory)."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _to_fast_tokenizer(
    processor: Any, num_sentinels: int, label_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Wrap a trained SentencePiece unigram model as a `tokenizers` Unigram fast tokenizer, with
    `label_tokens` appended as whole tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    # SentencePiece never matches control and byte pieces against text; a `tokenizers` Unigram
    # model matches every vocabulary piece, so those get a score no segmentation would choose
    # (text "<sep>" stays text; byte pieces are still reached through byte fallback).
    vocab = [
        (
            processor.id_to_piece(i),
            UNMATCHABLE_SCORE
            if processor.is_control(i) or processor.is_byte(i) or processor.is_unknown(i)
            else processor.get_score(i),
        )
        for i in range(processor.get_piece_size())
    ]
    specials = [PAD, EOS, UNK, CLM, SEP, *sentinel_tokens(num_sentinels)]
    for expected_id, token in enumerate(specials):
        if vocab[expected_id][0] != token:
            raise RuntimeError(
                f"SentencePiece put {vocab[expected_id][0]!r} at id {expected_id}, expected {token!r}"
            )

    tok = Tokenizer(Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=True))
    # Identity normalisation apart from SentencePiece's own space handling: one "▁" is always
    # prepended (add_dummy_prefix; Metaspace's own prepending skips text that already starts with a
    # space, which would lose a leading space) and spaces become "▁". Splitting before each "▁"
    # mirrors SentencePiece's split_by_whitespace.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE_PIECE), normalizers.Replace(" ", SPACE_PIECE)]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_PIECE, prepend_scheme="never", split=True)
    # "▁" back to spaces, byte pieces back to UTF-8, then drop the one prepended space.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE_PIECE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, processor.eos_id())]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    # Not special: `decode(..., skip_special_tokens=True)`, which every predictor uses, keeps them.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in label_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=specials[3:],
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=1_000_000,
    )


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory written by train_tokenizer (or any model directory holding it)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (train one with `polyteacher data tokenizer`)")
    tok = AutoTokenizer.from_pretrained(str(path))
    special_ids(tok)  # fail early on a tokenizer without the reserved tokens
    return tok


def sentinel_ids(vocab: dict[str, int]) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... in `vocab`, up to the first one missing."""
    ids = []
    while f"<extra_id_{len(ids)}>" in vocab:
        ids.append(vocab[f"<extra_id_{len(ids)}>"])
    return ids


def num_word_sentinels(tokenizer: Any) -> int:
    """How many `<extra_id_i>` sentinels `tokenizer` has, counted from 0 (they mark words)."""
    count = len(sentinel_ids(tokenizer.get_vocab()))
    if not count:
        raise ValueError("finetune.sentinels=true needs a tokenizer with <extra_id_0>, <extra_id_1>, ... sentinels")
    return count


def special_ids(tokenizer: Any) -> SpecialIds:
    """The reserved ids of `tokenizer`; raises ValueError when one is missing or misplaced."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in RESERVED_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the reserved token(s) {', '.join(missing)}")
    ids = {t: vocab[t] for t in RESERVED_TOKENS}
    if [ids[t] for t in (PAD, EOS, UNK)] != [0, 1, 2]:
        raise ValueError(
            f"tokenizer has <pad>, </s>, <unk> at {ids[PAD]}, {ids[EOS]}, {ids[UNK]}; expected 0, 1, 2"
        )
    sentinels = sentinel_ids(vocab)
    return SpecialIds(
        pad=ids[PAD], eos=ids[EOS], unk=ids[UNK], clm=ids[CLM], sep=ids[SEP], sentinels=sentinels
    )


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds a finished tokenizer (atomic_dir only ever publishes whole ones)."""
    out_dir = Path(out_dir)
    return all(
        (out_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "training.json")
    )


# ----------------------------------------------------------------------------- evaluation



def evaluate_tokenizer(tokenizer: Any, texts_by_locale: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Per locale: fertility (tokens per word, or per character for NO_SPACE_LOCALES), unknown-token
    rate, exact round-trip rate (decode(encode(s), skip_special_tokens=True) == s) and sizes.

    Token counts exclude the appended eos.
    """
    unk_id = tokenizer.unk_token_id
    rows = []
    for loc, texts in texts_by_locale.items():
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        decoded = tokenizer.batch_decode(ids, skip_special_tokens=True) if texts else []
        num_tokens = sum(len(x) for x in ids)
        num_unknown = sum(x.count(unk_id) for x in ids)
        per_char = loc in NO_SPACE_LOCALES
        units = sum(len("".join(t.split())) if per_char else len(t.split()) for t in texts)
        exact = sum(a == b for a, b in zip(texts, decoded))
        rows.append(
            {
                "locale": loc,
                "num_texts": len(texts),
                "num_tokens": num_tokens,
                "fertility": num_tokens / units if units else 0.0,
                "fertility_unit": "char" if per_char else "word",
                "unknown_rate": num_unknown / num_tokens if num_tokens else 0.0,
                "round_trip_rate": exact / len(texts) if texts else 1.0,
            }
        )
    return rows


def tokenizer_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The evaluate_tokenizer rows as a plain-text or Markdown table, with a mean row."""
    cols = ["locale", "texts", "tokens", "fertility", "per", "unk rate", "round trip"]
    body = [
        [
            r["locale"],
            str(r["num_texts"]),
            str(r["num_tokens"]),
            f"{r['fertility']:.3f}",
            r["fertility_unit"],
            f"{r['unknown_rate']:.4f}",
            f"{r['round_trip_rate']:.4f}",
        ]
        for r in rows
    ]
    if rows:
        n = len(rows)
        body.append(
            [
                "mean",
                str(sum(r["num_texts"] for r in rows)),
                str(sum(r["num_tokens"] for r in rows)),
                f"{sum(r['fertility'] for r in rows) / n:.3f}",
                "",
                f"{sum(r['unknown_rate'] for r in rows) / n:.4f}",
                f"{sum(r['round_trip_rate'] for r in rows) / n:.4f}",
            ]
        )
    if markdown:
        return markdown_table(cols, body).rstrip("\n")
    widths = [max(len(c), *(len(row[i]) for row in body)) if body else len(c) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 4) else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*cols), "-" * (sum(widths) + 2 * (len(cols) - 1))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)
