"""`polyteacher pipeline`: every stage end to end, resumable, with one report.

Stages run as subprocesses of the `polyteacher` command (training stages through `polyteacher launch`
with several processes), so each stage is exactly what a user would run by hand, and a crash in one
stage leaves the finished ones in place. Stages whose inputs are done run side by side, the cores
split between them (pipeline.max_parallel_stages, launch.schedule). A stage is skipped when its output exists and is complete
(every artifact is written under a temporary name and renamed); when a stage runs, every stage that
depends on it runs again too. The order and the dependencies are the table `STAGES` below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from core.config import ConfigError, load_config, save_config
from core.fsutil import atomic_write_json, check_run_dir, mark_run_dir, safe_path
from core.locales import DEFAULT_LOCALES, ZERO_SHOT_LOCALES
from evaluation.report import (
    FAIRNESS_PAIRS,
    MASSIVE_COMPARISONS,
    WALL_SECONDS,
    MassiveComparison,
    write_report,
)
from launch.schedule import (
    FORWARDER,
    SEQUENCE_FLAG,
    PipelineStopped,
    StageFailed,
    StageScheduler,
    Start,
    parallel_slots,
    priority_order,
    run_commands,
    run_scheduled,
)


@dataclasses.dataclass
class PipelineConfig:
    num_train_procs: int = 0
    """Processes per node for teacher pretraining (DeepSpeed launcher; CPU processes without a GPU);
    0 = chosen by measurement (`polyteacher launch --nproc-per-node auto`: every GPU, or on CPU the
    processes x threads that measured fastest on this machine)."""
    num_procs_other: int = 0
    """Processes for the other training stages (stage 2, distillation, fine-tuning); 0 = auto, as above."""
    skip: list[str] = dataclasses.field(default_factory=list)
    """Stage names to leave out (see `polyteacher pipeline --list-stages`); stages needing them are left out too (the report never)."""
    massive_locales: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LOCALES))
    """MASSIVE locales of fine-tuning, task distillation and the MASSIVE evaluation: passed to those
    commands as their `locales` (the sizes and the other evaluations' locales are the preset's
    `evaluate` section, read by each `evaluate` command through `--preset`)."""
    nlu_members: list[str] = dataclasses.field(default_factory=lambda: ["student"])
    """Starts of the encoder NLU student (stage student_nlu): run-directory model names (student) or
    scratch:<size preset>. One start trains one model. Two or more train side by side, one process
    each with the cores split between them (seeds 0, 1, ...; run directories student-nlu-members/<i>),
    and `polyteacher ensemble` combines them into one model that averages their predictions: members
    from different starts make different errors."""
    nlu_member_overrides: list[str] = dataclasses.field(default_factory=list)
    """Extra dotted overrides of each NLU member's fine-tuning (`finetune --section nlu`), one string of
    space-separated overrides per nlu_members entry ("" = none), e.g. ["", "train.max_steps=6000"];
    empty list = none. With one member (the NLU student) its string sets the student's own shape,
    e.g. "ngram_buckets=4096" (the teacher_nlu stage keeps the nlu section as it is). Members train side by side and the stage lasts as long as the slowest, so a
    faster member (a smaller shape) can take more steps in the same wall time."""
    nlu_teacher: bool = True
    """The encoder NLU student learns from the teacher: stage teacher_nlu fine-tunes the stage-2
    teacher's encoder with the NLU heads (teacher-nlu), and every NLU fine-tuning of student_nlu adds
    the teacher term (`finetune.teacher`). false: gold labels only, a reference rather than a student."""
    nlu_gold_reference: bool = False
    """student_nlu also trains the same model on the same gold data without the teacher term
    (student-nlu-gold, one more NLU fine-tuning after the student), and eval_massive pairs the two
    (the report's claim that the teacher term helps). Off in the demo, whose 15 minutes it would
    exceed; on in `small` and `multilingual`."""
    zero_shot_locales: list[str] = dataclasses.field(default_factory=lambda: list(ZERO_SHOT_LOCALES))
    """Locales no model was fine-tuned on: eval_massive scores the teacher and its from-scratch
    reference (scratch-ft) on them (`--setting zero-shot`, sources massive_locales), and compares the two
    (the report's zero-shot row). Empty: no zero-shot row."""
    zero_shot_max_examples: int = 200
    """Shared test ids per zero-shot locale (a seeded sample): the row is a cheap probe, not a benchmark."""
    scratch_size: str = "tiny"
    """Teacher size preset of the from-scratch reference (`finetune --model scratch:SIZE`, the stage
    scratch_ft): the teacher's own size, fine-tuned with the same budget, shows what pretraining adds."""
    pretraining_steps: int = 0
    """Fine-tuning steps of the pretraining claim (stage scratch_ft). 0: the reference from random
    weights takes the preset's fine-tuning budget and the claim compares it with the teacher
    (teacher-ft). N > 0: the reference and a second fine-tuning of the stage-2 teacher (pretrained-ft)
    each take N steps, side by side with one process each (each cosine schedule ends at step N), and
    the claim compares those two; teacher-ft keeps the full budget for the students. Pretraining can
    buy a head start that a long fine-tuning takes back (`small`: +2.4 EM at 1,800 steps, +0.0 at
    2,700), so the budget of the claim is stated with it."""
    train_precision: str = ""
    """`train.precision` of every training stage, over the preset's sections ("" = each section's own).
    fp32 runs the pipeline as a CPU without fast bf16 would (auto picks fp32 there): how the demo's
    15-minute budget is measured on a machine where bf16 pays."""
    timeout_minutes: int = 120
    """Wall-clock limit per stage; a stage that runs longer is stopped and reported."""
    max_parallel_stages: int = 0
    """Stages that may run at once: a stage starts as soon as the stages it needs are done and a slot is
    free (launch.schedule). 0 = auto: the cores available, at most 4; 1 = one after another. A stage
    that runs alone keeps the machine's layout (`launch --nproc-per-node auto`); stages side by side
    split the cores when they start, each training with one process and OMP_NUM_THREADS = its share
    (an explicit num_train_procs/num_procs_other N keeps N processes, share // N threads each)."""

    def validate(self) -> None:
        if self.num_train_procs < 0 or self.num_procs_other < 0:
            raise ConfigError("pipeline.num_train_procs and pipeline.num_procs_other must be >= 1, or 0 (auto)")
        if self.max_parallel_stages < 0:
            raise ConfigError(f"pipeline.max_parallel_stages: {self.max_parallel_stages} must be >= 1, or 0 (auto)")
        if self.train_precision not in ("", "auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"pipeline.train_precision: {self.train_precision!r}; allowed values: '' (each section's "
                              "own), auto, fp32, bf16, fp16")
        if self.pretraining_steps < 0:
            raise ConfigError(f"pipeline.pretraining_steps: {self.pretraining_steps} must be >= 0 (0 = the fine-tuning budget)")
        if not self.nlu_members:
            raise ConfigError("pipeline.nlu_members: give at least one start (e.g. [student])")
        if self.nlu_member_overrides and len(self.nlu_member_overrides) != len(self.nlu_members):
            raise ConfigError(
                f"pipeline.nlu_member_overrides: {len(self.nlu_member_overrides)} entries for "
                f"{len(self.nlu_members)} nlu_members; give one string per member (\"\" for none) or none at all"
            )
        seen = sorted(set(self.zero_shot_locales) & set(self.massive_locales))
        if seen:
            raise ConfigError(f"pipeline.zero_shot_locales: {', '.join(seen)} is fine-tuned on (massive_locales); "
                              "the zero-shot row needs locales the models never saw labels of")
        if self.zero_shot_max_examples < 0:
            raise ConfigError(f"pipeline.zero_shot_max_examples: {self.zero_shot_max_examples} must be >= 0 (0 = all)")
        unknown = [s for s in self.skip if s not in {st.name for st in STAGES}]
        if unknown:
            raise ConfigError(
                f"pipeline.skip: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(s.name for s in STAGES)}"
            )


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    output: str  # relative to the run dir; the stage is complete when it exists
    deps: tuple[str, ...]
    kind: str  # "cli" | "launch" | "internal"
    what: str
    work: str = ""  # a directory under the run dir its commands write on the way; cleared when the stage runs


@dataclasses.dataclass(frozen=True)
class Concurrent:
    """Commands of a stage that run at the same time, the cores split evenly between them (each gets
    OMP_NUM_THREADS = cores // len(commands)); each logs to its own file."""

    commands: list[Union[list[str], OneProcess]]


@dataclasses.dataclass(frozen=True)
class OneProcess:
    """Commands of a stage that run one after another in one process (`python -m launch.cli
    --run-sequence FILE`): consecutive commands that start no processes of their own (evaluations,
    exports) then pay one Python start-up and one import of torch between them (~4-8 s each on 2 cores)."""

    commands: list[list[str]]


# A step of a stage: one command (argv after `polyteacher`), commands run side by side, or commands
# run one after another in one process.
Step = Union[list[str], Concurrent, OneProcess]


INDEPENDENT_COMMANDS = (("evaluate", "massive"), ("evaluate", "baseline"))
"""Commands that only read models and data and each write their own --out: a run of them may be split
into groups that run side by side (`split_side_by_side`)."""


def split_side_by_side(steps: list[Step], ways: int = 2) -> list[Step]:
    """`steps` with the leading run of independent commands (INDEPENDENT_COMMANDS) of each OneProcess
    step dealt round-robin into `ways` OneProcess groups run side by side (a Concurrent step; the
    cores are split between them), the rest of it after them in one process: eval_massive scores its
    models in two processes of one thread each, which on small models is faster than one process
    of two threads, and keeps both cores busy when the stage runs beside another."""
    out: list[Step] = []
    for step in steps:
        if not isinstance(step, OneProcess):
            out.append(step)
            continue
        n = 0
        while n < len(step.commands) and tuple(step.commands[n][:2]) in INDEPENDENT_COMMANDS:
            n += 1
        if n < 2 or ways < 2:
            out.append(step)
            continue
        groups = [step.commands[i:n:ways] for i in range(min(ways, n))]
        out.append(Concurrent([OneProcess(g) if len(g) > 1 else g[0] for g in groups]))
        rest = step.commands[n:]
        out.extend([OneProcess(rest)] if len(rest) > 1 else rest)
    return out


def in_one_process(steps: list[Step]) -> list[Step]:
    """`steps` with every run of two or more consecutive single commands that are not a `launch`
    (which starts processes of its own) put into one OneProcess step; the order is kept."""
    out: list[Step] = []
    run: list[list[str]] = []
    for step in [*steps, None]:
        if isinstance(step, list) and step[:1] != ["launch"]:
            run.append(step)
            continue
        if len(run) > 1:
            out.append(OneProcess(run))
        else:
            out.extend(run)
        run = []
        if step is not None:
            out.append(step)
    return out
NLU_MEMBERS_DIR = "student-nlu-members"


STAGES: tuple[Stage, ...] = (
    Stage("data", "data/train", (), "cli", "tokenizer, packed general-domain and in-domain data"),
    Stage("teacher", "teacher", ("data",), "launch", "teacher pretraining (denoising + CLM)"),
    Stage("teacher_indomain", "teacher-indomain", ("teacher",), "launch", "stage-2 in-domain pretraining"),
    Stage("teacher_icl", "teacher-icl", ("teacher_indomain",), "launch",
          "in-context training of the stage-2 teacher (prompts of k demonstrations per label; the held-out "
          "scenarios never shown)"),
    Stage("student", "student", ("teacher_indomain",), "launch",
          "task-agnostic distillation with CRR (CDA + perturbation), the NLU student's start"),
    Stage("student_kd", "student-kd", ("teacher_indomain",), "launch",
          "task-agnostic distillation, plain KD (no CRR): the reference for generation disparity"),
    Stage("teacher_ft", "teacher-ft", ("teacher_indomain",), "launch", "MASSIVE fine-tuning of the teacher"),
    # With pipeline.pretraining_steps the stage also fine-tunes the stage-2 teacher (pretrained-ft).
    Stage("scratch_ft", "scratch-ft", ("data", "teacher_indomain"), "launch",
          "MASSIVE fine-tuning of a teacher-size model from random weights (what pretraining adds)"),
    Stage("student_ft", "student-ft", ("teacher_ft",), "launch",
          "task distillation with CRR: the student learns MASSIVE from the fine-tuned teacher"),
    Stage("student_kd_ft", "student-kd-ft", ("teacher_ft",), "launch", "task distillation, plain KD (no CRR)"),
    Stage("teacher_nlu", "teacher-nlu", ("teacher_indomain",), "launch",
          "encoder NLU fine-tuning of the stage-2 teacher: the NLU student's teacher (pipeline.nlu_teacher)"),
    Stage("student_nlu", "student-nlu", ("student", "teacher_nlu"), "launch",
          "the NLU student: encoder NLU fine-tuning of the CRR student with the teacher term (teacher-nlu's "
          "intent and slot distributions); with several nlu_members, an ensemble of such models",
          work=NLU_MEMBERS_DIR),
    Stage("export", "onnx/int8", ("student_ft",), "cli", "ONNX export of the student, fp32 and int8"),
    Stage("export_teacher", "onnx/teacher-int8", ("teacher_ft",), "cli", "ONNX export of the teacher, int8"),
    Stage("export_nlu", "onnx/nlu-int8", ("student_nlu",), "cli", "ONNX export of the encoder NLU student, int8"),
    Stage("eval_massive", "eval/massive",
          ("teacher_ft", "scratch_ft", "student_ft", "student_kd_ft", "export", "export_nlu", "teacher_nlu"),
          "cli", "MASSIVE per locale: teacher, student, student int8, ..., the TF-IDF baseline, and the paired "
          "comparisons behind the report's claims"),
    Stage("eval_icl", "eval/icl", ("teacher_indomain", "teacher_icl"), "cli",
          "k-shot intent classification by prompting: all intents (stage-2 teacher); held-out intents, the "
          "in-context trained teacher beside the stage-2 teacher on the same prompts (test, read once)"),
    Stage("eval_translation", "eval/translation", ("teacher_indomain",), "cli", "1-shot FLORES-200 translation"),
    Stage("eval_fairness", "eval/fairness",
          ("teacher_ft", "student_ft", "student_kd_ft", "teacher_indomain", "student", "student_kd"), "cli",
          "flips and generation disparity of the MASSIVE models; generation disparity of the task-agnostic ones"),
    Stage("eval_latency", "eval/latency", ("student_ft", "teacher_ft", "export", "export_teacher", "export_nlu"),
          "cli", "latency at batch 1 on one thread, and sizes"),
    Stage("report", "REPORT.md", ("eval_massive", "eval_icl", "eval_translation", "eval_fairness", "eval_latency"),
          "internal", "REPORT.md, summary.json and plots"),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}

# The models of eval_massive: name (its directory under eval/massive/) -> model directory in the run dir.
# The comparisons between them are the report's claims (evaluation.report.MASSIVE_COMPARISONS).
MASSIVE_MODELS: dict[str, str] = {
    "teacher": "teacher-ft",
    "scratch": "scratch-ft",
    "student": "student-ft",
    "student_int8": "onnx/int8",
    "student_fp32": "onnx/fp32",
    "student_kd": "student-kd-ft",
    "student_nlu_int8": "onnx/nlu-int8",
    "teacher_nlu": "teacher-nlu",
}
# The zero-shot row: eval_massive name -> model, scored on pipeline.zero_shot_locales only.
ZERO_SHOT_MODELS: dict[str, str] = {"teacher_zero_shot": "teacher-ft", "scratch_zero_shot": "scratch-ft"}
PRETRAINED_FT = "pretrained-ft"
"""The stage-2 teacher fine-tuned with pipeline.pretraining_steps, beside scratch-ft (stage scratch_ft)."""


def zero_shot_models(cfg: PipelineConfig) -> dict[str, str]:
    """ZERO_SHOT_MODELS, budget-matched: when pipeline.pretraining_steps gives scratch-ft a budget of its
    own, the pretrained side of the pair is pretrained-ft (the same steps), not teacher-ft."""
    return {**ZERO_SHOT_MODELS, **({"teacher_zero_shot": PRETRAINED_FT} if cfg.pretraining_steps else {})}

PRETRAINED_SHORT = "pretrained"
"""eval_massive's name for PRETRAINED_FT."""


NLU_GOLD = "student-nlu-gold"
"""The NLU student's architecture and start trained on gold labels alone (pipeline.nlu_gold_reference)."""
NLU_GOLD_MODELS = {"student_nlu": "student-nlu", "student_nlu_gold": NLU_GOLD}
"""eval_massive's names of the pair behind the teacher-term claim (PyTorch models, the same ids)."""


def massive_models(cfg: PipelineConfig) -> dict[str, str]:
    """The models eval_massive scores: MASSIVE_MODELS, pretrained-ft when the pretraining claim has its
    own budget, and the NLU student with its gold-only twin when pipeline.nlu_gold_reference is on."""
    return {**MASSIVE_MODELS, **({PRETRAINED_SHORT: PRETRAINED_FT} if cfg.pretraining_steps else {}),
            **(NLU_GOLD_MODELS if cfg.nlu_gold_reference else {})}


def compared_models(comparison: MassiveComparison, cfg: PipelineConfig) -> tuple[str, str]:
    """The eval_massive names a claim compares: the pretraining claim's B is pretrained-ft when
    pipeline.pretraining_steps gives it a budget of its own (the reference then has that budget too)."""
    if comparison.name == "pretraining" and cfg.pretraining_steps:
        return comparison.a, PRETRAINED_SHORT
    return comparison.a, comparison.b



def stage_commands(stage: Stage, run_dir: Path, preset: str | None, cfg: PipelineConfig, tmp_out: Path,
                   resume: bool = False) -> list[Step]:
    """The polyteacher command lines (argv after `polyteacher`) that produce one stage's output, in
    order; a `Concurrent` step runs its commands side by side. `resume`: a training stage continues
    from its latest complete checkpoint (`--resume`), if it has one."""
    r = str(run_dir)
    p = ["--preset", preset] if preset else []
    locales = ",".join(cfg.massive_locales)

    def launch(nproc: int, *args: str) -> list[str]:
        return ["launch", "--nproc-per-node", str(nproc) if nproc else "auto", "--", *args,
                *precision_override(cfg), *(["--resume"] if resume else [])]

    n_other = cfg.num_procs_other
    if stage.name == "data":
        return [["data", "prepare", "--run-dir", r, *p]]
    if stage.name == "teacher":
        return [launch(cfg.num_train_procs, "pretrain", "--run-dir", r, "--out", "teacher", *p)]
    if stage.name == "teacher_indomain":
        return [launch(n_other, "pretrain", "--run-dir", r, "--out", "teacher-indomain", "--section", "indomain",
                       "--init-from", str(run_dir / "teacher"), *p)]
    if stage.name == "teacher_icl":
        return [launch(n_other, "pretrain", "--run-dir", r, "--out", "teacher-icl", "--section", "icl",
                       "--init-from", str(run_dir / "teacher-indomain"), *p)]
    # Plain KD: the preset's distillation without CRR (no CDA, so no repeated counterfactuals and no
    # counterfactual pairs either).
    plain_kd = ["cda=none", "cda_repeat=1", "perturb=none", "counterfactual_pairing_weight=0"]
    generic_distill = {"student": ("student", []), "student_kd": ("student-kd", plain_kd)}
    if stage.name in generic_distill:
        out, ablation = generic_distill[stage.name]
        return [launch(n_other, "distill", "--run-dir", r, "--teacher", str(run_dir / "teacher-indomain"),
                       "--out", out, *p, *ablation)]
    # The task-distilled plain-KD student is CRR's matched reference: every gendered train utterance as
    # often as CRR sees it as x or x~ (cda=repeat keeps the preset's cda_repeat), the same steps, order
    # and seed; only the swap, the teacher perturbation and the logit pairing differ.
    matched_kd = ["cda=repeat", "perturb=none", "counterfactual_pairing_weight=0"]
    task_distill = {"student_ft": ("student-ft", []), "student_kd_ft": ("student-kd-ft", matched_kd)}
    if stage.name in task_distill:
        out, ablation = task_distill[stage.name]
        return [launch(n_other, "distill", "--run-dir", r, "--section", "taskdistill",
                       "--teacher", str(run_dir / "teacher-ft"), "--out", out, *p, f"locales=[{locales}]", *ablation)]
    # stage: (input model, output, --head, the preset section of that head's settings)
    ft = {"teacher_ft": ("teacher-indomain", "teacher-ft", "seq2seq", []),
          "scratch_ft": (f"scratch:{cfg.scratch_size}", "scratch-ft", "seq2seq", []),
          "teacher_nlu": ("teacher-indomain", "teacher-nlu", "encoder", ["--section", "nlu"]),
          "student_nlu": ("student", "student-nlu", "encoder", ["--section", "nlu"])}
    if stage.name == "student_nlu" and len(cfg.nlu_members) > 1:
        return nlu_ensemble_commands(run_dir, p, cfg)

    def finetune(nproc: int, name: str, *extra: str) -> list[str]:
        src, out, head, section = ft[name]
        model = src if src.startswith("scratch:") else str(run_dir / src)
        return launch(nproc, "finetune", "--run-dir", r, "--model", model, "--out", out, "--head", head, *section,
                      *p, f"locales=[{locales}]", *extra)

    if stage.name == "scratch_ft" and cfg.pretraining_steps:
        # The claim's pair, side by side (one process each): the same steps, schedule and seed.
        ft["pretrained_ft"] = (ft["teacher_ft"][0], PRETRAINED_FT, "seq2seq", [])
        budget = [f"train.max_steps={cfg.pretraining_steps}", f"train.eval_every={max(1, cfg.pretraining_steps // 2)}",
                  f"train.save_every={cfg.pretraining_steps}"]
        return [Concurrent([finetune(1, name, *budget) for name in ("scratch_ft", "pretrained_ft")])]
    if stage.name == "student_nlu":
        own = cfg.nlu_member_overrides[0].split() if cfg.nlu_member_overrides else []
        student = finetune(n_other, stage.name, *nlu_teacher_overrides(run_dir, cfg), *own)
        if not cfg.nlu_gold_reference:
            return [student]
        # The same model, start, steps and seed without the teacher term (launch's trailing --resume stays last).
        gold = finetune(n_other, stage.name, *own)
        gold[gold.index("--out") + 1] = NLU_GOLD
        return [student, gold]
    if stage.name in ft:
        return [finetune(n_other, stage.name)]
    # (model, also an fp32 export, overrides). The teacher's int8 export is measured for latency and
    # size only, which GPTQ rounding hardly changes, so it skips the calibration (~30 s on 2 cores).
    exports = {"export": ("student-ft", True, []),
               "export_teacher": ("teacher-ft", False, ["rounding=nearest", "fp16_candidate_rows=0"]),
               "export_nlu": ("student-nlu", False, [])}
    if stage.name in exports:
        src, with_fp32, overrides = exports[stage.name]
        # The preset's export.yaml chooses the int8 method (tiny/small: GPTQ rounding calibrated on
        # MASSIVE train utterances), as every other stage takes its section from the preset.
        cmds = [["export", "--model", str(run_dir / src), "--out", str(tmp_out), "--int8", *p, *overrides]]
        if with_fp32:
            fp32_tmp = _fp32_tmp(tmp_out.with_name(Path(stage.output).name))
            cmds.append(["export", "--model", str(run_dir / src), "--out", str(fp32_tmp), *p])
        return cmds
    # Every evaluation reads the preset's evaluate section (sizes, locales, batch sizes); the pipeline
    # passes only what is its own: the fine-tuned locales (massive_locales) and the zero-shot row.
    if stage.name == "eval_massive":
        models = [["evaluate", "massive", "--model", str(run_dir / d), "--locales", *cfg.massive_locales, *p,
                   "--out", str(tmp_out / name)] for name, d in massive_models(cfg).items()]
        # The classical reference row of the MASSIVE tables, scored on the same ids as the models.
        baseline = ["evaluate", "baseline", "--locales", *cfg.massive_locales, *p, "--out", str(tmp_out / "baseline_tfidf")]
        # After the models: each comparison reads two of their results (massive.json, the default --name).
        # The zero-shot row: the teacher and its random-weights reference on locales they never saw
        # labels of (a small sample: a probe of transfer, not the benchmark of `evaluate massive --locales all`).
        zero_shot = [["evaluate", "massive", "--model", str(run_dir / d), "--locales", *cfg.zero_shot_locales,
                      "--setting", "zero-shot", "--source-locales", *cfg.massive_locales,
                      "--max-examples", str(cfg.zero_shot_max_examples), *p, "--out", str(tmp_out / name)]
                     for name, d in zero_shot_models(cfg).items()] if cfg.zero_shot_locales else []
        compares = [["evaluate", "compare", *(str(tmp_out / m / "massive.json") for m in compared_models(c, cfg)),
                     "--out", str(tmp_out), "--name", f"compare_{c.name}"] for c in massive_comparisons(cfg)]
        return [*models, baseline, *zero_shot, *compares]
    if stage.name == "eval_icl":
        from evaluation.report import ICL_HELDOUT_RESULTS

        all_intents = ["evaluate", "icl", "--model", str(run_dir / "teacher-indomain"), *p, "--out", str(tmp_out)]
        # Held-out intents: each model on the same prompts (they depend only on the evaluate section's
        # icl.seed, locales, shots, way and max_examples, all from the preset), on test: the pipeline's
        # figures are read once; choices are made on dev (the command's default) beforehand.
        heldout = [["evaluate", "icl", "--model", str(run_dir / r.model), "--protocol", "heldout", "--split", "test",
                    *p, "--name", r.name, "--out", str(tmp_out)] for r in ICL_HELDOUT_RESULTS]
        return [all_intents, *heldout]
    if stage.name == "eval_translation":
        return [["evaluate", "translation", "--model", str(run_dir / "teacher-indomain"), *p, "--out", str(tmp_out)]]
    if stage.name == "eval_fairness":
        # Flips are measured where the task is learnt (the MASSIVE models); generation disparity also on
        # the task-agnostic models, which still generate text (the MASSIVE models generate labels), as
        # in the CRR paper: the stage-2 teacher and the two students distilled from it. The name and
        # template pairs (evaluation/fairness_pairs.py) measure the MASSIVE models on pairs that no
        # lexicon swap produced, so CRR is not scored on its own augmentation: the teacher, the matched
        # plain-KD student and the CRR student, each one seed.
        massive_arms = [f"teacher={run_dir / 'teacher-ft'}", f"student_kd={run_dir / 'student-kd-ft'}",
                        f"student_crr={run_dir / 'student-ft'}"]
        return [["evaluate", "fairness", "--models", *massive_arms, *p, "--out", str(tmp_out)],
                ["evaluate", "fairness", "--models", *massive_arms, "--metrics", "pairs", "--pair-sets", "independent",
                 "--name", FAIRNESS_PAIRS, *p, "--out", str(tmp_out)],
                ["evaluate", "fairness", "--models", f"teacher={run_dir / 'teacher-indomain'}",
                 f"student_kd={run_dir / 'student-kd'}", f"student_crr={run_dir / 'student'}",
                 "--metrics", "disparity", "--name", "disparity", *p, "--out", str(tmp_out)]]
    if stage.name == "eval_latency":
        return [["evaluate", "latency", "--models", f"teacher={run_dir / 'teacher-ft'}",
                 f"teacher_int8={run_dir / 'onnx' / 'teacher-int8'}", f"student={run_dir / 'student-ft'}",
                 f"student_fp32={run_dir / 'onnx' / 'fp32'}", f"student_int8={run_dir / 'onnx' / 'int8'}",
                 f"student_nlu_int8={run_dir / 'onnx' / 'nlu-int8'}", *p, "--out", str(tmp_out)]]
    raise KeyError(stage.name)


def precision_override(cfg: PipelineConfig) -> list[str]:
    """The override every training command gets from pipeline.train_precision (none when empty)."""
    return [f"train.precision={cfg.train_precision}"] if cfg.train_precision else []


def nlu_teacher_overrides(run_dir: Path, cfg: PipelineConfig) -> list[str]:
    """The teacher term of every NLU fine-tuning of student_nlu (none without pipeline.nlu_teacher)."""
    return [f"teacher={run_dir / 'teacher-nlu'}"] if cfg.nlu_teacher else []


def massive_comparisons(cfg: PipelineConfig) -> list[MassiveComparison]:
    """The comparisons eval_massive runs: the zero-shot one only when there is a zero-shot row, the
    teacher-term one only with pipeline.nlu_gold_reference."""
    return [c for c in MASSIVE_COMPARISONS
            if (c.name != "zero_shot" or cfg.zero_shot_locales) and (c.name != "nlu_teacher" or cfg.nlu_gold_reference)]


def nlu_ensemble_commands(run_dir: Path, preset_args: list[str], cfg: PipelineConfig) -> list[Step]:
    """Train each of cfg.nlu_members in its own run directory, side by side, then combine them."""
    members_dir = run_dir / NLU_MEMBERS_DIR
    locales = ",".join(cfg.massive_locales)
    train = []
    extra = cfg.nlu_member_overrides or [""] * len(cfg.nlu_members)
    for i, (start, overrides) in enumerate(zip(cfg.nlu_members, extra)):
        model = start if start.startswith("scratch:") else str(run_dir / start)
        train.append(["launch", "--nproc-per-node", "1", "--", "finetune", "--run-dir", str(members_dir / str(i)),
                      "--model", model, "--out", "model", "--head", "encoder", "--section", "nlu", *preset_args,
                      f"locales=[{locales}]", f"train.seed={i}", f"tokenizer={run_dir / 'tokenizer'}",
                      *nlu_teacher_overrides(run_dir, cfg), *overrides.split(), *precision_override(cfg)])
    combine = ["ensemble", "--members", *(str(members_dir / str(i) / "model") for i in range(len(train))),
               "--out", str(run_dir / "student-nlu")]
    return [Concurrent(train), combine]


# ----------------------------------------------------------------------------- running


def starts_over(stage: Stage, decision: dict[str, str], force: Sequence[str]) -> bool:
    """The stage was forced, or a stage it depends on runs again: its earlier output (and checkpoints)
    are stale. A stage that runs otherwise runs only because its output is missing (a crash)."""
    return stage.name in force or any(decision.get(d) == "run" for d in stage.deps)


def plan_stages(run_dir: Path, cfg: PipelineConfig, force: list[str]) -> dict[str, str]:
    """Decide, per stage: "run", "skip" (output complete) or "off" (left out by pipeline.skip)."""
    decision: dict[str, str] = {}
    for stage in STAGES:
        # The report tolerates missing evaluations; any other stage needs all of its inputs.
        needs_off_input = stage.kind != "internal" and any(decision.get(d) == "off" for d in stage.deps)
        if stage.name in cfg.skip or needs_off_input:
            decision[stage.name] = "off"
            continue
        complete = all((run_dir / out).exists() for out in stage_outputs(stage, cfg))
        decision[stage.name] = "run" if (starts_over(stage, decision, force) or not complete) else "skip"
    return decision


def _fp32_tmp(final: Path) -> Path:
    """Where the export stage writes its fp32 model before it is renamed to `fp32/` beside `final`."""
    return final.parent / f".{final.name}-fp32.tmp"


def stage_outputs(stage: Stage, cfg: PipelineConfig) -> list[str]:
    """What a stage writes in the run directory: its output, and pretrained-ft beside scratch-ft when
    the pretraining claim has its own budget (pipeline.pretraining_steps)."""
    extra = [PRETRAINED_FT] if stage.name == "scratch_ft" and cfg.pretraining_steps else []
    if stage.name == "student_nlu" and cfg.nlu_gold_reference:
        extra.append(NLU_GOLD)
    return [stage.output, *extra]


def stage_checkpoints(stage: Stage, run_dir: Path, cfg: PipelineConfig) -> list[Path]:
    """Where a training stage's commands keep their checkpoints (core.checkpoint: checkpoints/<out>)."""
    return [safe_path(run_dir, f"checkpoints/{out}") for out in stage_outputs(stage, cfg)]


def run_stage(stage: Stage, run_dir: Path, preset: str | None, cfg: PipelineConfig, log_dir: Path,
              fresh: bool = True, threads: int | None = None) -> None:
    """Run one stage's commands. A training stage that runs `fresh` (forced, or an input of it ran
    again) first removes its own earlier checkpoints; otherwise it resumes from them, so rerunning
    the pipeline after a crash continues the interrupted training. `threads`: the stage's share of
    the cores beside other stages (None: it runs alone; see `run_commands`)."""
    final = safe_path(run_dir, stage.output)
    if stage.kind == "internal":
        write_report(run_dir)
        return
    # Stages whose command writes into a directory we name get a temporary one, renamed when all
    # commands succeeded; training stages write their model directory atomically themselves.
    tmp_out = final.with_name(f".{final.name}.pipeline-tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    shutil.rmtree(_fp32_tmp(final), ignore_errors=True)
    if final.exists() and stage.kind == "cli" and not stage.name == "data":
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    if stage.work:
        shutil.rmtree(safe_path(run_dir, stage.work), ignore_errors=True)  # this stage's own earlier output
    if stage.kind == "launch" and fresh:
        for checkpoints in stage_checkpoints(stage, run_dir, cfg):
            shutil.rmtree(checkpoints, ignore_errors=True)
    log_path = log_dir / f"{stage.name}.log"
    resume = stage.kind == "launch" and not fresh
    def sequence(group: OneProcess, name: str) -> list[str]:
        # The commands file lives beside the log; the log shows each command as it starts.
        commands_file = log_dir / f"{name}.commands.json"
        atomic_write_json(commands_file, group.commands)
        return [SEQUENCE_FLAG, str(commands_file)]

    steps = split_side_by_side(in_one_process(stage_commands(stage, run_dir, preset, cfg, tmp_out, resume=resume)))
    for step in steps:
        if isinstance(step, Concurrent):
            logs = [log_dir / f"{stage.name}.{i}.log" for i in range(len(step.commands))]
            commands = [sequence(c, f"{stage.name}.{i}") if isinstance(c, OneProcess) else c
                        for i, c in enumerate(step.commands)]
            run_commands(stage.name, commands, logs, cfg.timeout_minutes, threads=threads)
        elif isinstance(step, OneProcess):
            run_commands(stage.name, [sequence(step, stage.name)], [log_path], cfg.timeout_minutes, threads=threads)
        else:
            run_commands(stage.name, [step], [log_path], cfg.timeout_minutes, threads=threads)
    if tmp_out.exists():
        os.replace(tmp_out, final)
        fp32 = _fp32_tmp(final)
        if fp32.exists():
            target = final.parent / "fp32"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(fp32, target)
    missing = [out for out in stage_outputs(stage, cfg) if not (run_dir / out).exists()]
    if missing:
        raise StageFailed(f"stage {stage.name} finished but wrote no {', '.join(str(run_dir / m) for m in missing)}; "
                          f"log: {log_path}")


RUNS_ALONE = ("eval_latency",)
"""Stages that measure time: they run with no other stage beside them (launch.schedule)."""


def pipeline(run_dir: Path, preset: str | None, cfg: PipelineConfig, force: list[str] = ()) -> dict[str, Any]:
    """Run the stages that `plan_stages` decides to run, side by side where their dependencies allow
    (pipeline.max_parallel_stages; launch.schedule), and record each one's seconds and the run's
    wall time in stage_seconds.json."""
    from launch.launcher import cores_available

    # Absolute paths, so that stage commands never resolve them against the run dir a second time.
    run_dir = Path(run_dir).resolve()
    check_run_dir(run_dir, "--out")
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_run_dir(run_dir)
    log_dir = run_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    save_config(cfg, run_dir / "pipeline.yaml")
    timings_path = run_dir / "stage_seconds.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    decision = plan_stages(run_dir, cfg, list(force))
    for stage in STAGES:
        if decision[stage.name] != "run":
            print(f"[pipeline] {stage.name:18s} {'skipped (complete)' if decision[stage.name] == 'skip' else 'left out'}",
                  flush=True)
    cores = cores_available()
    deps = {s.name: s.deps for s in STAGES}
    # The previous run's seconds (if any) weigh the chains of stages that decide the order.
    order = priority_order([s.name for s in STAGES], deps, timings)
    sched = StageScheduler(order, deps, [name for name, v in decision.items() if v == "run"],
                           parallel_slots(cfg.max_parallel_stages, cores), cores, alone=RUNS_ALONE)
    total_start = time.time()

    def started(start: Start) -> None:
        stage = STAGE_BY_NAME[start.name]
        others = [name for name in start.beside if name != start.name]
        share = f"; {start.threads} of {cores} cores, beside {', '.join(others)}" if start.threads else ""
        print(f"[pipeline] {stage.name:18s} running: {stage.what} (log: {log_dir / (stage.name + '.log')}{share})",
              flush=True)

    def work(start: Start) -> None:
        # A stage that runs only because its output is missing (a crash) resumes its checkpoints.
        stage = STAGE_BY_NAME[start.name]
        run_stage(stage, run_dir, preset, cfg, log_dir, fresh=starts_over(stage, decision, force),
                  threads=start.threads)

    def finished(name: str, seconds: float) -> None:
        timings[name] = round(seconds, 1)
        timings[WALL_SECONDS] = round(time.time() - total_start, 1)
        atomic_write_json(timings_path, timings)
        print(f"[pipeline] {name:18s} done in {timings[name]:.0f} s", flush=True)

    def interrupted() -> PipelineStopped | None:
        return PipelineStopped(FORWARDER.received, ", ".join(sched.running)) if FORWARDER.received else None

    try:
        run_scheduled(sched, work, started, finished, stop_running=FORWARDER.halt, interrupted=interrupted)
    finally:
        FORWARDER.halted_by = ""  # every stage has ended: a later pipeline in this process starts afresh
    if sched.done:
        timings[WALL_SECONDS] = round(time.time() - total_start, 1)
        atomic_write_json(timings_path, timings)
    print(f"[pipeline] finished in {time.time() - total_start:.0f} s; report: {run_dir / 'REPORT.md'}", flush=True)
    return {"decision": decision, "stage_seconds": timings}


# ----------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="run every stage end to end (resumable) and write REPORT.md and summary.json",
        description="Runs data prep -> teacher pretraining -> stage-2 pretraining -> distillation (CRR and "
        "plain KD) -> MASSIVE fine-tuning -> ONNX export + int8 -> evaluation -> report. A stage whose "
        "output already exists is skipped, so rerunning after a crash resumes; a stage that runs makes "
        "every stage after it that depends on it run again.",
    )
    p.add_argument("--preset", default="tiny", help="preset for every stage (launch/presets/NAME/); default tiny")
    p.add_argument("--out", default=None, help="run directory, e.g. runs/demo (required unless --list-stages)")
    p.add_argument("--force", nargs="*", default=[], metavar="STAGE", help="rerun these stages (and what depends on them)")
    p.add_argument("--list-stages", action="store_true", help="print the stages, their outputs and dependencies, then exit")
    p.add_argument("overrides", nargs="*", help="pipeline.* overrides without the prefix, e.g. num_train_procs=1")
    p.set_defaults(func=run, lock_run_dir="out")


def run(args: argparse.Namespace) -> int:
    if args.list_stages:
        for s in STAGES:
            print(f"{s.name:18s} -> {s.output:20s} after: {', '.join(s.deps) or '-'}\n{'':22s}{s.what}")
        return 0
    if not args.out:
        raise ConfigError("--out: the run directory is required (e.g. --out runs/demo)")
    cfg = load_config(PipelineConfig, section="pipeline", preset=args.preset, overrides=args.overrides)
    unknown = [s for s in args.force if s not in STAGE_BY_NAME]
    if unknown:
        raise ConfigError(f"--force: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGE_BY_NAME)}")
    try:
        with FORWARDER:
            pipeline(Path(args.out), args.preset, cfg, force=args.force)
    except PipelineStopped as e:
        print(f"polyteacher pipeline: {e}", file=sys.stderr)
        return 128 + e.signum
    except StageFailed as e:
        print(f"polyteacher pipeline: {e}", file=sys.stderr)
        print("Fix the cause and rerun the same command: finished stages are kept.", file=sys.stderr)
        return 1
    return 0
