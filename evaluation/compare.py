"""`polyteacher evaluate compare A.json B.json`: two models on the same utterances, compared paired.

Reads two results of `evaluate massive` or `evaluate baseline`, which hold per-utterance outcomes
("records"), and reports for each metric both have (a baseline has intent accuracy only) the
difference B - A of the means over locales and per locale, with a bootstrap interval over ids
(`evaluation.massive.paired_difference`). Pairing matters: two intervals that overlap do not show
that two models are alike, while the interval of the paired difference, where utterances both get
right or wrong cancel out, does show whether one is better. Both results must cover the same ids
(scored with the same massive.seed, max_examples and locales).

Also the ratio B / A of the means (how much of A's score B keeps) with its interval, and the share
of utterances on which both predict exactly the same intent and slot labels (when both results
record their predictions; `evaluation.massive.identical_predictions`).

Prints a Markdown table; with --out DIR also writes `DIR/NAME.json` (schema: docs/internals.md,
"Evaluation outputs") and `DIR/NAME.md`, the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_result(path: str | Path) -> dict[str, Any]:
    """A result JSON with per-utterance records."""
    from core.config import ConfigError

    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a result JSON ({e})") from e
    if not isinstance(result, dict) or not isinstance(result.get("records"), dict):
        raise ConfigError(
            f"{path}: no per-utterance records; give the NAME.json of `evaluate massive` or `evaluate baseline`"
        )
    return result


def compare_results(path_a: str | Path, path_b: str | Path, *, samples: int, seed: int, confidence: float) -> dict[str, Any]:
    from core.config import ConfigError
    from massive.scoring import paired_difference

    a, b = read_result(path_a), read_result(path_b)
    try:
        paired = paired_difference(a["records"], b["records"], samples=samples, seed=seed, confidence=confidence)
    except ValueError as e:
        raise ConfigError(f"{path_a} and {path_b}: {e}") from e
    return {
        "a": str(path_a),
        "b": str(path_b),
        "model_a": a.get("model", str(path_a)),
        "model_b": b.get("model", str(path_b)),
        "samples": samples,
        "seed": seed,
        "confidence": confidence,
        **paired,
    }


def compare_markdown(result: dict[str, Any]) -> str:
    from core.tables import markdown_table

    def interval(pair: list[float] | None, sign: str = "+") -> str | None:
        return None if pair is None else f"[{pair[0]:{sign}.4f}, {pair[1]:{sign}.4f}]"

    def row(metric: str, locale: str, v: dict[str, Any]) -> list[Any]:
        return [metric, locale, v["a"], v["b"], v["diff"], interval(v["diff_ci"])]

    rows = []
    for metric, m in result["metrics"].items():
        # B / A only for the mean over locales: what a claim such as "the student keeps 90% of the
        # teacher's EM" is about.
        rows.append([*row(metric, "**mean**", m), m["ratio"], interval(m["ratio_ci"], "")])
        rows += [[*row(metric, loc, v), "", ""] for loc, v in sorted(m["per_locale"].items())]
    level = f"{result['confidence']:.0%}"
    header = ["metric", "locale", "A", "B", "B - A", f"{level} CI of B - A", "B / A", f"{level} CI of B / A"]
    title = (
        f"# Paired comparison on {result['num_ids']} ids\n\nA: {result['model_a']}\n\nB: {result['model_b']}\n\n"
        f"Intervals: {result['ci_method']}.\n\n"
    )
    same = result["identical_predictions"]
    if same is None:
        identical = "\nIdentical predictions: n/a (a result without recorded predictions).\n"
    else:
        per_locale = ", ".join(f"{loc} {share:.1%}" for loc, share in sorted(same["per_locale"].items()))
        identical = (
            f"\nIdentical predictions ({' and '.join(same['compared'])}): {same['share']:.1%} of ids x locales "
            f"({per_locale}).\n"
        )
    return title + markdown_table(header, rows) + identical


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="B - A for two MASSIVE results on the same ids, with a paired bootstrap interval",
        description="Reads two NAME.json files of `evaluate massive` or `evaluate baseline` scored on the same "
        "ids and prints B - A (EM, intent accuracy, slot F1: those both have), mean over locales and per "
        "locale, with bootstrap intervals over ids, paired. With --out, writes NAME.json and NAME.md.",
    )
    p.add_argument("a", help="result JSON of model A")
    p.add_argument("b", help="result JSON of model B")
    p.add_argument("--out", default=None, help="output directory (default: print only)")
    p.add_argument("--name", default="compare", help="base name of the output files (default 'compare')")
    p.add_argument("--samples", type=int, default=None, help="bootstrap resamples (default: bootstrap_samples = 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    p.add_argument("--confidence", type=float, default=None, help="interval coverage (default: confidence = 0.95)")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from core.fsutil import atomic_write_json, atomic_write_text
    from evaluation.cli import check_name
    from evaluation.config import EvalConfig

    # The defaults of every other evaluation; validated as the config validates them.
    cfg = EvalConfig()
    cfg.bootstrap_samples = cfg.bootstrap_samples if args.samples is None else args.samples
    cfg.confidence = cfg.confidence if args.confidence is None else args.confidence
    cfg.validate()
    check_name(args.name)
    result = compare_results(args.a, args.b, samples=cfg.bootstrap_samples, seed=args.seed, confidence=cfg.confidence)
    table = compare_markdown(result)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        atomic_write_json(out / f"{args.name}.json", result)
        atomic_write_text(out / f"{args.name}.md", table)
        print(f"wrote {out / (args.name + '.json')}")
    return 0
