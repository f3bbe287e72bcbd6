"""MASSIVE scoring as the official scorer does it, predictors, and `polyteacher evaluate massive`.

Scoring (`score(golds, preds)`), equivalent to `eval_preds` of the official MASSIVE repository
(alexa/massive, src/massive/utils/training_utils.py):
- A prediction's slot labels are truncated to the gold number of words, or padded with `Other`
  (as the official eval does with `pad='Other'`); `parse_target` already does this for text output.
- Per-word labels become BIO tags: `Other` -> O; a run of the same label is one span (B- then I-);
  a different label starts a new span even when adjacent.
- intent accuracy; slot micro-F1 from seqeval (`seqeval.metrics.f1_score`, default mode) over all
  utterances of a locale; exact match when the intent and every word's label agree.
- Interval: normal approximation p +- z sqrt(p (1 - p) / n), clipped to [0, 1], with n = utterances
  for EM and intent accuracy and n = words for slot F1 (the official `slot_micro_f1_stderr` uses
  the number of word tags). The mean over locales is the unweighted mean (every locale counts the
  same, as in the MASSIVE paper); its interval treats locales as independent samples:
  se = sqrt(sum_l se_l^2) / L.

Output of `evaluate massive --out DIR [--name NAME]` (NAME defaults to "massive"):
- `DIR/NAME.json`:
  {"kind": "massive", "model": str, "predictor": str, "split": str, "num_examples": int,
   "em": float, "intent_acc": float, "slot_f1": float,                 # unweighted mean over locales
   "em_ci": [lo, hi], "intent_acc_ci": [lo, hi], "slot_f1_ci": [lo, hi],
   "per_locale": {locale: {"em", "intent_acc", "slot_f1": float, "n": int (utterances),
                           "num_words": int, "num_gold_spans", "num_pred_spans", "num_correct_spans": int,
                           "em_ci", "intent_acc_ci", "slot_f1_ci": [lo, hi]}},
   "ci_method": str, "elapsed_s": float, "config": {...resolved evaluate config...}}
- `DIR/NAME.md`: the same as a Markdown table; `DIR/NAME_em.png`: EM per locale, sorted, with 95%
  intervals and the mean marked.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

OUTSIDE = "Other"

CI_METHOD = (
    "normal approximation p +- z*sqrt(p(1-p)/n), clipped to [0,1]; n = utterances (em, intent_acc) or "
    "words (slot_f1); mean over locales is unweighted with se = sqrt(sum se_l^2)/L"
)


class Predictor(Protocol):
    def predict_words(self, batch: list[list[str]]) -> list[Any]: ...


# ----------------------------------------------------------------------------- scoring


def align_labels(pred_slots: Sequence[str], num_words: int, pad: str = OUTSIDE) -> list[str]:
    """Truncate to `num_words` labels, or pad with `pad` (the official eval's handling)."""
    pred = list(pred_slots)[:num_words]
    return pred + [pad] * (num_words - len(pred))


def to_bio(labels: Sequence[str], outside: str = OUTSIDE) -> list[str]:
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


def normal_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """p +- z sqrt(p (1 - p) / n), clipped to [0, 1]."""
    if n <= 0:
        return (0.0, 1.0)
    half = z * math.sqrt(max(p * (1.0 - p), 0.0) / n)
    return (max(0.0, p - half), min(1.0, p + half))


def mean_interval(estimates: Sequence[tuple[float, int]], z: float = 1.96) -> tuple[float, float]:
    """Interval of the unweighted mean of independent proportions [(p_l, n_l)]."""
    if not estimates:
        return (0.0, 1.0)
    num = len(estimates)
    mean = sum(p for p, _ in estimates) / num
    variance = sum(p * (1.0 - p) / n for p, n in estimates if n > 0) / num**2
    half = z * math.sqrt(max(variance, 0.0))
    return (max(0.0, mean - half), min(1.0, mean + half))


def score_locale(golds: Sequence[Any], preds: Sequence[Any], z: float = 1.96) -> dict[str, Any]:
    """Scores of one group of utterances. golds: objects with .intent and .slots (MassiveExample);
    preds: objects with .intent and .slots (NLUPrediction)."""
    from seqeval.metrics import f1_score
    from seqeval.metrics.sequence_labeling import get_entities

    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold examples but {len(preds)} predictions")
    if not golds:
        raise ValueError("cannot score an empty set of examples")
    gold_bio, pred_bio = [], []
    num_intent_correct = num_exact = num_words = 0
    for gold, pred in zip(golds, preds):
        pred_labels = align_labels(pred.slots, len(gold.slots))
        gold_tags, pred_tags = to_bio(gold.slots), to_bio(pred_labels)
        gold_bio.append(gold_tags)
        pred_bio.append(pred_tags)
        intent_ok = pred.intent == gold.intent
        num_intent_correct += intent_ok
        num_exact += intent_ok and pred_labels == list(gold.slots)
        num_words += len(gold.slots)
    n = len(golds)
    gold_spans = {(i, *e) for i, tags in enumerate(gold_bio) for e in get_entities(tags)}
    pred_spans = {(i, *e) for i, tags in enumerate(pred_bio) for e in get_entities(tags)}
    # seqeval warns and returns 0 when there are no spans at all (as the official scorer reports).
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slot_f1 = float(f1_score(gold_bio, pred_bio))
    em, intent_acc = num_exact / n, num_intent_correct / n
    return {
        "em": em,
        "intent_acc": intent_acc,
        "slot_f1": slot_f1,
        "n": n,
        "num_words": num_words,
        "num_gold_spans": len(gold_spans),
        "num_pred_spans": len(pred_spans),
        "num_correct_spans": len(gold_spans & pred_spans),
        "em_ci": list(normal_interval(em, n, z)),
        "intent_acc_ci": list(normal_interval(intent_acc, n, z)),
        "slot_f1_ci": list(normal_interval(slot_f1, num_words, z)),
    }


def score(golds: Sequence[Any], preds: Sequence[Any], z: float = 1.96) -> dict[str, Any]:
    """Per-locale scores (grouped by gold `.locale`) and their unweighted mean with intervals.

    Returns {"em", "intent_acc", "slot_f1", "em_ci", "intent_acc_ci", "slot_f1_ci", "num_examples",
    "per_locale": {locale: score_locale(...)}, "ci_method"}.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold examples but {len(preds)} predictions")
    if not golds:
        raise ValueError("cannot score an empty set of examples")
    groups: dict[str, tuple[list[Any], list[Any]]] = {}
    for gold, pred in zip(golds, preds):
        g, p = groups.setdefault(getattr(gold, "locale", "all"), ([], []))
        g.append(gold)
        p.append(pred)
    per_locale = {loc: score_locale(g, p, z) for loc, (g, p) in groups.items()}
    out: dict[str, Any] = {}
    for metric, size in (("em", "n"), ("intent_acc", "n"), ("slot_f1", "num_words")):
        values = [(s[metric], s[size]) for s in per_locale.values()]
        out[metric] = sum(v for v, _ in values) / len(values)
        out[f"{metric}_ci"] = list(mean_interval(values, z))
    out["num_examples"] = len(golds)
    out["per_locale"] = per_locale
    out["ci_method"] = CI_METHOD
    return out


# ----------------------------------------------------------------------------- predictors


def torch_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from launch.config import ConfigError

        raise ConfigError("device: 'cuda' requested but no CUDA device is available; allowed: auto, cpu, cuda")
    return torch.device(name)


def load_seq2seq(model_dir: str | Path, device: str = "auto", dtype: str = "float32"):
    """(model in eval mode on the device, tokenizer) from a Hugging Face seq2seq directory."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from data_prep.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
    model.to(torch_device(device)).eval()
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
    ) -> None:
        """`max_new_tokens`: a fixed generation budget (latency timing); None bounds each batch by
        its longest well-formed target instead."""
        from data_prep.massive import model_intent_first

        self.model, self.tokenizer = load_seq2seq(model_dir, device, dtype)
        self.max_new_tokens = max_new_tokens

        def longest(labels: Sequence[str], default: int) -> int:
            lengths = [len(self.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in labels]
            return max(lengths, default=default)

        # Upper bound of a well-formed target: one label per word plus the intent plus eos.
        self.tokens_per_word = longest([OUTSIDE, *slot_labels], 4)
        self.intent_tokens = longest(intents, 8)
        self.margin = max_new_tokens_margin
        self.intent_first = model_intent_first(self.model.config)

    def predict_words(self, batch: list[list[str]]) -> list[Any]:
        import torch

        from data_prep.massive import parse_target, t2t_source

        sources = [t2t_source(words) for words in batch]
        encoded = self.tokenizer(sources, padding=True, return_tensors="pt").to(self.model.device)
        max_words = max(len(words) for words in batch)
        max_new_tokens = self.max_new_tokens or max_words * self.tokens_per_word + self.intent_tokens + 1 + self.margin
        with torch.inference_mode():
            output = self.model.generate(**encoded, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [parse_target(text, len(words), intent_first=self.intent_first) for text, words in zip(texts, batch)]


def load_predictor(
    model_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "float32",
    num_threads: int = 1,
    slot_labels: Sequence[str] = (),
    intents: Sequence[str] = (),
    max_new_tokens_margin: int = 4,
) -> Predictor:
    """The predictor for a model directory: ONNX export (manifest.json) -> student.runtime.OnnxPredictor;
    encoder NLU (nlu_labels.json) -> student.nlu; otherwise a seq2seq PyTorch model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if (model_dir / "manifest.json").is_file():
        from student.runtime import OnnxPredictor

        return OnnxPredictor(model_dir, num_threads=num_threads)
    if (model_dir / "nlu_labels.json").is_file():
        return _load_encoder_nlu(model_dir, device)
    return Seq2SeqPredictor(
        model_dir,
        device=device,
        dtype=dtype,
        slot_labels=slot_labels,
        intents=intents,
        max_new_tokens_margin=max_new_tokens_margin,
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


def load_split(source: str, locales: Sequence[str], split: str, max_examples: int | None):
    """(MassiveData, {locale: [examples of the split, first max_examples]})."""
    from data_prep.massive import load_massive
    from launch.config import resolve_data_path

    path = resolve_data_path(source)
    data = load_massive(str(path), locales=list(locales) or None, partitions=(split,))
    wanted = list(locales) or list(data.locales)
    per_locale = {}
    for loc in wanted:
        examples = data.examples(locale=loc, partition=split)
        if not examples:
            raise FileNotFoundError(f"{path}: no {split} examples for locale {loc}; available locales: {', '.join(data.locales)}")
        per_locale[loc] = examples[:max_examples] if max_examples else examples
    return data, per_locale


def evaluate_massive(cfg, model_dir: str | Path, out_dir: str | Path, name: str = "massive") -> dict[str, Any]:
    """Predict and score one model on MASSIVE; write NAME.json, NAME.md, NAME_em.png into out_dir."""
    from evaluation.config import section_dict

    mcfg = cfg.massive
    started = time.perf_counter()
    data, per_locale = load_split(mcfg.data, mcfg.locales, mcfg.split, mcfg.max_examples)
    predictor = load_predictor(
        model_dir,
        device=cfg.device,
        dtype=cfg.dtype,
        num_threads=mcfg.num_threads,
        slot_labels=data.slot_types,
        intents=data.intents,
        max_new_tokens_margin=mcfg.max_new_tokens_margin,
    )
    golds = [ex for examples in per_locale.values() for ex in examples]
    preds = predict_all(predictor, golds, mcfg.batch_size, desc=f"massive {Path(model_dir).name}")
    result = {
        "kind": "massive",
        "model": str(model_dir),
        "predictor": type(predictor).__name__,
        "split": mcfg.split,
        **score(golds, preds, cfg.confidence_z),
        "elapsed_s": round(time.perf_counter() - started, 3),
        "config": section_dict(cfg, "massive"),
    }
    write_massive_outputs(result, Path(out_dir), name)
    return result


def massive_markdown(result: dict[str, Any]) -> str:
    from evaluation.plots import markdown_table

    def ci(pair: Sequence[float]) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

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
    header = ["locale", "n", "EM", "EM 95% CI", "intent acc", "intent 95% CI", "slot F1", "slot F1 95% CI"]
    title = f"# MASSIVE {result['split']}: {result['model']}\n\nPredictor: {result['predictor']}. Intervals: {result['ci_method']}.\n\n"
    return title + markdown_table(header, rows)


def write_massive_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from evaluation.plots import bar_chart
    from launch.fsutil import atomic_write_json, atomic_write_text

    per_locale = result["per_locale"]
    return [
        atomic_write_json(out_dir / f"{name}.json", result),
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
        "export) and score it like the official MASSIVE scorer: per locale and the mean over "
        "locales, with 95% intervals. Writes NAME.json, NAME.md and NAME_em.png into --out.",
    )
    add_common_arguments(p, default_name="massive")
    p.add_argument("--locales", nargs="+", default=None, help="locales to score (default: massive.locales, empty = all)")
    p.add_argument("--split", choices=["train", "dev", "test"], default=None, help="partition (default: massive.split = test)")
    p.add_argument("--max-examples", type=int, default=None, help="first N utterances per locale (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="utterances per predictor call (default 32)")
    p.set_defaults(func=run_massive)


def run_massive(args: argparse.Namespace) -> int:
    from evaluation.cli import run_common

    flags = {"locales": args.locales, "split": args.split, "max_examples": args.max_examples, "batch_size": args.batch_size}
    return run_common(args, "massive", flags, evaluate_massive, lambda result: (
        f"MASSIVE {result['split']} ({len(result['per_locale'])} locales, {result['num_examples']} utterances): "
        f"EM {result['em']:.4f}  intent acc {result['intent_acc']:.4f}  slot F1 {result['slot_f1']:.4f}"))
