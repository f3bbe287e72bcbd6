"""Pipeline stage planning: skip complete stages, rerun a deleted one and everything depending on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from evaluation.report import MASSIVE_COMPARISONS
from launch.pipeline import (
    MASSIVE_MODELS,
    STAGE_BY_NAME,
    STAGES,
    PipelineConfig,
    plan_stages,
    stage_commands,
)


def _complete_all(run_dir: Path) -> None:
    for stage in STAGES:
        out = run_dir / stage.output
        if stage.output.endswith(".md"):
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("x")
        else:
            out.mkdir(parents=True, exist_ok=True)


def _downstream(name: str) -> set[str]:
    found = {name}
    for stage in STAGES:  # STAGES is topologically ordered
        if any(d in found for d in stage.deps):
            found.add(stage.name)
    return found


def test_fresh_run_runs_everything(tmp_path):
    decision = plan_stages(tmp_path, PipelineConfig(), [])
    assert set(decision.values()) == {"run"}


def test_complete_run_skips_everything(tmp_path):
    _complete_all(tmp_path)
    assert set(plan_stages(tmp_path, PipelineConfig(), []).values()) == {"skip"}


@pytest.mark.parametrize("deleted", ["student", "teacher_ft", "export", "eval_icl"])
def test_deleting_one_output_reruns_it_and_dependants_only(tmp_path, deleted):
    _complete_all(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / STAGE_BY_NAME[deleted].output)
    decision = plan_stages(tmp_path, PipelineConfig(), [])
    rerun = {k for k, v in decision.items() if v == "run"}
    assert rerun == _downstream(deleted)
    assert "data" not in rerun and "teacher" not in rerun


def test_skip_and_force(tmp_path):
    _complete_all(tmp_path)
    cfg = load_config(PipelineConfig, overrides=["skip=[eval_translation]"])
    decision = plan_stages(tmp_path, cfg, ["eval_icl"])
    assert decision["eval_translation"] == "off"
    assert decision["eval_icl"] == "run" and decision["report"] == "run" and decision["teacher"] == "skip"
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(PipelineConfig, overrides=["skip=[nope]"])


def test_every_stage_has_a_command_or_is_internal(tmp_path):
    for stage in STAGES:
        if stage.kind == "internal":
            continue
        cmds = stage_commands(stage, tmp_path, "tiny", PipelineConfig(), tmp_path / ".tmp")
        assert cmds and all(isinstance(c, list) and c for c in cmds)


def test_tiny_and_small_pipeline_presets_load():
    for preset in ("tiny", "small"):
        cfg = load_config(PipelineConfig, section="pipeline", preset=preset)
        assert cfg.massive_locales


def test_eval_massive_compares_after_evaluating_both_models(tmp_path):
    tmp_out = tmp_path / ".tmp"
    cmds = stage_commands(STAGE_BY_NAME["eval_massive"], tmp_path, "tiny", PipelineConfig(), tmp_out)
    evaluated = {Path(c[c.index("--out") + 1]).name: k for k, c in enumerate(cmds) if c[:2] == ["evaluate", "massive"]}
    assert set(evaluated) == set(MASSIVE_MODELS)
    compares = [(k, c) for k, c in enumerate(cmds) if c[:2] == ["evaluate", "compare"]]
    assert len(compares) == len(MASSIVE_COMPARISONS)
    for comparison, (k, cmd) in zip(MASSIVE_COMPARISONS, compares):
        # A and B are results this stage writes, before the comparison reads them.
        assert cmd[2:4] == [str(tmp_out / comparison.a / "massive.json"), str(tmp_out / comparison.b / "massive.json")]
        assert evaluated[comparison.a] < k and evaluated[comparison.b] < k
        assert cmd[4:] == ["--out", str(tmp_out), "--name", f"compare_{comparison.name}"]
    assert [(c.a, c.b) for c in MASSIVE_COMPARISONS] == [
        ("scratch", "teacher"), ("teacher", "student_fp32"), ("student_fp32", "student_int8"),
    ]  # fmt: skip
