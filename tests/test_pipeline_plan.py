"""Pipeline stage planning: skip complete stages, rerun a deleted one and everything depending on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from evaluation.report import MASSIVE_COMPARISONS
from launch.pipeline import (
    MASSIVE_MODELS,
    NLU_MEMBERS_DIR,
    PRETRAINED_FT,
    STAGE_BY_NAME,
    STAGES,
    ZERO_SHOT_MODELS,
    Concurrent,
    PipelineConfig,
    StageFailed,
    plan_stages,
    run_commands,
    stage_commands,
    stage_outputs,
    zero_shot_models,
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


@pytest.mark.parametrize("deleted", ["student", "teacher_ft", "export", "eval_icl", "teacher_icl"])
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
    nlu = stage_commands(STAGE_BY_NAME["student_nlu"], tmp_path, "tiny",
                         load_config(PipelineConfig, overrides=["nlu_members=[student,scratch:tiny]"]), tmp_path / ".tmp")
    assert isinstance(nlu[0], Concurrent) and all(isinstance(c, list) and c for c in nlu[0].commands)


def test_training_stages_resume_only_when_asked(tmp_path):
    from core.checkpoint import CheckpointManager
    from launch.pipeline import stage_checkpoints

    for stage in STAGES:
        if stage.kind != "launch":
            continue
        cfg = PipelineConfig()
        plain = stage_commands(stage, tmp_path, "tiny", cfg, tmp_path / ".tmp")
        resumed = stage_commands(stage, tmp_path, "tiny", cfg, tmp_path / ".tmp", resume=True)
        assert all("--resume" not in c for c in plain)
        assert [c + ["--resume"] for c in plain] == resumed
        # The pipeline clears the same directory the training command writes its checkpoints to.
        assert stage_checkpoints(stage, tmp_path, cfg) == [CheckpointManager(tmp_path, stage.output).root]
    pair = PipelineConfig(pretraining_steps=1800)
    assert stage_checkpoints(STAGE_BY_NAME["scratch_ft"], tmp_path, pair) == [
        CheckpointManager(tmp_path, out).root for out in ("scratch-ft", "pretrained-ft")
    ]


def test_pretraining_claim_with_its_own_budget_trains_a_pair_and_compares_it(tmp_path):
    cfg = PipelineConfig(pretraining_steps=1800, scratch_size="small")
    (step,) = stage_commands(STAGE_BY_NAME["scratch_ft"], tmp_path, "small", cfg, tmp_path / ".tmp")
    assert isinstance(step, Concurrent) and len(step.commands) == 2
    starts = {c[c.index("--out") + 1]: c[c.index("--model") + 1] for c in step.commands}
    assert starts == {"scratch-ft": "scratch:small", "pretrained-ft": str(tmp_path / "teacher-indomain")}
    for cmd in step.commands:
        # One process each, the same budget and schedule, the preset's fine-tuning otherwise.
        assert cmd[:4] == ["launch", "--nproc-per-node", "1", "--"]
        assert {"train.max_steps=1800", "train.save_every=1800", "--preset", "small"} <= set(cmd)
    resumed = stage_commands(STAGE_BY_NAME["scratch_ft"], tmp_path, "small", cfg, tmp_path / ".tmp", resume=True)
    assert all(c[-1] == "--resume" for c in resumed[0].commands)

    evals = stage_commands(STAGE_BY_NAME["eval_massive"], tmp_path, "small", cfg, tmp_path / ".tmp")
    scored = [c[c.index("--model") + 1] for c in evals if c[:2] == ["evaluate", "massive"]]
    assert str(tmp_path / "pretrained-ft") in scored and str(tmp_path / "teacher-ft") in scored
    pretraining = next(c for c in evals if c[-1] == "compare_pretraining")
    assert pretraining[2:4] == [str(tmp_path / ".tmp" / m / "massive.json") for m in ("scratch", "pretrained")]

    # The stage is complete only with both models; a new stage-2 teacher reruns it.
    _complete_all(tmp_path)  # scratch-ft among the rest, but no pretrained-ft
    assert plan_stages(tmp_path, cfg, [])["scratch_ft"] == "run"
    (tmp_path / "pretrained-ft").mkdir()
    assert plan_stages(tmp_path, cfg, [])["scratch_ft"] == "skip"
    assert plan_stages(tmp_path, cfg, ["teacher_indomain"])["scratch_ft"] == "run"
    with pytest.raises(ConfigError, match="pretraining_steps"):
        PipelineConfig(pretraining_steps=-1).validate()


def test_tiny_and_small_pipeline_presets_load():
    for preset in ("tiny", "small"):
        cfg = load_config(PipelineConfig, section="pipeline", preset=preset)
        assert cfg.massive_locales


def test_eval_massive_compares_after_evaluating_both_models(tmp_path):
    tmp_out = tmp_path / ".tmp"
    cmds = stage_commands(STAGE_BY_NAME["eval_massive"], tmp_path, "tiny", PipelineConfig(), tmp_out)
    evaluated = {Path(c[c.index("--out") + 1]).name: k for k, c in enumerate(cmds) if c[:2] == ["evaluate", "massive"]}
    assert set(evaluated) == set(MASSIVE_MODELS) | set(ZERO_SHOT_MODELS)
    compares = [(k, c) for k, c in enumerate(cmds) if c[:2] == ["evaluate", "compare"]]
    # The teacher-term claim needs pipeline.nlu_gold_reference (off by default).
    run = [c for c in MASSIVE_COMPARISONS if c.name != "nlu_teacher"]
    assert len(compares) == len(run)
    for comparison, (k, cmd) in zip(run, compares):
        # A and B are results this stage writes, before the comparison reads them.
        assert cmd[2:4] == [str(tmp_out / comparison.a / "massive.json"), str(tmp_out / comparison.b / "massive.json")]
        assert evaluated[comparison.a] < k and evaluated[comparison.b] < k
        assert cmd[4:] == ["--out", str(tmp_out), "--name", f"compare_{comparison.name}"]
    assert [(c.a, c.b) for c in MASSIVE_COMPARISONS] == [
        ("scratch", "teacher"), ("teacher", "student_fp32"), ("student_fp32", "student_int8"), ("student_kd", "student"),
        ("scratch_zero_shot", "teacher_zero_shot"), ("student_nlu_gold", "student_nlu"),
    ]  # fmt: skip


def test_the_zero_shot_row_scores_teacher_and_reference_on_unseen_locales_once_each(tmp_path):
    tmp_out = tmp_path / ".tmp"
    for preset in ("tiny", "small"):
        cfg = load_config(PipelineConfig, section="pipeline", preset=preset)
        assert len(cfg.zero_shot_locales) >= 3 and not set(cfg.zero_shot_locales) & set(cfg.massive_locales)
        cmds = stage_commands(STAGE_BY_NAME["eval_massive"], tmp_path, preset, cfg, tmp_out)
        rows = {Path(c[c.index("--out") + 1]).name: c for c in cmds if c[:2] == ["evaluate", "massive"]}
        models = zero_shot_models(cfg)
        # Budget-matched: with a pretraining budget of its own (small), scratch-ft's partner is pretrained-ft.
        assert models["teacher_zero_shot"] == (PRETRAINED_FT if cfg.pretraining_steps else "teacher-ft")
        assert set(models) == set(ZERO_SHOT_MODELS) and models["scratch_zero_shot"] == "scratch-ft"
        for name, model in models.items():
            cmd = rows[name]
            assert cmd[cmd.index("--model") + 1] == str(tmp_path / model)
            locales = cmd[cmd.index("--locales") + 1 : cmd.index("--setting")]
            assert locales == cfg.zero_shot_locales and cmd[cmd.index("--setting") + 1] == "zero-shot"
            assert cmd[cmd.index("--max-examples") + 1] == str(cfg.zero_shot_max_examples)
        # The pipeline chooses nothing on these scores: each (model, locale) is scored on test once, and
        # no command reads dev for a choice (choices live in the presets, made on dev beforehand).
        def locales_of(cmd: list[str]) -> list[str]:
            rest = cmd[cmd.index("--locales") + 1 :]
            return rest[: next(i for i, a in enumerate(rest) if a.startswith("--"))]

        scored = [(c[c.index("--model") + 1], loc) for c in rows.values() for loc in locales_of(c)]
        assert len(scored) == len(set(scored))
        assert all("--split" not in c for c in rows.values())
    none = stage_commands(STAGE_BY_NAME["eval_massive"], tmp_path, "tiny", PipelineConfig(zero_shot_locales=[]), tmp_out)
    assert not any(c[-1] == "compare_zero_shot" for c in none)
    with pytest.raises(ConfigError, match="zero_shot_locales"):
        PipelineConfig(zero_shot_locales=["en-US"]).validate()


def test_the_nlu_student_is_one_model_distilled_from_teacher_nlu(tmp_path):
    cfg = load_config(PipelineConfig, section="pipeline", preset="tiny")
    assert cfg.nlu_members == ["student"] and cfg.nlu_teacher
    (teacher,) = stage_commands(STAGE_BY_NAME["teacher_nlu"], tmp_path, "tiny", cfg, tmp_path / ".tmp")
    assert teacher[teacher.index("--model") + 1] == str(tmp_path / "teacher-indomain")
    assert teacher[teacher.index("--out") + 1] == "teacher-nlu" and "--head" in teacher
    (student,) = stage_commands(STAGE_BY_NAME["student_nlu"], tmp_path, "tiny", cfg, tmp_path / ".tmp")
    assert student[student.index("--model") + 1] == str(tmp_path / "student")
    assert f"teacher={tmp_path / 'teacher-nlu'}" in student and "ngram_buckets=4096" in student
    assert "teacher_nlu" in STAGE_BY_NAME["student_nlu"].deps
    (gold,) = stage_commands(STAGE_BY_NAME["student_nlu"], tmp_path, "tiny",
                             PipelineConfig(nlu_teacher=False), tmp_path / ".tmp")
    assert not any(a.startswith("teacher=") for a in gold)


def test_the_gold_only_twin_trains_after_the_student_and_is_compared_with_it(tmp_path):
    cfg = load_config(PipelineConfig, section="pipeline", preset="small")
    assert cfg.nlu_gold_reference
    student, gold = stage_commands(STAGE_BY_NAME["student_nlu"], tmp_path, "small", cfg, tmp_path / ".tmp")
    assert gold[gold.index("--out") + 1] == "student-nlu-gold" and student[student.index("--out") + 1] == "student-nlu"
    # The same command but for the teacher term and the output.
    assert [a for a in student if not a.startswith("teacher=")] == [
        "student-nlu" if a == "student-nlu-gold" else a for a in gold]
    assert stage_outputs(STAGE_BY_NAME["student_nlu"], cfg) == ["student-nlu", "student-nlu-gold"]
    cmds = stage_commands(STAGE_BY_NAME["eval_massive"], tmp_path, "small", cfg, tmp_path / ".tmp")
    compare = next(c for c in cmds if c[-1] == "compare_nlu_teacher")
    assert compare[2:4] == [str(tmp_path / ".tmp" / m / "massive.json") for m in ("student_nlu_gold", "student_nlu")]
    scored = {c[c.index("--out") + 1]: c[c.index("--model") + 1] for c in cmds if c[:2] == ["evaluate", "massive"]}
    assert scored[str(tmp_path / ".tmp" / "student_nlu_gold")] == str(tmp_path / "student-nlu-gold")


def test_nlu_members_train_side_by_side_then_combine(tmp_path):
    cfg = load_config(PipelineConfig, overrides=["nlu_members=[student,scratch:tiny]", "massive_locales=[en-US,ja-JP]"])
    train, combine = stage_commands(STAGE_BY_NAME["student_nlu"], tmp_path, "tiny", cfg, tmp_path / ".tmp")
    assert isinstance(train, Concurrent) and len(train.commands) == 2
    members = tmp_path / NLU_MEMBERS_DIR
    for i, (cmd, start) in enumerate(zip(train.commands, [str(tmp_path / "student"), "scratch:tiny"])):
        assert cmd[:4] == ["launch", "--nproc-per-node", "1", "--"]  # one process each: the cores are split
        args = cmd[4:]
        assert args[args.index("--run-dir") + 1] == str(members / str(i))  # one run directory (and lock) each
        assert args[args.index("--model") + 1] == start and f"train.seed={i}" in args
        assert ["--head", "encoder", "--section", "nlu"] == args[args.index("--head"):args.index("--head") + 4]
        assert "locales=[en-US,ja-JP]" in args and f"tokenizer={tmp_path / 'tokenizer'}" in args
    assert combine == ["ensemble", "--members", str(members / "0" / "model"), str(members / "1" / "model"),
                       "--out", str(tmp_path / "student-nlu")]
    # One start: the single fine-tuning of before, in the run directory itself.
    (single,) = stage_commands(STAGE_BY_NAME["student_nlu"], tmp_path, "tiny", PipelineConfig(), tmp_path / ".tmp")
    assert single[single.index("--run-dir") + 1] == str(tmp_path) and "ensemble" not in single
    with pytest.raises(ConfigError, match="nlu_members"):
        load_config(PipelineConfig, overrides=["nlu_members=[]"])
    # Per-member overrides go last, after the member's seed and locales, so they win.
    cfg = load_config(PipelineConfig, overrides=["nlu_members=[student,scratch:tiny]",
                                                 "nlu_member_overrides=['', 'train.max_steps=9 train.lr=0.1']"])
    train, _ = stage_commands(STAGE_BY_NAME["student_nlu"], tmp_path, "tiny", cfg, tmp_path / ".tmp")
    teacher = f"teacher={tmp_path / 'teacher-nlu'}"  # every member learns from teacher-nlu
    assert train.commands[0][-2:] == [f"tokenizer={tmp_path / 'tokenizer'}", teacher]
    assert train.commands[1][-4:] == [f"tokenizer={tmp_path / 'tokenizer'}", teacher, "train.max_steps=9", "train.lr=0.1"]
    with pytest.raises(ConfigError, match="one string per member"):
        load_config(PipelineConfig, overrides=["nlu_members=[student,scratch:tiny]", "nlu_member_overrides=['']"])


def test_run_commands_runs_side_by_side_and_names_the_failure(tmp_path):
    stage = STAGE_BY_NAME["student_nlu"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # Real polyteacher commands: both run and each writes its own log.
    run_commands(stage.name, [["config", "pipeline"], ["config", "export"]], logs, timeout_minutes=5)
    assert "nlu_members" in logs[0].read_text() and "opset" in logs[1].read_text()
    assert logs[0].read_text().startswith("$ polyteacher config pipeline")
    with pytest.raises(StageFailed, match="failed \\(exit 2\\): polyteacher config no-such-stage"):
        run_commands(stage.name, [["config", "pipeline"], ["config", "no-such-stage"]], logs, timeout_minutes=5)


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).resolve().parent.parent / "launch" / "presets").iterdir()))
def test_distillation_commands_load_with_every_preset(tmp_path, preset):
    """The CRR and plain-KD students' overrides make a valid config with each preset's sections (the
    plain-KD ablation once failed on `small`, whose CRR section repeats counterfactuals)."""
    from distill.config import DistillConfig

    for name in ("student", "student_kd", "student_ft", "student_kd_ft"):
        # The preset's own pipeline section: its MASSIVE locales are the ones its cross-lingual setting allows.
        pipe = load_config(PipelineConfig, section="pipeline", preset=preset)
        (cmd,) = stage_commands(STAGE_BY_NAME[name], tmp_path, preset, pipe, tmp_path / ".tmp")
        args = cmd[cmd.index("distill") + 1 :]
        section = args[args.index("--section") + 1] if "--section" in args else "distill"
        overrides = [a for a in args if "=" in a and not a.startswith("--")]
        cfg = load_config(DistillConfig, section=section, preset=preset, overrides=overrides)
        if name == "student_kd":
            assert (cfg.cda, cfg.cda_repeat, cfg.perturb) == ("none", 1, "none")
        if name == "student_kd_ft":  # CRR's matched reference: its exposure, no swap
            crr = load_config(DistillConfig, section=section, preset=preset,
                              overrides=[o for o in overrides if o.startswith("locales=")])
            assert (cfg.cda, cfg.perturb, cfg.counterfactual_pairing_weight) == ("repeat", "none", 0.0)
            assert (cfg.cda_repeat, cfg.train, cfg.locales) == (crr.cda_repeat, crr.train, crr.locales)
            assert crr.cda == "two_sided"


EVAL_STAGES = ("eval_massive", "eval_icl", "eval_translation", "eval_fairness", "eval_latency")


@pytest.mark.parametrize("preset", ["tiny", "small", "multilingual"])
def test_evaluations_read_their_sizes_and_locales_from_the_preset_evaluate_section(tmp_path, preset):
    """The pipeline passes its own values only (the fine-tuned locales, the zero-shot row); every other
    size and locale list of an evaluation is the preset's evaluate section, which each command reads
    through --preset: a flag it does not pass falls back to the section."""
    from evaluation.config import EvalConfig
    from launch.cli import build_parser

    cfg = load_config(PipelineConfig, section="pipeline", preset=preset)
    section = load_config(EvalConfig, section="evaluate", preset=preset)
    zero_shot = {str(tmp_path / ".tmp" / name) for name in ZERO_SHOT_MODELS}
    for stage in EVAL_STAGES:
        for cmd in stage_commands(STAGE_BY_NAME[stage], tmp_path, preset, cfg, tmp_path / ".tmp"):
            if cmd[1] == "compare":
                continue
            args = build_parser().parse_args(cmd)
            assert args.preset == preset, cmd
            if args.out in zero_shot:
                assert args.max_examples == cfg.zero_shot_max_examples and args.locales == cfg.zero_shot_locales
                continue
            assert getattr(args, "max_examples", None) is None and getattr(args, "shots", None) is None, cmd
            expected_locales = cfg.massive_locales if cmd[1] in ("massive", "baseline") else None
            assert getattr(args, "locales", None) == expected_locales, cmd
    # The values the pipeline used to pass are the section's (docs/experiments.md's figures).
    expected = {"tiny": (300, [0, 1, 5], 30, 20, ["en-US", "de-DE"], 50),
                "small": (500, [0, 1, 5], 60, 20, ["en-US", "de-DE", "fr-FR", "es-ES"], 100),
                "multilingual": (500, [0, 1, 5], 60, 20, ["en-US"], 100)}[preset]
    assert (section.massive.max_examples, section.icl.shots, section.icl.max_examples, section.translation.max_examples,
            section.fairness.locales, section.latency.max_examples) == expected
    assert not section.fairness.max_examples  # every gendered utterance


def test_eval_fairness_adds_the_independent_pairs_of_the_massive_models(tmp_path):
    from evaluation.report import FAIRNESS_PAIRS

    cmds = stage_commands(STAGE_BY_NAME["eval_fairness"], tmp_path, "tiny", PipelineConfig(), tmp_path / ".tmp")
    names = [c[c.index("--name") + 1] if "--name" in c else "fairness" for c in cmds]
    assert names == ["fairness", FAIRNESS_PAIRS, "disparity"]  # each writes its own NAME.json
    flips, pairs = cmds[0], cmds[1]
    models = flips[flips.index("--models") + 1 : flips.index("--preset")]
    assert models == [f"teacher={tmp_path / 'teacher-ft'}", f"student_kd={tmp_path / 'student-kd-ft'}",
                      f"student_crr={tmp_path / 'student-ft'}"]
    assert pairs[pairs.index("--models") + 1 : pairs.index("--metrics")] == models
    assert pairs[pairs.index("--metrics") + 1] == "pairs" and pairs[pairs.index("--pair-sets") + 1] == "independent"
    assert pairs[pairs.index("--pair-sets") + 2].startswith("--")  # the independent set alone


def test_pipeline_config_no_longer_shadows_the_evaluate_section():
    fields = {f.name for f in __import__("dataclasses").fields(PipelineConfig)}
    assert not fields & {"eval_max_examples", "icl_locales", "icl_shots", "icl_max_examples", "translation_locales",
                         "translation_max_examples", "fairness_locales", "fairness_max_examples", "latency_max_examples"}
    with pytest.raises(ConfigError, match="eval_max_examples"):
        load_config(PipelineConfig, overrides=["eval_max_examples=10"])


@pytest.mark.parametrize("preset", ["tiny", "small", "multilingual"])
def test_in_context_training_continues_the_stage_2_teacher_with_the_preset(tmp_path, preset):
    from teacher.config import PretrainConfig

    stage = STAGE_BY_NAME["teacher_icl"]
    assert stage.deps == ("teacher_indomain",) and stage.output == "teacher-icl" and stage.kind == "launch"
    names = [s.name for s in STAGES]
    assert names.index("teacher_indomain") < names.index("teacher_icl") < names.index("eval_icl")
    assert "teacher_icl" in STAGE_BY_NAME["eval_icl"].deps
    (cmd,) = stage_commands(stage, tmp_path, preset, load_config(PipelineConfig, section="pipeline", preset=preset),
                            tmp_path / ".tmp")
    args = cmd[cmd.index("pretrain") + 1:]
    assert cmd[:2] == ["launch", "--nproc-per-node"]
    assert args[args.index("--section") + 1] == "icl" and args[args.index("--out") + 1] == "teacher-icl"
    assert args[args.index("--init-from") + 1] == str(tmp_path / "teacher-indomain")
    # The preset's icl section makes a valid in-context training config of the teacher's own size.
    cfg = load_config(PretrainConfig, section="icl", preset=preset, flags={"icl": {"enabled": True}})
    assert cfg.icl.enabled and cfg.teacher.preset == load_config(PretrainConfig, section="indomain", preset=preset).teacher.preset
    assert cfg.icl.locales and cfg.train.max_steps >= 1


def test_eval_icl_scores_both_teachers_on_the_same_heldout_prompts_on_test(tmp_path):
    from evaluation.report import ICL_HELDOUT_RESULTS

    tmp_out = tmp_path / ".tmp"
    all_intents, *heldout = stage_commands(STAGE_BY_NAME["eval_icl"], tmp_path, "tiny", PipelineConfig(), tmp_out)
    # The all-intents run stays, on the stage-2 teacher.
    assert all_intents[:2] == ["evaluate", "icl"] and "--protocol" not in all_intents
    assert all_intents[all_intents.index("--model") + 1] == str(tmp_path / "teacher-indomain")
    assert [(c[c.index("--model") + 1], c[c.index("--name") + 1]) for c in heldout] == [
        (str(tmp_path / "teacher-icl"), "heldout-icl"), (str(tmp_path / "teacher-indomain"), "heldout-base")]
    assert [r.name for r in ICL_HELDOUT_RESULTS] == ["heldout-icl", "heldout-base"]
    for cmd in heldout:
        assert cmd[:2] == ["evaluate", "icl"] and cmd[cmd.index("--protocol") + 1] == "heldout"
        # The pipeline's figures are the once-read test figures; locales, k and query count come from the
        # preset's evaluate section, so nothing else differs between the two models' prompts.
        assert cmd[cmd.index("--split") + 1] == "test" and cmd[cmd.index("--preset") + 1] == "tiny"
        assert cmd[cmd.index("--out") + 1] == str(tmp_out)
        assert not {"--locales", "--shots", "--max-examples", "--way"} & set(cmd)
    first, second = heldout

    def without_model(cmd: list[str]) -> list[str]:
        return [a for i, a in enumerate(cmd) if i not in (cmd.index("--model") + 1, cmd.index("--name") + 1)]

    assert without_model(first) == without_model(second)


def test_consecutive_commands_that_start_no_processes_run_in_one_process(tmp_path):
    from launch.pipeline import Concurrent, OneProcess, in_one_process

    train = ["launch", "--nproc-per-node", "auto", "--", "finetune"]
    a, b, c = ["evaluate", "massive"], ["evaluate", "baseline"], ["evaluate", "compare"]
    side = Concurrent([train, train])
    assert in_one_process([a, b, c]) == [OneProcess([a, b, c])]
    assert in_one_process([a]) == [a]  # alone: the command as a user types it
    assert in_one_process([train, a, b, side, c]) == [train, OneProcess([a, b]), side, c]
    # Every eval stage of the demo: its commands in one process, in their order.
    cfg = PipelineConfig()
    massive = stage_commands(STAGE_BY_NAME["eval_massive"], tmp_path, "tiny", cfg, tmp_path / ".tmp")
    assert in_one_process(massive) == [OneProcess(massive)]


def test_run_sequence_runs_each_command_in_one_process_and_stops_at_the_first_failure(tmp_path):
    import json
    import subprocess
    import sys

    from launch.schedule import SEQUENCE_FLAG

    commands = tmp_path / "commands.json"
    commands.write_text(json.dumps([["config", "pipeline"], ["config", "export"], ["config", "no-such-stage"],
                                    ["config", "data"]]))
    proc = subprocess.run([sys.executable, "-m", "launch.cli", SEQUENCE_FLAG, str(commands)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    out = proc.stdout
    assert out.index("$ polyteacher config pipeline") < out.index("nlu_members") < out.index("$ polyteacher config export")
    assert "opset" in out and "$ polyteacher config no-such-stage" in out
    assert "$ polyteacher config data" not in out  # stopped at the failure
    assert "exit 2 from: polyteacher config no-such-stage" in proc.stderr
    commands.write_text('{"not": "a list"}')
    proc = subprocess.run([sys.executable, "-m", "launch.cli", SEQUENCE_FLAG, str(commands)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode != 0 and "expected a JSON list of argument lists" in proc.stderr


def test_eval_massive_scores_its_models_in_two_processes_then_compares(tmp_path):
    from launch.pipeline import Concurrent, OneProcess, in_one_process, split_side_by_side

    massive = stage_commands(STAGE_BY_NAME["eval_massive"], tmp_path, "tiny", PipelineConfig(), tmp_path / ".tmp")
    scoring = [c for c in massive if c[1] in ("massive", "baseline")]
    compares = [c for c in massive if c[1] == "compare"]
    assert scoring and compares and massive == [*scoring, *compares]  # every score before any comparison
    side, after = split_side_by_side(in_one_process(massive))
    assert isinstance(side, Concurrent) and [g.commands for g in side.commands] == [scoring[0::2], scoring[1::2]]
    assert after == OneProcess(compares)
    # Nothing to split: a single command, or commands that depend on each other, stay as they are.
    assert split_side_by_side([["evaluate", "massive"]]) == [["evaluate", "massive"]]
    assert split_side_by_side([OneProcess(compares)]) == [OneProcess(compares)]
    # Two independent commands: one each, no sequence of one.
    two = [["evaluate", "massive", "a"], ["evaluate", "baseline", "b"]]
    assert split_side_by_side([OneProcess(two)]) == [Concurrent([two[0], two[1]])]


def test_train_precision_reaches_every_training_command_and_nothing_else(tmp_path):
    cfg = load_config(PipelineConfig, overrides=["train_precision=fp32", "nlu_members=[student,scratch:tiny]"])
    training = evaluating = 0
    for stage in STAGES:
        if stage.kind == "internal":
            continue
        steps = stage_commands(stage, tmp_path, "tiny", cfg, tmp_path / ".tmp", resume=True)
        for cmd in (c for st in steps for c in (st.commands if isinstance(st, Concurrent) else [st])):
            if cmd[0] == "launch":
                training += 1
                assert "train.precision=fp32" in cmd, cmd
                assert "--resume" not in cmd or cmd[-1] == "--resume", cmd  # launch's flag stays last
            else:
                evaluating += 1
                assert not any(a.startswith("train.precision") for a in cmd), cmd
    assert training >= 10 and evaluating >= 10
    assert not any("train.precision" in a for c in stage_commands(STAGE_BY_NAME["teacher"], tmp_path, "tiny",
                                                                  PipelineConfig(), tmp_path / ".tmp") for a in c)
    with pytest.raises(ConfigError, match="allowed values"):
        load_config(PipelineConfig, overrides=["train_precision=fp8"])
