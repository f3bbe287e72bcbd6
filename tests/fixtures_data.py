"""Data fixtures shared by tests: small tokenizers and packed data built from the data root.

- `tiny_tokenizer_dir`: a HF fast tokenizer (vocab 2000, 100 sentinels) trained on a few hundred
  sentences of ten locales of different scripts (en-US de-DE fr-FR ru-RU ar-SA hi-IN th-TH ja-JP
  zh-CN my-MM); byte fallback makes every other script encodable too.
- `multilingual_tokenizer_dir`: the same recipe on all 48 locales (vocab 4000).
- `tiny_packed_dir`: packed train/heldout data (seq_len 64) with the tiny tokenizer.

Training text is the first lines of each locale's Tatoeba and NTREX files plus MASSIVE train
utterances (never dev/test, never FLORES).
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
from pathlib import Path

import pytest

TINY_LOCALES = ["en-US", "de-DE", "fr-FR", "ru-RU", "ar-SA", "hi-IN", "th-TH", "ja-JP", "zh-CN", "my-MM"]


def squash_tables(text: str) -> str:
    """Markdown tables with one space around every cell and `---` separators (tabulate pads cells to
    the column width), so that a test can look for `| en-US | 200 | n/a |`."""
    out = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):  # the header separator
                cells = ["---"] * len(cells)
            line = "| " + " | ".join(cells) + " |"
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _first_lines(path: Path, n: int) -> list[str]:
    if not path.exists():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in itertools.islice(f, n) if line.strip()]


def _massive_train_utterances(massive_dir: Path, locale: str, n: int) -> list[str]:
    path = massive_dir / f"{locale}.jsonl.gz"
    if not path.exists():
        return []
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["partition"] == "train":
                out.append(row["utt"])
                if len(out) >= n:
                    break
    return out


def sample_training_text(
    corpora_dir: Path, massive_dir: Path, locales: list[str], per_source: int
) -> list[str]:
    """A small multilingual training text: `per_source` lines per locale from each source."""
    texts: list[str] = []
    for loc in locales:
        texts += _first_lines(corpora_dir / "tatoeba" / f"{loc}.txt.gz", per_source)
        texts += _first_lines(corpora_dir / "ntrex" / f"{loc}.txt.gz", per_source)
        texts += _massive_train_utterances(massive_dir, loc, per_source)
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, corpora_dir: Path, massive_dir: Path) -> Path:
    """A tiny HF fast tokenizer directory (vocab 2000, 100 sentinels; trains in a few seconds)."""
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import train_tokenizer

    texts = sample_training_text(corpora_dir, massive_dir, TINY_LOCALES, per_source=300)
    cfg = TokenizerConfig(vocab_size=2000, character_coverage=0.99, num_sentinels=100)
    return train_tokenizer(texts, tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer", cfg, seed=0)


@pytest.fixture(scope="session")
def multilingual_tokenizer_dir(tmp_path_factory, corpora_dir: Path, massive_dir: Path) -> Path:
    """A small HF fast tokenizer trained on all 48 locales (vocab 4000)."""
    from data_prep.config import DEFAULT_LOCALES, TokenizerConfig
    from data_prep.tokenizer import train_tokenizer

    texts = sample_training_text(corpora_dir, massive_dir, DEFAULT_LOCALES, per_source=100)
    cfg = TokenizerConfig(vocab_size=4000, character_coverage=0.995, num_sentinels=100)
    return train_tokenizer(
        texts, tmp_path_factory.mktemp("multilingual_tokenizer") / "tokenizer", cfg, seed=0
    )


@pytest.fixture(scope="session")
def tiny_packed_dir(tmp_path_factory, tiny_tokenizer_dir: Path, corpora_dir: Path, massive_dir: Path) -> Path:
    """Packed data (seq_len 64) with the tiny tokenizer: `train/`, `heldout/`, `stats.json`.

    Train holds 200 sentences per tiny locale (Tatoeba, NTREX and MASSIVE train utterances);
    heldout 20 other sentences per locale. Load with data_prep.packing.load_packed(dir, split).
    """
    from data_prep.config import PackingConfig
    from data_prep.corpus import has_reserved_text
    from data_prep.packing import write_packed
    from data_prep.tokenizer import load_tokenizer

    train, heldout = ([], []), ([], [])
    for loc in TINY_LOCALES:
        texts = [
            t
            for t in sample_training_text(corpora_dir, massive_dir, [loc], per_source=80)
            if not has_reserved_text(t)
        ]
        for i, text in enumerate(texts[:220]):
            split = heldout if i % 11 == 10 else train
            split[0].append(text)
            split[1].append(loc)
    out = tmp_path_factory.mktemp("tiny_packed") / "data"
    write_packed(
        out,
        load_tokenizer(tiny_tokenizer_dir),
        {"train": train, "heldout": heldout},
        PackingConfig(seq_len=64),
        progress=False,
    )
    return out
