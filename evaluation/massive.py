"""MASSIVE scoring as the official scorer does it, predictors, and `polyteacher evaluate massive`.

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

Output of `evaluate massive --out DIR [--name NAME]` (NAME defaults to "massive"): `DIR/NAME.json`,
the scores, intervals and per-utterance records with each prediction (schema: docs/internals.md,
"Evaluation outputs"); `DIR/NAME.md`: the same as a Markdown table; `DIR/NAME_em.png`: EM per
locale, sorted, with 95% intervals and the mean marked.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from core.modeldir import model_kind
from data_prep.massive import OTHER


class Predictor(Protocol):
    def predict_words(self, batch: list[list[str]]) -> list[Any]: ...


# ----------------------------------------------------------------------------- scoring

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
    # Well-formedness of generated targets (`data_prep.massive.GenerationCheck`); None for classifiers.
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


def _interval(values: Any, confidence: float) -> list[float]:
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
            s[metric], s[f"{metric}_ci"] = float(point[k]), _interval(boot[:, k], confidence)
        out[metric], out[f"{metric}_ci"] = float(point.mean()), _interval(boot.mean(axis=1), confidence)
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
            "diff_ci": _interval(diff.mean(axis=1), confidence),
            "ratio": float(point_b.mean() / point_a.mean()) if has_ratio else None,
            "ratio_ci": _interval(ratio, confidence) if has_ratio else None,
            "per_locale": {
                loc: {
                    "a": float(point_a[k]),
                    "b": float(point_b[k]),
                    "diff": float(point_b[k] - point_a[k]),
                    "diff_ci": _interval(diff[:, k], confidence),
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


# ----------------------------------------------------------------------------- predictors


def torch_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from core.config import ConfigError

        raise ConfigError("device: 'cuda' requested but no CUDA device is available; allowed: auto, cpu, cuda")
    return torch.device(name)


def load_seq2seq(model_dir: str | Path, device: str = "auto", dtype: str = "float32", load: Any = None):
    """(model in eval mode, tokenizer) from a Hugging Face seq2seq directory: on the device, or placed
    by accelerate's device map with CPU/disk offload when `load` (a `core.bigmodel.ModelLoadConfig`)
    says device_map=auto. dtype "auto": bf16/fp16 on GPU, float32 on CPU. Feed inputs on
    `core.bigmodel.input_device(model)`."""
    from core.bigmodel import load_model, resolve_dtype
    from core.modeldir import check_model_dir
    from data_prep.tokenizer import load_tokenizer

    model_dir = check_model_dir(model_dir, "--model")  # the loading rule every command shares
    tokenizer = load_tokenizer(model_dir)
    target = torch_device(device)
    model = load_model(model_dir, "--model", device=str(target), dtype=resolve_dtype(dtype, target.type == "cuda"),
                       load=load)
    return model, tokenizer


def pad_right(rows: Sequence[Sequence[int]], pad_id: int):
    """(ids, attention_mask), int64 tensors [len(rows), longest row]: each row's tokens first, then
    pad_id in ids and 0 in the mask."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class Seq2SeqPredictor:
    """Text-to-text MASSIVE predictor: `Annotate: w1 w2 ...` -> `s1 s2 ... intent` (or intent first,
    as the model's config records), batched greedy generation, output parsed by
    `data_prep.massive.parse_target`."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "float32",
        slot_labels: Sequence[str] = (),
        intents: Sequence[str] = (),
        max_new_tokens_margin: int = 4,
        max_new_tokens: int | None = None,
        load: Any = None,
    ) -> None:
        """`max_new_tokens`: a fixed generation budget (latency timing); None bounds each batch by
        its longest well-formed target instead. `load`: big-model placement (see `load_seq2seq`)."""
        from data_prep.massive import has_label_tokens, label_token, model_intent_first, model_sentinels

        self.model, self.tokenizer = load_seq2seq(model_dir, device, dtype, load)
        self.max_new_tokens = max_new_tokens

        def longest(labels: Sequence[str], default: int) -> int:
            lengths = [len(self.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in labels]
            return max(lengths, default=default)

        # Upper bound of a well-formed target: one label per word plus the intent plus eos.
        spell = label_token if has_label_tokens(self.tokenizer) else str
        self.tokens_per_word = longest([spell(x) for x in [OTHER, *slot_labels]], 4)
        self.intent_tokens = longest([spell(x) for x in intents], 8)
        self.margin = max_new_tokens_margin
        self.intents = list(intents)
        self.intent_first = model_intent_first(self.model.config)
        self.sentinels = model_sentinels(self.model.config)
        if self.sentinels:  # each label follows its word's sentinel
            self.tokens_per_word += 1

    def predict_words(self, batch: list[list[str]]) -> list[Any]:
        import torch

        from data_prep.massive import t2t_source

        sources = [t2t_source(words, self.sentinels) for words in batch]
        from core.bigmodel import input_device

        encoded = self.tokenizer(sources, padding=True, return_tensors="pt").to(input_device(self.model))
        max_words = max(len(words) for words in batch)
        max_new_tokens = self.max_new_tokens or max_words * self.tokens_per_word + self.intent_tokens + 1 + self.margin
        with torch.inference_mode():
            output = self.model.generate(**encoded, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        return parse_generations(output, self.tokenizer, [len(words) for words in batch], self.intents,
                                 self.intent_first)


def parse_generations(
    output: Any, tokenizer: Any, word_counts: Sequence[int], intents: Sequence[str], intent_first: bool
) -> list[Any]:
    """Generated ids ([B, L], decoder start first) -> NLUPredictions, each with its GenerationCheck
    (did it emit eos, label count, known intent) when `intents` is given."""
    from data_prep.massive import parse_generated, parse_target

    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    if not intents:  # nothing to check the intent against
        return [parse_target(text, n, intent_first=intent_first) for text, n in zip(texts, word_counts)]
    stopped = (output[:, 1:] == tokenizer.eos_token_id).any(dim=-1).tolist()
    return [parse_generated(text, n, intents, intent_first=intent_first, stopped=done)
            for text, n, done in zip(texts, word_counts, stopped)]


def load_predictor(
    model_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "float32",
    num_threads: int = 1,
    slot_labels: Sequence[str] = (),
    intents: Sequence[str] = (),
    max_new_tokens_margin: int = 4,
    load: Any = None,
) -> Predictor:
    """The predictor for a model directory: ONNX export (manifest.json) -> student.runtime.OnnxPredictor;
    encoder NLU (nlu_labels.json) -> student.nlu; otherwise a seq2seq PyTorch model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    kind = model_kind(model_dir)
    if kind == "onnx":
        from student.runtime import OnnxPredictor

        return OnnxPredictor(model_dir, num_threads=num_threads)
    if kind == "encoder_nlu":
        return _load_encoder_nlu(model_dir, device)
    return Seq2SeqPredictor(
        model_dir,
        device=device,
        dtype=dtype,
        slot_labels=slot_labels,
        intents=intents,
        max_new_tokens_margin=max_new_tokens_margin,
        load=load,
    )


def _load_encoder_nlu(model_dir: Path, device: str) -> Predictor:
    from student import nlu

    model = nlu.EncoderNLUModel.from_pretrained(model_dir)
    if hasattr(model, "to"):
        model.to(torch_device(device))
    if hasattr(model, "eval"):
        model.eval()
    if not hasattr(model, "predict_words"):
        raise TypeError(f"{model_dir}: student.nlu.EncoderNLUModel has no predict_words(batch)")
    return model


def predict_all(predictor: Predictor, examples: Sequence[Any], batch_size: int, desc: str = "predict") -> list[Any]:
    """Predictions for `examples` (objects with .words) in their order; batches of similar length."""
    from tqdm.auto import tqdm

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].words), reverse=True)
    preds: list[Any] = [None] * len(examples)
    with tqdm(total=len(examples), desc=desc, unit="utt", file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch_preds = predictor.predict_words([list(examples[i].words) for i in idx])
            if len(batch_preds) != len(idx):
                raise RuntimeError(f"predictor returned {len(batch_preds)} predictions for {len(idx)} utterances")
            for i, pred in zip(idx, batch_preds):
                preds[i] = pred
            bar.update(len(idx))
    return preds


# ----------------------------------------------------------------------------- the command


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


def load_split(source: str, locales: Sequence[str], split: str, max_examples: int | None, seed: int = 0):
    """(MassiveData, {locale: examples}): the examples of `split` with the ids of
    `sample_shared_ids(..., max_examples, seed)`, the same ids in every locale, in id order."""
    from core.config import resolve_data_path
    from data_prep.massive import load_massive

    path = resolve_data_path(source)
    data = load_massive(str(path), locales=list(locales) or None, partitions=(split,))
    wanted = list(locales) or list(data.locales)
    per_locale = {}
    for loc in wanted:
        per_locale[loc] = data.examples(locale=loc, partition=split)
        if not per_locale[loc]:
            raise FileNotFoundError(f"{path}: no {split} examples for locale {loc}; available locales: {', '.join(data.locales)}")
    ids = sample_shared_ids(per_locale, max_examples, seed)
    return data, {loc: select_ids(examples, ids) for loc, examples in per_locale.items()}


def evaluate_massive(cfg, model_dir: str | Path, out_dir: str | Path, name: str = "massive") -> dict[str, Any]:
    """Predict and score one model on MASSIVE; write NAME.json, NAME.md, NAME_em.png into out_dir."""
    from evaluation.config import section_dict

    mcfg = cfg.massive
    started = time.perf_counter()
    if not (Path(model_dir) / "manifest.json").is_file():  # refuse a bad model before loading any data
        from core.modeldir import check_model_dir

        check_model_dir(model_dir, "--model")
    data, per_locale = load_split(mcfg.data, mcfg.locales, mcfg.split, mcfg.max_examples, mcfg.seed)
    predictor = load_predictor(
        model_dir,
        device=cfg.device,
        dtype=cfg.dtype,
        num_threads=mcfg.num_threads,
        slot_labels=data.slot_types,
        intents=data.intents,
        max_new_tokens_margin=mcfg.max_new_tokens_margin,
        load=cfg.load,
    )
    golds = [ex for examples in per_locale.values() for ex in examples]
    preds = predict_all(predictor, golds, mcfg.batch_size, desc=f"massive {Path(model_dir).name}")
    records = utterance_records(golds, preds)
    result = {
        "kind": "massive",
        "model": str(model_dir),
        "predictor": type(predictor).__name__,
        "split": mcfg.split,
        **score_records(records, samples=cfg.bootstrap_samples, seed=mcfg.seed, confidence=cfg.confidence),
        "elapsed_s": round(time.perf_counter() - started, 3),
        "config": section_dict(cfg, "massive"),
        # Last, after what a reader looks for: what `evaluate compare` pairs up.
        "records": records,
    }
    write_massive_outputs(result, Path(out_dir), name)
    return result


def massive_markdown(result: dict[str, Any]) -> str:
    from evaluation.plots import markdown_table

    def ci(pair: Sequence[float] | None) -> str | None:
        return None if pair is None else f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    rows = [
        [loc, s["n"], s["em"], ci(s["em_ci"]), s["intent_acc"], ci(s["intent_acc_ci"]), s["slot_f1"], ci(s["slot_f1_ci"])]
        for loc, s in sorted(result["per_locale"].items())
    ]
    rows.append(
        [
            "**mean**",
            result["num_examples"],
            result["em"],
            ci(result["em_ci"]),
            result["intent_acc"],
            ci(result["intent_acc_ci"]),
            result["slot_f1"],
            ci(result["slot_f1_ci"]),
        ]
    )
    level = f"{result['config']['confidence']:.0%}"
    header = ["locale", "n", "EM", f"EM {level} CI", "intent acc", f"intent {level} CI", "slot F1", f"slot F1 {level} CI"]
    title = f"# MASSIVE {result['split']}: {result['model']}\n\nPredictor: {result['predictor']}. Intervals: {result['ci_method']}.\n\n"
    text = title + markdown_table(header, rows)
    if result.get("stop_rate") is not None:
        names = GENERATION_METRICS
        generation_rows = [[loc, *(s[m] for m in names)] for loc, s in sorted(result["per_locale"].items())]
        generation_rows.append(["**mean**", *(result[m] for m in names)])
        text += (
            "\n\n## Generated targets\n\nShare of utterances whose generated target stopped (eos within "
            "the budget), has one label per word plus the intent, and carries a known intent, before "
            "parsing repairs it.\n\n" + markdown_table(["locale", "stopped", "label count right", "known intent"], generation_rows)
        )
    return text


def result_json(result: Mapping[str, Any]) -> str:
    """A result as indented JSON, except that each column of its "records" takes one line.

    Indenting every element would put each utterance's values on lines of their own: about 1.7 times
    the size for a full test partition (2974 ids x 3 locales), and a file no one reads that way.
    """
    import json

    head = json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2, ensure_ascii=False)
    if "records" not in result:
        return head + "\n"
    locales = []
    for locale, columns in result["records"].items():
        lines = [
            f"      {json.dumps(name)}: {json.dumps(values, ensure_ascii=False, separators=(',', ':'))}"
            for name, values in columns.items()
        ]
        locales.append(f"    {json.dumps(locale, ensure_ascii=False)}: {{\n" + ",\n".join(lines) + "\n    }")
    # head ends with "\n}": the records go in as its last key.
    return head[:-2] + ',\n  "records": {\n' + ",\n".join(locales) + "\n  }\n}\n"


def write_massive_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from core.fsutil import atomic_write_text
    from evaluation.plots import bar_chart

    per_locale = result["per_locale"]
    return [
        atomic_write_text(out_dir / f"{name}.json", result_json(result)),
        atomic_write_text(out_dir / f"{name}.md", massive_markdown(result)),
        bar_chart(
            {loc: s["em"] for loc, s in per_locale.items()},
            out_dir / f"{name}_em.png",
            title=f"MASSIVE {result['split']} exact match: {Path(result['model']).name}",
            ylabel="exact match",
            errors={loc: tuple(s["em_ci"]) for loc, s in per_locale.items()},
            mean=result["em"],
            mean_label="mean over locales",
            ylim=(0.0, 1.0),
        ),
    ]


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    from evaluation.cli import add_common_arguments

    p = sub.add_parser(
        "massive",
        help="MASSIVE exact match, intent accuracy and slot F1 per locale (official scoring)",
        description="Predict MASSIVE with a model directory (seq2seq HF model, encoder NLU model, or ONNX "
        "export) and score it like the official MASSIVE scorer on a seeded sample of test ids shared by "
        "every locale: per locale and the mean over locales, with bootstrap intervals over ids. Writes "
        "NAME.json (with per-utterance records for `evaluate compare`), NAME.md and NAME_em.png into --out.",
    )
    add_common_arguments(p, default_name="massive")
    p.add_argument("--locales", nargs="+", default=None, help="locales to score (default: massive.locales, empty = all)")
    p.add_argument("--split", choices=["train", "dev", "test"], default=None, help="partition (default: massive.split = test)")
    p.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="N test ids, a seeded sample shared by every locale (default: massive.max_examples; 0 = all)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sample of ids and of the bootstrap (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="utterances per predictor call (default 32)")
    p.set_defaults(func=run_massive)


def run_massive(args: argparse.Namespace) -> int:
    from evaluation.cli import run_common

    flags = {
        "locales": args.locales,
        "split": args.split,
        "max_examples": args.max_examples,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    return run_common(args, "massive", flags, evaluate_massive, lambda result: (
        f"MASSIVE {result['split']} ({len(result['per_locale'])} locales, {result['num_examples']} utterances): "
        f"EM {result['em']:.4f}  intent acc {result['intent_acc']:.4f}  slot F1 {result['slot_f1']:.4f}"))
