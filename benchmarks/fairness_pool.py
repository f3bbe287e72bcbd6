"""Counterfactual flip rates pooled over several `polyteacher evaluate fairness` results of the same
models (e.g. the test and the dev split), each model paired against a baseline model.

One fairness run scores every test utterance with gendered words in its lexicon locales; on `small`
that is 736 utterances and 9-18 flips per student, so the CRR / plain-KD ratio moves by more than
its 0.5 line between runs. The dev split holds more such utterances that no model was selected on;
pooling the two (each locale x split a stratum of the same paired bootstrap,
`evaluation.fairness.compare_consistency`) narrows the intervals.

    polyteacher evaluate fairness --models teacher=R/teacher-ft student_kd=R/student-kd-ft \\
        student_crr=R/student-ft --locales en-US de-DE fr-FR es-ES --split dev --metrics consistency \\
        --out R/eval/fairness-dev
    .venv/bin/python -m benchmarks.fairness_pool R/eval/fairness/fairness.json R/eval/fairness-dev/fairness.json

Prints a table, writes benchmarks/results/fairness_pool.json (or --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)

METRICS = {"intent_flip_rate": "intent flips", "em_flip_rate": "whole-parse flips", "em_original": "EM on originals"}


def strata(result: dict, model: str, path: Path) -> dict[str, dict]:
    """The per-locale consistency records of `model` in one fairness result, keyed locale/split."""
    if model not in result.get("models", {}):
        raise SystemExit(f"{path}: no model {model!r} (models: {', '.join(result.get('models', {}))})")
    consistency = result["models"][model].get("consistency") or {}
    return {f"{locale}/{result['split']}": value for locale, value in consistency.items()
            if locale != "overall" and isinstance(value, dict) and "records" in value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="fairness.json files of the same models")
    parser.add_argument("--baseline", default="student_kd", help="the model the others are paired against")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--out", type=Path, default=RESULTS / "fairness_pool.json", help="JSON output")
    args = parser.parse_args()

    from tabulate import tabulate

    from evaluation.fairness import compare_consistency

    results = [(path, json.loads(path.read_text())) for path in args.results]
    splits = [r["split"] for _, r in results]
    if len(set(splits)) != len(splits):
        raise SystemExit(f"each result must be another split (got {', '.join(splits)}): one utterance counted twice")
    models = [m for m in results[0][1]["models"] if m != args.baseline]
    baseline = {k: v for path, r in results for k, v in strata(r, args.baseline, path).items()}
    rows, out = [], {"results": [str(p) for p in args.results], "baseline": args.baseline, "models": {}}
    for model in models:
        pooled = {k: v for path, r in results for k, v in strata(r, model, path).items()}
        overall = compare_consistency(baseline, pooled, samples=args.samples)["overall"]
        out["models"][model] = overall
        for key, label in METRICS.items():
            v = overall[key]
            ratio = f"{v['ratio']:.2f} [{v['ratio_ci'][0]:.2f}, {v['ratio_ci'][1]:.2f}]" if v.get("ratio_ci") else "-"
            rows.append([model, label, overall["num_examples"], f"{100 * v['a']:.1f}", f"{100 * v['b']:.1f}", ratio,
                         f"{100 * v['diff']:+.1f} [{100 * v['diff_ci'][0]:+.1f}, {100 * v['diff_ci'][1]:+.1f}]"])
    print(f"pooled over {', '.join(splits)}; paired against {args.baseline}, 95% bootstrap over utterances")
    print(tabulate(rows, headers=["model", "measure", "n", f"{args.baseline} %", "model %", "ratio [CI]", "diff pp [CI]"],
                   tablefmt="github"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
