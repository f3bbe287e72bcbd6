"""The `polyteacher` command.

Each package registers its subcommands once, through `register(subparsers)` in its `cli.py`
(`core.commands`), which adds its parsers and sets `func` (called with the parsed args; returns an
exit code or None); the `launch` package's own commands (launch, pipeline, config) come last.
Options follow one precedence rule (`core.config`): defaults < preset < dotted overrides < flags. A command that writes into
a run directory also sets `lock_run_dir` to the name of the argument holding it: `main` runs it under
`core.fsutil.run_dir_lock`, so one writer holds a run directory at a time. Those modules import heavy
libraries (torch, deepspeed) inside their functions so that `polyteacher --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from core.commands import register_modules
from core.config import ConfigError
from core.fsutil import run_dir_lock
from launch import config_cli, launcher, pipeline
from launch.schedule import SEQUENCE_FLAG

# One registration per package, in the order its subcommands appear in --help.
COMMAND_MODULES = (
    "data_prep.cli",  # polyteacher data ...
    "teacher.cli",  # polyteacher pretrain, plan
    "distill.cli",  # polyteacher distill
    "student.cli",  # polyteacher finetune, export, predict
    "evaluation.cli",  # polyteacher evaluate ...
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from core.checkpoint import CheckpointError
    from core.distributed import UnsafeCheckpointError
    from core.fsutil import OutputPathError, RunDirLockedError, UnsafePathError
    from core.modeldir import ModelDirError

    types_: list[type[BaseException]] = [UnsafePathError, OutputPathError, UnsafeCheckpointError, CheckpointError,
                                           ModelDirError, RunDirLockedError]
    try:
        from massive.format import MassiveError

        types_.append(MassiveError)
    except ImportError:
        pass
    from data_prep.corpus import CorpusSourceError

    types_.append(CorpusSourceError)
    return tuple(types_)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyteacher",
        description=(
            "Multilingual teacher distillation: data prep, DeepSpeed teacher pretraining, "
            "fair distillation, MASSIVE fine-tuning, int8 ONNX export and evaluation. "
            "Stage options are dotted config overrides (e.g. tokenizer.vocab_size=16000); "
            "`polyteacher config STAGE` lists every key with its documentation."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_modules(sub, COMMAND_MODULES, "register")
    register(sub)
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    """The launch package's commands: launch, pipeline, config."""
    launcher.register(sub)
    pipeline.register(sub)
    config_cli.register(sub)


_WATCHING_PARENT = False


def main(argv: list[str] | None = None) -> int:
    global _WATCHING_PARENT
    if not _WATCHING_PARENT:  # once per process (run_sequence calls main for each command)
        launcher.watch_parent()  # a stage or rank stops when the pipeline or launcher that started it is gone
        _WATCHING_PARENT = True
    parser = build_parser()
    # argparse cannot put positionals after options into an earlier, already-filled `nargs="*"`
    # (`config data --preset tiny a.b=1`): dotted overrides left over are appended to them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    lock_dir = getattr(args, getattr(args, "lock_run_dir", None) or "", None)
    try:
        with run_dir_lock(lock_dir, " ".join(["polyteacher", *(sys.argv[1:] if argv is None else argv)])[:300]) \
                if lock_dir else contextlib.nullcontext():
            code = args.func(args)
    except ConfigError as e:
        print(f"polyteacher: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from core.loop import TrainingStopped

        if isinstance(e, TrainingStopped):  # SIGTERM/SIGINT: a checkpoint was saved first
            print(f"polyteacher {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        # Bad input the user can fix (malformed data, unsafe paths) is one line, not a traceback.
        if isinstance(e, _user_error_types()):
            print(f"polyteacher: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("polyteacher: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def run_sequence(commands: list[list[str]]) -> int:
    """Run polyteacher `commands` one after another in this process, each announced as `$ polyteacher
    ...` the way a user would type it; stop at the first that fails and return its exit code. A stage's
    dozen evaluation commands then pay one Python start-up and one import of torch and transformers
    instead of a dozen (~4-8 s each on 2 CPU cores)."""
    import shlex

    for argv in commands:
        print("$ polyteacher " + shlex.join(argv), flush=True)
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's usage errors exit; the sequence reports them like the others
            code = e.code if isinstance(e.code, int) else 1
        if code:
            print(f"polyteacher: exit {code} from: polyteacher {shlex.join(argv)}", file=sys.stderr, flush=True)
            return code
    return 0


def _sequence_from_file(path: str) -> list[list[str]]:
    import json

    commands = json.loads(open(path, encoding="utf-8").read())
    if not (isinstance(commands, list) and all(isinstance(c, list) and all(isinstance(a, str) for a in c)
                                               for c in commands)):
        raise SystemExit(f"{SEQUENCE_FLAG} {path}: expected a JSON list of argument lists")
    return commands


if __name__ == "__main__":
    if sys.argv[1:2] == [SEQUENCE_FLAG] and len(sys.argv) == 3:
        sys.exit(run_sequence(_sequence_from_file(sys.argv[2])))
    sys.exit(main())
