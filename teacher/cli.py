"""`polyteacher pretrain`: teacher pretraining (general domain, or stage 2 in-domain with --init-from);
the teacher package's one registration, which also adds `polyteacher plan` (teacher/plan.py).

Imported by the CLI at start-up: torch, transformers and deepspeed are imported only when the
command runs (inside teacher.pretrain).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config import config_help, given_flags, load_config
from teacher import plan
from teacher.config import PretrainConfig

EPILOG = """\
examples:
  polyteacher pretrain --run-dir runs/demo --preset tiny
  polyteacher pretrain --run-dir runs/demo --preset tiny train.max_steps=200 train.zero_stage=3
  polyteacher pretrain --run-dir runs/demo --preset tiny --section indomain --init-from teacher --out teacher-indomain
  polyteacher pretrain --run-dir runs/demo --preset tiny --section icl --init-from teacher --out teacher-icl
  polyteacher pretrain --run-dir runs/demo --preset tiny --resume
  polyteacher launch --nproc-per-node 2 -- pretrain --run-dir runs/demo --preset tiny

config keys (dotted overrides, e.g. train.max_steps=200 teacher.d_model=256):
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a multilingual seq2seq teacher with DeepSpeed (denoising + causal LM)",
        description=(
            "Pretrain a T5-style teacher on the packed data of a run directory (RUN_DIR/<data>/train, "
            "held-out loss on RUN_DIR/<data>/heldout) with a denoising + [CLM] objective mixture, or continue "
            "pretraining a model directory on in-domain data (--section indomain --init-from teacher). Writes "
            "RUN_DIR/<out>/ (Hugging Face directory with the tokenizer), resumable checkpoints under "
            "RUN_DIR/checkpoints/<out>/, metrics.jsonl, tb/<out>/ and config.yaml. Runs in one process, or "
            "in several under `polyteacher launch` (ranks from the environment)."
        ),
        epilog=EPILOG + config_help(PretrainConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", required=True, type=Path, help="run directory (data in, model/checkpoints/metrics out)")
    p.add_argument("--out", default=None, help="output model directory name under the run directory; sets config key out")
    p.add_argument("--init-from", default=None,
                   help="Hugging Face model directory to continue from (absolute or relative to the run directory); "
                   "sets config key init_from")
    p.add_argument("--section", choices=["pretrain", "indomain", "icl"], default="pretrain",
                   help="which preset section to read: pretrain (general domain, default), indomain (stage 2: "
                   "data-indomain, init_from teacher) or icl (in-context training on MASSIVE prompts outside the "
                   "held-out intents; sets icl.enabled; docs/icl.md)")
    p.add_argument("--preset", default=None, help="preset name (launch/presets/<name>/) or YAML path")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint of checkpoints/<out>/ (exactly: weights, "
                   "optimizer, LR schedule, data position, RNG); starts fresh when there is none. Without it, "
                   "existing checkpoints are an error")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (listed below), e.g. train.max_steps=200")
    p.set_defaults(func=run, lock_run_dir="run_dir")
    plan.register(sub)


def build_config(args: argparse.Namespace) -> PretrainConfig:
    """Defaults <- preset section <- overrides <- the explicit flags (--out, --init-from)."""
    flags = given_flags(out=args.out, init_from=args.init_from)
    if args.section == "icl":
        flags["icl"] = {"enabled": True}
    return load_config(PretrainConfig, section=args.section, preset=args.preset, overrides=args.overrides, flags=flags)


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    from core.loop import NonFiniteLossError
    from teacher.pretrain import pretrain

    try:
        out = pretrain(cfg, args.run_dir, resume=args.resume)
    except FileNotFoundError as e:  # missing data, tokenizer or init_from directory
        print(f"polyteacher pretrain: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"polyteacher pretrain: {e}", file=sys.stderr)
        return 3
    from core.distributed import is_rank0

    if is_rank0():
        print(out)
    return 0
