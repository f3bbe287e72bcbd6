"""`polyteacher data ...`: prepare, massive, tokenizer, pack.

Imported at CLI start-up: heavy libraries are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.config import ConfigError, config_help, load_config

DESCRIPTION = """\
The data_prep stage. `prepare` runs it all: read the monolingual corpora and MASSIVE, refuse
evaluation text (FLORES-200 dev, MASSIVE dev/test), sample languages with p_l ~ n_l^alpha, train
a SentencePiece unigram tokenizer, pack pretraining data and in-domain data (MASSIVE train
utterances). Outputs that already exist for the same settings are reused.
"""

CONFIG_EPILOG = "config keys (trailing dotted overrides, e.g. tokenizer.vocab_size=16000):\n"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="data prep: corpora, tokenizer, packed pretraining data, MASSIVE",
        description=DESCRIPTION,
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    prep = _stage_parser(
        data_sub,
        "prepare",
        "the whole stage: corpus -> tokenizer -> data/ -> data-indomain/",
        "Writes config.yaml, tokenizer/, tokenizer_eval.{json,md}, data/{train,heldout,stats.json} and "
        "data-indomain/ into --run-dir; prints the corpus, mixture and tokenizer tables.",
    )
    prep.add_argument(
        "--force",
        action="store_true",
        help="rebuild outputs even when they exist (needed when the settings changed)",
    )
    prep.set_defaults(func=cmd_prepare, lock_run_dir="run_dir")

    mas = _stage_parser(
        data_sub,
        "massive",
        "load MASSIVE, print examples per locale and partition and the bad-row report",
        "Loads massive.source for the configured locales with massive.on_bad_row (error: stop at "
        "the first bad row naming file and line; skip: count them). With --run-dir the report is "
        "also written to RUN_DIR/massive_report.json and parsed splits are cached there.",
        run_dir_required=False,
    )
    mas.set_defaults(func=cmd_massive, lock_run_dir="run_dir")

    tok = _stage_parser(
        data_sub,
        "tokenizer",
        "train (or just evaluate) the tokenizer and print its per-locale table",
        "Trains RUN_DIR/tokenizer unless an up-to-date one exists, then prints and writes "
        "(tokenizer_eval.json, tokenizer_eval.md) fertility, unknown-token rate and round-trip "
        "exactness on each locale's MASSIVE test utterances.",
    )
    tok.add_argument(
        "--evaluate",
        metavar="DIR",
        default=None,
        help="only evaluate the tokenizer in DIR (a tokenizer or model directory); no training",
    )
    tok.add_argument("--force", action="store_true", help="retrain even when RUN_DIR/tokenizer exists")
    tok.set_defaults(func=cmd_tokenizer, lock_run_dir="run_dir")

    pack = _stage_parser(
        data_sub,
        "pack",
        "pack pretraining data (data/) and in-domain data (data-indomain/) with RUN_DIR/tokenizer",
        "Needs RUN_DIR/tokenizer (from `data tokenizer` or `data prepare`). Tokenizes the language-"
        "sampled mixture, packs it into packing.seq_len rows joined by <sep> and writes Arrow shards.",
    )
    pack.add_argument("--force", action="store_true", help="repack even when the outputs exist")
    pack.set_defaults(func=cmd_pack, lock_run_dir="run_dir")


def _stage_parser(
    sub: argparse._SubParsersAction,
    name: str,
    help_text: str,
    description: str,
    run_dir_required: bool = True,
) -> argparse.ArgumentParser:
    from data_prep.config import DataConfig

    p = sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=CONFIG_EPILOG + config_help(DataConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run-dir",
        required=run_dir_required,
        default=None,
        type=Path,
        help="the run directory (created if missing)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="preset name (tiny, small, base, large, xl, alexatm-20b) or a YAML path; its "
        "`data` section overrides the defaults",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides applied after the preset, e.g. packing.seq_len=256",
    )
    return p


def _config(args: argparse.Namespace):
    from data_prep.config import DataConfig

    return load_config(DataConfig, section="data", preset=args.preset, overrides=args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_prep.prepare import prepare

    cfg = _config(args)
    result = prepare(cfg, args.run_dir, force=args.force, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def cmd_massive(args: argparse.Namespace) -> int:
    from core.fsutil import atomic_write_json
    from data_prep.prepare import massive_cache_dir
    from massive.loader import load_massive

    cfg = _config(args)
    data = load_massive(
        cfg.massive.source,
        locales=cfg.locales,
        on_bad_row=cfg.massive.on_bad_row,
        cache_dir=massive_cache_dir(cfg, args.run_dir) if args.run_dir else cfg.massive.cache_dir,
        progress=not args.quiet,
    )
    print(data.summary_table())
    print(f"{len(data.intents)} intents, {len(data.slot_types)} slot types")
    if args.run_dir:
        atomic_write_json(
            Path(args.run_dir) / "massive_report.json",
            {**data.report.to_dict(), "intents": data.intents, "slot_types": data.slot_types},
        )
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from data_prep import prepare as stage
    from data_prep.tokenizer import load_tokenizer

    cfg = _config(args)
    run_dir = Path(args.run_dir)
    if args.evaluate:
        tokenizer = load_tokenizer(args.evaluate)
        test = _massive_test_utterances(cfg, run_dir, not args.quiet)
    else:
        inputs = stage.load_inputs(cfg, run_dir, progress=not args.quiet)
        print(inputs.corpus.table())
        tokenizer = stage.ensure_tokenizer(cfg, inputs, run_dir, force=args.force)
        test = inputs.massive_test
    print(stage.evaluate_and_report_tokenizer(tokenizer, test, run_dir))
    return 0


def _massive_test_utterances(cfg, run_dir: Path, progress: bool) -> dict[str, list[str]]:
    from data_prep.prepare import massive_cache_dir
    from massive.loader import load_massive, massive_utterances

    data = load_massive(
        cfg.massive.source,
        locales=cfg.locales,
        partitions=("test",),
        on_bad_row=cfg.massive.on_bad_row,
        cache_dir=massive_cache_dir(cfg, run_dir),
        progress=progress,
    )
    return massive_utterances(data, ("test",))


def cmd_pack(args: argparse.Namespace) -> int:
    from data_prep import prepare as stage
    from data_prep.tokenizer import is_complete, load_tokenizer

    cfg = _config(args)
    run_dir = Path(args.run_dir)
    tok_dir = run_dir / stage.TOKENIZER_DIR
    if not is_complete(tok_dir):
        raise ConfigError(
            f"{tok_dir}: no tokenizer; run `polyteacher data tokenizer --run-dir {run_dir}` first"
        )
    tokenizer = load_tokenizer(tok_dir)
    inputs = stage.load_inputs(cfg, run_dir, progress=not args.quiet)
    print(inputs.corpus.table())
    stage.ensure_all_packed(cfg, tokenizer, inputs, run_dir, force=args.force, progress=not args.quiet)
    print(json.dumps(stage.summary(run_dir), indent=2))
    return 0
