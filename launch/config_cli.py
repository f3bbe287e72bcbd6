"""`polyteacher config STAGE [--preset P] [overrides]`: document and resolve a stage's config."""

from __future__ import annotations

import argparse
import importlib

import yaml

from core.config import config_help, load_config, to_dict

# Preset section -> "module:Class" of the stage's config dataclass.
STAGE_CONFIGS = {
    "data": "data_prep.config:DataConfig",
    "pretrain": "teacher.config:PretrainConfig",
    "indomain": "teacher.config:PretrainConfig",
    "icl": "teacher.config:PretrainConfig",
    "distill": "distill.config:DistillConfig",
    "taskdistill": "distill.config:DistillConfig",
    "finetune": "student.config:FinetuneConfig",
    "nlu": "student.config:FinetuneConfig",
    "export": "student.export:ExportConfig",
    "evaluate": "evaluation.config:EvalConfig",
    "pipeline": "launch.pipeline:PipelineConfig",
}


def stage_config_class(stage: str) -> type:
    module_name, cls_name = STAGE_CONFIGS[stage].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="list a stage's config keys with their documentation, or print the resolved config",
        description="Without --resolve: every dotted key of the stage's config, its type, default and "
        "documentation. With --resolve: the YAML that the given preset and overrides produce.",
    )
    p.add_argument("stage", choices=sorted(STAGE_CONFIGS), help="which stage's config")
    p.add_argument("--preset", default=None, help="preset name (launch/presets) or YAML path")
    p.add_argument("--resolve", action="store_true", help="print the resolved config as YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tokenizer.vocab_size=16000")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cls = stage_config_class(args.stage)
    if args.resolve or args.preset or args.overrides:
        cfg = load_config(cls, section=args.stage, preset=args.preset, overrides=args.overrides)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    else:
        print(f"{args.stage}: {cls.__name__}\n{config_help(cls)}")
    return 0
