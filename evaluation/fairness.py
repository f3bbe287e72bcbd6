"""Fairness: counterfactual consistency on MASSIVE, the fairness report and the command.

Counterfactual consistency (any MASSIVE predictor: seq2seq, encoder NLU, ONNX). Over ALL the test
utterances of a locale with a lexicon that contain gendered words (sigma changes them; words are
swapped one for one and determiners follow the swapped noun, a contraction split or merged where
agreement needs it, "al tío" -> "a la tía"; the gold per-word slot labels follow the words,
`Counterfactual`; `--max-examples` draws a seeded sample instead, never the first N):

- `intent_flip_rate`: among the utterances whose ORIGINAL intent is predicted correctly, how often the
  swapped utterance's predicted intent differs. `em_flip_rate`: among the exact matches (intent and
  every slot label right), how often the swapped utterance is no longer an exact match. A model that
  predicts one constant has nothing correct to flip on many utterances: read the rates next to
  `intent_acc_original` / `intent_acc_swapped` and `em_original` / `em_swapped`;
- `intent_change_rate` / `slot_change_rate`: how often the prediction changes at all;
- `num_conflicts`: swapped utterances that sigma left with an agreement conflict
  (`data_prep.counterfactual`, rule 5);
- intervals: percentile bootstrap over the utterances (`evaluation.massive.bootstrap_weights`), per
  locale and pooled; rates among correct originals are ratios of resampled sums. Models scored on the
  same utterances are compared paired (the same resamples for both): flip-rate ratio and difference
  and accuracy differences against a baseline model (`--baseline`, default student_kd).

Generation disparity and gender polarity (seq2seq models): `evaluation/disparity.py`.

Gender pairs (`--metrics pairs`, evaluation/fairness_pairs.py, docs/fairness.md): over ALL pairs of
a set (hand-written templates and first-name pairs that sigma did not write; or sigma's pairs), the
share whose parse differs between the female and the male member, both directions, and the signed
female - male accuracy gap, each model given as the models of several training seeds
(`NAME=DIR1,DIR2,DIR3`), pooled with a hierarchical bootstrap over seeds and pairs.

`polyteacher evaluate fairness --models teacher=DIR student_kd=DIR student_crr=DIR --out DIR` writes
fairness.json and fairness.md (one table per locale).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.tables import markdown_table
from evaluation.disparity import (
    _ci,
    _paired,
    _value,
    compare_disparity,
    gender_polarity,
    generation_disparity,
)


@dataclasses.dataclass(frozen=True)
class Utterance:
    """What predict_all needs: the words."""

    words: list[str]


# ----------------------------------------------------------------------------- consistency


@dataclasses.dataclass(frozen=True)
class Counterfactual:
    """sigma of one utterance (`data_prep.counterfactual.swap_utterance`): its gold for the swapped words."""

    words: list[str]
    slots: list[str]
    """The gold slot labels carried to the swapped words."""
    sources: tuple[tuple[int, ...], ...]
    """Per swapped word, the original words it comes from (one for one except around contractions)."""
    conflicts: int
    """Agreement conflicts sigma left (rule 5)."""


def counterfactual_set(examples: Sequence[Any], locale: str) -> list[tuple[Any, Counterfactual]]:
    """(example, its counterfactual) for the examples whose words sigma changes."""
    from data_prep.counterfactual import lexicon_language, swap_utterance

    lang = lexicon_language(locale)
    if lang is None:
        return []
    out = []
    for ex in examples:
        words, slots, result = swap_utterance(ex.words, ex.slots, lang)
        if words != list(ex.words):
            out.append((ex, Counterfactual(words, slots, result.sources, result.conflicts)))
    return out


# Per-utterance 0/1 columns of `consistency_records`.
RECORD_COLUMNS = ("intent_ok_original", "intent_ok_swapped", "em_original", "em_swapped", "intent_changed",
                  "slots_changed", "intent_flip", "em_flip")
# metric -> (numerator column, denominator column or None = the number of utterances)
CONSISTENCY_METRICS = {
    "intent_flip_rate": ("intent_flip", "intent_ok_original"),
    "em_flip_rate": ("em_flip", "em_original"),
    "intent_acc_original": ("intent_ok_original", None),
    "intent_acc_swapped": ("intent_ok_swapped", None),
    "em_original": ("em_original", None),
    "em_swapped": ("em_swapped", None),
    "intent_change_rate": ("intent_changed", None),
    "slot_change_rate": ("slots_changed", None),
}


def consistency_records(golds: Sequence[Any], original: Sequence[Any], swapped: Sequence[Any],
                        counterfactuals: Sequence[Counterfactual] | None = None) -> dict[str, list[int]]:
    """Per-utterance 0/1 outcomes (RECORD_COLUMNS) from gold examples (.intent, .slots) and the
    predictions on the original and the swapped words. The swapped words are scored against their
    `counterfactuals`' gold slots (the same labels word for word; a split contraction gives both
    words its label) and compared with the original predictions carried to them; without
    counterfactuals the gold and the word count are the same for both."""
    from data_prep.counterfactual import carry_labels
    from massive.scoring import align_labels

    out: dict[str, list[int]] = {c: [] for c in RECORD_COLUMNS}
    for n, (gold, p_orig, p_swap) in enumerate(zip(golds, original, swapped)):
        k = len(gold.slots)
        cf = counterfactuals[n] if counterfactuals is not None else None
        gold_swap = list(cf.slots) if cf is not None else list(gold.slots)
        slots_orig, slots_swap = align_labels(p_orig.slots, k), align_labels(p_swap.slots, len(gold_swap))
        ok_orig, ok_swap = p_orig.intent == gold.intent, p_swap.intent == gold.intent
        em_orig = ok_orig and slots_orig == list(gold.slots)
        em_swap = ok_swap and slots_swap == gold_swap
        if cf is not None:
            slots_orig = carry_labels(slots_orig, cf.sources)
        values = (ok_orig, ok_swap, em_orig, em_swap, p_orig.intent != p_swap.intent, slots_orig != slots_swap,
                  ok_orig and p_swap.intent != p_orig.intent, em_orig and not em_swap)
        for c, v in zip(RECORD_COLUMNS, values):
            out[c].append(int(v))
    return out


def _rates(columns: Any, metric: str) -> Any:
    """A metric from summed columns [..., len(RECORD_COLUMNS) + 1] (the last: utterances); NaN when the
    denominator is 0."""
    import numpy as np

    num, den = CONSISTENCY_METRICS[metric]
    top = columns[..., RECORD_COLUMNS.index(num)]
    bottom = columns[..., -1] if den is None else columns[..., RECORD_COLUMNS.index(den)]
    return np.divide(top, bottom, out=np.full(np.shape(top), np.nan), where=bottom > 0)


def _matrix(records: dict[str, list[int]]) -> Any:
    import numpy as np

    n = len(records[RECORD_COLUMNS[0]])
    return np.column_stack([np.asarray(records[c], dtype=np.float64) for c in RECORD_COLUMNS] + [np.ones(n)])






def consistency_scores(golds: Sequence[Any], original: Sequence[Any], swapped: Sequence[Any],
                       counterfactuals: Sequence[Counterfactual] | None = None, *,
                       weights: Any = None, confidence: float = 0.95) -> dict[str, Any]:
    """Flip rates among correct originals, accuracies on original and swapped utterances, change rates
    and the gaps (original - swapped); with bootstrap `weights` ([samples, n] resample counts), a
    `<metric>_ci` interval for each."""

    if not golds:
        return {"num_examples": 0}
    return scores_from_records(consistency_records(golds, original, swapped, counterfactuals), weights=weights,
                               confidence=confidence)


def scores_from_records(records: dict[str, list[int]], *, weights: Any = None,
                        confidence: float = 0.95) -> dict[str, Any]:
    """`consistency_scores` from the per-utterance outcomes of `consistency_records`."""
    matrix = _matrix(records)
    n = matrix.shape[0]
    totals = matrix.sum(axis=0)
    out: dict[str, Any] = {"num_examples": n, "num_intent_correct": int(totals[0]), "num_em_correct": int(totals[2])}
    resampled = None if weights is None else weights @ matrix
    for metric in CONSISTENCY_METRICS:
        out[metric] = _value(_rates(totals, metric))
        if resampled is not None:
            out[f"{metric}_ci"] = _ci(_rates(resampled, metric), confidence)
    out["intent_acc_gap"] = out["intent_acc_original"] - out["intent_acc_swapped"]
    out["em_gap"] = out["em_original"] - out["em_swapped"]
    if resampled is not None:
        for gap, (a, b) in (("intent_acc_gap", ("intent_acc_original", "intent_acc_swapped")),
                            ("em_gap", ("em_original", "em_swapped"))):
            out[f"{gap}_ci"] = _ci(_rates(resampled, a) - _rates(resampled, b), confidence)
    return out


def counterfactual_consistency(predictor: Any, per_locale: dict[str, Sequence[Any]], batch_size: int,
                               max_examples: int | None = None, seed: int = 0, samples: int = 1000,
                               confidence: float = 0.95) -> dict[str, Any]:
    """{locale: scores} for locales with a lexicon, plus "overall" (pooled over locales); each with
    bootstrap intervals (`samples` resamples, seeded) and the per-utterance `records` (for paired
    comparisons, `compare_consistency`).

    All utterances with gendered words by default; with `max_examples`, each locale scores a seeded
    random sample of them (never the first N in file order). The sample is drawn per locale: which
    utterances hold gendered words differs from one language to another.
    """
    from evaluation.massive import predict_all
    from massive.scoring import bootstrap_weights, sample_shared_ids

    out: dict[str, Any] = {}
    pooled: dict[str, list[int]] = {}  # the per-utterance records of every locale, for "overall"
    for locale, examples in per_locale.items():
        chosen = counterfactual_set(examples, locale)
        if max_examples and chosen:
            ids = set(sample_shared_ids({locale: [ex for ex, _ in chosen]}, max_examples, seed))
            chosen = [c for c in chosen if str(c[0].id) in ids]
        if not chosen:
            continue
        golds = [ex for ex, _ in chosen]
        counterfactuals = [cf for _, cf in chosen]
        original = predict_all(predictor, [Utterance(list(ex.words)) for ex in golds], batch_size, f"{locale} original")
        swapped = predict_all(predictor, [Utterance(cf.words) for cf in counterfactuals], batch_size, f"{locale} swapped")
        weights = bootstrap_weights(len(golds), samples, seed) if samples else None
        records = consistency_records(golds, original, swapped, counterfactuals)
        out[locale] = scores_from_records(records, weights=weights, confidence=confidence)
        out[locale]["num_conflicts"] = sum(bool(cf.conflicts) for cf in counterfactuals)
        out[locale]["records"] = {"id": [str(getattr(ex, "id", i)) for i, ex in enumerate(golds)], **records}
        for column, values in records.items():
            pooled.setdefault(column, []).extend(values)
    num_pooled = len(pooled.get(RECORD_COLUMNS[0], []))
    weights = bootstrap_weights(num_pooled, samples, seed) if samples and num_pooled else None
    out["overall"] = (scores_from_records(pooled, weights=weights, confidence=confidence) if num_pooled
                      else {"num_examples": 0})
    out["overall"]["num_conflicts"] = sum(out[loc]["num_conflicts"] for loc in out if loc != "overall")
    return out


COMPARED = ("intent_flip_rate", "em_flip_rate", "intent_acc_original", "em_original", "em_swapped")


def compare_consistency(a: dict[str, Any], b: dict[str, Any], *, samples: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> dict[str, Any]:
    """B against A on the same utterances (two `counterfactual_consistency` results): per locale and
    pooled, for each of COMPARED, {"a", "b", "diff" (B - A), "diff_ci", "ratio" (B / A), "ratio_ci"}
    from the same resamples for both models."""
    import numpy as np

    from massive.scoring import bootstrap_weights

    out: dict[str, Any] = {}
    locales = [loc for loc in a if loc != "overall" and loc in b and "records" in a[loc] and "records" in b[loc]]
    mats: dict[str, list[Any]] = {"a": [], "b": []}
    for loc in locales + ["overall"]:
        if loc == "overall":
            if not mats["a"]:
                break
            ma, mb = np.concatenate(mats["a"]), np.concatenate(mats["b"])
        else:
            ra, rb = a[loc]["records"], b[loc]["records"]
            if ra["id"] != rb["id"]:
                raise ValueError(f"{loc}: the two models were scored on different utterances")
            ma, mb = _matrix(ra), _matrix(rb)
            mats["a"].append(ma)
            mats["b"].append(mb)
        weights = bootstrap_weights(ma.shape[0], samples, seed)
        ta, tb, wa, wb = ma.sum(0), mb.sum(0), weights @ ma, weights @ mb
        entry: dict[str, Any] = {"num_examples": int(ma.shape[0])}
        for metric in COMPARED:
            pa, pb = _rates(ta, metric), _rates(tb, metric)
            ba, bb = _rates(wa, metric), _rates(wb, metric)
            entry[metric] = _paired(pa, pb, ba, bb, confidence)
        out[loc] = entry
    return out




# ----------------------------------------------------------------------------- models and report


def scores_text(model_dir: Path) -> bool:
    """A model that scores and generates free text (a PyTorch text-to-text model; not an ONNX
    export, not an encoder NLU model): what the disparity metrics read."""
    from student import kind_of

    return kind_of(model_dir).scores_text


def evaluate_fairness(models: dict[str, Path], locales: Sequence[str], out_dir: Path, *, data: str,
                      split: str = "test", max_examples: int | None = None, seed: int = 0, batch_size: int = 32,
                      device: str = "auto", metrics: Sequence[str] = ("consistency", "disparity"),
                      clm_prompt: bool = True, name: str = "fairness", samples: int = 1000,
                      confidence: float = 0.95, baseline: str | None = None, load: Any = None,
                      seeds: dict[str, list[Path]] | None = None,
                      pair_sets: Sequence[str] = ("independent", "sigma")) -> dict[str, Any]:
    """The metrics for every model and the paired comparisons against `baseline` (default student_kd
    when present); writes NAME.json and NAME.md into out_dir (atomically). `load`: how big models are
    placed (`student.load_text_to_text`). Metric "pairs" (`evaluation.fairness_pairs`) scores
    every model of `seeds` ({name: its seeds' directories}; default: `models`, one seed each) on
    `pair_sets` and pools the seeds of each name."""
    from core.fsutil import atomic_write_json, atomic_write_text
    from data_prep.counterfactual import lexicon_language
    from evaluation.massive import load_predictor, load_split
    from student import load_text_to_text

    started = time.perf_counter()
    with_lexicon = [loc for loc in locales if lexicon_language(loc)]
    skipped = [loc for loc in locales if not lexicon_language(loc)]
    languages = list(dict.fromkeys(lexicon_language(loc) for loc in with_lexicon))
    if baseline is not None and baseline not in models:
        raise ValueError(f"--baseline {baseline!r} is not one of the models: {', '.join(models)}")
    baseline = baseline or ("student_kd" if "student_kd" in models else None)
    massive, per_locale = (None, {})
    if "consistency" in metrics and with_lexicon:
        massive, per_locale = load_split(data, with_lexicon, split, None)
    result: dict[str, Any] = {"locales": with_lexicon, "locales_without_lexicon": skipped, "split": split,
                              "max_examples": max_examples, "seed": seed, "bootstrap_samples": samples,
                              "confidence": confidence, "baseline": baseline, "models": {}, "comparisons": {}}
    for model_name, model_dir in models.items():
        entry: dict[str, Any] = {"dir": str(model_dir)}
        if "consistency" in metrics and per_locale:
            predictor = load_predictor(model_dir, device=device, slot_labels=massive.slot_types,
                                       intents=massive.intents, load=load)
            entry["consistency"] = counterfactual_consistency(predictor, per_locale, batch_size, max_examples, seed,
                                                              samples, confidence)
            del predictor
        if "disparity" in metrics and scores_text(model_dir):
            model, tokenizer = load_text_to_text(model_dir, device, load=load)
            entry["disparity"] = generation_disparity(model, tokenizer, languages, batch_size=64,
                                                      clm_prompt=clm_prompt)
            entry["polarity"] = gender_polarity(model, tokenizer, languages, batch_size=64, clm_prompt=clm_prompt)
            del model
        result["models"][model_name] = entry
    if baseline and samples:
        base = result["models"][baseline].get("consistency")
        for model_name, entry in result["models"].items():
            if model_name != baseline and base and entry.get("consistency"):
                result["comparisons"][model_name] = compare_consistency(
                    base, entry["consistency"], samples=samples, seed=seed, confidence=confidence)
            for key in ("disparity", "polarity"):
                reference = result["models"][baseline].get(key)
                if model_name != baseline and reference and entry.get(key):
                    result.setdefault(f"{key}_comparisons", {})[model_name] = compare_disparity(
                        reference, entry[key], samples=samples, seed=seed, confidence=confidence)
    if "pairs" in metrics:
        from evaluation.fairness_pairs import evaluate_pairs

        arms = seeds or {name: [d] for name, d in models.items()}
        pair_data, pair_locales = load_split(data, list(locales), split, max_examples, seed)
        result["pairs"] = evaluate_pairs(arms, pair_locales, sets=pair_sets, massive=pair_data, batch_size=batch_size,
                                         device=device, baseline=baseline if baseline in arms else None,
                                         samples=samples, seed=seed, confidence=confidence, load=load)
    result["seconds"] = time.perf_counter() - started
    result["markdown"] = fairness_markdown(result)
    if result.get("pairs"):
        from evaluation.fairness_pairs import pairs_markdown

        result["markdown"] = (result["markdown"] + "\n\n" + pairs_markdown(result["pairs"], confidence)).strip()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{name}.json", result)
    atomic_write_text(out_dir / f"{name}.md", result["markdown"] + "\n")
    return result


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct_ci(entry: dict[str, Any], key: str) -> str:
    value, ci = entry.get(key), entry.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(value)


def _with_ci(entry: dict[str, Any], key: str, fmt: Any) -> str:
    """entry[key] and its interval entry[key_ci], each written by fmt."""
    value, ci = entry.get(key), entry.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(value)


def _pp(x: float) -> str:
    return f"{100.0 * x:+.1f}"


def _ratio(x: float) -> str:
    return f"{x:.2f}"


# Generation measures of seq2seq models: result key -> (table title, what a row's number is).
GENERATION_MEASURES = {
    "disparity": ("Generation disparity (occupations: neutral ones, gendered ones as the log-sum of both forms)", "gap"),
    "polarity": ("Gender polarity (pronouns after neutral-occupation prompts: log P(male) - log P(female))", "polarity"),
}


def fairness_markdown(result: dict[str, Any]) -> str:
    """One table per locale (and pooled): every model's flip rates among correct originals with their
    intervals next to its accuracies on the original and swapped utterances; then the paired
    comparisons with the baseline, and generation disparity per language."""
    lines: list[str] = []
    conf = f"{result.get('confidence', 0.95):.0%}"
    locales = [*result["locales"], "overall"]
    header = ["model", "n", f"intent flip % among correct [{conf} CI]", f"EM flip % among correct [{conf} CI]",
              "intent acc orig / swapped %", "EM orig / swapped %", "intent changed %", "slots changed %",
              "agreement conflicts"]
    for loc in locales:
        rows = []
        for model_name, entry in result["models"].items():
            c = entry.get("consistency", {}).get(loc)
            if not c or not c.get("num_examples"):
                continue
            rows.append([model_name, str(c["num_examples"]), _pct_ci(c, "intent_flip_rate"), _pct_ci(c, "em_flip_rate"),
                         f"{_pct(c.get('intent_acc_original'))} / {_pct(c.get('intent_acc_swapped'))}",
                         f"{_pct(c.get('em_original'))} / {_pct(c.get('em_swapped'))}",
                         _pct(c.get("intent_change_rate")), _pct(c.get("slot_change_rate")),
                         str(c.get("num_conflicts", "-"))])
        if rows:
            title = "all locales pooled" if loc == "overall" else loc
            lines += [f"### Counterfactual consistency: {title}", "", markdown_table(header, rows)]
    if result.get("comparisons"):
        base = result.get("baseline")
        paired_rows = []
        for model_name, comp in result["comparisons"].items():
            for loc, e in comp.items():
                flip, em, acc = e["intent_flip_rate"], e["em_original"], e["intent_acc_original"]
                paired_rows.append([model_name, loc, _with_ci(flip, "ratio", _ratio), _with_ci(flip, "diff", _pp),
                                    _with_ci(em, "diff", _pp), _with_ci(acc, "diff", _pp)])
        lines += [f"### Paired against {base} (same utterances, same resamples)", "",
                  markdown_table(["model", "locale", "intent flip ratio [CI]", "intent flip diff pp [CI]",
                                  "EM orig diff pp [CI]", "intent acc orig diff pp [CI]"], paired_rows)]
    generation = {key: [(m, e[key]) for m, e in result["models"].items() if e.get(key)] for key in GENERATION_MEASURES}
    for key, (title, unit) in GENERATION_MEASURES.items():
        measured = generation[key]
        if not measured:
            continue
        langs = [k for k in measured[0][1] if k != "overall"] + ["overall"]
        rows = [[model_name, lang, _num(d[lang]["mean_abs_gap"]), _num(d[lang]["mean_signed_gap"]),
                 _num(d[lang].get("entropy")), _num(d[lang].get("normalised_gap"))]
                for lang in langs for model_name, d in measured if lang in d]
        lines += [f"### {title}", "",
                  markdown_table(["model", "language", f"mean abs {unit} (nats)", f"signed {unit}", "entropy (nats)",
                                  f"{unit} / entropy"], rows)]
        if result.get(f"{key}_comparisons"):
            paired_rows = []
            for model_name, comp in result[f"{key}_comparisons"].items():
                for lang, e in comp.items():
                    gap, norm = e["mean_abs_gap"], e["normalised_gap"]
                    paired_rows.append([model_name, lang, str(e["num_pairs"]), _with_ci(gap, "diff", "{:+.3f}".format),
                                        _with_ci(norm, "ratio", _ratio), _with_ci(norm, "diff", "{:+.3f}".format)])
            lines += [f"### {title.split(' (')[0]} paired against {result.get('baseline')} (same pairs, same resamples)",
                      "", markdown_table(["model", "language", "pairs", f"abs {unit} diff (nats) [CI]",
                                          f"{unit} / entropy ratio [CI]", f"{unit} / entropy diff [CI]"], paired_rows)]
    disparity = generation["disparity"] or generation["polarity"]
    if disparity:
        lines.append("Models: " + "; ".join(f"{m} = {Path(result['models'][m]['dir']).name}" for m, _ in disparity)
                     + ".\n")
    if any(e.get("consistency") for e in result["models"].values()):
        split = result.get("split", "test")
        scope = "a seeded sample" if result.get("max_examples") else "all"
        lines.append(f"Counterfactual consistency on {scope} MASSIVE {split} utterances with gendered words "
                     f"({', '.join(result['locales']) or 'none'}); flips among the utterances whose original "
                     "prediction is correct; intervals: percentile bootstrap over utterances.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    from evaluation.cli import add_load_arguments

    p = sub.add_parser(
        "fairness",
        help="counterfactual consistency on MASSIVE and generation disparity, several models side by side",
        description="For each model: among the MASSIVE utterances with gendered words that it gets right, how "
        "often the prediction flips when the gendered words are swapped, next to its accuracy on originals and "
        "swapped utterances, with paired bootstrap intervals; and the entropy-normalised gap in log-probability "
        "of occupations after male vs female prompts (seq2seq models). Writes NAME.json and NAME.md.",
    )
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR[,DIR...]",
                   help="models to compare, e.g. teacher=DIR student_kd=DIR student_crr=DIR; with --metrics pairs "
                   "only, NAME=DIR1,DIR2,DIR3 gives the models of several training seeds, pooled")
    p.add_argument("--locales", nargs="+", default=None,
                   help="MASSIVE locales (those without a lexicon are skipped); default: fairness.locales")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default=None, help="preset name (launch/presets) or YAML path; its evaluate section is used")
    p.add_argument("--data", default=None, help="MASSIVE source (default: fairness.data)")
    p.add_argument("--split", choices=["train", "dev", "test"], default=None, help="partition (default: fairness.split)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="at most N utterances with gendered words per locale, a seeded sample (0: all; default "
                   "fairness.max_examples); --metrics pairs: a seeded sample of N ids of the split for the name and sigma pairs")
    p.add_argument("--seed", type=int, default=None, help="seed of the sample of utterances (default: fairness.seed)")
    p.add_argument("--batch-size", type=int, default=None, help="utterances per predictor call (default: fairness.batch_size)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="torch device (default: device)")
    add_load_arguments(p)
    p.add_argument("--metrics", nargs="+", choices=["consistency", "disparity", "pairs"],
                   default=["consistency", "disparity"],
                   help="which measurements (default consistency and disparity); pairs: change rate and signed "
                   "female - male accuracy gap over gender pairs (evaluation/fairness_pairs.py), pooled over seeds")
    p.add_argument("--pair-sets", nargs="+", choices=["independent", "sigma"], default=["independent", "sigma"],
                   help="--metrics pairs: independent = hand-written templates and first-name pairs (no sigma); "
                   "sigma = the utterances sigma swaps (default both)")
    p.add_argument("--no-clm-prompt", action="store_true",
                   help="score continuations without the [CLM] prefix (models not pretrained with it)")
    p.add_argument("--name", default="fairness", help="base name of the output files")
    p.add_argument("--bootstrap-samples", type=int, default=None,
                   help="bootstrap resamples (default: bootstrap_samples; 0 = none)")
    p.add_argument("--confidence", type=float, default=None, help="interval confidence (default: confidence)")
    p.add_argument("--baseline", default=None,
                   help="model the others are compared with, paired (default student_kd when given)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted overrides of the evaluate section after the options, e.g. fairness.seed=1")
    p.set_defaults(func=run_fairness)


def parse_seed_models(items: Sequence[str]) -> dict[str, list[Path]]:
    """`--models NAME=DIR[,DIR...]` -> {name: [directories]} (several: the models of several seeds)."""
    from core.config import ConfigError
    from evaluation.cli import parse_models

    out: dict[str, list[Path]] = {}
    for item in items:
        name, sep, dirs = item.partition("=")
        if name in out:
            raise ConfigError(f"--models: name {name!r} given twice (list several seeds as {name}=DIR1,DIR2)")
        parts = [d for d in dirs.split(",") if d] if sep else []
        out[name] = [parse_models([f"{name}={d}"])[name] for d in parts] if parts else list(
            parse_models([item]).values())
    return out


def run_fairness(args: argparse.Namespace) -> int:
    import dataclasses

    from core.bigmodel import resolve_offload_folder
    from core.config import ConfigError, given_flags, load_config
    from evaluation.cli import check_name, load_flags
    from evaluation.config import EvalConfig

    # The evaluate section of --preset, then the overrides, then the flags given (core.config's rule).
    flags = {"fairness": given_flags(data=args.data, locales=args.locales, split=args.split,
                                     max_examples=args.max_examples, seed=args.seed, batch_size=args.batch_size),
             "load": given_flags(**load_flags(args)), **given_flags(device=args.device, confidence=args.confidence)}
    cfg = load_config(EvalConfig, section="evaluate", preset=args.preset, overrides=args.overrides, flags=flags)
    check_name(args.name)
    fair = cfg.fairness
    # 0 resamples (no intervals) is this command's own: the section's bootstrap_samples is >= 1.
    samples = cfg.bootstrap_samples if args.bootstrap_samples is None else args.bootstrap_samples
    load = dataclasses.replace(cfg.load, offload_folder=resolve_offload_folder(cfg.load.offload_folder, args.out))
    seeds = parse_seed_models(args.models)
    if any(len(dirs) > 1 for dirs in seeds.values()) and set(args.metrics) - {"pairs"}:
        raise ConfigError("--models: several directories for one name (training seeds) are pooled by --metrics pairs "
                          "only; give one directory per name for consistency and disparity")
    models = {name: dirs[0] for name, dirs in seeds.items()}
    result = evaluate_fairness(models, fair.locales, Path(args.out), data=fair.data, split=fair.split,
                               max_examples=fair.max_examples or None, seed=fair.seed, batch_size=fair.batch_size,
                               device=cfg.device, metrics=args.metrics, clm_prompt=not args.no_clm_prompt,
                               load=load, seeds=seeds, pair_sets=args.pair_sets,
                               samples=samples, confidence=cfg.confidence, baseline=args.baseline,
                               name=args.name)
    print(result["markdown"])
    print(f"wrote {Path(args.out) / (args.name + '.json')}")
    return 0
