"""REPORT.md and summary.json (evaluation/report.py): the Claims section, built from small hand-made
evaluation results, `evaluate compare` run on them, and a metrics.jsonl; and a run where the stages
behind it were skipped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from fixtures_data import squash_tables

from evaluation.massive import result_json
from evaluation.report import MASSIVE_COMPARISONS, write_report
from launch.cli import main
from massive.format import MassiveExample, NLUPrediction
from massive.scoring import score_records, utterance_records

LOCALES = ("en-US", "de-DE")
NUM_IDS = 100
LABELS = ("Other", "Other", "date", "time", "place_name")


def golds() -> list[MassiveExample]:
    rng = random.Random(0)
    out = []
    for i in range(NUM_IDS):
        slots = tuple(rng.choice(LABELS) for _ in range(rng.randint(2, 6)))
        words = tuple(f"w{k}" for k in range(len(slots)))
        for loc in LOCALES:
            out.append(MassiveExample(
                id=str(i), locale=loc, partition="test", scenario="alarm", intent="alarm_set",
                utt=" ".join(words), annot_utt=" ".join(words), words=words, slots=slots,
            ))  # fmt: skip
    return out


def predictions(examples: list[MassiveExample], p_right: float, seed: int) -> list[NLUPrediction]:
    """Right on the whole utterance with probability p_right, else the intent is wrong."""
    rng = random.Random(seed)
    return [NLUPrediction(ex.intent if rng.random() < p_right else "wrong", list(ex.slots)) for ex in examples]


def write_result(massive_dir: Path, name: str, examples: list[MassiveExample], preds: list[NLUPrediction]) -> None:
    """A small `evaluate massive` result, as the pipeline lays it out: eval/massive/NAME/massive.json."""
    records = utterance_records(examples, preds)
    result = {"kind": "massive", "model": name, **score_records(records, samples=200), "records": records}
    (massive_dir / name).mkdir(parents=True)
    (massive_dir / name / "massive.json").write_text(result_json(result))


def write_metrics(run_dir: Path) -> None:
    records = [
        {"stage": "pretrain", "name": "teacher", "step": 0, "heldout_unigram_ce": 6.0},
        {"stage": "pretrain", "name": "teacher", "step": 0, "eval_loss": 9.0, "eval_loss_denoise": 8.0},
        {"stage": "pretrain", "name": "teacher", "step": 100, "eval_loss": 3.0, "eval_loss_denoise": 2.4},
        {"stage": "pretrain", "name": "teacher-indomain", "step": 0, "heldout_unigram_ce": 5.0},
        {"stage": "pretrain", "name": "teacher-indomain", "step": 50, "eval_loss_denoise": 3.0},
        # Another run's records do not count for the teacher's.
        {"stage": "finetune", "name": "teacher-ft", "step": 100, "eval_loss_denoise": 0.1},
    ]
    lines = [json.dumps(r) for r in records]
    # A killed run can leave its last line unfinished.
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"stage": "pretrain", "name": "tea')


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run directory with the four models the claims compare, their comparisons, and metrics.jsonl."""
    run_dir = tmp_path / "run"
    massive_dir = run_dir / "eval" / "massive"
    examples = golds()
    fp32 = predictions(examples, 0.8, 2)
    # int8 changes two predictions of its fp32 source (one id in each locale, one of them an intent).
    int8 = list(fp32)
    int8[0] = NLUPrediction(fp32[0].intent, ["time"] * len(fp32[0].slots))
    int8[11] = NLUPrediction("changed", fp32[11].slots)
    for name, preds in (("scratch", predictions(examples, 0.2, 0)), ("teacher", predictions(examples, 0.9, 1)),
                        ("student_fp32", fp32), ("student_int8", int8), ("student", fp32),
                        ("student_kd", predictions(examples, 0.8, 3)),
                        ("scratch_zero_shot", predictions(examples, 0.1, 4)),
                        ("teacher_zero_shot", predictions(examples, 0.3, 5)),
                        ("student_nlu_gold", predictions(examples, 0.6, 6)),
                        ("student_nlu", predictions(examples, 0.7, 7))):  # fmt: skip
        write_result(massive_dir, name, examples, preds)
    for c in MASSIVE_COMPARISONS:
        argv = ["evaluate", "compare", str(massive_dir / c.a / "massive.json"), str(massive_dir / c.b / "massive.json"),
                "--out", str(massive_dir), "--name", f"compare_{c.name}", "--samples", "200"]  # fmt: skip
        assert main(argv) == 0
    write_metrics(run_dir)
    return run_dir


def test_claims_state_each_comparison_with_its_paired_evidence(run_dir, capsys):
    summary = write_report(run_dir)
    capsys.readouterr()
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["claims"] == summary["claims"]
    rows = {row["name"]: row for row in summary["claims"]["comparisons"]}
    assert list(rows) == ["pretraining", "distillation", "quantization", "crr", "zero_shot", "nlu_teacher"]
    for row in rows.values():
        # A's and B's EM are those of their own results, on the same ids.
        assert (row["value_a"], row["value_b"]) == (summary["massive"][row["a"]]["em"], summary["massive"][row["b"]]["em"])
        assert row["diff"] == pytest.approx(row["value_b"] - row["value_a"])
        assert row["metric"] == "em" and row["num_ids"] == NUM_IDS and row["confidence"] == 0.95

    pretraining = rows["pretraining"]
    assert (pretraining["a"], pretraining["b"]) == ("scratch", "teacher")
    assert 0.0 < pretraining["diff_ci"][0] < pretraining["diff"] and pretraining["excludes_zero"] is True
    assert pretraining["ratio"] is None and pretraining["identical_predictions"] is None

    distillation = rows["distillation"]
    assert (distillation["a"], distillation["b"]) == ("teacher", "student_fp32")
    assert distillation["ratio"] == pytest.approx(distillation["value_b"] / distillation["value_a"])
    assert distillation["ratio_ci"][0] < distillation["ratio"] < distillation["ratio_ci"][1]
    assert distillation["identical_predictions"] is None

    quantization = rows["quantization"]
    assert (quantization["a"], quantization["b"]) == ("student_fp32", "student_int8")
    # Two of 2 x 100 utterances changed.
    assert quantization["identical_predictions"] == 0.99 and quantization["ratio"] is None
    assert quantization["diff_ci"][0] <= quantization["diff"] <= quantization["diff_ci"][1]

    teacher, indomain = summary["claims"]["pretraining"]
    assert teacher == {"name": "teacher", "step": 100, "eval_loss_denoise": 2.4, "heldout_unigram_ce": 6.0,
                       "ratio": pytest.approx(0.4), "target_ratio": 0.5, "meets_target": True}  # fmt: skip
    assert (indomain["name"], indomain["ratio"], indomain["meets_target"]) == ("teacher-indomain", 0.6, False)

    report = (run_dir / "REPORT.md").read_text()
    assert report.index("## Claims") < report.index("## Summary")
    claims = squash_tables(report[report.index("## Claims") : report.index("## Summary")])
    rows_md = [line for line in claims.splitlines() if line.startswith("|") and " -> " in line]
    assert rows_md[0].startswith("| question | A -> B | EM A % | EM B % | B - A | 95% CI of B - A | CI excludes 0 |")
    lines = {line.split(" | ")[1]: line for line in rows_md[1:]}
    assert set(lines) == {"scratch -> teacher", "teacher -> student_fp32", "student_fp32 -> student_int8",
                          "student_kd -> student", "scratch_zero_shot -> teacher_zero_shot",
                          "student_nlu_gold -> student_nlu"}
    assert "| yes |" in lines["scratch -> teacher"]
    assert f"| {distillation['ratio']:.2f} [" in lines["teacher -> student_fp32"]
    assert lines["student_fp32 -> student_int8"].endswith("| - | 99.0 |")
    assert "| teacher | 100 | 2.400 | 6.000 | 0.40 | yes |" in claims
    assert "| teacher-indomain | 50 | 3.000 | 5.000 | 0.60 | no |" in claims


def test_claims_of_a_run_whose_stages_were_skipped_are_dashes(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "eval" / "massive").mkdir(parents=True)
    # A comparison cut short, and a teacher that logged its unigram line but never evaluated.
    (run_dir / "eval" / "massive" / "compare_quantization.json").write_text('{"metrics": {"em": {"a": 0.')
    (run_dir / "metrics.jsonl").write_text(json.dumps({"name": "teacher", "step": 0, "heldout_unigram_ce": 6.0}) + "\n")
    summary = write_report(run_dir)
    for row in summary["claims"]["comparisons"]:
        assert all(row[k] is None for k in ("value_a", "value_b", "diff", "diff_ci", "excludes_zero", "ratio",
                                            "identical_predictions", "num_ids"))  # fmt: skip
    teacher, indomain = summary["claims"]["pretraining"]
    assert teacher["heldout_unigram_ce"] == 6.0 and teacher["ratio"] is None and teacher["meets_target"] is None
    assert indomain["heldout_unigram_ce"] is None
    report = squash_tables((run_dir / "REPORT.md").read_text())
    assert "| scratch -> teacher | - | - | - | - | - | - | - |" in report
    assert "| teacher | - | - | 6.000 | - | - |" in report
    # Nothing at all: no eval directory, no metrics.jsonl.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [row["diff"] for row in write_report(empty)["claims"]["comparisons"]] == [None] * len(MASSIVE_COMPARISONS)


def test_stage_seconds_and_the_wall_time_of_stages_side_by_side(tmp_path):
    """stage_seconds.json holds each stage's seconds and the pipeline's wall time (pipeline_wall):
    the stages' total leaves the wall time out, which the report states on its own."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stage_seconds.json").write_text(json.dumps({"data": 10.0, "teacher": 30.0, "pipeline_wall": 32.5}))
    summary = write_report(run_dir)
    assert summary["stage_seconds"] == {"data": 10.0, "teacher": 30.0} and summary["wall_seconds"] == 32.5
    report = (run_dir / "REPORT.md").read_text()
    assert "Total: 40 s" in report and "stages side by side, up to the report): 32 s" in report
    (run_dir / "stage_seconds.json").write_text(json.dumps({"data": 10.0}))  # a run from before the key
    assert write_report(run_dir)["wall_seconds"] is None and "Wall time of the latest" not in \
        (run_dir / "REPORT.md").read_text()


def test_models_side_by_side_per_locale_in_one_figure_per_metric(run_dir):
    # A classifier reference: intent only, no EM or slot F1.
    examples = golds()
    write_result(run_dir / "eval" / "massive", "baseline_tfidf", examples,
                 [type("Intent", (), {"intent": ex.intent})() for ex in examples])  # fmt: skip
    (run_dir / "eval" / "massive" / "teacher" / "massive_em.png").write_bytes(b"\x89PNG per-model bars")
    summary = write_report(run_dir)
    plots = run_dir / "plots"
    for metric in ("em", "intent_acc", "slot_f1"):
        png = plots / f"massive_{metric}_by_locale.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    # The per-model bars are replaced by the side-by-side figures in the report.
    assert not (plots / "massive_teacher_massive_em.png").exists()
    report = (run_dir / "REPORT.md").read_text()
    assert "plots/massive_intent_acc_by_locale.png" in report and "massive_em.png" not in report
    # The reference has intent accuracy only; the models have all three.
    assert summary["massive"]["baseline_tfidf"]["em"] is None
    assert summary["massive"]["baseline_tfidf"]["intent_acc"] == 1.0


def test_quality_benchmark_holds_a_run_to_the_acceptance_lines(run_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    write_report(run_dir)
    out = tmp_path / "q.json"
    assert quality.main(["--run-dir", str(run_dir), "--out", str(out)]) == 0
    rows = {r["criterion"]: r for r in json.loads(out.read_text())["criteria"]}
    # The fixture: teacher 0.9 vs scratch 0.2 right; int8 changes 2 of 200 fp32 predictions.
    assert rows["(a) stage-2 teacher - scratch, EM diff and CI"]["holds"] is True
    assert rows["(b) student / teacher EM"]["holds"] is False  # fp32 student 0.8 of a 0.9 teacher
    assert rows["(c) identical int8 / fp32 predictions"]["value"] == pytest.approx(0.99)
    assert rows["(c) identical int8 / fp32 predictions"]["holds"] is True
    assert rows["teacher: held-out denoising / unigram CE"]["value"] == pytest.approx(0.4)
    assert rows["teacher: held-out denoising / unigram CE"]["holds"] is True
    assert rows["NLU int8 intent accuracy vs TF-IDF"]["holds"] is None  # not in this run
    assert "| (b) student / teacher EM" in capsys.readouterr().out


def test_quality_benchmark_fairness_rows():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    rows: dict[str, tuple] = {}
    quality.fairness_criteria({"claims": {"comparisons": []}}, lambda c, v, line, holds: rows.update({c: (v, holds)}))
    assert rows and all(holds is None for _, holds in rows.values())  # nothing measured, nothing claimed
    summary = {
        "claims": {"comparisons": [{"name": "crr", "diff": -0.02, "diff_ci": [-0.03, -0.01]}]},
        "fairness": {
            "comparisons": {"student_crr": {"overall": {
                "em_flip_rate": {"ratio": 0.4, "ratio_ci": [0.2, 0.7]},
                "intent_flip_rate": {"ratio": 0.6, "ratio_ci": [0.2, 1.2]}}}},
            "disparity": {"student_crr": {"overall": {"normalised_gap": 0.5}},
                          "student_kd": {"overall": {"normalised_gap": 0.7}}}},
    }
    rows.clear()
    quality.fairness_criteria(summary, lambda c, v, line, holds: rows.update({c: (v, holds)}))
    assert rows["CRR / plain-KD flip ratio, whole parse (pooled)"] == ([0.4, [0.2, 0.7]], True)
    assert rows["CRR / plain-KD flip ratio, intent (pooled)"][1] is False
    assert rows["CRR - plain-KD student EM (MASSIVE)"][1] is False  # costs 2 points
    assert rows["generation gap / entropy, CRR vs plain KD"] == ([0.5, 0.7], True)
    summary["fairness"]["disparity_comparisons"] = {"student_crr": {"overall": {
        "normalised_gap": {"ratio": 1.02, "ratio_ci": [0.9, 1.1]}}}}
    rows.clear()
    quality.fairness_criteria(summary, lambda c, v, line, holds: rows.update({c: (v, holds)}))
    assert rows["generation gap / entropy, CRR / plain KD (paired)"] == ([1.02, [0.9, 1.1]], False)
    summary["fairness"]["polarity_comparisons"] = {"student_crr": {"overall": {
        "normalised_gap": {"ratio": 0.91, "ratio_ci": [0.90, 0.92]}}}}
    rows.clear()
    quality.fairness_criteria(summary, lambda c, v, line, holds: rows.update({c: (v, holds)}))
    assert rows["gender polarity / entropy, CRR / plain KD (paired)"] == ([0.91, [0.90, 0.92]], True)


def _transfer_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("transfer", Path(__file__).resolve().parent.parent / "benchmarks" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_transfer_benchmark_splits_the_target_nll_and_probes_the_encoder(tiny_teacher_dir, massive_dir, tmp_path):
    import shutil

    import numpy as np
    import torch

    from core.modeldir import load_seq2seq_model
    from data_prep.tokenizer import load_tokenizer
    from massive.format import TargetFormat, has_label_tokens

    transfer = _transfer_module()
    model_dir = tmp_path / "ft"
    shutil.copytree(tiny_teacher_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["massive_intent_first"] = True
    (model_dir / "config.json").write_text(json.dumps(config))
    dev, train = transfer.load_sample(str(massive_dir), ["en-US", "ja-JP"], num_dev=12, num_train=30, seed=0)
    # The same 12 ids in both locales; the bootstrap resamples an id with its translation.
    assert [ex.id for ex in dev[:12]] == [ex.id for ex in dev[12:]] and len(train) == 60
    weights = transfer.id_weights(dev, samples=50, seed=0)
    assert (weights[:, :12] == weights[:, 12:]).all() and (weights.sum(1) == 24).all()

    model, tokenizer = load_seq2seq_model(model_dir).eval(), load_tokenizer(model_dir)
    split = transfer.intent_split_nll(model, tokenizer, dev, batch_size=7)
    # Intent NLL + rest NLL = the model's own mean loss x the number of target tokens.
    fmt = TargetFormat.of(model.config)
    pairs = [fmt.pair(ex.words, ex.slots, ex.intent, has_label_tokens(tokenizer)) for ex in dev]
    targets = [tokenizer(t)["input_ids"] for _, t in pairs]
    total = 0.0
    for (source, _), target in zip(pairs, targets):
        with torch.inference_mode():
            loss = model(**tokenizer([source], return_tensors="pt"), labels=torch.tensor([target])).loss
        total += float(loss) * len(target)
    assert split["intent_nll"].sum() + split["rest_nll"].sum() == pytest.approx(total, rel=1e-4)
    assert (split["rest_tokens"] == [len(t) - 1 for t in targets]).all()
    assert set(np.unique(split["intent_ok"])) <= {0.0, 1.0}

    # The probe reads a separable feature perfectly.
    x = np.array([[0.0], [1.0]] * 10)
    assert transfer.probe_accuracy(x, ["a", "b"] * 10, x, ["a", "b"] * 10).mean() == 1.0

    out = tmp_path / "transfer.json"
    assert transfer.main(["--finetuned", f"ft={model_dir}", f"same={model_dir}", "--pretrained", f"t={tiny_teacher_dir}", "--massive",
                          str(massive_dir), "--locales", "en-US", "ja-JP", "--num-dev", "12", "--num-train", "30",
                          "--bootstrap-samples", "50", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_dev_ids"] == 12 and list(result["probe"]) == ["random", "t"]
    entry = result["finetuned"]["ft"]
    assert entry["intent_nll"] == pytest.approx(split["intent_nll"].mean(), rel=1e-5)
    assert entry["intent_nll_ci"][0] <= entry["intent_nll"] <= entry["intent_nll_ci"][1]
    assert all(0.0 <= v["probe_intent_acc"] <= 1.0 for v in result["probe"].values())
    # Paired against the last --finetuned model (here the same weights): every difference is 0.
    assert entry["vs_baseline"]["intent_nll"] == {"diff": 0.0, "diff_ci": [0.0, 0.0]}
    assert entry["vs_baseline"]["rest_nll"]["diff"] == 0.0 and "vs_baseline" not in result["finetuned"]["same"]
    probe = result["probe"]["t"]
    assert probe["vs_random"]["diff"] == pytest.approx(probe["probe_intent_acc"] - result["probe"]["random"]["probe_intent_acc"])
    with pytest.raises(SystemExit, match="intent-first"):
        transfer.intent_split_nll(load_seq2seq_model(tiny_teacher_dir), tokenizer, dev[:2])


def test_the_gender_pairs_of_the_pipeline_are_in_the_summary_and_the_fairness_section(tmp_path):
    from evaluation.fairness_pairs import pairs_markdown
    from evaluation.report import FAIRNESS_PAIRS

    run_dir = tmp_path / "run"
    fairness_dir = run_dir / "eval" / "fairness"
    fairness_dir.mkdir(parents=True)
    arm = {"seeds": 1, "parse_change_rate": 0.1, "parse_change_rate_ci": [0.05, 0.15], "parse_female_only": 0.04,
           "parse_male_only": 0.06, "parse_gap": -0.02, "parse_gap_ci": [-0.05, 0.01], "intent_change_rate": 0.03,
           "intent_change_rate_ci": [0.01, 0.05], "intent_female_only": 0.01, "intent_male_only": 0.02,
           "intent_gap": -0.01, "intent_gap_ci": [-0.02, 0.0], "parse_female": 0.7, "parse_male": 0.72}
    pairs = {"arms": {"teacher": ["t"]}, "sets": {"independent": {"num_pairs": 12, "arms": {"teacher": arm}}}}
    (fairness_dir / f"{FAIRNESS_PAIRS}.json").write_text(json.dumps({"pairs": pairs}))
    (fairness_dir / f"{FAIRNESS_PAIRS}.md").write_text(pairs_markdown(pairs) + "\n")
    summary = write_report(run_dir)
    assert summary["fairness"]["pairs"]["sets"]["independent"]["num_pairs"] == 12
    section = (run_dir / "REPORT.md").read_text().split("## Fairness")[1].split("## Latency and size")[0]
    assert "### Gender pairs" in section and "| independent | teacher | 1 | 12 |" in squash_tables(section)


# ----------------------------------------------------------------------------- held-out-intent ICL

SHOTS = (0, 1, 2, 5)


def heldout_pair(kind: str, acc: tuple[float, ...], tfidf: tuple[float | None, ...], half: float = 0.1) -> dict:
    """One language pair as evaluation/icl_heldout.py writes it: accuracy +- `half`, differences +- 0.08."""
    def ci(v: float, h: float) -> list[float]:
        return [round(v - h, 6), round(v + h, 6)]

    s = {"kind": kind, "n": 40, **{key: {} for key in ("accuracy", "accuracy_ci", "vs_chance_ci", "vs_k0", "vs_k0_ci",
                                                        "tfidf", "tfidf_ci", "vs_tfidf", "vs_tfidf_ci")}}
    for k, a, t in zip(map(str, SHOTS), acc, tfidf):
        s["accuracy"][k], s["accuracy_ci"][k] = a, ci(a, half)
        s["vs_chance_ci"][k] = ci(a - 0.2, half)
        s["vs_k0"][k], s["vs_k0_ci"][k] = round(a - acc[0], 6), ci(a - acc[0], 0.08 if k != "0" else 0.0)
        s["tfidf"][k], s["tfidf_ci"][k] = t, None if t is None else ci(t, half)
        s["vs_tfidf"][k] = None if t is None else round(a - t, 6)
        s["vs_tfidf_ci"][k] = None if t is None else ci(a - t, 0.08)
    return s


def heldout_result(model: str, pairs: dict[str, dict], num_queries: int = 40) -> dict:
    return {"kind": "icl_heldout", "model": model, "split": "test", "heldout_scenarios": ["alarm", "audio"],
            "heldout_intents": ["alarm_query", "alarm_set", "audio_volume_up", "audio_volume_mute", "alarm_remove"],
            "way": 5, "chance": 0.2, "shots": list(SHOTS), "normalize": "mean", "clm_prompt": True,
            "num_queries": num_queries, "pairs": pairs,
            "mean": {"same": {"pairs": [p for p, s in pairs.items() if s["kind"] == "same"],
                              **{k: v for k, v in pairs["en-US->en-US"].items() if k not in ("kind", "n")}}},
            "example_prompt": "Utterance: wake me up Intent: alarm set\nUtterance: louder Intent:",
            "ci_method": "percentile bootstrap, 95%", "elapsed_s": 1.0, "config": {"icl": {"seed": 0}}}


TFIDF = (None, 0.4, 0.5, 0.5)


def write_heldout(run_dir: Path, base_queries: int = 40) -> Path:
    """eval/icl as the pipeline's eval_icl leaves it: the all-intents result beside the two held-out ones."""
    icl_dir = run_dir / "eval" / "icl"
    icl_dir.mkdir(parents=True)
    trained = {"en-US->en-US": heldout_pair("same", (0.25, 0.3, 0.45, 0.6), TFIDF),
               "de-DE->de-DE": heldout_pair("same", (0.2, 0.2, 0.25, 0.25), TFIDF),
               "en-US->de-DE": heldout_pair("cross", (0.2, 0.2, 0.2, 0.2), (None, 0.3, 0.3, 0.35))}
    base = {"en-US->en-US": heldout_pair("same", (0.2, 0.2, 0.2, 0.2), TFIDF),
            "de-DE->de-DE": heldout_pair("same", (0.05, 0.2, 0.2, 0.2), TFIDF),
            "en-US->de-DE": heldout_pair("cross", (0.2, 0.2, 0.2, 0.2), (None, 0.3, 0.3, 0.35))}
    (icl_dir / "heldout-icl.json").write_text(json.dumps(heldout_result("runs/x/teacher-icl", trained)))
    (icl_dir / "heldout-base.json").write_text(json.dumps(heldout_result("runs/x/teacher-indomain", base, base_queries)))
    for name in ("heldout-icl", "heldout-base"):
        (icl_dir / f"{name}.md").write_text(f"# per-model table {name}\n")
        (icl_dir / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (icl_dir / "icl.json").write_text(json.dumps({"kind": "icl", "accuracy": {"0": 0.03}, "per_locale": {}}))
    (icl_dir / "icl.md").write_text("# all-intents table\n")
    return icl_dir


def test_heldout_icl_section_states_each_pair_against_chance_tfidf_and_the_model_without_icl_training(tmp_path):
    run_dir = tmp_path / "run"
    write_heldout(run_dir)
    summary = write_report(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["icl_heldout"] == summary["icl_heldout"]
    # The all-intents result stays summary["icl"], whatever sorts first in eval/icl.
    assert summary["icl"]["kind"] == "icl"
    held = summary["icl_heldout"]
    assert (held["split"], held["way"], held["chance"], held["shots"], held["num_queries"]) == ("test", 5, 0.2, [0, 1, 2, 5], 40)
    assert held["same_prompts"] is True and list(held["models"]) == ["heldout-icl", "heldout-base"]
    trained, base = held["models"]["heldout-icl"], held["models"]["heldout-base"]
    assert (trained["model"], base["model"]) == ("teacher-icl", "teacher-indomain")
    assert trained["pairs"]["en-US->en-US"]["accuracy"]["5"] == 0.6 and base["pairs"]["de-DE->de-DE"]["accuracy"]["0"] == 0.05
    # en-US k=5: 0.6 [0.5, 0.7] is above chance, above k=0 (+0.35 [0.27, 0.43]) and TF-IDF (+0.1 [0.02, 0.18]);
    # k=2 (0.45) is above chance and k=0 but not TF-IDF (-0.05 [-0.13, 0.03]).
    assert trained["findings"] == {
        "cells": 12, "cells_with_demos": 9,
        "above_chance": ["en-US->en-US k=2", "en-US->en-US k=5"],
        "below_chance": [],
        "above_k0": ["en-US->en-US k=2", "en-US->en-US k=5"],
        "above_tfidf": ["en-US->en-US k=5"],
    }  # fmt: skip
    assert base["findings"] == {"cells": 12, "cells_with_demos": 9, "above_chance": [], "below_chance": ["de-DE->de-DE k=0"],
                                "above_k0": ["de-DE->de-DE k=1", "de-DE->de-DE k=2", "de-DE->de-DE k=5"], "above_tfidf": []}

    report = (run_dir / "REPORT.md").read_text()
    section = squash_tables(report[report.index("## In-context learning on held-out intents"):
                                   report.index("## 1-shot FLORES-200 translation")])
    assert "Both models on the same prompts: yes." in section
    assert ("- in-context trained (teacher-icl): above chance in 2 of 12 (pair, k) cells (en-US->en-US k=2, "
            "en-US->en-US k=5), below it in 0; above its own k=0 in 2 of 9") in section
    assert "above the TF-IDF reference in 1 of 9 (en-US->en-US k=5)." in section
    assert "- In short: some (pair, k) cell of either model is above chance, and some cell is above the TF-IDF" in section
    for pair, kind in (("en-US->en-US", "same language"), ("de-DE->de-DE", "same language"),
                       ("en-US->de-DE", "across languages")):
        assert f"### {pair} ({kind})" in section
    en = section[section.index("### en-US->en-US"):section.index("### de-DE->de-DE")]
    assert ("| k | in-context trained % | vs k=0 (points) | without in-context training % | vs k=0 (points) | "
            "TF-IDF NN % | chance % |") in en
    assert "| 0 | 25.0 [15.0, 35.0] | +0.0 [+0.0, +0.0] | 20.0 [10.0, 30.0] | +0.0 [+0.0, +0.0] | n/a | 20.0 |" in en
    assert "| 5 | 60.0 [50.0, 70.0] | +35.0 [+27.0, +43.0] | 20.0 [10.0, 30.0] | +0.0 [-8.0, +8.0] | 50.0 [40.0, 60.0] | 20.0 |" in en
    assert "### mean over the same-language pairs" in section
    # One figure for both models and every pair; the per-model figures and tables are not repeated.
    assert "![held-out-intent k-shot curves](plots/icl_heldout_kshot.png)" in section
    assert (run_dir / "plots" / "icl_heldout_kshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((run_dir / "plots").glob("icl_heldout-*.png"))
    assert "per-model table" not in report and "# all-intents table" in report


def test_heldout_icl_section_says_when_the_prompts_differ_or_nothing_ran(tmp_path):
    run_dir = tmp_path / "run"
    write_heldout(run_dir, base_queries=39)
    summary = write_report(run_dir)
    assert summary["icl_heldout"]["same_prompts"] is False
    assert "Both models on the same prompts: NO" in (run_dir / "REPORT.md").read_text()
    # Only the in-context trained model: its rows, dashes for the other.
    (run_dir / "eval" / "icl" / "heldout-base.json").unlink()
    summary = write_report(run_dir)
    assert summary["icl_heldout"]["same_prompts"] is None and list(summary["icl_heldout"]["models"]) == ["heldout-icl"]
    report = squash_tables((run_dir / "REPORT.md").read_text())
    assert "- without in-context training (teacher-indomain): not run" in report
    assert "| 1 | 30.0 [20.0, 40.0] | +5.0 [-3.0, +13.0] | - | - | 40.0 [30.0, 50.0] | 20.0 |" in report
    # Neither: the section says so, summary.json holds {}.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_report(empty)["icl_heldout"] == {}
    text = (empty / "REPORT.md").read_text()
    assert text[text.index("## In-context learning on held-out intents"):].split("\n\n")[1].startswith("_not run_")
    assert not (empty / "plots" / "icl_heldout_kshot.png").exists()
