"""1-shot FLORES-200 translation: data reading, prompts, demo/eval split, metrics, spBLEU handling,
and an end-to-end run on the tiny teacher."""

from __future__ import annotations

import gzip
import json

import pytest
from sacrebleu.metrics import CHRF

from evaluation.translation import (
    FLORES_DEV_LINES,
    build_translation_prompt,
    corpus_metrics,
    demo_line,
    language_name,
    read_flores,
    spbleu_model_path,
    spbleu_status,
)


def test_read_flores_gives_997_aligned_lines(flores_dir):
    en, de = read_flores(flores_dir, "en-US"), read_flores(flores_dir, "de-DE")
    assert len(en) == len(de) == FLORES_DEV_LINES
    assert en[0].startswith("On Monday, scientists from the Stanford University School of Medicine")
    assert "Stanford" in de[0]


def test_read_flores_errors_name_the_file(tmp_path):
    with gzip.open(tmp_path / "de-DE.txt.gz", "wt", encoding="utf-8") as f:
        f.write("eins\nzwei\n")
    with pytest.raises(ValueError, match=r"de-DE\.txt\.gz: 2 lines, expected 997"):
        read_flores(tmp_path, "de-DE")
    with gzip.open(tmp_path / "fr-FR.txt.gz", "wt", encoding="utf-8") as f:
        f.write("un\n\ntrois\n")
    with pytest.raises(ValueError, match=r"fr-FR\.txt\.gz:2: empty line"):
        read_flores(tmp_path, "fr-FR")
    with pytest.raises(FileNotFoundError, match="available: de-DE, fr-FR"):
        read_flores(tmp_path, "ja-JP")


def test_demo_lines_are_seeded_and_disjoint_from_evaluated_lines():
    picks = [demo_line(i, 100, seed=0) for i in range(100, 997)]
    assert all(0 <= j < 100 for j in picks)  # evaluated lines start at 100: never a demo
    assert picks == [demo_line(i, 100, seed=0) for i in range(100, 997)]
    assert len(set(picks)) > 50
    assert picks != [demo_line(i, 100, seed=1) for i in range(100, 997)]


def test_prompt_construction():
    prompt = build_translation_prompt(
        "Guten Morgen.", "German", "English", "Danke.", "Thank you.",
        "{demo}{src_lang}: {src}\n{tgt_lang}:", "{src_lang}: {src}\n{tgt_lang}: {tgt}\n",
    )  # fmt: skip
    assert prompt == "German: Danke.\nEnglish: Thank you.\nGerman: Guten Morgen.\nEnglish:"
    assert language_name("ja-JP") == "Japanese"
    with pytest.raises(KeyError, match="no language name for locale xx-XX"):
        language_name("xx-XX")


def test_corpus_metrics_values():
    refs = ["The cat sat on the mat.", "It is raining today."]
    perfect = corpus_metrics(refs, refs, "de-DE", None)
    assert perfect["chrf++"] == pytest.approx(100.0) and perfect["bleu"] == pytest.approx(100.0)
    assert perfect["spbleu"] is None and perfect["bleu_tokenize"] == "13a" and perfect["n"] == 2
    wrong = corpus_metrics(["xyz qqq", "zzz"], refs, "de-DE", None)
    assert wrong["chrf++"] < 5.0 and wrong["bleu"] == 0.0
    hyps = ["The cat sat on a mat.", "It rains today."]
    assert corpus_metrics(hyps, refs, "fr-FR", None)["chrf++"] == pytest.approx(CHRF(word_order=2).corpus_score(hyps, [refs]).score)
    # Unsegmented scripts get character-level BLEU: one wrong character out of six still scores.
    ja = corpus_metrics(["今日は雨です"], ["今日は雪です"], "ja-JP", None)
    assert ja["bleu_tokenize"] == "char" and 0.0 < ja["bleu"] < 100.0


def test_spbleu_is_null_with_a_note_unless_the_model_is_cached(tmp_path, monkeypatch):
    import sacrebleu.utils
    import sentencepiece as spm

    monkeypatch.setattr(sacrebleu.utils, "SACREBLEU_DIR", str(tmp_path))
    ok, note = spbleu_status("flores200")
    assert not ok and str(spbleu_model_path("flores200")) in note and "not computed" in note
    # A cached SentencePiece model (here a tiny one trained on the spot) is used as is.
    path = spbleu_model_path("flores200")
    path.parent.mkdir(parents=True)
    sentences = ["the cat sat on the mat", "it is raining today", "guten morgen", "bonjour tout le monde"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "m"), vocab_size=30, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    (tmp_path / "m.model").rename(path)
    assert spbleu_status("flores200") == (True, None)
    metrics = corpus_metrics(["the cat sat on the mat"], ["the cat sat on the mat"], "en-US", "flores200")
    assert metrics["spbleu"] == pytest.approx(100.0)


def test_evaluate_translation_on_the_tiny_teacher(tiny_teacher_dir, flores_dir, tmp_path, monkeypatch):
    import sacrebleu.utils

    from core.config import load_config
    from evaluation.config import EvalConfig
    from evaluation.translation import evaluate_translation

    monkeypatch.setattr(sacrebleu.utils, "SACREBLEU_DIR", str(tmp_path / "no-sacrebleu-cache"))
    cfg = load_config(
        EvalConfig,
        overrides=[
            f"translation.data={flores_dir}", "translation.locales=[de-DE, ja-JP]", "translation.max_examples=3",
            "translation.num_demo_lines=20", "translation.max_new_tokens=12", "translation.batch_size=2", "device=cpu",
        ],
    )  # fmt: skip
    evaluate_translation(cfg, tiny_teacher_dir, tmp_path, name="tr")
    saved = json.loads((tmp_path / "tr.json").read_text())
    assert saved["per_language"].keys() == {"de-DE", "ja-JP"}
    assert saved["spbleu_available"] is False and "not computed" in saved["spbleu_note"]
    for directions in saved["per_language"].values():
        assert directions.keys() == {"en-xx", "xx-en"}
        for d in directions.values():
            assert d["n"] == 3 and 0.0 <= d["chrf++"] <= 100.0 and d["spbleu"] is None
            assert [s["line"] for s in d["samples"]] == [21, 22, 23]  # 1-based, after the 20 demo lines
    assert saved["per_language"]["ja-JP"]["en-xx"]["bleu_tokenize"] == "char"
    en_de = saved["per_language"]["de-DE"]["en-xx"]["samples"][0]
    assert en_de["src"] == read_flores(flores_dir, "en-US")[20] and en_de["ref"] == read_flores(flores_dir, "de-DE")[20]
    # 1-shot prompt: the demo pair, then the source, ending with the target language tag.
    assert saved["example_prompt"].count("English: ") == 2 and saved["example_prompt"].endswith("\nGerman:")
    mean = saved["chrf++"]["en-xx"]
    assert mean == pytest.approx((saved["per_language"]["de-DE"]["en-xx"]["chrf++"] + saved["per_language"]["ja-JP"]["en-xx"]["chrf++"]) / 2)
    assert saved["spbleu"] == {"en-xx": None, "xx-en": None}
    assert "not computed" in (tmp_path / "tr.md").read_text()
    assert (tmp_path / "tr.png").read_bytes()[:4] == b"\x89PNG"
