"""`polyteacher data ...` commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.cli import main

TINY_OVERRIDES = [
    "locales=[en-US, de-DE, ja-JP]",
    "massive.exclude_all_locales=false",
    "corpus.max_sentences_per_language=500",
    "sampling.tokenizer_sentences=3000",
    "tokenizer.vocab_size=1000",
    "tokenizer.num_sentinels=10",
    "tokenizer.character_coverage=0.99",
    "packing.seq_len=64",
    "packing.heldout_fraction=0.02",
    "massive.exclude_all_locales=false",
]


def test_help_lists_subcommands_and_config_keys():
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "data", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("prepare", "massive", "tokenizer", "pack"):
        assert name in out
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "data", "prepare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for key in (
        "--run-dir",
        "--preset",
        "--force",
        "sampling.alpha",
        "tokenizer.vocab_size",
        "packing.seq_len",
    ):
        assert key in out


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    code = main(["data", "prepare", "--run-dir", str(tmp_path / "run"), "tokenizer.vocab_size=100"])
    assert code == 2
    assert "tokenizer.vocab_size: 100 is too small" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pack_without_tokenizer_says_what_to_run(tmp_path, capsys):
    code = main(["data", "pack", "--run-dir", str(tmp_path), "--preset", "tiny"])
    assert code == 2
    assert "polyteacher data tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_end_to_end_then_reuse(tmp_path, capsys, massive_dir, corpora_dir):
    from data_prep.packing import load_packed, unpack_documents
    from data_prep.tokenizer import load_tokenizer, special_ids

    run = tmp_path / "run"
    args = ["data", "prepare", "--run-dir", str(run), "--preset", "tiny", "--quiet", *TINY_OVERRIDES]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fertility" in out and "realised" in out and "flores" in out
    for path in (
        "config.yaml",
        "tokenizer/tokenizer.json",
        "tokenizer_eval.json",
        "tokenizer_eval.md",
        "data/train",
        "data/heldout",
        "data/stats.json",
        "data-indomain/train",
        "data-indomain/stats.json",
    ):
        assert (run / path).exists(), path
    evaluation = json.loads((run / "tokenizer_eval.json").read_text())["rows"]
    assert [r["locale"] for r in evaluation] == ["en-US", "de-DE", "ja-JP"]
    assert all(r["unknown_rate"] == 0 and r["round_trip_rate"] == 1.0 for r in evaluation)
    assert next(r for r in evaluation if r["locale"] == "ja-JP")["fertility_unit"] == "char"

    tok = load_tokenizer(run / "tokenizer")
    # 1000 SentencePiece pieces, then one whole token per MASSIVE label of the train partitions.
    num_labels = json.loads((run / "tokenizer" / "training.json").read_text())["num_label_tokens"]
    assert num_labels > 60 and len(tok) == 1000 + num_labels
    assert special_ids(tok).sentinels == list(range(5, 15))
    stats = json.loads((run / "data" / "stats.json").read_text())
    train = load_packed(run / "data", "train")
    docs = unpack_documents(train["input_ids"], special_ids(tok).sep)
    assert len(docs) == stats["splits"]["train"]["num_documents"]
    assert {r["locale"] for r in stats["mixture"]} == {"en-US", "de-DE", "ja-JP"}
    # Heldout documents never occur in train.
    heldout = {
        tuple(d)
        for d in unpack_documents(load_packed(run / "data", "heldout")["input_ids"], special_ids(tok).sep)
    }
    assert heldout and not heldout & {tuple(d) for d in docs}
    indomain = json.loads((run / "data-indomain" / "stats.json").read_text())
    assert indomain["splits"]["train"]["num_documents"] > 3 * 10_000

    # A second run reuses every output.
    mtime = (run / "data" / "stats.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "already holds" in capsys.readouterr().out
    assert (run / "data" / "stats.json").stat().st_mtime_ns == mtime
    # Changed settings do not silently reuse outputs built from other ones.
    assert main([*args, "packing.seq_len=32"]) == 2
    assert "different settings" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_packs_the_translations_of_an_aligned_line_next_to_each_other(tmp_path, capsys, massive_dir,
                                                                               corpora_dir):
    """corpus.aligned_sources=[ntrex]: the packed pretraining data holds NTREX line n of each locale
    as consecutive documents (translation language modelling), and no NTREX line elsewhere."""
    import gzip

    from data_prep.packing import load_packed, unpack_documents
    from data_prep.tokenizer import load_tokenizer, special_ids

    run = tmp_path / "run"
    assert main(["data", "prepare", "--run-dir", str(run), "--preset", "tiny", "--quiet", *TINY_OVERRIDES,
                 "corpus.max_sentences_per_source=200", "corpus.aligned_sources=[ntrex]",
                 "massive.indomain=false"]) == 0
    assert "translations adjacent" in capsys.readouterr().out
    tok = load_tokenizer(run / "tokenizer")
    sep = special_ids(tok).sep
    docs = [tok.decode(d) for d in unpack_documents(load_packed(run / "data", "train")["input_ids"], sep)]
    docs += [tok.decode(d) for d in unpack_documents(load_packed(run / "data", "heldout")["input_ids"], sep)]
    ntrex = {loc: [" ".join(x.split()) for x in gzip.open(corpora_dir / "ntrex" / f"{loc}.txt.gz", "rt",
                                                          encoding="utf-8").read().splitlines()[:200]]
             for loc in ("en-US", "de-DE", "ja-JP")}
    line_of = {text: n for lines in ntrex.values() for n, text in enumerate(lines)}
    positions = [(i, line_of[d]) for i, d in enumerate(docs) if d in line_of]
    # Every NTREX document sits in a run of its own line's translations (one run per line).
    runs = [n for k, (i, n) in enumerate(positions) if k == 0 or positions[k - 1] != (i - 1, n)]
    assert len(runs) == len(set(runs)) >= 150
    assert sum(1 for _, n in positions) >= 2.5 * len(runs)  # mostly all three locales per line
