"""Fairness evaluation: counterfactual consistency and generation disparity."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from fixtures_data import squash_tables

from core.config import ConfigError
from evaluation.cli import parse_models
from evaluation.disparity import (
    TEMPLATES,
    continuations,
    generation_disparity,
    occupations,
    score_continuations,
)
from evaluation.fairness import (
    compare_consistency,
    consistency_scores,
    counterfactual_consistency,
    counterfactual_set,
    fairness_markdown,
)
from massive.format import NLUPrediction


@dataclass
class Gold:
    words: list[str]
    slots: list[str]
    intent: str


class KeywordPredictor:
    """A rule-based MASSIVE predictor: intent 'calendar_set' unless the utterance says `trigger`."""

    def __init__(self, trigger: str | None) -> None:
        self.trigger = trigger

    def predict_words(self, batch: list[list[str]]) -> list[NLUPrediction]:
        out = []
        for words in batch:
            hit = self.trigger is not None and self.trigger in words
            out.append(NLUPrediction("email_query" if hit else "calendar_set",
                                     ["person" if w in ("mom", "dad") else "Other" for w in words]))
        return out


EXAMPLES = [
    Gold(["remind", "mom", "about", "her", "meeting"], ["Other", "person", "Other", "Other", "Other"], "calendar_set"),
    Gold(["tell", "him", "hello"], ["Other", "Other", "Other"], "calendar_set"),
    Gold(["wake", "me", "up"], ["Other", "Other", "Other"], "calendar_set"),  # no gendered word
]


def test_counterfactual_set_selects_and_swaps_word_for_word():
    chosen = counterfactual_set(EXAMPLES, "en-US")
    assert [ex.words for ex, _ in chosen] == [EXAMPLES[0].words, EXAMPLES[1].words]
    assert chosen[0][1].words == ["remind", "dad", "about", "his", "meeting"]
    assert chosen[1][1].words == ["tell", "her", "hello"]
    assert counterfactual_set(EXAMPLES, "ja-JP") == []


def test_consistency_zero_for_gender_blind_predictor():
    result = counterfactual_consistency(KeywordPredictor(None), {"en-US": EXAMPLES}, batch_size=2)
    overall = result["overall"]
    assert overall["num_examples"] == 2
    assert overall["intent_change_rate"] == 0.0 and overall["slot_change_rate"] == 0.0
    assert overall["intent_acc_original"] == overall["intent_acc_swapped"] == 1.0
    assert overall["em_original"] == 1.0 and overall["em_gap"] == 0.0
    assert overall["intent_flip_rate"] == 0.0 and overall["em_flip_rate"] == 0.0
    assert overall["intent_flip_rate_ci"] == [0.0, 0.0]


def test_consistency_counts_changes_of_a_gender_sensitive_predictor():
    # Predicts a different intent whenever "her" appears: the swapped "tell her hello" flips, and the
    # original "remind mom about her meeting" is wrong while its swap is right.
    result = counterfactual_consistency(KeywordPredictor("her"), {"en-US": EXAMPLES}, batch_size=2)
    overall = result["overall"]
    assert overall["intent_change_rate"] == 1.0
    assert overall["intent_acc_original"] == 0.5 and overall["intent_acc_swapped"] == 0.5
    assert overall["slot_change_rate"] == 0.0  # mom -> dad is still a person
    # Among the correct originals (only "tell him hello"), every one flips.
    assert overall["num_intent_correct"] == 1 and overall["intent_flip_rate"] == 1.0


def test_agreement_conflicts_are_counted_per_utterance():
    golds = [Gold(["ruf", "meine", "mutter", "an"], ["Other"] * 4, "calling"),
             Gold(["ruf", "meinen", "vater", "an"], ["Other"] * 4, "calling")]
    chosen = counterfactual_set(golds, "de-DE")
    assert [(cf.words, cf.conflicts) for _, cf in chosen] == [(["ruf", "meine", "vater", "an"], 1),
                                                               (["ruf", "meine", "mutter", "an"], 0)]


def test_bootstrap_intervals_and_paired_comparison():
    examples = [GoldWithId(["tell", "him", f"w{i}"], ["Other"] * 3, "calendar_set", str(i)) for i in range(30)]
    examples += [GoldWithId(["tell", "her", f"v{i}"], ["Other"] * 3, "calendar_set", str(100 + i)) for i in range(10)]
    blind = counterfactual_consistency(KeywordPredictor(None), {"en-US": examples}, batch_size=8, samples=200)
    biased = counterfactual_consistency(KeywordPredictor("her"), {"en-US": examples}, batch_size=8, samples=200)
    b = biased["en-US"]
    # 30 correct originals ("him"), all flip; the 10 "her" originals are wrong and their swaps right.
    assert b["num_intent_correct"] == 30 and b["intent_flip_rate"] == 1.0
    assert b["intent_acc_original"] == 0.75 and b["intent_acc_swapped"] == 0.25
    lo, hi = b["intent_acc_gap_ci"]
    assert lo <= 0.5 <= hi and hi - lo > 0  # the gap's interval holds its point and has a width
    assert len(b["records"]["id"]) == 40
    comp = compare_consistency(biased, blind, samples=200)
    flip = comp["en-US"]["intent_flip_rate"]
    assert (flip["a"], flip["b"], flip["diff"], flip["ratio"]) == (1.0, 0.0, -1.0, 0.0)
    assert flip["ratio_ci"] == [0.0, 0.0]
    assert comp["en-US"]["intent_acc_original"]["diff"] == 0.25
    assert set(comp) == {"en-US", "overall"}
    # Against a model with no flips there is no ratio.
    assert compare_consistency(blind, biased, samples=50)["en-US"]["intent_flip_rate"]["ratio"] is None
    result = {"locales": ["en-US"], "split": "test", "confidence": 0.95, "baseline": "biased",
              "models": {"biased": {"consistency": biased}, "blind": {"consistency": blind}},
              "comparisons": {"blind": comp}}
    md = squash_tables(fairness_markdown(result))
    assert "### Counterfactual consistency: en-US" in md and "| biased | 40 | 100.0 [100.0, 100.0] |" in md
    assert "| blind | en-US | 0.00 [0.00, 0.00] | -100.0 [-100.0, -100.0] |" in md


@dataclass
class GoldWithId(Gold):
    id: str


class RecordingPredictor(KeywordPredictor):
    """KeywordPredictor that remembers the utterances it saw."""

    def __init__(self) -> None:
        super().__init__(None)
        self.seen: list[list[str]] = []

    def predict_words(self, batch: list[list[str]]) -> list[NLUPrediction]:
        self.seen += batch
        return super().predict_words(batch)


def test_consistency_with_max_examples_scores_a_seeded_sample_not_the_first_n():
    examples = [GoldWithId(["tell", "him", f"w{i}"], ["Other"] * 3, "calendar_set", str(i)) for i in range(40)]

    def chosen(seed: int) -> list[str]:
        predictor = RecordingPredictor()
        result = counterfactual_consistency(predictor, {"en-US": examples}, batch_size=4, max_examples=5, seed=seed)
        assert result["en-US"]["num_examples"] == 5
        return sorted(words[2] for words in predictor.seen if words[1] == "him")

    first = chosen(0)
    assert first == chosen(0) and first != chosen(1)
    assert first != sorted(f"w{i}" for i in range(5))


def test_consistency_scores_hand_case():
    golds = [Gold(["a", "b"], ["Other", "x"], "i1"), Gold(["c"], ["y"], "i2")]
    original = [NLUPrediction("i1", ["Other", "x"]), NLUPrediction("i2", ["y"])]
    swapped = [NLUPrediction("i1", ["Other", "Other"]), NLUPrediction("i3", ["y"])]
    s = consistency_scores(golds, original, swapped)
    assert s["intent_flip_rate"] == 0.5 and s["em_flip_rate"] == 1.0
    assert s["intent_change_rate"] == 0.5 and s["slot_change_rate"] == 0.5
    assert s["em_original"] == 1.0 and s["em_swapped"] == 0.0 and s["em_gap"] == 1.0
    assert s["intent_acc_gap"] == 0.5


def test_templates_and_continuations_cover_every_lexicon():
    from data_prep.counterfactual import available_languages

    for lang in available_languages():
        assert len(TEMPLATES[lang]) >= 3
        assert len(continuations(lang)) >= 10, lang
        assert len(occupations(lang)) >= 10, lang
    # Gendered occupations are scored as one item over both forms; neutral ones with one form.
    assert ("Lehrer", "Lehrerin") in occupations("de") and ("doctor",) in occupations("en")
    assert ("actor", "actress") in occupations("en")


def test_disparity_on_tiny_teacher(tiny_teacher_dir):
    from student import load_text_to_text

    model, tokenizer = load_text_to_text(tiny_teacher_dir, "cpu")
    conts = continuations("en")[:6]
    same = score_continuations(model, tokenizer, ["He works as a", "He works as a"], conts, batch_size=5)
    assert same.shape == (2, 6) and np.all(same < 0)
    np.testing.assert_allclose(same[0], same[1], rtol=1e-5)
    # Batching does not change the scores.
    np.testing.assert_allclose(score_continuations(model, tokenizer, ["He works as a"], conts, batch_size=1)[0],
                               same[0], rtol=1e-4)
    result = generation_disparity(model, tokenizer, ["en", "de"], batch_size=64)
    assert set(result) == {"en", "de", "overall"}
    assert result["en"]["num_pairs"] == 3 * len(occupations("en"))
    assert result["overall"]["mean_abs_gap"] > 0  # a random model is not gender-blind
    assert result["overall"]["mean_abs_gap"] >= abs(result["overall"]["mean_signed_gap"])
    # A random model is nearly flat: its entropy is close to log(vocabulary), and the gap is divided by it.
    en = result["en"]
    assert 0.5 * np.log(len(tokenizer)) < en["entropy"] <= np.log(len(tokenizer)) + 1e-6
    assert en["normalised_gap"] == pytest.approx(en["mean_abs_gap"] / en["entropy"])



def test_gender_polarity_scores_pronouns_after_neutral_occupations(tiny_teacher_dir):
    from evaluation.disparity import NEUTRAL_OCCUPATIONS, POLARITY_TEMPLATES, gender_polarity, gendered_words
    from student import load_text_to_text

    assert gendered_words("en") == {"male": ["he", "his", "him", "himself"], "female": ["she", "her", "hers", "herself"]}
    assert "él mismo" not in gendered_words("es")["male"]  # one-word forms only
    model, tokenizer = load_text_to_text(tiny_teacher_dir, "cpu")
    result = gender_polarity(model, tokenizer, ["en", "de", "fr"], batch_size=64)
    assert set(result) == {"en", "fr", "overall"}  # German has no neutral occupation: not scored
    assert result["en"]["num_pairs"] == len(POLARITY_TEMPLATES["en"]) * len(NEUTRAL_OCCUPATIONS["en"])
    # Each polarity is log P(male words) - log P(female words) after one prompt, from the same scores.
    words = gendered_words("fr")
    prompt = POLARITY_TEMPLATES["fr"][0].format(NEUTRAL_OCCUPATIONS["fr"][0])
    scores = score_continuations(model, tokenizer, [prompt], words["male"] + words["female"])[0]
    k = len(words["male"])
    expected = np.logaddexp.reduce(scores[:k]) - np.logaddexp.reduce(scores[k:])
    assert result["fr"]["gaps"][0] == pytest.approx(expected, rel=1e-4)
    assert result["overall"]["num_pairs"] == result["en"]["num_pairs"] + result["fr"]["num_pairs"]
    md = squash_tables(fairness_markdown({"locales": [], "split": "test", "models": {
        "student_crr": {"dir": "/r/student", "polarity": result}}}))
    assert "### Gender polarity" in md and "| student_crr | fr |" in md


def test_markdown_of_disparity_only_names_the_models_and_no_consistency():
    gap = {"mean_abs_gap": 0.5, "mean_signed_gap": 0.1, "entropy": 2.0, "normalised_gap": 0.25, "num_pairs": 3}
    result = {"locales": ["en-US"], "split": "test", "models": {
        "teacher": {"dir": "/r/teacher-indomain", "disparity": {"en": gap, "overall": gap}},
        "student_crr": {"dir": "/r/student", "disparity": {"en": gap, "overall": gap}}}}
    md = squash_tables(fairness_markdown(result))
    assert "Counterfactual consistency" not in md
    assert "| student_crr | overall | 0.500 | 0.100 | 2.000 | 0.250 |" in md
    assert "Models: teacher = teacher-indomain; student_crr = student." in md


def test_compare_disparity_pairs_the_same_occupations():
    from evaluation.disparity import _disparity, compare_disparity

    rng = np.random.default_rng(0)
    gaps = rng.normal(0.0, 1.0, 200)
    a = {"en": _disparity(gaps, np.full(6, 2.0))}
    half = {"en": _disparity(gaps / 2, np.full(6, 2.0))}  # the same pairs, every gap halved
    flatter = {"en": _disparity(gaps, np.full(6, 4.0))}  # the same gaps at twice the entropy
    comp = compare_disparity(a, half, samples=300)["en"]
    assert comp["num_pairs"] == 200
    assert comp["mean_abs_gap"]["ratio"] == pytest.approx(0.5)
    # Paired: every resample halves the gap, so the interval is the point.
    assert comp["mean_abs_gap"]["ratio_ci"] == pytest.approx([0.5, 0.5])
    lo, hi = comp["mean_abs_gap"]["diff_ci"]
    assert lo < comp["mean_abs_gap"]["diff"] < hi < 0
    norm = compare_disparity(a, flatter, samples=300)["en"]
    assert norm["mean_abs_gap"]["diff"] == 0.0 and norm["normalised_gap"]["ratio"] == pytest.approx(0.5)
    # Results on different pairs are not compared.
    assert compare_disparity(a, {"en": _disparity(gaps[:10], np.full(6, 2.0))}) == {}


def test_parse_models_errors(tmp_path):
    assert parse_models([f"a={tmp_path}"]) == {"a": tmp_path}
    with pytest.raises(ConfigError, match="NAME=DIR"):
        parse_models([str(tmp_path)])
    with pytest.raises(ConfigError, match="is not a directory"):
        parse_models([f"a={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_models([f"a={tmp_path}", f"a={tmp_path}"])
    (tmp_path / "student").mkdir()
    assert parse_models(["s=student"], run_dir=tmp_path) == {"s": (tmp_path / "student").resolve()}


@pytest.mark.slow
def test_cli_writes_json_and_markdown(tmp_path, tiny_teacher_dir, massive_dir):
    from launch.cli import main

    out = tmp_path / "fair"
    code = main(["evaluate", "fairness", "--models", f"teacher={tiny_teacher_dir}", f"copy={tiny_teacher_dir}",
                 "--locales", "en-US", "ja-JP", "--max-examples", "3", "--batch-size", "3",
                 "--data", str(massive_dir), "--device", "cpu", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "fairness.json").read_text())
    assert result["locales"] == ["en-US"] and result["locales_without_lexicon"] == ["ja-JP"]
    for name in ("teacher", "copy"):
        entry = result["models"][name]
        assert entry["consistency"]["en-US"]["num_examples"] == 3
        assert 0.0 <= entry["consistency"]["overall"]["intent_change_rate"] <= 1.0
        assert entry["disparity"]["en"]["mean_abs_gap"] > 0
    # The same weights give the same numbers.
    assert result["models"]["teacher"]["disparity"] == result["models"]["copy"]["disparity"]
    md = squash_tables((out / "fairness.md").read_text())
    assert md.startswith("### Counterfactual consistency: en-US") and "| teacher |" in md and "| copy |" in md


def test_fairness_scores_a_split_counterfactual_against_its_carried_gold():
    from evaluation.fairness import consistency_records, counterfactual_set
    from massive.format import MassiveExample, NLUPrediction

    slots = ("Other", "Other", "Other", "Other", "relation")
    ex = MassiveExample("1", "es-ES", "test", "email", "email_sendemail", "", "", tuple("envía un correo al tío".split()),
                        slots)
    [(gold, cf)] = counterfactual_set([ex], "es-ES")
    assert cf.words == "envía un correo a la tía".split() and len(cf.slots) == 6
    right = NLUPrediction("email_sendemail", list(cf.slots))
    records = consistency_records([gold], [NLUPrediction("email_sendemail", list(slots))], [right], [cf])
    assert records["em_original"] == [1] and records["em_swapped"] == [1] and records["slots_changed"] == [0]
    wrong = NLUPrediction("email_sendemail", ["Other"] * 5 + ["person"])
    records = consistency_records([gold], [NLUPrediction("email_sendemail", list(slots))], [wrong], [cf])
    assert records["em_flip"] == [1] and records["slots_changed"] == [1]
