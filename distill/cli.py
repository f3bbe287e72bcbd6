"""`polyteacher distill`: distil a teacher into a compact student with counterfactual role reversal."""

from __future__ import annotations

import argparse

from core.config import ConfigError, config_help, given_flags, load_config


def register(sub: argparse._SubParsersAction) -> None:
    from distill.config import DistillConfig

    p = sub.add_parser(
        "distill",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys of the distill section (trailing dotted overrides):\n" + config_help(DistillConfig),
        help="distil a teacher into a compact student (KD + counterfactual role reversal)",
        description=(
            "Distil the teacher into a student (fewer layers and/or narrower, initialised from mapped teacher "
            "layers when the widths match) with loss alpha*T^2*KL(teacher_T||student_T) + (1-alpha)*CE, "
            "gender-swapped augmentation (distill.cda) and teacher-prediction perturbation (distill.perturb). "
            "Run it under `polyteacher launch` or `deepspeed` for several processes. Every key of the distill "
            "section (`polyteacher config distill` lists them) can be given as a trailing dotted override, "
            "e.g. student.preset=quarter cda=none perturb=none train.max_steps=200."
        ),
    )
    p.add_argument("--run-dir", required=True, help="run directory (reads tokenizer/, data/, the teacher; writes <out>/)")
    p.add_argument("--teacher", default=None, help="teacher model directory (absolute or run-relative); default: distill.teacher")
    p.add_argument("--out", default=None, help="student name: run_dir/<out>/ and checkpoints/<out>/; default: distill.out")
    p.add_argument("--preset", default=None, help="preset name (launch/presets) or YAML path for the distill section")
    p.add_argument("--section", choices=["distill", "taskdistill"], default="distill",
                   help="which preset section to read: distill (task-agnostic, on the pretraining mixture; default) "
                        "or taskdistill (MASSIVE from a fine-tuned teacher, task=massive)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint of <out>")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the distill section, e.g. alpha=0.7")
    p.set_defaults(func=run, lock_run_dir="run_dir")


def run(args: argparse.Namespace) -> int:
    from distill.config import DistillConfig

    flags = given_flags(teacher=args.teacher, out=args.out)
    cfg = load_config(DistillConfig, section=args.section, preset=args.preset, overrides=args.overrides, flags=flags)
    if args.section == "taskdistill" and cfg.task != "massive":
        raise ConfigError(f"--section taskdistill distils MASSIVE from a fine-tuned teacher: set task=massive "
                          f"(the preset {args.preset!r} gives task={cfg.task!r})")
    from distill.distill import distill

    out_dir = distill(cfg, args.run_dir, resume=args.resume)
    from core.distributed import is_rank0

    if is_rank0():
        print(f"student written to {out_dir}")
    return 0
