"""The whole pipeline end to end on an even smaller configuration than the tiny preset.

Runs every stage for real (DeepSpeed through the launcher, ONNX export, every evaluation), checks
every key of summary.json and every section of REPORT.md, then deletes one stage's output and checks
that a second run redoes exactly that stage and the stages that depend on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import PRESET_DIR
from evaluation.report import MASSIVE_COMPARISONS
from launch.pipeline import STAGE_BY_NAME, STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent

# Overrides on top of the tiny preset, per stage section: a few steps and a few examples each.
MICRO = {
    "data": {"locales": ["en-US", "de-DE", "ja-JP"], "corpus": {"max_sentences_per_language": 400},
             "sampling": {"tokenizer_sentences": 3000},
             "tokenizer": {"vocab_size": 1500, "num_sentinels": 20},
             "packing": {"seq_len": 64, "heldout_fraction": 0.05},
             "massive": {"exclude_all_locales": False}},
    "pretrain": {"train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 4, "warmup_steps": 1, "log_every": 2, "eval_every": 2,
                           "num_eval_batches": 1, "save_every": 4}},
    "indomain": {"train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 2, "warmup_steps": 1, "log_every": 1, "eval_every": 2,
                           "num_eval_batches": 1, "save_every": 2}},
    "icl": {"icl": {"max_prompt_tokens": 96, "num_heldout_prompts": 4}, "train": {
        "micro_batch_size": 2, "global_batch_size": 4, "max_steps": 2, "warmup_steps": 1, "log_every": 1,
        "eval_every": 2, "num_eval_batches": 1, "save_every": 2}},
    "distill": {"train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 2, "warmup_steps": 1,
                          "log_every": 1, "eval_every": 2, "num_eval_batches": 1, "save_every": 2}},
    "taskdistill": {"num_train_examples": 16, "num_eval_examples": 2, "train": {
        "micro_batch_size": 4, "global_batch_size": 4, "max_steps": 2, "warmup_steps": 1, "log_every": 1,
        "eval_every": 2, "num_eval_batches": 1, "save_every": 2}},
    "finetune": {"num_train_examples": 16, "num_eval_examples": 4, "train": {
        "micro_batch_size": 4, "global_batch_size": 4, "max_steps": 3, "warmup_steps": 1, "log_every": 1,
        "eval_every": 3, "save_every": 3}},
    "nlu": {"train": {"max_steps": 3, "eval_every": 3, "save_every": 3}},
    "export": {"calibration_examples": 8},
    # The evaluations' sizes and locales are the evaluate section (the pipeline passes only its locales).
    "evaluate": {"massive": {"max_examples": 4}, "icl": {"locales": ["en-US"], "shots": [0, 1], "max_examples": 2},
                 "translation": {"locales": ["de-DE"], "max_examples": 2},
                 "fairness": {"locales": ["en-US"], "max_examples": 3}, "latency": {"max_examples": 3}},
    "pipeline": {"num_train_procs": 2, "num_procs_other": 1, "massive_locales": ["en-US", "ja-JP"],
                 "zero_shot_locales": ["de-DE", "es-ES", "fr-FR"], "zero_shot_max_examples": 4},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def _micro_preset(tmp: Path) -> Path:
    preset = tmp / "micro"
    preset.mkdir()
    for src in sorted((PRESET_DIR / "tiny").glob("*.yaml")):
        data = yaml.safe_load(src.read_text()) or {}
        data = _merge(data, MICRO.get(src.stem, {}))
        (preset / src.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return preset


def _run_pipeline(preset: Path, run_dir: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "pipeline", "--preset", str(preset),
                           "--out", str(run_dir)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _ran(stdout: str) -> set[str]:
    return set(re.findall(r"^\[pipeline\] (\S+)\s+running:", stdout, flags=re.M))


def _downstream(name: str) -> set[str]:
    found = {name}
    for stage in STAGES:
        if any(d in found for d in stage.deps):
            found.add(stage.name)
    return found


@pytest.mark.slow
@pytest.mark.timeout(1800)  # every stage as its own process, twice: ~17 min on 2 AVX2 cores
def test_pipeline_end_to_end_then_partial_rerun(tmp_path, massive_dir, flores_dir):
    run_dir = tmp_path / "run"
    preset = _micro_preset(tmp_path)

    first = _run_pipeline(preset, run_dir)
    assert _ran(first) == {s.name for s in STAGES}

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= {"massive", "icl", "translation", "fairness", "latency_ms", "size_mb", "stage_seconds"}
    for model in ("teacher", "student", "student_int8"):
        m = summary["massive"][model]
        for key in ("em", "intent_acc", "slot_f1"):
            assert 0.0 <= m[key] <= 1.0
        assert set(m["per_locale"]) == {"en-US", "ja-JP"}
        for vals in m["per_locale"].values():
            assert set(vals) == {"em", "intent_acc", "slot_f1"}
        lat = summary["latency_ms"][model]
        assert 0 < lat["p50"] <= lat["p95"]
        assert summary["size_mb"][model] > 0
    # int8 is the quantized export of the fine-tuned student: smaller than its fp32 export.
    assert summary["size_mb"]["student_int8"] < summary["size_mb"]["student_fp32"]
    assert summary["icl"]["accuracy"] and summary["translation"]["per_language"]
    # Held-out intents: the in-context trained teacher and the stage-2 teacher on the same test prompts.
    held = summary["icl_heldout"]
    assert held["split"] == "test" and held["same_prompts"] is True and held["num_queries"] == 2
    assert list(held["models"]) == ["heldout-icl", "heldout-base"]
    assert set(summary["fairness"]["models"]) == {"teacher", "student_kd", "student_crr"}
    # Flips and disparity of the MASSIVE models; disparity of the task-agnostic teacher and students,
    # paired against the plain-KD student.
    assert all(e["consistency"] and e["disparity"] for e in summary["fairness"]["models"].values())
    assert set(summary["fairness"]["disparity"]) == {"teacher", "student_kd", "student_crr"}
    assert all(d["overall"]["entropy"] > 0 and "gaps" not in d["overall"] for d in summary["fairness"]["disparity"].values())
    assert set(summary["fairness"]["disparity_comparisons"]) == {"teacher", "student_crr"}
    # The independent name and template pairs of the MASSIVE models (eval/fairness/pairs.json), in the report.
    assert set(summary["fairness"]["pairs"]["sets"]) == {"independent"}
    assert set(summary["fairness"]["pairs"]["sets"]["independent"]["arms"]) == {"teacher", "student_kd", "student_crr"}
    assert set(summary["stage_seconds"]) >= {s.name for s in STAGES if s.name != "report"}
    # Every comparison behind the claims ran on the models' shared ids.
    comparisons = summary["claims"]["comparisons"]
    assert [c["name"] for c in comparisons] == [c.name for c in MASSIVE_COMPARISONS]
    # nlu_teacher compares the NLU student with its gold-only twin, trained only with
    # pipeline.nlu_gold_reference (off in the tiny preset): listed, without a result.
    ran = [c for c in comparisons if c["name"] != "nlu_teacher"]
    assert all(c["diff"] is not None and c["num_ids"] == 4 for c in ran)
    assert next(c for c in comparisons if c["name"] == "nlu_teacher")["diff"] is None
    assert all(p["heldout_unigram_ce"] > 0 for p in summary["claims"]["pretraining"])
    report = (run_dir / "REPORT.md").read_text()
    for section in ("## Claims", "## Summary", "## MASSIVE per locale", "## In-context intent classification",
                    "## In-context learning on held-out intents",
                    "## 1-shot FLORES-200 translation", "## Fairness", "## Latency and size", "## Plots",
                    "## Wall time per stage", "## Resolved configuration"):
        assert section in report
    assert "### Gender pairs" in report.split("## Fairness")[1].split("## Latency and size")[0]
    for png in re.findall(r"\(plots/([^)]+\.png)\)", report):
        assert (run_dir / "plots" / png).is_file()

    # Delete one stage's output: only it and what depends on it run again. A training stage whose
    # output is missing but whose checkpoints are kept (a crash after its last save) resumes them.
    # (Which stages a missing output reruns is planned by plan_stages, tested in test_pipeline_plan.py;
    # here one real rerun, of a training stage, keeps the second run short.)
    teacher_mtime = (run_dir / "teacher" / "config.json").stat().st_mtime
    export_mtime = (run_dir / STAGE_BY_NAME["export"].output / "manifest.json").stat().st_mtime
    shutil.rmtree(run_dir / STAGE_BY_NAME["student_kd_ft"].output)
    assert (run_dir / "checkpoints" / STAGE_BY_NAME["student_kd_ft"].output).is_dir()
    second = _run_pipeline(preset, run_dir)
    assert _ran(second) == _downstream("student_kd_ft")
    assert "export" not in _downstream("student_kd_ft")  # so it was skipped, its output untouched
    assert (run_dir / STAGE_BY_NAME["export"].output / "manifest.json").stat().st_mtime == export_mtime
    kd_log = (run_dir / "logs" / "student_kd_ft.log").read_text()
    assert "--resume" in kd_log.split("$ polyteacher")[-1].splitlines()[0]
    assert re.search(r"resumed from \S+step_0+2 \(step 2\)", kd_log)
    assert (run_dir / STAGE_BY_NAME["student_kd_ft"].output / "config.json").is_file()
    assert "[pipeline] teacher            skipped (complete)" in second
    assert (run_dir / "teacher" / "config.json").stat().st_mtime == teacher_mtime
    assert (run_dir / STAGE_BY_NAME["export"].output / "manifest.json").is_file()
