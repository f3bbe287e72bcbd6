"""MASSIVE scoring against hand-computed cases, the official scorer's own test cases, and seqeval."""

from __future__ import annotations

import math

import pytest
from seqeval.metrics import f1_score as seqeval_f1

from data_prep.massive import MassiveExample, NLUPrediction, parse_annot_utt, parse_target
from evaluation.massive import align_labels, mean_interval, normal_interval, score, score_locale, to_bio


def gold(slots: list[str], intent: str = "alarm_set", locale: str = "en-US", words: list[str] | None = None) -> MassiveExample:
    words = words or [f"w{i}" for i in range(len(slots))]
    return MassiveExample(
        id="0", locale=locale, partition="test", scenario=intent.split("_")[0], intent=intent,
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
    assert (s["num_gold_spans"], s["num_correct_spans"], s["num_words"], s["em"]) == (2, 2, 8, 1.0)
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


# ----------------------------------------------------------------------------- intervals and grouping


def test_normal_interval_formula():
    lo, hi = normal_interval(0.5, 100)
    assert lo == pytest.approx(0.5 - 1.96 * 0.05) and hi == pytest.approx(0.5 + 1.96 * 0.05)
    lo, hi = normal_interval(0.9, 400, z=2.0)
    assert (lo, hi) == pytest.approx((0.9 - 2.0 * math.sqrt(0.09 / 400), 0.9 + 2.0 * math.sqrt(0.09 / 400)))
    assert normal_interval(0.02, 10) == pytest.approx((0.0, 0.02 + 1.96 * math.sqrt(0.02 * 0.98 / 10)))
    assert normal_interval(1.0, 50) == (1.0, 1.0)


def test_mean_interval_treats_locales_as_independent():
    lo, hi = mean_interval([(0.5, 100), (0.7, 200)])
    se = math.sqrt(0.25 / 100 + 0.21 / 200) / 2
    assert (lo, hi) == pytest.approx((0.6 - 1.96 * se, 0.6 + 1.96 * se))


def test_per_locale_scores_and_unweighted_mean():
    golds = [gold(["date"], "a", "en-US")] * 3 + [gold(["date"], "a", "de-DE")]
    preds = [pred(["date"], "a"), pred(["date"], "b"), pred(["date"], "b"), pred(["date"], "a")]
    s = score(golds, preds)
    assert s["per_locale"]["en-US"]["intent_acc"] == pytest.approx(1 / 3)
    assert s["per_locale"]["de-DE"]["intent_acc"] == 1.0
    # Unweighted over locales, not pooled over utterances (which would give 0.5).
    assert s["intent_acc"] == pytest.approx((1 / 3 + 1) / 2)
    assert s["num_examples"] == 4
    lo, hi = s["per_locale"]["en-US"]["intent_acc_ci"]
    assert (lo, hi) == pytest.approx(normal_interval(1 / 3, 3))
    # slot F1's interval counts words, exact match's counts utterances
    assert s["per_locale"]["en-US"]["num_words"] == 3


def test_mismatched_lengths_and_empty_input_fail_loudly():
    with pytest.raises(ValueError, match="1 gold examples but 2 predictions"):
        score([gold(["date"])], [pred(["date"]), pred(["date"])])
    with pytest.raises(ValueError, match="empty"):
        score([], [])
