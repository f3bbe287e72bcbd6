"""What the counterfactual flips are: every fairness utterance (MASSIVE utterances sigma changes) scored
by each model on the original and on the swapped words, the whole-parse flips sorted by where they
happen, and (with --show) the flips themselves.

Kinds of a flip (original parse exactly right, swapped parse not):
- intent: the swapped utterance gets another intent;
- slot at a swapped word: a slot label differs at a word sigma changed;
- slot elsewhere: a slot label differs only at words sigma left alone (boundaries, other slots).
`unflips` counts the other direction (original wrong, swap right): flips that come from instability,
not from the gender of a word, occur about as often both ways.

    .venv/bin/python -m benchmarks.fairness_flips --models kd=R/student-kd-ft crr=R/student-ft \\
        --split dev [--locales en-US de-DE fr-FR es-ES] [--show crr]

Prints a table, writes benchmarks/results/fairness_flips.json (or --out).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from benchmarks.common import RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)


def flip_kind(words_changed: set[int], predicted: list[str], gold: list[str], intent_ok: bool) -> str:
    """The kind of one whole-parse flip (module doc)."""
    if not intent_ok:
        return "intent"
    differ = {i for i, (p, g) in enumerate(zip(predicted, gold)) if p != g}
    return "slot at a swapped word" if differ & words_changed else "slot elsewhere"


def score(model_dir: Path, per_locale: dict, massive) -> list[dict]:
    """One row per fairness utterance: the swapped words, their gold and predicted parse, and the
    outcomes of `evaluation.fairness.consistency_records` (exact match on the original and the swap)."""
    from evaluation.fairness import Utterance, consistency_records, counterfactual_set
    from evaluation.massive import load_predictor, predict_all
    from massive.scoring import align_labels

    predictor = load_predictor(model_dir, device="cpu", slot_labels=massive.slot_types, intents=massive.intents)
    rows = []
    for locale, examples in per_locale.items():
        chosen = counterfactual_set(examples, locale)
        golds, cfs = [ex for ex, _ in chosen], [cf for _, cf in chosen]
        original = predict_all(predictor, [Utterance(list(ex.words)) for ex in golds], 32, f"{locale} original")
        swapped = predict_all(predictor, [Utterance(cf.words) for cf in cfs], 32, f"{locale} swapped")
        records = consistency_records(golds, original, swapped, cfs)
        for n, (gold, cf, p_swap) in enumerate(zip(golds, cfs, swapped)):
            slots_swap = align_labels(p_swap.slots, len(cf.slots))
            row = {"locale": locale, "id": str(gold.id), "intent": gold.intent, "swapped": cf.words,
                   "gold": list(cf.slots), "predicted_intent": p_swap.intent, "predicted": slots_swap,
                   "em_original": bool(records["em_original"][n]), "em_swapped": bool(records["em_swapped"][n])}
            if records["em_flip"][n]:
                changed = {i for i, src in enumerate(cf.sources) if [gold.words[j] for j in src] != [cf.words[i]]}
                row["kind"] = flip_kind(changed, slots_swap, list(cf.slots), p_swap.intent == gold.intent)
            rows.append(row)
    return rows


def parse(words: list[str], slots: list[str]) -> str:
    return " ".join(w if s == "Other" else f"{w}/{s}" for w, s in zip(words, slots))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, help="NAME=DIR pairs (seq2seq, ONNX or NLU model directories)")
    ap.add_argument("--locales", nargs="+", default=["en-US", "de-DE", "fr-FR", "es-ES"])
    ap.add_argument("--split", default="dev", choices=("train", "dev", "test"))
    ap.add_argument("--data", default="@data/massive/data", help="MASSIVE source (default @data/massive/data)")
    ap.add_argument("--show", nargs="*", default=[], help="models whose flips are printed one by one")
    ap.add_argument("--out", type=Path, default=RESULTS / "fairness_flips.json")
    args = ap.parse_args()
    from tabulate import tabulate

    from evaluation.massive import load_split

    models = dict(m.split("=", 1) for m in args.models)
    massive, per_locale = load_split(args.data, args.locales, args.split, None)
    table, result = [], {}
    for name, model_dir in models.items():
        rows = score(Path(model_dir), per_locale, massive)
        flips = [r for r in rows if "kind" in r]
        correct = sum(r["em_original"] for r in rows)
        kinds = collections.Counter(r["kind"] for r in flips)
        unflips = sum(not r["em_original"] and r["em_swapped"] for r in rows)
        table.append([name, len(rows), correct, len(flips), f"{100 * len(flips) / max(correct, 1):.1f}", unflips,
                      kinds["intent"], kinds["slot at a swapped word"], kinds["slot elsewhere"]])
        result[name] = {"dir": model_dir, "utterances": len(rows), "correct_originals": correct, "flips": len(flips),
                        "unflips": unflips, "kinds": dict(kinds), "rows": rows}
        if name in args.show:
            for r in flips:
                intent = f" -> {r['predicted_intent']}" if r["kind"] == "intent" else ""
                print(f"{name} {r['locale']} {r['id']} {r['intent']}{intent} ({r['kind']})\n"
                      f"   gold:      {parse(r['swapped'], r['gold'])}\n"
                      f"   predicted: {parse(r['swapped'], r['predicted'])}")
    print(tabulate(table, headers=["model", "utterances", "correct originals", "flips", "flip %", "unflips",
                                   "intent", "slot at a swapped word", "slot elsewhere"], tablefmt="github"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"split": args.split, "locales": args.locales, "models": result}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
