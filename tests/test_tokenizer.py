"""Tokenizer: reserved ids, eos, exact round trip and zero unknowns on MASSIVE test text, determinism."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_prep.config import DEFAULT_LOCALES, TokenizerConfig
from data_prep.tokenizer import load_tokenizer, special_ids, train_tokenizer


def _massive_test_utterances(massive_dir: Path, locale: str) -> list[str]:
    with gzip.open(massive_dir / f"{locale}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [row["utt"] for row in map(json.loads, f) if row["partition"] == "test"]


def test_reserved_ids_and_eos(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = special_ids(tok)
    assert (ids.pad, ids.eos, ids.unk, ids.clm, ids.sep) == (0, 1, 2, 3, 4)
    assert ids.sentinels == list(range(5, 105))
    assert tok.convert_ids_to_tokens([3, 4, 5, 104]) == ["[CLM]", "<sep>", "<extra_id_0>", "<extra_id_99>"]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    enc = tok("wake me up at five am")["input_ids"]
    assert enc[-1] == 1 and enc.count(1) == 1
    assert tok("")["input_ids"] == [1]
    # Byte pieces follow the sentinels.
    assert tok.convert_ids_to_tokens([105, 105 + 255]) == ["<0x00>", "<0xFF>"]


def test_loads_with_autotokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert tok.decode(tok("Guten Morgen")["input_ids"], skip_special_tokens=True) == "Guten Morgen"
    assert len(tok) == 2000


@pytest.mark.parametrize(
    "text",
    [
        "  two leading spaces and  double  spaces ",
        "ｆｕｌｌ－ｗｉｄｔｈ and ﬁ ligature (NFKC would change these)",
        "emoji 🙂 snowman ☃ and Khmer ខ្ញុំ ស្រឡាញ់ Georgian გამარჯობა",
        "tab\tand\nnewline",
        "",
        "123 4567.89",
    ],
)
def test_round_trip_edge_cases(tiny_tokenizer_dir, text):
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = tok(text)["input_ids"]
    assert 2 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_matches_sentencepiece(tiny_tokenizer_dir, massive_dir):
    """The fast tokenizer segments exactly as the SentencePiece model it was built from."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "spm.model"))
    tok = load_tokenizer(tiny_tokenizer_dir)
    texts = []
    for loc in ("en-US", "ja-JP", "th-TH", "ko-KR", "am-ET"):
        texts += _massive_test_utterances(massive_dir, loc)[:200]
    fast = tok(texts, add_special_tokens=False)["input_ids"]
    assert fast == [sp.encode(t) for t in texts]


@pytest.mark.slow
def test_round_trip_all_locales(multilingual_tokenizer_dir, massive_dir):
    """decode(encode(s)) == s exactly and no <unk> for every MASSIVE test utterance of all 48 locales."""
    tok = load_tokenizer(multilingual_tokenizer_dir)
    failures = {}
    for loc in DEFAULT_LOCALES:
        utts = _massive_test_utterances(massive_dir, loc)
        assert len(utts) == 2974, loc
        ids = tok(utts)["input_ids"]
        decoded = tok.batch_decode(ids, skip_special_tokens=True)
        bad = [u for u, d in zip(utts, decoded) if u != d]
        unk = sum(x.count(tok.unk_token_id) for x in ids)
        if bad or unk:
            failures[loc] = (len(bad), unk, bad[:2])
    assert failures == {}


def test_deterministic_for_seed(tmp_path):
    texts = [f"sentence number {i} with words {i * 7 % 13} und Wörter {i % 5}" for i in range(400)]
    cfg = TokenizerConfig(vocab_size=400, num_sentinels=4)
    a = train_tokenizer(texts, tmp_path / "a", cfg, seed=3)
    b = train_tokenizer(texts, tmp_path / "b", cfg, seed=3)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "spm.model").read_bytes() == (b / "spm.model").read_bytes()


def test_label_tokens_are_whole_and_never_match_inside_text(tmp_path):
    texts = [f"what is the date {i} and set alarm number {i % 7}" for i in range(300)]
    labels = ["<Other>", "<date>", "<alarm_set>"]
    out = train_tokenizer(texts, tmp_path / "t", TokenizerConfig(vocab_size=300, num_sentinels=4), label_tokens=labels)
    tok = load_tokenizer(out)
    meta = json.loads((out / "training.json").read_text())
    assert meta["vocab_size"] == len(tok) and meta["num_label_tokens"] == 3
    ids = tok("<alarm_set><Other><date>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<alarm_set>", "<Other>", "<date>", "</s>"]
    assert tok.decode(ids, skip_special_tokens=True) == "<alarm_set><Other><date>"
    # The word "date" in an utterance is text, not the label.
    assert "<date>" not in tok.convert_ids_to_tokens(tok("what is the date")["input_ids"])
    assert special_ids(tok).pad == 0


def test_vocab_too_small_for_characters_is_a_clear_error(tmp_path):
    texts = ["".join(chr(0x4E00 + (i * 31 + j) % 3000) for j in range(20)) for i in range(300)]
    cfg = TokenizerConfig(vocab_size=400, num_sentinels=4, character_coverage=1.0)
    with pytest.raises(ValueError, match="character_coverage"):
        train_tokenizer(texts, tmp_path / "t", cfg)
    assert not (tmp_path / "t").exists()


def test_load_rejects_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
