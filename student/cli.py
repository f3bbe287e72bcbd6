"""`polyteacher finetune`: MASSIVE fine-tuning of a seq2seq model (text-to-text or encoder NLU heads);
the student package's one registration, which also adds `polyteacher ensemble` (encoder NLU models
combined into one, student/nlu.py), `polyteacher export` (student/export.py) and `polyteacher predict`
(student/runtime.py).

Imported by the CLI at start-up: torch, transformers and deepspeed are imported only when the
command runs (inside student.finetune).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.config import config_help, given_flags, load_config
from student import export, runtime
from student.config import FinetuneConfig

EPILOG = """\
examples:
  polyteacher finetune --run-dir runs/demo --model teacher-indomain --preset tiny
  polyteacher finetune --run-dir runs/demo --model student --head encoder --out student-nlu
  polyteacher finetune --run-dir runs/demo --model scratch:tiny --preset tiny tokenizer=tokenizer
  polyteacher finetune --run-dir runs/demo --model teacher-indomain --preset small setting=zero_shot
  polyteacher launch --nproc-per-node 2 -- finetune --run-dir runs/demo --model teacher --preset tiny

config keys (dotted overrides, e.g. train.max_steps=200 locales=[en-US,de-DE]):
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a seq2seq model on MASSIVE (text-to-text or encoder intent+slot heads)",
        description=(
            "Fine-tune a Hugging Face seq2seq model directory (teacher, student or any T5-family model), "
            "or a freshly initialised size preset (scratch:<preset>), on MASSIVE with DeepSpeed. Writes "
            "RUN_DIR/<out>/ (a Hugging Face directory with the tokenizer; for --head encoder also "
            "nlu_labels.json), resumable checkpoints under RUN_DIR/checkpoints/<out>/, metrics.jsonl and "
            "tb/<out>/. Run it under `polyteacher launch` for several processes."
        ),
        epilog=EPILOG + config_help(FinetuneConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", required=True, type=Path, help="run directory (outputs, checkpoints, metrics)")
    p.add_argument(
        "--model",
        default=None,
        help="model to start from: a seq2seq model directory (absolute, or relative to the run directory, "
        "e.g. teacher-indomain) or scratch:<size preset>; sets config key init",
    )
    p.add_argument("--out", default=None, help="output directory name under the run directory; sets config key out")
    p.add_argument("--head", choices=["seq2seq", "encoder"], default=None,
                   help="seq2seq: text-to-text; encoder: encoder + intent and slot heads; sets config key head")
    p.add_argument("--preset", default=None, help="preset name (launch/presets/<name>/finetune.yaml) or YAML path")
    p.add_argument("--section", choices=["finetune", "nlu"], default="finetune",
                   help="preset section to read: finetune (default) or nlu, the encoder NLU fine-tuning "
                   "(nlu.yaml holds only what differs from finetune.yaml: steps, dropout, head)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint of checkpoints/<out>/ (exactly: same data "
                   "order, RNG and optimizer state); starts fresh when there is none")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (listed below), e.g. train.max_steps=200")
    p.set_defaults(func=run, lock_run_dir="run_dir")
    e = sub.add_parser(
        "ensemble",
        help="combine trained encoder NLU models into one model that averages their predictions",
        description=(
            "Combine encoder NLU model directories (`finetune --head encoder`) with the same intents, slot "
            "labels and tokenizer into one model directory whose forward averages the members' "
            "log-probabilities. It predicts, exports to ONNX (one graph) and quantizes like a single model, "
            "at the members' total size and latency. The members are copied in."
        ),
        epilog="example:\n  polyteacher ensemble --members runs/demo/nlu-0/student-nlu runs/demo/nlu-1/student-nlu "
        "--out runs/demo/student-nlu",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--members", nargs="+", required=True, type=Path, help="encoder NLU model directories (2 or more)")
    e.add_argument("--out", required=True, type=Path, help="ensemble directory to write (replaced if it is one already)")
    e.set_defaults(func=run_ensemble)
    export.register(sub)
    runtime.register(sub)


def build_config(args: argparse.Namespace) -> FinetuneConfig:
    """Defaults <- preset <- overrides <- the explicit flags (--model, --out, --head)."""
    flags = given_flags(init=args.model, out=args.out, head=args.head)
    section = getattr(args, "section", "finetune")
    cfg = load_config(FinetuneConfig, section=section, preset=args.preset, overrides=args.overrides, flags=flags)
    if not cfg.init:
        from core.config import ConfigError

        raise ConfigError("finetune: no model to start from; pass --model DIR (or scratch:<preset>) or set init=...")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    from student.finetune import finetune

    out = finetune(cfg, args.run_dir, resume=args.resume)
    from core.distributed import is_rank0

    if is_rank0():
        print(f"finetune: wrote {out}")
    return 0


def run_ensemble(args: argparse.Namespace) -> int:
    from student.kinds import build_ensemble

    out = build_ensemble(args.members, args.out)
    print(f"ensemble: wrote {out} ({len(args.members)} members)")
    return 0
