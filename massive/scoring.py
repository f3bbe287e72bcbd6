"""MASSIVE scoring as the official scorer does it: per-utterance records, bootstrap intervals, paired
comparison, and the seeded sample of test ids shared by every locale.

Scoring (`score(golds, preds)`), equivalent to `eval_preds` of the official MASSIVE repository
(alexa/massive, src/massive/utils/training_utils.py):
- A prediction's slot labels are truncated to the gold number of words, or padded with `Other`
  (as the official eval does with `pad='Other'`); `parse_target` already does this for text output.
- Per-word labels become BIO tags: `Other` -> O; a run of the same label is one span (B- then I-);
  a different label starts a new span even when adjacent.
- intent accuracy; slot micro-F1 as seqeval's `f1_score` (default mode) over all utterances of a
  locale; exact match when the intent and every word's label agree.
- Every score is computed from per-utterance outcomes (`utterance_records`: intent right, exact match,
  and the utterance's correct / predicted / gold slot spans, found by seqeval's `get_entities`), so
  that a resample needs only sums: slot F1 = `micro_f1` of the summed span counts, bit-identical to
  seqeval's `f1_score` on the same utterances.
- The mean over locales is the unweighted mean (every locale counts the same, as in the MASSIVE paper).
- Which utterances: `load_split` scores a seeded random sample of test ids shared by every locale
  (`sample_shared_ids`; MASSIVE is parallel across locales: the same id is the same utterance
  translated), never the first N in file order, which would follow the files' ordering.
- Intervals: percentile bootstrap over ids. Each resample draws ids with replacement and uses the
  same drawn ids in every locale, because locales are translations of the same utterances and their
  errors are correlated: an interval for the mean that treated locales as independent would be too
  narrow. The mean over locales is recomputed on each resample.
- Two models scored on the same ids are compared paired (`paired_difference`, `evaluate compare`):
  the difference B - A with a bootstrap interval from the same resampled ids for both, and how often
  their predictions are identical (`identical_predictions`, from the predictions the records keep).

"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from massive.format import OTHER

# Outcome columns of utterance_records; an intent classifier has only the first two.
INTENT_FIELDS = ("id", "intent_ok")
RECORD_FIELDS = (*INTENT_FIELDS, "em", "slot_tp", "slot_pred", "slot_gold")
# The prediction itself, so that two results on the same ids can be checked for identical outputs
# (`identical_predictions`): the intent, and the slot labels as scored (aligned to the gold words)
# joined by spaces; one string per utterance keeps a full test partition's JSON small. An intent
# classifier has only the intent.
PREDICTION_FIELDS = ("pred_intent", "pred_slots")
# Each metric and the record columns it is computed from.
METRIC_FIELDS = {
    "em": ("em",),
    "intent_acc": ("intent_ok",),
    "slot_f1": ("slot_tp", "slot_pred", "slot_gold"),
    # Well-formedness of generated targets (`massive.format.GenerationCheck`); None for classifiers.
    "stop_rate": ("stopped",),
    "label_count_rate": ("label_count_ok",),
    "known_intent_rate": ("known_intent",),
}
GENERATION_FIELDS = ("stopped", "label_count_ok", "known_intent")
GENERATION_METRICS = tuple(m for m, cols in METRIC_FIELDS.items() if cols[0] in GENERATION_FIELDS)


def align_labels(pred_slots: Sequence[str], num_words: int, pad: str = OTHER) -> list[str]:
    """Truncate to `num_words` labels, or pad with `pad` (the official eval's handling)."""
    pred = list(pred_slots)[:num_words]
    return pred + [pad] * (num_words - len(pred))


def to_bio(labels: Sequence[str], outside: str = OTHER) -> list[str]:
    """Per-word labels -> BIO tags; a run of the same label is one span, `outside` -> O."""
    tags: list[str] = []
    previous = None
    for label in labels:
        if label == outside:
            tags.append("O")
        elif label == previous:
            tags.append("I-" + label)
        else:
            tags.append("B-" + label)
        previous = label
    return tags


def micro_f1(tp: Any, pred: Any, gold: Any) -> Any:
    """Micro F1 from span counts (numbers or numpy arrays), with seqeval's arithmetic so that the
    value is bit-identical to `seqeval.metrics.f1_score`: precision tp/pred and recall tp/gold are 0
    when undefined, and F1 = 2 P R / (P + R) with P + R = 0 giving 0."""
    import numpy as np

    tp, pred, gold = (np.asarray(x, dtype=np.float64) for x in (tp, pred, gold))
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred != 0)
    recall = np.divide(tp, gold, out=np.zeros_like(tp), where=gold != 0)
    denom = precision + recall
    denom = np.where(denom == 0, 1.0, denom)
    return 2.0 * precision * recall / denom


def utterance_records(golds: Sequence[Any], preds: Sequence[Any]) -> dict[str, dict[str, list]]:
    """Per-utterance outcomes and predictions grouped by gold `.locale`, as columns:
    {locale: {"id": [str], "intent_ok": [0|1], "em": [0|1], "slot_tp", "slot_pred", "slot_gold": [int],
    "pred_intent": [str], "pred_slots": [str (labels joined by spaces)]}}, plus "stopped",
    "label_count_ok", "known_intent" ([0|1]) when every prediction carries a `generation` check.

    golds: objects with .id, .locale, .intent, .slots (MassiveExample); preds: objects with .intent
    and .slots (NLUPrediction). Predictions without a `slots` attribute (an intent classifier) give
    only "id", "intent_ok" and "pred_intent". Slot counts are spans as seqeval finds them
    (`get_entities` over each utterance's BIO tags; a span is correct when its label, start and end
    all match), so their sums give seqeval's micro F1 (`micro_f1`).
    """
    from seqeval.metrics.sequence_labeling import get_entities

    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold examples but {len(preds)} predictions")
    if not golds:
        raise ValueError("cannot score an empty set of examples")
    with_slots = all(hasattr(pred, "slots") for pred in preds)
    fields = (*RECORD_FIELDS, *PREDICTION_FIELDS) if with_slots else (*INTENT_FIELDS, "pred_intent")
    generated = all(getattr(pred, "generation", None) is not None for pred in preds)
    if generated:
        fields = (*fields, *GENERATION_FIELDS)
    records: dict[str, dict[str, list]] = {}
    for gold, pred in zip(golds, preds):
        columns = records.setdefault(gold.locale, {name: [] for name in fields})
        intent_ok = pred.intent == gold.intent
        columns["id"].append(str(gold.id))
        columns["intent_ok"].append(int(intent_ok))
        columns["pred_intent"].append(str(pred.intent))
        if with_slots:
            pred_labels = align_labels(pred.slots, len(gold.slots))
            gold_spans = set(get_entities(to_bio(gold.slots)))
            pred_spans = set(get_entities(to_bio(pred_labels)))
            columns["em"].append(int(intent_ok and pred_labels == list(gold.slots)))
            columns["slot_tp"].append(len(gold_spans & pred_spans))
            columns["slot_pred"].append(len(pred_spans))
            columns["slot_gold"].append(len(gold_spans))
            columns["pred_slots"].append(" ".join(pred_labels))
        if generated:
            for name in GENERATION_FIELDS:
                columns[name].append(int(getattr(pred.generation, name)))
    return records


def _id_order(ids: Any) -> list[str]:
    """Distinct ids in a fixed order (numeric order for MASSIVE's digit strings), so that a seed picks
    the same ids whatever order the data came in."""
    return sorted(set(ids), key=lambda i: (len(i), i))


def _sums_by_id(records: Mapping[str, Mapping[str, list]], ids: list[str], columns: Sequence[str]):
    """[ids, locales, columns + 1] array: for each id and locale, the sum of each column over the
    locale's utterances with that id, and (last) how many there are."""
    import numpy as np

    index = {i: k for k, i in enumerate(ids)}
    sums = np.zeros((len(ids), len(records), len(columns) + 1))
    for loc, cols in enumerate(records.values()):
        rows = np.array([index[i] for i in cols["id"]], dtype=np.int64)
        for c, name in enumerate(columns):
            np.add.at(sums[:, loc, c], rows, np.asarray(cols[name], dtype=np.float64))
        np.add.at(sums[:, loc, -1], rows, 1.0)
    return sums


def _metric(totals: Any, columns: Sequence[str], metric: str) -> Any:
    """A metric from summed columns (`_sums_by_id` summed or resampled over ids): [..., columns + 1] -> [...]."""
    import numpy as np

    def col(name: str) -> Any:
        return totals[..., columns.index(name)]

    if metric == "slot_f1":
        return micro_f1(col("slot_tp"), col("slot_pred"), col("slot_gold"))
    # A resample can miss every id a locale has only when locales hold different ids: undefined, NaN.
    count = totals[..., -1]
    return np.divide(col(METRIC_FIELDS[metric][0]), count, out=np.full(count.shape, np.nan), where=count > 0)


def bootstrap_weights(num_ids: int, samples: int, seed: int) -> Any:
    """[samples, num_ids] float array: how often each id is drawn in each resample of num_ids ids
    with replacement (multinomial counts, the same as drawing indices)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.multinomial(num_ids, np.full(num_ids, 1.0 / num_ids), size=samples).astype(np.float64)


def percentile_interval(values: Any, confidence: float) -> list[float]:
    """Percentile interval of bootstrap values [samples, ...] along the first axis."""
    import numpy as np

    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.nanpercentile(values, [tail, 100.0 - tail], axis=0)
    return [float(low), float(high)]


def ci_method(samples: int, confidence: float) -> str:
    return (
        f"percentile bootstrap, {confidence:.0%}: {samples} resamples of the test ids with replacement, the same "
        "resampled ids in every locale (locales are translations of the same utterances, not independent "
        "samples); the mean over locales is recomputed on each resample"
    )


def score_records(
    records: Mapping[str, Mapping[str, list]], *, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """Scores of `utterance_records` output: per locale and the unweighted mean over locales (every
    locale counts the same, as in the MASSIVE paper), with bootstrap intervals over ids.

    One set of resampled ids serves every locale and metric; utterances sharing an id (one per locale
    in MASSIVE) are drawn together. A metric whose columns are missing (EM and slot F1 of an intent
    classifier) is None, as is its interval.
    Returns {"em", "intent_acc", "slot_f1", "em_ci", "intent_acc_ci", "slot_f1_ci", "num_examples",
    "num_ids", "per_locale": {locale: {metrics, their "_ci", "n", and with slots "num_gold_spans",
    "num_pred_spans", "num_correct_spans"}}, "ci_method"}.
    """
    import numpy as np

    if not records:
        raise ValueError("cannot score an empty set of examples")
    metrics = [m for m, cols in METRIC_FIELDS.items() if all(c in r for r in records.values() for c in cols)]
    columns = [c for m in metrics for c in METRIC_FIELDS[m]]
    ids = _id_order(i for r in records.values() for i in r["id"])
    sums = _sums_by_id(records, ids, columns)
    totals = sums.sum(axis=0)  # [locales, columns + 1]
    resampled = np.tensordot(bootstrap_weights(len(ids), samples, seed), sums, axes=(1, 0))  # [samples, locales, columns + 1]
    per_locale: dict[str, Any] = {loc: {"n": int(totals[k, -1])} for k, loc in enumerate(records)}
    out: dict[str, Any] = {}
    for metric in METRIC_FIELDS:
        if metric not in metrics:
            out[metric], out[f"{metric}_ci"] = None, None
            for s in per_locale.values():
                s[metric], s[f"{metric}_ci"] = None, None
            continue
        point, boot = _metric(totals, columns, metric), _metric(resampled, columns, metric)
        for k, s in enumerate(per_locale.values()):
            s[metric], s[f"{metric}_ci"] = float(point[k]), percentile_interval(boot[:, k], confidence)
        out[metric], out[f"{metric}_ci"] = float(point.mean()), percentile_interval(boot.mean(axis=1), confidence)
    if "slot_f1" in metrics:
        for k, s in enumerate(per_locale.values()):
            s["num_gold_spans"], s["num_pred_spans"], s["num_correct_spans"] = (
                int(totals[k, columns.index(c)]) for c in ("slot_gold", "slot_pred", "slot_tp")
            )
    out["num_examples"] = int(totals[:, -1].sum())
    out["num_ids"] = len(ids)
    out["per_locale"] = per_locale
    out["ci_method"] = ci_method(samples, confidence)
    return out


def score(
    golds: Sequence[Any], preds: Sequence[Any], *, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """`score_records(utterance_records(golds, preds))`: per-locale scores (grouped by gold `.locale`),
    their unweighted mean, and bootstrap intervals over ids."""
    return score_records(utterance_records(golds, preds), samples=samples, seed=seed, confidence=confidence)


def score_locale(golds: Sequence[Any], preds: Sequence[Any]) -> dict[str, Any]:
    """Point scores of one pool of utterances (all locales together), without intervals: fine-tuning's
    dev scoring, which sums the counts over ranks. Returns {"em", "intent_acc", "slot_f1", "n",
    "num_gold_spans", "num_pred_spans", "num_correct_spans"}."""
    records = utterance_records(golds, preds).values()
    total = {name: sum(sum(r[name]) for r in records) for name in RECORD_FIELDS[1:]}
    n = len(golds)
    return {
        "em": total["em"] / n,
        "intent_acc": total["intent_ok"] / n,
        "slot_f1": float(micro_f1(total["slot_tp"], total["slot_pred"], total["slot_gold"])),
        "n": n,
        "num_gold_spans": total["slot_gold"],
        "num_pred_spans": total["slot_pred"],
        "num_correct_spans": total["slot_tp"],
    }


def paired_difference(
    records_a: Mapping[str, Mapping[str, list]],
    records_b: Mapping[str, Mapping[str, list]],
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """B - A on the same utterances: for each metric both have, the difference of the unweighted means
    over locales and per locale, with bootstrap intervals over ids (the same resampled ids for A and
    B, so the comparison is paired: what both get right or wrong cancels out).

    records_a, records_b: `utterance_records(golds, preds)` of two models, or the "records" of two
    `evaluate massive` / `evaluate baseline` results; they must cover the same ids in the same locales.
    Also, for the means over locales, the ratio B / A with its interval from the same resamples (how
    much of A's score B keeps; None when A's score is 0), and `identical_predictions`.
    Returns {"metrics": {metric: {"a", "b", "diff", "diff_ci", "ratio", "ratio_ci", "per_locale":
    {locale: {"a", "b", "diff", "diff_ci"}}}}, "identical_predictions", "locales", "num_ids", "ci_method"}.
    """
    import numpy as np

    if set(records_a) != set(records_b):
        raise ValueError(f"A has locales {sorted(records_a)} but B has {sorted(records_b)}")
    for loc in records_a:
        if sorted(records_a[loc]["id"]) != sorted(records_b[loc]["id"]):
            raise ValueError(
                f"{loc}: A and B were scored on different utterances; score both with the same "
                "massive.seed and max_examples"
            )
    records_b = {loc: records_b[loc] for loc in records_a}  # the same locale order
    metrics = [
        m
        for m, cols in METRIC_FIELDS.items()
        if all(c in r for records in (records_a, records_b) for r in records.values() for c in cols)
    ]
    columns = [c for m in metrics for c in METRIC_FIELDS[m]]
    ids = _id_order(i for r in records_a.values() for i in r["id"])
    weights = bootstrap_weights(len(ids), samples, seed)
    values: dict[str, list[Any]] = {m: [] for m in metrics}  # per model: (point [locales], bootstrap [samples, locales])
    for records in (records_a, records_b):
        sums = _sums_by_id(records, ids, columns)
        totals, resampled = sums.sum(axis=0), np.tensordot(weights, sums, axes=(1, 0))
        for m in metrics:
            values[m].append((_metric(totals, columns, m), _metric(resampled, columns, m)))
    out: dict[str, Any] = {}
    for m, ((point_a, boot_a), (point_b, boot_b)) in values.items():
        diff = boot_b - boot_a
        mean_a, mean_b = boot_a.mean(axis=1), boot_b.mean(axis=1)
        # A resample where A scores 0 has no ratio (NaN); the percentiles leave it out.
        ratio = np.divide(mean_b, mean_a, out=np.full(mean_a.shape, np.nan), where=mean_a > 0)
        has_ratio = point_a.mean() > 0
        out[m] = {
            "a": float(point_a.mean()),
            "b": float(point_b.mean()),
            "diff": float(point_b.mean() - point_a.mean()),
            "diff_ci": percentile_interval(diff.mean(axis=1), confidence),
            "ratio": float(point_b.mean() / point_a.mean()) if has_ratio else None,
            "ratio_ci": percentile_interval(ratio, confidence) if has_ratio else None,
            "per_locale": {
                loc: {
                    "a": float(point_a[k]),
                    "b": float(point_b[k]),
                    "diff": float(point_b[k] - point_a[k]),
                    "diff_ci": percentile_interval(diff[:, k], confidence),
                }
                for k, loc in enumerate(records_a)
            },
        }
    return {
        "metrics": out,
        "identical_predictions": identical_predictions(records_a, records_b),
        "locales": list(records_a),
        "num_ids": len(ids),
        "ci_method": ci_method(samples, confidence),
    }


def identical_predictions(
    records_a: Mapping[str, Mapping[str, list]], records_b: Mapping[str, Mapping[str, list]]
) -> dict[str, Any] | None:
    """How often A and B predict exactly the same thing on the same utterance (an int8 export
    against its fp32 source, say): the share of ids x locales whose prediction columns all agree.

    Compares the prediction columns both carry (`PREDICTION_FIELDS`: the intent, and the slot labels
    unless one is an intent classifier); None when either lacks them (a result written before
    predictions were recorded). The records must cover the same ids per locale, as
    `paired_difference` checks. Returns {"share": float, "compared": [column], "per_locale": {locale:
    float}}.
    """
    compared = [c for c in PREDICTION_FIELDS if all(c in r for recs in (records_a, records_b) for r in recs.values())]
    if "pred_intent" not in compared:
        return None
    per_locale: dict[str, float] = {}
    same = total = 0
    for loc, cols_a in records_a.items():
        cols_b = records_b[loc]
        # Matched by id: the two results may list their utterances in different orders.
        by_id_b = dict(zip(cols_b["id"], zip(*(cols_b[c] for c in compared))))
        agree = sum(by_id_b[i] == p for i, p in zip(cols_a["id"], zip(*(cols_a[c] for c in compared))))
        per_locale[loc] = agree / len(cols_a["id"])
        same, total = same + agree, total + len(cols_a["id"])
    return {"share": same / total, "compared": compared, "per_locale": per_locale}



def sample_shared_ids(per_locale: Mapping[str, Sequence[Any]], n: int | None, seed: int) -> list[str]:
    """`n` ids drawn at random (seeded) from the ids that every locale's examples have, in id order;
    all of them when n is 0, None or at least their number.

    MASSIVE is parallel across locales (an id is one utterance and its translations), so scoring the
    same ids in every locale makes locales comparable and lets a bootstrap resample ids jointly. The
    draw depends only on the set of shared ids, n and seed, not on the order of the examples.
    """
    if not per_locale:
        raise ValueError("no locales to sample ids from")
    shared: set[str] | None = None
    for locale, examples in per_locale.items():
        ids = [str(ex.id) for ex in examples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{locale}: duplicate ids; MASSIVE ids are unique within a locale and partition")
        shared = set(ids) if shared is None else shared & set(ids)
    candidates = _id_order(shared or ())
    if not candidates:
        raise ValueError(f"the locales {', '.join(per_locale)} have no id in common")
    if not n or n >= len(candidates):
        return candidates
    chosen = set(random.Random(seed).sample(candidates, n))
    return [i for i in candidates if i in chosen]


def select_ids(examples: Sequence[Any], ids: Sequence[str]) -> list[Any]:
    """The examples with these ids, in the order of `ids`."""
    by_id = {str(ex.id): ex for ex in examples}
    return [by_id[i] for i in ids]
