"""MASSIVE scoring against hand-computed cases, the official scorer's own test cases, and seqeval;
the shared sample of test ids, bootstrap intervals over ids, and paired comparisons."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from fixtures_data import squash_tables
from seqeval.metrics import f1_score as seqeval_f1

from evaluation.massive import load_split, result_json
from massive.format import MassiveExample, NLUPrediction, parse_annot_utt, parse_target
from massive.scoring import (
    align_labels,
    bootstrap_weights,
    identical_predictions,
    micro_f1,
    paired_difference,
    sample_shared_ids,
    score,
    score_locale,
    score_records,
    to_bio,
    utterance_records,
)


def gold(
    slots: list[str], intent: str = "alarm_set", locale: str = "en-US", words: list[str] | None = None, id: str = "0"
) -> MassiveExample:
    words = words or [f"w{i}" for i in range(len(slots))]
    return MassiveExample(
        id=id, locale=locale, partition="test", scenario=intent.split("_")[0], intent=intent,
        utt=" ".join(words), annot_utt=" ".join(words), words=tuple(words), slots=tuple(slots),
    )  # fmt: skip


def pred(slots: list[str], intent: str = "alarm_set") -> NLUPrediction:
    return NLUPrediction(intent=intent, slots=slots)


def slot_f1(gold_slots: list[list[str]], pred_slots: list[list[str]]) -> float:
    return score([gold(g) for g in gold_slots], [pred(p) for p in pred_slots])["slot_f1"]


# ----------------------------------------------------------------------------- BIO and spans


def test_bio_run_of_same_label_is_one_span_and_different_adjacent_labels_are_two():
    assert to_bio(["date", "date", "Other", "time"]) == ["B-date", "I-date", "O", "B-time"]
    assert to_bio(["time", "date"]) == ["B-time", "B-date"]
    assert to_bio(["date", "Other", "date"]) == ["B-date", "O", "B-date"]
    assert to_bio([]) == []


def test_adjacent_same_label_words_are_one_span():
    s = score_locale([gold(["Other", "date", "date"])], [pred(["Other", "date", "date"])])
    assert (s["num_gold_spans"], s["num_pred_spans"], s["num_correct_spans"]) == (1, 1, 1)
    assert s["slot_f1"] == 1.0
    # Only half of the two-word span predicted: the span boundaries differ, so it is wrong.
    s = score_locale([gold(["Other", "date", "date"])], [pred(["Other", "date", "Other"])])
    assert (s["num_gold_spans"], s["num_pred_spans"], s["num_correct_spans"]) == (1, 1, 0)
    assert s["slot_f1"] == 0.0 and s["em"] == 0.0 and s["intent_acc"] == 1.0


def test_two_different_adjacent_labels_are_two_spans():
    s = score_locale([gold(["time", "date"])], [pred(["time", "date"])])
    assert (s["num_gold_spans"], s["num_correct_spans"], s["slot_f1"]) == (2, 2, 1.0)
    # Predicting one run of `time` over both words: one predicted span, matching neither gold span.
    s = score_locale([gold(["time", "date"])], [pred(["time", "time"])])
    assert (s["num_gold_spans"], s["num_pred_spans"], s["num_correct_spans"], s["slot_f1"]) == (2, 1, 0, 0.0)
    # One of two right: P = 1/2, R = 1/2.
    s = score_locale([gold(["time", "date"])], [pred(["time", "place_name"])])
    assert s["slot_f1"] == pytest.approx(0.5)


def test_garbage_predictions_score_zero_and_do_not_crash():
    golds = [gold(["Other", "date", "Other"], intent="alarm_set")]
    # Made-up labels form spans that match nothing; the intent is wrong.
    s = score_locale(golds, [pred(["zzz", "zzz", "yyy"], intent="%%%")])
    assert (s["num_pred_spans"], s["num_correct_spans"]) == (2, 0)
    assert s["em"] == s["intent_acc"] == s["slot_f1"] == 0.0
    # Raw garbage text through the tolerant parser: empty and one-token outputs.
    for text in ["", "   ", "alarm_set", "<pad> ] [ : :"]:
        p = parse_target(text, 3)
        assert len(p.slots) == 3
        s = score_locale(golds, [p])
        assert s["em"] == 0.0 and 0.0 <= s["slot_f1"] <= 1.0


def test_too_many_predicted_labels_are_truncated_to_the_gold_length():
    assert align_labels(["Other", "date", "date", "time"], 2) == ["Other", "date"]
    s = score_locale([gold(["Other", "date"])], [pred(["Other", "date", "date", "time"])])
    assert s["em"] == 1.0 and s["slot_f1"] == 1.0


def test_too_few_predicted_labels_are_padded_with_other():
    assert align_labels(["date"], 3) == ["date", "Other", "Other"]
    # Padded to [Other, date, Other]: the gold span covers words 1-2, the predicted one word 1 only.
    s = score_locale([gold(["Other", "date", "date"])], [pred(["Other", "date"])])
    assert (s["num_pred_spans"], s["num_correct_spans"], s["slot_f1"], s["em"]) == (1, 0, 0.0, 0.0)
    s = score_locale([gold(["date", "Other", "Other"])], [pred(["date"])])
    assert s["em"] == 1.0 and s["slot_f1"] == 1.0


@pytest.mark.parametrize(
    ("pred_slots", "gold_slots", "expected"),
    [
        # Cases and expected values from the official MASSIVE repository's test_eval_metrics.py.
        ([["X", "Y"]], [["X", "Y"]], 1.0),
        ([["X", "X", "Z"]], [["X", "X", "Y"]], 0.5),
        ([["X", "X", "Y", "Other"]], [["X", "X", "Y", "Other", "Y"]], 0.8),  # padding
        ([["X", "X", "Z", "Z"]], [["X", "X", "Y"]], 0.5),  # truncation
        ([["X", "X", "Other", "X", "X", "Y", "Z"]], [["X", "X", "Other", "X", "X", "Z", "Y"]], 0.5),
        ([["X", "X", "X", "Y", "Y"]], [["X", "X", "Other", "Y", "Y"]], 0.5),
        ([["X", "Other", "Other", "Y", "Y"]], [["X", "X", "Other", "Y", "Y"]], 0.5),
        ([["Other"], ["X"]], [["Y"], ["X"]], 2 / 3),
    ],
)
def test_official_scorer_cases(pred_slots, gold_slots, expected):
    assert slot_f1(gold_slots, pred_slots) == pytest.approx(expected)


def test_official_exact_match_and_intent_cases():
    golds = [gold(s, intent=i) for s, i in zip([["X", "X"], ["X", "X", "Y"], ["X"], ["X", "Z"]], "ABDE")]
    preds = [pred(s, intent=i) for s, i in zip([["X", "Y"], ["X", "X", "Y"], ["X"], ["X", "Y"]], "ABCE")]
    s = score(golds, preds)
    assert s["em"] == pytest.approx(0.25) and s["intent_acc"] == pytest.approx(0.75)
    assert score([gold(["X", "X", "Other"], "A")], [pred(["X", "X", "X"], "A")])["em"] == 0.0


def test_cjk_character_splitting():
    # A real zh-CN test row: the words are characters, two adjacent spans of different labels.
    words, slots = parse_annot_utt("[date : 这周] [time : 五点] 叫我起床", "zh-CN")
    assert words == list("这周五点叫我起床")
    assert slots == ["date", "date", "time", "time"] + ["Other"] * 4
    g = gold(slots, locale="zh-CN", words=words)
    s = score_locale([g], [pred(["date", "date", "time", "time"] + ["Other"] * 4)])
    assert (s["num_gold_spans"], s["num_correct_spans"], s["em"]) == (2, 2, 1.0)
    # One run of `date` over all four slot characters: one predicted span, neither gold span.
    s = score_locale([g], [pred(["date"] * 4)])
    assert (s["num_pred_spans"], s["num_correct_spans"], s["em"]) == (1, 0, 0.0)
    # A prediction per space-separated chunk (3 labels for 8 characters) is padded with Other.
    s = score_locale([g], [pred(["date", "time", "Other"])])
    assert (s["num_pred_spans"], s["num_correct_spans"]) == (2, 0)


def test_all_correct_and_all_wrong():
    golds = [gold(["Other", "date", "date"], "alarm_set"), gold(["time", "Other"], "alarm_query"), gold(["Other"], "weather_query")]
    right = [pred(list(g.slots), g.intent) for g in golds]
    s = score(golds, right)
    assert s["em"] == s["intent_acc"] == s["slot_f1"] == 1.0
    assert s["em_ci"] == [1.0, 1.0]
    wrong = [pred(["place_name"] * len(g.slots), "music_query") for g in golds]
    s = score(golds, wrong)
    assert s["em"] == s["intent_acc"] == s["slot_f1"] == 0.0
    assert s["per_locale"]["en-US"]["n"] == 3


# ----------------------------------------------------------------------------- seqeval parity and hand count


def test_slot_f1_equals_seqeval_and_a_hand_count():
    gold_slots = [
        ["Other", "date", "date", "time"],  # spans: date(1-2), time(3)
        ["place_name", "place_name", "Other"],  # place_name(0-1)
        ["Other", "Other"],  # none
        ["person", "Other", "person"],  # person(0), person(2)
    ]
    pred_slots = [
        ["Other", "date", "date", "date"],  # date(1-3): wrong boundary
        ["place_name", "place_name", "Other"],  # correct
        ["Other", "time"],  # false positive
        ["person", "Other", "person", "Other", "Other"],  # two correct (extra labels truncated)
    ]
    s = score_locale([gold(g) for g in gold_slots], [pred(p) for p in pred_slots])
    # Hand count: gold spans 5, predicted spans 5, correct 3 -> P = R = 3/5.
    assert (s["num_gold_spans"], s["num_pred_spans"], s["num_correct_spans"]) == (5, 5, 3)
    precision, recall = 3 / 5, 3 / 5
    assert s["slot_f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    expected = seqeval_f1(
        [to_bio(g) for g in gold_slots], [to_bio(align_labels(p, len(g))) for g, p in zip(gold_slots, pred_slots)]
    )
    assert s["slot_f1"] == pytest.approx(expected)


# ----------------------------------------------------------------------------- grouping


def test_per_locale_scores_and_unweighted_mean():
    golds = [gold(["date"], "a", "en-US", id=str(i)) for i in range(3)] + [gold(["date"], "a", "de-DE", id="0")]
    preds = [pred(["date"], "a"), pred(["date"], "b"), pred(["date"], "b"), pred(["date"], "a")]
    s = score(golds, preds)
    assert s["per_locale"]["en-US"]["intent_acc"] == pytest.approx(1 / 3)
    assert s["per_locale"]["de-DE"]["intent_acc"] == 1.0
    # Unweighted over locales, not pooled over utterances (which would give 0.5).
    assert s["intent_acc"] == pytest.approx((1 / 3 + 1) / 2)
    assert (s["num_examples"], s["num_ids"]) == (4, 3)
    # de-DE has one utterance, right in every resample that draws it.
    assert s["per_locale"]["de-DE"]["intent_acc_ci"] == [1.0, 1.0]
    assert s["per_locale"]["en-US"]["n"] == 3


def test_mismatched_lengths_and_empty_input_fail_loudly():
    with pytest.raises(ValueError, match="1 gold examples but 2 predictions"):
        score([gold(["date"])], [pred(["date"]), pred(["date"])])
    with pytest.raises(ValueError, match="empty"):
        score([], [])


# ----------------------------------------------------------------------------- slot F1 from span counts


def random_slots(rng: random.Random, num_words: int) -> list[str]:
    return [rng.choice(["Other", "Other", "date", "time", "place_name"]) for _ in range(num_words)]


def test_slot_f1_from_counts_is_exactly_seqeval_on_the_sample_and_on_a_resample():
    rng = random.Random(0)
    gold_slots = [random_slots(rng, rng.randint(1, 8)) for _ in range(300)]
    # Predictions of varying quality and length (some truncated or padded by the scorer).
    pred_slots = [[s if rng.random() < 0.8 else rng.choice(["Other", "date", "time"]) for s in g][: rng.randint(0, 9)]
                  for g in gold_slots]  # fmt: skip
    golds = [gold(g, id=str(i)) for i, g in enumerate(gold_slots)]
    preds = [pred(p) for p in pred_slots]
    gold_bio = [to_bio(g) for g in gold_slots]
    pred_bio = [to_bio(align_labels(p, len(g))) for g, p in zip(gold_slots, pred_slots)]
    expected = seqeval_f1(gold_bio, pred_bio)
    assert 0.3 < expected < 0.95
    assert score_locale(golds, preds)["slot_f1"] == expected  # exactly, not approximately
    # The pooled point scores of fine-tuning's dev evaluation are the scorer's.
    per_locale = score(golds, preds)["per_locale"]["en-US"]
    assert {k: per_locale[k] for k in score_locale(golds, preds)} == score_locale(golds, preds)

    # One bootstrap resample: the F1 of its summed counts is seqeval's F1 of the resampled utterances.
    counts = utterance_records(golds, preds)["en-US"]
    weights = bootstrap_weights(len(golds), samples=1, seed=3)[0]
    resampled = [i for i, w in enumerate(weights) for _ in range(int(w))]
    sums = [float(np.dot(weights, counts[c])) for c in ("slot_tp", "slot_pred", "slot_gold")]
    assert float(micro_f1(*sums)) == seqeval_f1([gold_bio[i] for i in resampled], [pred_bio[i] for i in resampled])
    # seqeval's conventions when nothing is predicted or there is nothing to find.
    assert float(micro_f1(0, 0, 3)) == 0.0 and float(micro_f1(0, 0, 0)) == 0.0


# ----------------------------------------------------------------------------- shared ids


class Ex:
    def __init__(self, id: str) -> None:
        self.id = id


def test_sample_shared_ids_takes_ids_every_locale_has_seeded_and_independent_of_order():
    per_locale = {"en-US": [Ex(str(i)) for i in range(100)], "de-DE": [Ex(str(i)) for i in range(5, 120)]}
    ids = sample_shared_ids(per_locale, 20, seed=0)
    assert len(ids) == 20 and set(ids) <= {str(i) for i in range(5, 100)}
    assert ids == sorted(ids, key=int)  # id order
    assert ids == sample_shared_ids({loc: list(reversed(exs)) for loc, exs in per_locale.items()}, 20, seed=0)
    assert ids != sample_shared_ids(per_locale, 20, seed=1)
    assert ids != [str(i) for i in range(5, 25)]  # not the first N
    everything = [str(i) for i in range(5, 100)]
    assert sample_shared_ids(per_locale, 0, 0) == sample_shared_ids(per_locale, None, 0) == everything
    assert sample_shared_ids(per_locale, 1000, 0) == everything
    with pytest.raises(ValueError, match="no id in common"):
        sample_shared_ids({"en-US": [Ex("1")], "de-DE": [Ex("2")]}, 5, 0)
    with pytest.raises(ValueError, match="duplicate ids"):
        sample_shared_ids({"en-US": [Ex("1"), Ex("1")]}, 5, 0)


def test_load_split_scores_the_same_random_ids_in_every_locale(massive_dir):
    locales = ["en-US", "de-DE", "ja-JP"]
    _, per_locale = load_split(str(massive_dir), locales, "test", 50, seed=0)
    ids = [ex.id for ex in per_locale["en-US"]]
    assert len(ids) == 50 and len(set(ids)) == 50
    assert all([ex.id for ex in per_locale[loc]] == ids for loc in locales)
    assert all(ex.locale == loc and ex.partition == "test" for loc in locales for ex in per_locale[loc])
    # Not the first 50 utterances of the file, and another seed draws other ids.
    _, everything = load_split(str(massive_dir), ["en-US"], "test", 0, seed=0)
    assert ids != [ex.id for ex in everything["en-US"][:50]]
    _, again = load_split(str(massive_dir), ["en-US"], "test", 50, seed=0)
    assert [ex.id for ex in again["en-US"]] == ids
    _, other = load_split(str(massive_dir), ["en-US"], "test", 50, seed=1)
    assert [ex.id for ex in other["en-US"]] != ids
    # MASSIVE test partitions are parallel: the whole partition is every id of every locale.
    assert len(everything["en-US"]) == 2974


# ----------------------------------------------------------------------------- bootstrap intervals


def intent_records(locales: dict[str, list[int]]) -> dict[str, dict[str, list]]:
    return {loc: {"id": [str(i) for i in range(len(ok))], "intent_ok": ok} for loc, ok in locales.items()}


def bernoulli(n: int, p: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(rng.random() < p) for _ in range(n)]


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_ids():
    widths = []
    for n in (100, 400, 1600):
        s = score_records(intent_records({"en-US": bernoulli(n, 0.7, 0), "de-DE": bernoulli(n, 0.6, 1)}), seed=0)
        for scores in (s, *s["per_locale"].values()):
            low, high = scores["intent_acc_ci"]
            assert low < scores["intent_acc"] < high
        widths.append(s["intent_acc_ci"][1] - s["intent_acc_ci"][0])
        # Intent-only records: EM and slot F1 do not apply.
        assert s["em"] is None and s["slot_f1_ci"] is None and s["per_locale"]["en-US"]["em_ci"] is None
    assert widths[0] > widths[1] > widths[2]
    # About 1.96 * 2 * sqrt(p (1 - p) / n) / sqrt(2) for two independent locales of 1600 ids.
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt((0.21 + 0.24) / 1600) / 2, rel=0.2)
    # Seeded: the same records and seed give the same interval.
    records = intent_records({"en-US": bernoulli(100, 0.7, 0)})
    assert score_records(records, seed=5)["intent_acc_ci"] == score_records(records, seed=5)["intent_acc_ci"]


def test_locales_are_resampled_together():
    # Two locales with identical outcomes (perfectly correlated, as translations can be): the mean's
    # interval is a single locale's, not narrower as it would be for independent locales.
    ok = bernoulli(300, 0.7, 0)
    s = score_records(intent_records({"en-US": ok, "de-DE": list(ok)}), seed=0)
    assert s["intent_acc_ci"] == s["per_locale"]["en-US"]["intent_acc_ci"] == s["per_locale"]["de-DE"]["intent_acc_ci"]


def test_bootstrap_weights_draw_n_ids_per_resample():
    w = bootstrap_weights(50, samples=200, seed=0)
    assert w.shape == (200, 50) and np.all(w.sum(axis=1) == 50)
    assert np.array_equal(w, bootstrap_weights(50, samples=200, seed=0))
    assert w.mean() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- paired comparison


def noisy_predictions(golds: list[MassiveExample], p_right: float, seed: int) -> list[NLUPrediction]:
    rng = random.Random(seed)
    return [
        pred([s if rng.random() < p_right else "Other" for s in g.slots], g.intent if rng.random() < p_right else "x")
        for g in golds
    ]


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    rng = random.Random(0)
    golds = [gold(random_slots(rng, 4), locale=loc, id=str(i)) for loc in ("en-US", "de-DE") for i in range(200)]
    records = utterance_records(golds, noisy_predictions(golds, 0.7, 0))
    paired = paired_difference(records, records)
    assert set(paired["metrics"]) == {"em", "intent_acc", "slot_f1"}
    for m in paired["metrics"].values():
        assert m["diff"] == 0.0 and m["diff_ci"] == [0.0, 0.0]
        assert m["ratio"] == 1.0 and m["ratio_ci"] == [1.0, 1.0]
        assert all(v["diff"] == 0.0 and v["diff_ci"] == [0.0, 0.0] for v in m["per_locale"].values())
    assert paired["identical_predictions"] == {
        "share": 1.0, "compared": ["pred_intent", "pred_slots"], "per_locale": {"en-US": 1.0, "de-DE": 1.0},
    }  # fmt: skip


def test_records_keep_each_prediction_as_scored():
    golds = [gold(["date", "Other", "time"], id="7"), gold(["Other"], intent="play_music", id="8")]
    # Too many labels are truncated to the gold words, too few padded with Other, as the scorer does.
    records = utterance_records(golds, [pred(["date", "date", "time", "time"]), pred([], intent="")])["en-US"]
    assert records["pred_intent"] == ["alarm_set", ""]
    assert records["pred_slots"] == ["date date time", "Other"]
    assert (records["em"], records["intent_ok"]) == ([0, 0], [1, 0])
    intent_only = utterance_records(golds, [IntentOnly("alarm_set"), IntentOnly("x")])["en-US"]
    assert set(intent_only) == {"id", "intent_ok", "pred_intent"}


class IntentOnly:
    def __init__(self, intent: str) -> None:
        self.intent = intent


def test_identical_predictions_counts_utterances_whose_intent_and_slots_all_agree():
    rng = random.Random(0)
    golds = [gold(random_slots(rng, 4), locale=loc, id=str(i)) for loc in ("en-US", "de-DE") for i in range(100)]
    preds = noisy_predictions(golds, 0.7, 0)
    a = utterance_records(golds, preds)
    # One changed slot label (en-US, id 3) and one changed intent (de-DE, id 5); the same EM and intent
    # accuracy can hide them, identical predictions cannot.
    changed = list(preds)
    changed[3] = pred([*preds[3].slots[:-1], "changed"], preds[3].intent)
    changed[105] = pred(preds[105].slots, "changed")
    b = utterance_records(golds, changed)
    same = identical_predictions(a, b)
    assert same["per_locale"] == {"en-US": 0.99, "de-DE": 0.99} and same["share"] == 0.99
    # Matched by id, not by position: B listing its utterances in another order changes nothing.
    reversed_b = {loc: {c: list(reversed(v)) for c, v in cols.items()} for loc, cols in b.items()}
    assert identical_predictions(a, reversed_b) == same
    # Against an intent classifier only intents are compared; without predictions (an older result) no share.
    intent_only = {loc: {c: cols[c] for c in ("id", "intent_ok", "pred_intent")} for loc, cols in b.items()}
    assert identical_predictions(a, intent_only) == {
        "share": 0.995, "compared": ["pred_intent"], "per_locale": {"en-US": 1.0, "de-DE": 0.99},
    }  # fmt: skip
    older = {loc: {c: v for c, v in cols.items() if not c.startswith("pred_")} for loc, cols in b.items()}
    assert identical_predictions(a, older) is None and paired_difference(a, older)["identical_predictions"] is None


def test_ratio_of_means_and_none_when_a_scores_zero():
    # B is right on about 80% of the utterances A gets right, and nowhere else: B keeps about 80% of A.
    ok_a = bernoulli(400, 0.5, 0)
    ok_b = [x * y for x, y in zip(ok_a, bernoulli(400, 0.8, 1))]
    a, b = intent_records({"en-US": ok_a}), intent_records({"en-US": ok_b})
    m = paired_difference(a, b, seed=0)["metrics"]["intent_acc"]
    assert m["ratio"] == pytest.approx(m["b"] / m["a"]) == pytest.approx(0.8, abs=0.05)
    assert m["ratio_ci"][0] < m["ratio"] < m["ratio_ci"][1] < 1.0
    zero = intent_records({"en-US": [0] * 400})
    m = paired_difference(zero, b)["metrics"]["intent_acc"]
    assert (m["ratio"], m["ratio_ci"]) == (None, None)


def test_result_json_writes_one_line_per_record_column_and_reads_back_the_same():
    golds = [gold(["date", "Other"], locale=loc, id=str(i)) for loc in ("en-US", "ja-JP") for i in range(50)]
    records = utterance_records(golds, [pred(["date", "Other"]) for _ in golds])
    result = {"kind": "massive", "model": "m", "per_locale": {"en-US": {"em": 1.0}}, "records": records}
    text = result_json(result)
    assert json.loads(text) == result
    # 100 utterances x 8 columns, but one line per column and locale.
    lines = text.splitlines()
    assert sum(line.startswith('      "pred_slots": ["date Other","date Other"') for line in lines) == 2
    assert len(lines) < 40 and text.endswith("}\n")
    assert json.loads(result_json({"kind": "massive"})) == {"kind": "massive"}


def test_paired_difference_finds_a_better_model_and_refuses_different_ids():
    rng = random.Random(0)
    golds = [gold(random_slots(rng, 4), locale=loc, id=str(i)) for loc in ("en-US", "de-DE") for i in range(300)]
    a = utterance_records(golds, noisy_predictions(golds, 0.6, 1))
    b = utterance_records(golds, noisy_predictions(golds, 0.8, 2))
    paired = paired_difference(a, b, seed=0)
    sa, sb = score_records(a), score_records(b)
    for metric, m in paired["metrics"].items():
        assert (m["a"], m["b"]) == (sa[metric], sb[metric])
        assert m["diff"] == pytest.approx(sb[metric] - sa[metric])
        assert 0.0 < m["diff_ci"][0] < m["diff"] < m["diff_ci"][1]
    # B - A and A - B mirror each other.
    back = paired_difference(b, a, seed=0)["metrics"]["em"]
    assert back["diff_ci"] == pytest.approx([-x for x in reversed(paired["metrics"]["em"]["diff_ci"])])
    # An intent classifier against a full model: only intent accuracy is compared.
    intent_only = {loc: {"id": r["id"], "intent_ok": r["intent_ok"]} for loc, r in b.items()}
    assert set(paired_difference(a, intent_only)["metrics"]) == {"intent_acc"}
    shifted = {loc: {**r, "id": [str(int(i) + 1) for i in r["id"]]} for loc, r in b.items()}
    with pytest.raises(ValueError, match="different utterances"):
        paired_difference(a, shifted)
    with pytest.raises(ValueError, match="locales"):
        paired_difference(a, {"en-US": b["en-US"]})


# ----------------------------------------------------------------------------- generated targets


def test_check_generation_reads_the_raw_target() -> None:
    from massive.format import check_generation, parse_generated

    intents = ["alarm_set", "weather_query"]
    # Well-formed: two labels for two words, then a known intent, and it stopped.
    ok = check_generation("<time><Other><alarm_set>", 2, intents, stopped=True)
    assert (ok.stopped, ok.label_count_ok, ok.known_intent) == (True, True, True)
    # Looping on Other up to the budget: no eos, too many labels, no intent at the end.
    loop = check_generation("Other " * 9, 2, intents, stopped=False)
    assert (loop.stopped, loop.label_count_ok, loop.known_intent) == (False, False, False)
    # Intent first: the first token is the intent; a slot name there is not a known intent.
    first = check_generation("time Other alarm_set", 2, intents, intent_first=True)
    assert (first.label_count_ok, first.known_intent) == (True, False)
    assert check_generation("", 0, intents).label_count_ok is False
    # parse_generated scores exactly as parse_target does, with the check attached.
    pred = parse_generated("time alarm_set", 2, intents, stopped=False)
    assert (pred.intent, pred.slots) == (parse_target("time alarm_set", 2).intent, parse_target("time alarm_set", 2).slots)
    assert (pred.generation.stopped, pred.generation.label_count_ok, pred.generation.known_intent) == (False, False, True)


def test_generation_rates_in_records_and_scores() -> None:
    from massive.format import GenerationCheck

    golds = [gold(["Other"], id="1"), gold(["Other"], id="2"), gold(["Other"], id="3"), gold(["Other"], id="4")]
    checks = [GenerationCheck(True, True, True), GenerationCheck(True, False, True),
              GenerationCheck(False, False, False), GenerationCheck(True, True, False)]  # fmt: skip
    preds = [NLUPrediction("alarm_set", ["Other"], generation=c) for c in checks]
    records = utterance_records(golds, preds)
    assert records["en-US"]["stopped"] == [1, 1, 0, 1]
    assert records["en-US"]["label_count_ok"] == [1, 0, 0, 1]
    result = score_records(records, samples=200, seed=0)
    assert result["stop_rate"] == pytest.approx(0.75)
    assert result["label_count_rate"] == pytest.approx(0.5)
    assert result["known_intent_rate"] == pytest.approx(0.5)
    lo, hi = result["stop_rate_ci"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
    # Predictions without a check (a classifier, the ONNX runtime): the rates are None, EM unchanged.
    plain = score([*golds], [NLUPrediction("alarm_set", ["Other"])] * 4, samples=50)
    assert plain["stop_rate"] is None and plain["em"] == 1.0


def test_massive_markdown_lists_generation_rates() -> None:
    from evaluation.massive import massive_markdown
    from massive.format import GenerationCheck

    golds = [gold(["Other"], id=str(i)) for i in range(3)]
    preds = [NLUPrediction("alarm_set", ["Other"], generation=GenerationCheck(i > 0, True, True)) for i in range(3)]
    result = {"model": "m", "split": "test", "predictor": "Seq2SeqPredictor", "config": {"confidence": 0.95},
              **score(golds, preds, samples=50)}  # fmt: skip
    text = squash_tables(massive_markdown(result))
    assert "## Generated targets" in text
    assert "| en-US | 0.6667 | 1.0000 | 1.0000 |" in text
