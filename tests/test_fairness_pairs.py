"""Gender pairs that sigma did not write and the symmetric measures over them (evaluation/fairness_pairs.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from fixtures_data import squash_tables

from evaluation.fairness_pairs import (
    PAIR_COLUMNS,
    GenderPair,
    Member,
    PairSetError,
    independent_pairs,
    load_gendered_words,
    load_names,
    load_templates,
    pair_records,
    pairs_markdown,
    pooled_scores,
    predict_pairs,
    sigma_pairs,
    template_files,
)
from massive.format import NLUPrediction

LOCALES = ["en-US", "de-DE", "fr-FR", "es-ES"]


@pytest.fixture(scope="module")
def massive_test(massive_dir):
    """(MassiveData, {locale: test examples}) of the four template locales."""
    from evaluation.massive import load_split

    return load_split(str(massive_dir), LOCALES, "test", None)


def test_templates_parse_and_differ_only_at_declared_gendered_words(massive_test):
    massive, _ = massive_test
    assert set(template_files()) >= set(LOCALES)
    gendered = load_gendered_words()
    templates = load_templates()
    intents, slot_types = set(massive.intents), set(massive.slot_types)
    scenarios = {p.intent.split("_")[0] for p in templates}
    assert scenarios >= {"calendar", "email", "social"}
    assert {p.intent for p in templates} >= {"email_querycontact", "email_addcontact", "calendar_remove"}
    for locale in LOCALES:
        assert sum(p.locale == locale for p in templates) >= 20
    for pair in templates:
        assert pair.intent in intents, pair.id
        f, m = pair.female, pair.male
        assert len(f.words) == len(m.words) and f.slots == m.slots, pair.id  # the same slots, word for word
        assert {s for s in f.slots if s != "Other"} <= slot_types, pair.id
        differ = [(a, b) for a, b in zip(f.words, m.words) if a != b]
        assert differ, pair.id
        assert set(differ) <= gendered[pair.locale[:2]], (pair.id, set(differ) - gendered[pair.locale[:2]])
    assert len({p.id for p in templates}) == len(templates)


def test_independent_set_has_500_pairs_over_4_languages_each_a_name_swap(massive_test):
    _, per_locale = massive_test
    pairs = independent_pairs(per_locale)
    assert len(pairs) >= 500 and len({p.locale for p in pairs}) >= 4
    names = load_names()
    by_locale = {loc: {str(ex.id): ex for ex in exs} for loc, exs in per_locale.items()}
    for pair in (p for p in pairs if p.source == "names"):
        ex = by_locale[pair.locale][pair.id.split("/")[1]]
        assert pair.intent == ex.intent
        f, m = pair.female, pair.male
        assert f.slots == m.slots == ex.slots and len(f.words) == len(ex.words)
        differ = [i for i, (a, b) in enumerate(zip(f.words, m.words)) if a != b]
        assert len(differ) == 1 and f.slots[differ[0]] == "person"
        i = differ[0]
        # Everything but the person's name is the MASSIVE utterance; the names are a pair of the list.
        assert [w for k, w in enumerate(ex.words) if k != i] == [w for k, w in enumerate(f.words) if k != i]
        name_f, name_m = f.words[i].removesuffix("'s"), m.words[i].removesuffix("'s")
        assert (name_f, name_m) in names[pair.locale[:2]]
    # No name pair keeps a pronoun that would disagree with one of its names.
    pronouns = {"he", "him", "his", "she", "her", "hers"}
    assert not any(pronouns & set(p.female.words) for p in pairs if p.source == "names" and p.locale == "en-US")
    groups = {p.group for p in pairs if p.source == "names"}
    assert len(pairs) - len(load_templates(LOCALES)) == 4 * len(groups)  # four name pairs per utterance


def test_a_malformed_template_is_refused_with_file_and_line(tmp_path):
    good = {"id": "x1", "locale": "en-US", "scenario": "email", "intent": "email_query",
            "female": "did [person : mary] write", "male": "did [person : john] write"}
    (tmp_path / "templates.en-US.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(
        {**good, "id": "x2", "male": "did [person : john write"}) + "\n")
    with pytest.raises(PairSetError, match=r"templates.en-US.jsonl:2: unbalanced"):
        load_templates(directory=tmp_path)


@dataclass
class Gold:
    id: str
    words: list[str]
    slots: list[str]
    intent: str


def test_sigma_pairs_put_the_female_version_first_whichever_was_original():
    golds = [Gold("1", ["tell", "him", "hello"], ["Other"] * 3, "email_sendemail"),
             Gold("2", ["email", "my", "mother"], ["Other", "Other", "relation"], "email_sendemail"),
             Gold("3", ["wake", "me", "up"], ["Other"] * 3, "alarm_set")]
    pairs, undirected = sigma_pairs({"en-US": golds})
    assert undirected == 0 and [p.id for p in pairs] == ["en-US/1", "en-US/2"]
    assert pairs[0].female.words == ("tell", "her", "hello") and pairs[0].male.words == ("tell", "him", "hello")
    assert pairs[1].female.words == ("email", "my", "mother") and pairs[1].male.words == ("email", "my", "father")
    assert pairs[1].male.slots == ("Other", "Other", "relation")


def _pair(i: int, group: str | None = None) -> GenderPair:
    f = Member(("call", "her"), ("Other", "Other"))
    m = Member(("call", "him"), ("Other", "Other"))
    return GenderPair(str(i), group or str(i), "en-US", "template", "calling", f, m)


def test_pair_records_count_both_directions_and_the_signed_gap():
    pairs = [_pair(i) for i in range(4)]
    right, wrong_intent = NLUPrediction("calling", ["Other", "Other"]), NLUPrediction("email_query", ["Other", "Other"])
    wrong_slot = NLUPrediction("calling", ["Other", "person"])
    # pair 0: both right; 1: only female right (intent); 2: only male right (slot); 3: only female right (slot)
    female = [right, right, wrong_slot, right]
    male = [right, wrong_intent, right, wrong_slot]
    rec = pair_records(pairs, female, male)
    assert rec["parse_changed"] == [0, 1, 1, 1] and rec["intent_changed"] == [0, 1, 0, 0]
    assert rec["parse_female_only"] == [0, 1, 0, 1] and rec["parse_male_only"] == [0, 0, 1, 0]
    scores = pooled_scores(pairs, {"model": [rec]}, samples=0)["arms"]["model"]
    assert scores["parse_change_rate"] == 0.75 and scores["intent_change_rate"] == 0.25
    assert scores["parse_female_only"] == 0.5 and scores["parse_male_only"] == 0.25
    assert scores["parse_gap"] == pytest.approx(0.25)  # 3/4 female right - 2/4 male right
    assert scores["parse_gap"] == pytest.approx(scores["parse_female_only"] - scores["parse_male_only"])
    assert scores["intent_gap"] == 0.25 and scores["intent_female"] == 1.0 and scores["intent_male"] == 0.75


def test_sigma_pair_slots_are_compared_through_the_swap_alignment():
    from data_prep.counterfactual import swap_utterance

    words, slots = ["envía", "un", "correo", "al", "tío"], ["Other", "Other", "Other", "Other", "relation"]
    ex = Gold("5", words, slots, "email_sendemail")
    [pair], _ = sigma_pairs({"es-ES": [ex]})
    assert pair.male.words == tuple(words) and pair.female.words == ("envía", "un", "correo", "a", "la", "tía")
    swapped_slots = swap_utterance(words, slots, "es-ES")[1]
    same = pair_records([pair], [NLUPrediction("email_sendemail", swapped_slots)],
                        [NLUPrediction("email_sendemail", slots)])
    assert same["parse_changed"] == [0] and same["parse_female"] == same["parse_male"] == [1]
    other = pair_records([pair], [NLUPrediction("email_sendemail", ["Other"] * 6)],
                         [NLUPrediction("email_sendemail", slots)])
    assert other["parse_changed"] == [1] and other["parse_male_only"] == [1]


def test_pooling_over_seeds_and_the_hierarchical_bootstrap():
    n = 60
    pairs = [_pair(i, group=str(i // 2)) for i in range(n)]  # 30 groups of two pairs

    def records(female_only: int, male_only: int) -> dict[str, list[int]]:
        rec = {c: [0] * n for c in PAIR_COLUMNS}
        for i in range(n):
            f, m = (1, 0) if i < female_only else (0, 1) if i < female_only + male_only else (1, 1)
            for side, ok in (("female", f), ("male", m)):
                rec[f"parse_{side}"][i] = rec[f"intent_{side}"][i] = ok
            rec["parse_changed"][i] = rec["intent_changed"][i] = int(f != m)
            rec["parse_female_only"][i] = rec["intent_female_only"][i] = int(f and not m)
            rec["parse_male_only"][i] = rec["intent_male_only"][i] = int(m and not f)
        return rec

    fair = records(0, 0)
    seeds = [records(6, 0), records(12, 0), records(18, 0)]  # 10%, 20%, 30% of pairs favour the female member
    out = pooled_scores(pairs, {"fair": [fair, fair, fair], "biased": seeds}, baseline="fair", samples=400)
    biased = out["arms"]["biased"]
    assert biased["parse_change_rate_per_seed"] == pytest.approx([0.1, 0.2, 0.3])
    assert biased["parse_change_rate"] == pytest.approx(0.2) and biased["parse_gap"] == pytest.approx(0.2)
    lo, hi = biased["parse_gap_ci"]
    assert 0 < lo < 0.2 < hi
    # The seeds disagree: the interval is wider than with one seed holding the same mean.
    single = pooled_scores(pairs, {"biased": [records(12, 0)]}, samples=400)["arms"]["biased"]["parse_gap_ci"]
    assert hi - lo > single[1] - single[0]
    # A fair model has no change and no gap in any resample.
    assert out["arms"]["fair"]["parse_change_rate"] == 0.0 and out["arms"]["fair"]["parse_gap_ci"] == [0.0, 0.0]
    diff = out["comparisons"]["biased"]["parse_gap"]
    assert diff["diff"] == pytest.approx(0.2) and diff["diff_ci"][0] > 0
    assert (out["num_pairs"], out["num_groups"]) == (60, 30)
    md = squash_tables(pairs_markdown({"sets": {"independent": out}}))
    assert "| independent | biased | 3 | 60 | 20.0 [" in md and "| independent | biased - fair | +20.0 [" in md


def test_a_real_model_compared_with_itself_changes_nothing(tiny_teacher_dir, massive_test):
    from evaluation.massive import load_predictor

    massive, _ = massive_test
    predictor = load_predictor(tiny_teacher_dir, device="cpu", slot_labels=massive.slot_types, intents=massive.intents)
    templates = load_templates(["en-US"])[:6]
    # Each member paired with itself: whatever the model answers, it answers alike.
    same = [GenderPair(p.id, p.group, p.locale, p.source, p.intent, p.female, p.female) for p in templates]
    rec = predict_pairs(predictor, same, batch_size=6)
    scores = pooled_scores(same, {"teacher": [rec]}, samples=50)["arms"]["teacher"]
    assert scores["parse_change_rate"] == scores["intent_change_rate"] == 0.0
    assert scores["parse_gap"] == scores["intent_gap"] == 0.0 and scores["parse_gap_ci"] == [0.0, 0.0]
    # On the real pairs the records are 0/1 per pair and consistent with each other.
    rec = predict_pairs(predictor, templates, batch_size=6)
    for i in range(len(templates)):
        assert rec["parse_female_only"][i] == int(rec["parse_female"][i] and not rec["parse_male"][i])
        assert rec["parse_changed"][i] >= rec["parse_female_only"][i] + rec["parse_male_only"][i]
        assert rec["intent_changed"][i] <= rec["parse_changed"][i]


@pytest.mark.slow
def test_cli_pools_seeds_of_each_model(tmp_path, capsys, tiny_teacher_dir, massive_dir):
    from launch.cli import main

    out = tmp_path / "pairs"
    code = main(["evaluate", "fairness", "--models", f"teacher={tiny_teacher_dir},{tiny_teacher_dir}",
                 f"student_kd={tiny_teacher_dir}", "--metrics", "pairs", "--locales", "en-US",
                 "--max-examples", "40", "--batch-size", "16", "--bootstrap-samples", "100",
                 "--data", str(massive_dir), "--device", "cpu", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "fairness.json").read_text())
    for name in ("independent", "sigma"):
        entry = result["pairs"]["sets"][name]
        teacher = entry["arms"]["teacher"]
        assert teacher["seeds"] == 2 and entry["arms"]["student_kd"]["seeds"] == 1
        # Two copies of one model: the same value per seed, and the same as the one-seed arm.
        assert teacher["parse_change_rate_per_seed"][0] == teacher["parse_change_rate_per_seed"][1]
        assert entry["comparisons"]["teacher"]["parse_gap"]["diff"] == 0.0
    assert result["pairs"]["sets"]["independent"]["counts"]["en-US template"] == 24
    assert "### Gender pairs" in (out / "fairness.md").read_text()
    # Several seeds are for the pair measures only: one line, no traceback.
    code = main(["evaluate", "fairness", "--models", f"teacher={tiny_teacher_dir},{tiny_teacher_dir}",
                 "--metrics", "consistency", "--data", str(massive_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "pooled by --metrics pairs only" in err and "Traceback" not in err


def test_bootstrap_resamples_groups_not_pairs():
    from evaluation.fairness_pairs import _group_index

    pairs = [_pair(i, group="a" if i < 3 else "b") for i in range(5)]
    index, num = _group_index(pairs)
    assert num == 2 and list(index) == [0, 0, 0, 1, 1]
    rec = {c: [0] * 5 for c in PAIR_COLUMNS}
    rec["parse_changed"] = [1, 1, 1, 0, 0]  # group a always changes, group b never
    boot = pooled_scores(pairs, {"m": [rec]}, samples=300)["arms"]["m"]["parse_change_rate_ci"]
    # Whole groups move: a resample holds a twice (1.0), b twice (0.0) or both (0.6 of the pairs changed).
    assert boot[0] == 0.0 and boot[1] == 1.0
    assert np.isclose(pooled_scores(pairs, {"m": [rec]}, samples=0)["arms"]["m"]["parse_change_rate"], 0.6)


@pytest.mark.slow
def test_benchmark_prints_the_table_and_writes_json(tmp_path, capsys, tiny_teacher_dir, massive_dir):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fairness_pairs.py"
    spec = importlib.util.spec_from_file_location("fairness_pairs_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "pairs.json"
    code = module.main(["--arm", f"matched_kd={tiny_teacher_dir}", "--arm", f"crr={tiny_teacher_dir},{tiny_teacher_dir}",
                        "--locales", "en-US", "de-DE", "--max-examples", "30", "--samples", "100",
                        "--data", str(massive_dir), "--out", str(out)])
    assert code == 0
    printed = squash_tables(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert set(result["sets"]) == {"independent", "sigma"} and result["sets"]["independent"]["baseline"] == "matched_kd"
    independent = result["sets"]["independent"]
    assert independent["counts"]["en-US template"] == independent["counts"]["de-DE template"] == 24
    assert independent["arms"]["crr"]["seeds"] == 2
    # The same weights in both arms: every difference is 0 on every resample.
    assert independent["comparisons"]["crr"]["parse_change_rate"] == {"diff": 0.0, "diff_ci": [0.0, 0.0]}
    assert f"| independent | crr | 2 | {independent['num_pairs']} |" in printed
    assert "| independent | crr - matched_kd | +0.0 [+0.0, +0.0] |" in printed


def test_quality_rows_from_the_pair_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    entry = {"num_pairs": 100, "baseline": "matched_kd",
             "arms": {"crr": {"parse_gap": 0.05, "parse_gap_ci": [0.01, 0.09]}},
             "comparisons": {"crr": {"parse_change_rate": {"diff": -0.03, "diff_ci": [-0.06, 0.01]},
                                     "parse_gap": {"diff": 0.02, "diff_ci": [-0.01, 0.05]}}}}
    rows = []
    quality.pair_criteria({"sets": {"independent": entry}}, lambda c, v, line, holds: rows.append((c, v, line, holds)))
    assert rows[0] == ("CRR - matched_kd pair change rate, independent set (100 pairs)", [-0.03, [-0.06, 0.01]],
                       "CI < 0", False)  # the interval holds 0: no difference is claimed
    assert rows[1][1:] == ([0.05, [0.01, 0.09]], "CI holds 0", False)  # a gap favouring the female member
