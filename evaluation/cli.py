"""`polyteacher evaluate ...`: the command group of every evaluation.

Each module in EVALUATE_MODULES that is installed defines `register_evaluate(subparsers)` and adds its
own `evaluate X` subcommand. They share the options added by `add_common_arguments` (--model, --out,
--run-dir, --preset, --name, trailing dotted overrides of the `evaluate` config section) and resolve
them with `resolve_common` (`run_common` runs a whole single-model command); `evaluate baseline`, which
has no model, resolves the same config with `resolve_config`. Commands that compare several models
(fairness, latency) read `--models NAME=DIR ...` with `parse_models`. Heavy libraries are imported only when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.commands import register_modules

EVALUATE_MODULES = (
    "evaluation.massive",  # evaluate massive
    "evaluation.icl_heldout",  # evaluate icl (--protocol all_intents: evaluation/icl.py; heldout)
    "evaluation.translation",  # evaluate translation
    "evaluation.fairness",  # evaluate fairness
    "evaluation.latency",  # evaluate latency
    "evaluation.baseline",  # evaluate baseline
    "evaluation.compare",  # evaluate compare
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a model: MASSIVE, in-context learning, translation, fairness, latency; baseline, compare",
        description="Evaluations of a model directory. Each writes JSON, a Markdown table and PNG charts "
        "into --out. Options of the `evaluate` config section are dotted overrides "
        "(`polyteacher config evaluate` lists them).",
    )
    evaluate_sub = p.add_subparsers(dest="evaluation", metavar="EVALUATION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    register_modules(evaluate_sub, EVALUATE_MODULES, "register_evaluate")


def add_common_arguments(p: argparse.ArgumentParser, default_name: str) -> None:
    """--model, --out, --run-dir, --preset, --name and trailing dotted overrides."""
    p.add_argument(
        "--model",
        required=True,
        help="model directory (HF save_pretrained, encoder NLU or ONNX export); relative paths are "
        "taken inside --run-dir when it is given",
    )
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval when --run-dir is given)")
    p.add_argument("--run-dir", default=None, help="run directory that --model and --out are relative to")
    p.add_argument("--preset", default=None, help="preset name (launch/presets) or YAML path; its evaluate section is used")
    p.add_argument(
        "--name",
        default=default_name,
        help=f"base name of the output files (default {default_name!r}); use one per model to keep several in one --out",
    )
    add_load_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides of the evaluate section, e.g. icl.shots=[0,1]")


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """--device-map, --max-memory, --offload-folder: big-model placement (config keys load.*)."""
    p.add_argument("--device-map", choices=["none", "auto"], default=None,
                   help="auto: spread a model too big for one device over the GPUs, the CPU and the disk "
                   "(accelerate); sets load.device_map (default none)")
    p.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                   help="with --device-map auto: the most each device holds, e.g. 0=70GiB,1=70GiB,cpu=200GiB; "
                   "sets load.max_memory")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="with --device-map auto: directory for weights offloaded to the disk (relative: inside "
                   "--run-dir, else inside --out); sets load.offload_folder")


def load_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The `load` section set by --device-map, --max-memory, --offload-folder (None: not given)."""
    from core.bigmodel import parse_max_memory_flag

    max_memory = getattr(args, "max_memory", None)
    return {
        "device_map": getattr(args, "device_map", None),
        "max_memory": parse_max_memory_flag(max_memory) if max_memory is not None else None,
        "offload_folder": getattr(args, "offload_folder", None),
    }


def resolve_config(args: argparse.Namespace, flags: dict[str, dict[str, Any]]) -> Any:
    """The EvalConfig of --preset, the command's own options and the trailing dotted overrides;
    checks --name.

    `flags` holds the command's own options ({section: {config key: value or None}}); they override
    the preset and the trailing dotted overrides (core.config's one precedence rule).
    """
    from core.config import given_flags, load_config
    from evaluation.config import EvalConfig

    given = {section: given_flags(**values) for section, values in flags.items()}
    cfg = load_config(EvalConfig, section="evaluate", preset=args.preset, overrides=args.overrides, flags=given)
    check_name(args.name)
    return cfg


def check_name(name: str) -> None:
    """--name is a base name for files in --out, never a path."""
    from core.config import ConfigError

    if "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"--name {name!r} must be a plain file name without '/'")


def resolve_common(args: argparse.Namespace, section: str, flags: dict[str, Any]) -> tuple[Any, Path, Path]:
    """(EvalConfig, model directory, output directory) from the common options; `flags` are the
    command's own options of config section `section` (see `resolve_config`)."""
    from core.config import ConfigError
    from core.fsutil import safe_path

    cfg = resolve_config(args, {section: flags, "load": load_flags(args)})
    if args.run_dir:
        run_dir = Path(args.run_dir)
        model_dir = Path(args.model) if Path(args.model).is_absolute() else safe_path(run_dir, args.model)
        out_dir = Path(args.out) if args.out else safe_path(run_dir, "eval")
        if not out_dir.is_absolute():
            out_dir = safe_path(run_dir, out_dir)
    else:
        if not args.out:
            raise ConfigError("--out is required when --run-dir is not given")
        model_dir, out_dir = Path(args.model), Path(args.out)
    if not model_dir.is_dir():
        raise ConfigError(f"--model: {model_dir} is not a directory")
    if cfg.load.offload_folder:
        import dataclasses

        from core.bigmodel import resolve_offload_folder

        folder = resolve_offload_folder(cfg.load.offload_folder, args.run_dir or out_dir)
        cfg = dataclasses.replace(cfg, load=dataclasses.replace(cfg.load, offload_folder=folder))
    return cfg, model_dir, out_dir


def run_common(
    args: argparse.Namespace,
    section: str,
    flags: dict[str, Any],
    evaluate: Callable[[Any, Path, Path, str], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
) -> int:
    """The body of a single-model `evaluate X`: `resolve_common`, then `evaluate(cfg, model_dir,
    out_dir, args.name)`; prints `summary(result)` and where NAME.json went."""
    cfg, model_dir, out_dir = resolve_common(args, section, flags)
    result = evaluate(cfg, model_dir, out_dir, args.name)
    print(summary(result))
    print(f"wrote {out_dir / (args.name + '.json')}")
    return 0


def parse_models(items: Sequence[str], run_dir: str | Path | None = None) -> dict[str, Path]:
    """`--models NAME=DIR ...` -> {name: directory}, in the order given.

    Names are unique and contain no '/'. With `run_dir`, a relative DIR is taken inside it (never
    escaping it). Every directory must exist.
    """
    from core.config import ConfigError
    from core.fsutil import safe_path

    models: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or "/" in name:
            raise ConfigError(f"--models: {item!r} is not NAME=DIR (e.g. teacher=runs/x/teacher-ft)")
        if name in models:
            raise ConfigError(f"--models: name {name!r} given twice")
        models[name] = Path(path)
    if run_dir:
        models = {n: d if d.is_absolute() else safe_path(run_dir, d) for n, d in models.items()}
    missing = [f"{n}: {d} is not a directory" for n, d in models.items() if not d.is_dir()]
    if missing:
        raise ConfigError(f"--models: {'; '.join(missing)}")
    return models
