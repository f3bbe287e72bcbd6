"""The TF-IDF + logistic regression reference (`evaluate baseline`) on real MASSIVE data, and
`evaluate compare` on its results."""

from __future__ import annotations

import json

import pytest
from fixtures_data import squash_tables

from launch.cli import main


@pytest.fixture(scope="module")
def baseline_json(massive_dir, tmp_path_factory):
    """`evaluate baseline` on en-US: 2000 train utterances, 200 test ids."""
    out = tmp_path_factory.mktemp("baseline")
    argv = ["evaluate", "baseline", "--out", str(out), "--locales", "en-US", "--max-examples", "200",
            "--max-train", "2000", "--seed", "0", f"massive.data={massive_dir}"]  # fmt: skip
    assert main(argv) == 0
    return out / "baseline.json"


@pytest.mark.slow
def test_baseline_learns_intents_well_above_chance(baseline_json, massive_dir):
    from evaluation.massive import load_split

    result = json.loads(baseline_json.read_text())
    assert result["kind"] == "baseline" and result["num_train"] == {"en-US": 2000}
    s = result["per_locale"]["en-US"]
    assert s["n"] == 200
    # 60 intents: chance is 1/60; a linear model on 2000 utterances does far better.
    assert s["intent_acc"] > 0.5
    low, high = s["intent_acc_ci"]
    assert low < s["intent_acc"] < high and high - low < 0.2
    # Intents only: exact match and slot F1 do not apply.
    assert s["em"] is None and s["slot_f1"] is None and result["em_ci"] is None
    assert "| en-US | 200 | n/a |" in squash_tables(baseline_json.with_suffix(".md").read_text())
    # Scored on the ids `evaluate massive` scores with the same locales, max_examples and seed.
    _, per_locale = load_split(str(massive_dir), ["en-US"], "test", 200, seed=0)
    assert result["records"]["en-US"]["id"] == [ex.id for ex in per_locale["en-US"]]


def test_train_sample_is_seeded_and_capped():
    from evaluation.baseline import train_intent_classifier

    class Ex:
        def __init__(self, i: int) -> None:
            self.words, self.intent = ("set", "alarm", str(i)) if i % 2 else ("play", "music", str(i)), f"intent{i % 2}"

    examples = [Ex(i) for i in range(40)]
    classifier, n = train_intent_classifier(examples, 10, seed=0)
    assert n == 10 and list(classifier.predict(["set alarm 7", "play music 8"])) == ["intent1", "intent0"]
    assert train_intent_classifier(examples, 0, seed=0)[1] == 40
    with pytest.raises(ValueError, match="fewer than two intents"):
        train_intent_classifier(examples[:1], None, seed=0)


@pytest.mark.slow
def test_compare_a_result_with_itself_and_with_a_better_model(baseline_json, tmp_path, capsys):
    # Against itself: every difference is exactly 0, interval [0, 0].
    assert main(["evaluate", "compare", str(baseline_json), str(baseline_json), "--out", str(tmp_path)]) == 0
    assert "B - A" in capsys.readouterr().out
    compared = json.loads((tmp_path / "compare.json").read_text())
    assert set(compared["metrics"]) == {"intent_acc"}  # the only metric the baseline has
    m = compared["metrics"]["intent_acc"]
    assert (m["diff"], m["diff_ci"]) == (0.0, [0.0, 0.0])
    # The baseline records its intents: against itself every prediction is identical.
    assert compared["identical_predictions"] == {"share": 1.0, "compared": ["pred_intent"], "per_locale": {"en-US": 1.0}}
    table = (tmp_path / "compare.md").read_text()
    assert table.startswith("# Paired comparison on 200 ids")
    assert "Identical predictions (pred_intent): 100.0% of ids x locales (en-US 100.0%)." in table

    # A model right on every utterance, on the same ids: B - A = 1 - baseline accuracy.
    result = json.loads(baseline_json.read_text())
    ids = result["records"]["en-US"]["id"]
    oracle = {"model": "oracle", "records": {"en-US": {"id": ids, "intent_ok": [1] * len(ids), "em": [1] * len(ids),
                                                       "slot_tp": [1] * len(ids), "slot_pred": [1] * len(ids),
                                                       "slot_gold": [1] * len(ids)}}}  # fmt: skip
    (tmp_path / "oracle.json").write_text(json.dumps(oracle))
    assert main(["evaluate", "compare", str(baseline_json), str(tmp_path / "oracle.json"), "--out", str(tmp_path),
                 "--name", "vs-oracle"]) == 0  # fmt: skip
    vs_oracle = json.loads((tmp_path / "vs-oracle.json").read_text())
    m = vs_oracle["metrics"]["intent_acc"]
    assert m["diff"] == pytest.approx(1.0 - result["intent_acc"])
    assert 0.0 < m["diff_ci"][0] < m["diff"] < m["diff_ci"][1]
    assert m["ratio"] == pytest.approx(1.0 / result["intent_acc"])
    assert vs_oracle["identical_predictions"] is None  # the oracle records no predictions


def test_compare_refuses_results_on_other_ids_or_without_records(baseline_json, tmp_path, capsys):
    result = json.loads(baseline_json.read_text())
    result["records"]["en-US"]["id"][0] = "999999"
    (tmp_path / "other.json").write_text(json.dumps(result))
    assert main(["evaluate", "compare", str(baseline_json), str(tmp_path / "other.json")]) == 2
    assert "different utterances" in capsys.readouterr().err
    (tmp_path / "old.json").write_text(json.dumps({"kind": "massive", "em": 0.5}))
    assert main(["evaluate", "compare", str(baseline_json), str(tmp_path / "old.json")]) == 2
    assert "no per-utterance records" in capsys.readouterr().err
