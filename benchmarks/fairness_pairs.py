"""Gender pairs, several training seeds per arm: change rate (both directions) and the signed female -
male accuracy gap, whole parse and intent, on the independent set (hand-written templates and
first-name pairs, no sigma) and on the sigma set (`evaluation/fairness_pairs.py`, docs/fairness.md).

Each arm is a list of model directories, one per training seed; arms are compared with the baseline
(default matched_kd, the plain-KD student with CRR's exposure: `distill cda=repeat`) on the same
pair resamples. Intervals: hierarchical percentile bootstrap, seeds with replacement then pair groups
(source utterances) with replacement.

    .venv/bin/python benchmarks/fairness_pairs.py \\
        --arm teacher=runs/small/teacher-ft \\
        --arm matched_kd=runs/small/student-kd-ft,runs/s1/student-kd-ft-s1,runs/s2/student-kd-ft-s2 \\
        --arm crr=runs/small/student-ft,runs/s1/student-ft-s1,runs/s2/student-ft-s2 \\
        --locales en-US de-DE fr-FR es-ES --out benchmarks/results/fairness_pairs_small.json

Prints the table, writes JSON (default benchmarks/results/fairness_pairs.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=DIR[,DIR...]",
                        help="an arm and its models, one per training seed (repeat the flag per arm)")
    parser.add_argument("--locales", nargs="+", default=["en-US", "de-DE", "fr-FR", "es-ES"],
                        help="MASSIVE locales (templates exist for en-US de-DE fr-FR es-ES; names also it/pt/nl)")
    parser.add_argument("--sets", nargs="+", choices=["independent", "sigma"], default=["independent", "sigma"])
    parser.add_argument("--split", choices=["dev", "test"], default="test",
                        help="MASSIVE split of the name and sigma pairs (choices are made on dev; default test)")
    parser.add_argument("--data", default="@data/massive/data", help="MASSIVE source")
    parser.add_argument("--max-examples", type=int, default=0,
                        help="a seeded sample of N ids of the split for the name and sigma pairs (default 0: all)")
    parser.add_argument("--baseline", default="matched_kd", help="the arm the others are compared with")
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=RESULTS / "fairness_pairs.json", help="JSON output")
    args = parser.parse_args(argv)

    from core.config import ConfigError
    from core.fsutil import atomic_write_json
    from evaluation.fairness import parse_seed_models
    from evaluation.fairness_pairs import evaluate_pairs, pairs_markdown
    from evaluation.massive import load_split

    try:
        arms = parse_seed_models(args.arm)
    except ConfigError as err:
        print(f"fairness_pairs.py: {err}", file=sys.stderr)
        return 2
    baseline = args.baseline if args.baseline in arms else None
    massive, per_locale = load_split(args.data, args.locales, args.split, args.max_examples or None)
    result = evaluate_pairs(arms, per_locale, sets=args.sets, massive=massive, batch_size=args.batch_size,
                            device=args.device, baseline=baseline, samples=args.samples, seed=args.seed,
                            confidence=args.confidence)
    result.update({"locales": args.locales, "split": args.split, "bootstrap_samples": args.samples,
                   "confidence": args.confidence,
                   "interval": "hierarchical percentile bootstrap: seeds with replacement, then pair groups "
                               "(source utterances) with replacement; one group resample for every model"})
    print(f"MASSIVE {args.split}, {', '.join(args.locales)}; baseline {baseline or '-'}")
    for name, entry in result["sets"].items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(entry["counts"].items()))
        print(f"{name}: {entry['num_pairs']} pairs in {entry['num_groups']} groups ({counts})")
    print(pairs_markdown(result, args.confidence))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
