"""Packing: lossless, fixed-length int32 rows, disjoint heldout, deterministic."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.config import PackingConfig
from data_prep.packing import (
    is_complete,
    load_packed,
    pack_token_lists,
    tokenize_documents,
    unpack_documents,
    write_packed,
)
from data_prep.tokenizer import load_tokenizer, special_ids

SEP = 4


def _rows(values, offsets):
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def test_pack_small_example_by_hand():
    values, offsets = pack_token_lists(
        [[10, 11, 12], [20], [30, 31, 32, 33, 34, 35, 36]], seq_len=4, sep_id=SEP
    )
    assert _rows(values, offsets) == [[10, 11, 12, SEP], [20, SEP, 30, 31], [32, 33, 34, 35], [36]]
    assert values.dtype.name == "int32"


def test_documents_longer_than_seq_len_round_trip():
    docs = [list(range(100, 137)), [7, 8], list(range(200, 219))]
    values, offsets = pack_token_lists(docs, seq_len=8, sep_id=SEP)
    rows = _rows(values, offsets)
    assert all(len(r) == 8 for r in rows[:-1]) and 1 <= len(rows[-1]) <= 8
    assert unpack_documents(rows, SEP) == docs


@settings(max_examples=200, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(min_value=5, max_value=5000), min_size=1, max_size=40), max_size=30),
    seq_len=st.integers(min_value=1, max_value=64),
)
def test_packing_is_lossless_property(docs, seq_len):
    values, offsets = pack_token_lists(docs, seq_len=seq_len, sep_id=SEP)
    rows = _rows(values, offsets)
    assert all(len(r) == seq_len for r in rows[:-1])
    assert sum(len(r) for r in rows) == sum(len(d) for d in docs) + max(len(docs) - 1, 0)
    assert unpack_documents(rows, SEP) == docs
    # Removing <sep> gives the inputs' token stream exactly.
    assert [t for r in rows for t in r if t != SEP] == [t for d in docs for t in d]


def test_write_and_load_packed_real_text(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    docs = [
        "Guten Morgen, wie geht's?",
        "wake me up at five am this week " * 12,
        "東京の天気は？",
        "สวัสดีครับ",
        "x",
    ]
    locales = ["de-DE", "en-US", "ja-JP", "th-TH", "en-US"]
    cfg = PackingConfig(seq_len=16)
    stats = write_packed(
        tmp_path / "data",
        tok,
        {"train": (docs, locales), "heldout": (docs[:1], locales[:1])},
        cfg,
        progress=False,
    )
    assert is_complete(tmp_path / "data")
    train = load_packed(tmp_path / "data", "train")
    assert train.features["input_ids"].feature.dtype == "int32"
    rows = train["input_ids"]
    assert all(len(r) == 16 for r in rows[:-1])
    expected = tokenize_documents(tok, docs, progress=False)
    assert unpack_documents(rows, special_ids(tok).sep) == expected
    assert all(1 not in d for d in expected)  # documents carry no eos
    assert stats["splits"]["train"]["per_locale"]["en-US"]["tokens"] == len(expected[1]) + len(expected[4])
    assert stats["splits"]["train"]["num_tokens"] == sum(map(len, expected))
    assert json.loads((tmp_path / "data" / "stats.json").read_text()) == stats
    assert load_packed(tmp_path / "data" / "heldout")["input_ids"] == [
        tokenize_documents(tok, docs[:1], progress=False)[0]
    ]
    # Decoding the documents gives the text back.
    assert tok.batch_decode(expected) == docs


def test_packing_is_deterministic(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    docs = [f"document number {i} with some text" for i in range(50)]
    split = {"train": (docs, ["en-US"] * 50), "heldout": ([], [])}
    write_packed(tmp_path / "a", tok, split, PackingConfig(seq_len=32), progress=False)
    write_packed(tmp_path / "b", tok, split, PackingConfig(seq_len=32), progress=False)
    assert load_packed(tmp_path / "a")["input_ids"] == load_packed(tmp_path / "b")["input_ids"]
    assert load_packed(tmp_path / "a", "heldout").num_rows == 0


def test_reserved_token_text_is_rejected(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(ValueError, match=r"document 1 contains reserved-token text"):
        tokenize_documents(tok, ["fine", "a <sep> b"], progress=False)


def test_tiny_packed_fixture(tiny_packed_dir, tiny_tokenizer_dir):
    train = load_packed(tiny_packed_dir, "train")
    heldout = load_packed(tiny_packed_dir, "heldout")
    assert train.num_rows > 50 and heldout.num_rows > 3
    sep = special_ids(load_tokenizer(tiny_tokenizer_dir)).sep
    stats = json.loads((tiny_packed_dir / "stats.json").read_text())
    for name, ds in (("train", train), ("heldout", heldout)):
        docs = unpack_documents(ds["input_ids"], sep)
        assert len(docs) == stats["splits"][name]["num_documents"]
        assert sum(map(len, docs)) == stats["splits"][name]["num_tokens"]
    assert set(stats["splits"]["train"]["per_locale"]) == {
        "en-US",
        "de-DE",
        "fr-FR",
        "ru-RU",
        "ar-SA",
        "hi-IN",
        "th-TH",
        "ja-JP",
        "zh-CN",
        "my-MM",
    }
