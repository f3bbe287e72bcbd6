"""`polyteacher evaluate massive`: a model's predictions on MASSIVE, scored.

The predictors (a PyTorch text-to-text model through `generate`, an encoder NLU model, an ONNX
export through the torch-free runtime) turn each utterance's words into a prediction; the scoring
itself (official-equivalent scorer, per-utterance records, bootstrap intervals over ids shared by
every locale, paired comparison) is `massive.scoring`, whose docstring states its rules.

Output of `evaluate massive --out DIR [--name NAME]` (NAME defaults to "massive"): `DIR/NAME.json`,
the scores, intervals and per-utterance records with each prediction (schema: docs/internals.md,
"Evaluation outputs"); `DIR/NAME.md`: the same as a Markdown table; `DIR/NAME_em.png`: EM per
locale, sorted, with 95% intervals and the mean marked.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from massive.scoring import (
    GENERATION_METRICS,
    sample_shared_ids,
    score_records,
    select_ids,
    utterance_records,
)


class Predictor(Protocol):
    def predict_words(self, batch: list[list[str]]) -> list[Any]: ...


# ----------------------------------------------------------------------------- cross-lingual

PAPER_REFERENCES: tuple[tuple[str, str, float, float, float], ...] = (
    ("XLM-R base (270M), MASSIVE paper", "zero-shot", 0.387, 0.706, 0.503),
    ("mT5-base T2T (580M), MASSIVE paper", "zero-shot", 0.347, 0.629, 0.448),
    ("mT5-base T2T (580M), MASSIVE paper", "supervised", 0.666, 0.853, 0.768),
)
"""(model, setting, EM, intent accuracy, slot F1): the MASSIVE paper's (FitzGerald et al., ACL 2023)
means over the test partitions, zero-shot = fine-tuned on en-US and scored on the other 50 locales,
supervised = all 51 locales. Printed beside every cross-lingual table as reference rows."""


def crosslingual_summary(cfg, records: Mapping[str, Any], samples: int, seed: int, confidence: float) -> dict[str, Any]:
    """The setting, each scored locale's role and the means over the source and the target locales
    (with bootstrap intervals over the shared ids). Targets: `crosslingual.target_locales` when
    given, else every scored locale that is not a source."""
    xl = cfg.crosslingual
    scored = list(records)
    named = [loc for loc in xl.target_locales if loc in records]
    targets = named if xl.target_locales else [loc for loc in scored if loc not in xl.source_locales]
    roles = {loc: "target" if loc in targets else ("source" if loc in xl.source_locales else "other")
             for loc in scored}
    out: dict[str, Any] = {"setting": xl.setting, "source_locales": list(xl.source_locales),
                           "target_locales": targets, "roles": roles,
                           "references": [dict(zip(("model", "setting", "em", "intent_acc", "slot_f1"), row))
                                          for row in PAPER_REFERENCES]}
    for group, locales in (("target", targets), ("source", [loc for loc in scored if roles[loc] == "source"])):
        if not locales:
            out[f"{group}_mean"] = None
            continue
        part = score_records({loc: records[loc] for loc in locales}, samples=samples, seed=seed, confidence=confidence)
        out[f"{group}_mean"] = {k: part[k] for k in ("em", "intent_acc", "slot_f1", "em_ci", "intent_acc_ci",
                                                      "slot_f1_ci")} | {"locales": len(locales)}
    return out


# ----------------------------------------------------------------------------- predictors


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
    """The predictor the directory's model kind serves (student.kind_of): an ONNX export
    (manifest.json) -> student.OnnxPredictor; an encoder NLU model or ensemble (nlu_labels.json) ->
    itself; a Hugging Face seq2seq directory -> student.Seq2SeqPredictor."""
    from student import PredictOptions, kind_of

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    options = PredictOptions(device=device, dtype=dtype, load=load, num_threads=num_threads, slot_labels=slot_labels,
                             intents=intents, max_new_tokens_margin=max_new_tokens_margin)
    return kind_of(model_dir, "--model").predictor(model_dir, options)


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






def count_parameters(predictor: Any) -> int | None:
    """Every parameter of the predictor's model (embeddings, heads and n-gram buckets included); for
    an ONNX export, the elements of its stored weights (initializers, each name once across files).
    None when neither applies."""
    module = predictor if hasattr(predictor, "parameters") else getattr(predictor, "model", None)
    if module is not None and hasattr(module, "parameters"):
        return int(sum(p.numel() for p in module.parameters()))
    model_dir = getattr(predictor, "model_dir", None)
    if model_dir is None:
        return None
    import onnx

    seen: dict[str, int] = {}
    for path in sorted(Path(model_dir).glob("*.onnx")):
        graph = onnx.load(str(path), load_external_data=False).graph
        for init in graph.initializer:
            count = 1
            for d in init.dims:
                count *= int(d)
            seen.setdefault(init.name, count)
    return sum(seen.values()) if seen else None


def load_split(source: str, locales: Sequence[str], split: str, max_examples: int | None, seed: int = 0):
    """(MassiveData, {locale: examples}): the examples of `split` with the ids of
    `sample_shared_ids(..., max_examples, seed)`, the same ids in every locale, in id order."""
    from core.config import resolve_data_path
    from massive.loader import load_massive

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
    from student import kind_of

    kind_of(model_dir, "--model").check(Path(model_dir), "--model")  # refuse a bad model before loading any data
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
        "parameters": count_parameters(predictor),
        "crosslingual": crosslingual_summary(cfg, records, cfg.bootstrap_samples, mcfg.seed, cfg.confidence),
        "elapsed_s": round(time.perf_counter() - started, 3),
        "config": {**section_dict(cfg, "massive"), "crosslingual": section_dict(cfg, "crosslingual")["crosslingual"]},
        # Last, after what a reader looks for: what `evaluate compare` pairs up.
        "records": records,
    }
    write_massive_outputs(result, Path(out_dir), name)
    return result


def massive_markdown(result: dict[str, Any]) -> str:
    from core.tables import markdown_table

    def ci(pair: Sequence[float] | None) -> str | None:
        return None if pair is None else f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    xl = result.get("crosslingual") or {}
    roles = xl.get("roles", {})
    rows = [
        [loc, s["n"], s["em"], ci(s["em_ci"]), s["intent_acc"], ci(s["intent_acc_ci"]), s["slot_f1"],
         ci(s["slot_f1_ci"]), roles.get(loc, "")]
        for loc, s in sorted(result["per_locale"].items())
    ]
    for group in ("source", "target"):
        m = xl.get(f"{group}_mean")
        if m:
            rows.append([f"**mean over {m['locales']} {group} locales**", "", m["em"], ci(m["em_ci"]),
                         m["intent_acc"], ci(m["intent_acc_ci"]), m["slot_f1"], ci(m["slot_f1_ci"]), group])
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
            "all",
        ]
    )
    level = f"{result['config']['confidence']:.0%}"
    for ref in xl.get("references", []):
        rows.append([f"_{ref['model']}_", "", ref["em"], None, ref["intent_acc"], None, ref["slot_f1"], None,
                     f"reference, {ref['setting']}"])
    header = ["locale", "n", "EM", f"EM {level} CI", "intent acc", f"intent {level} CI", "slot F1",
              f"slot F1 {level} CI", "role"]
    params = result.get("parameters")
    title = (f"# MASSIVE {result['split']}: {result['model']}\n\nSetting: **{xl.get('setting', 'supervised')}** "
             f"(sources: {', '.join(xl.get('source_locales', [])) or '-'}; targets: "
             f"{', '.join(xl.get('target_locales', [])) or '-'}). Predictor: {result['predictor']}"
             f"{f', {params:,} parameters' if params else ''}. Intervals: {result['ci_method']}. Reference rows: "
             "the MASSIVE paper's means (zero-shot: fine-tuned on en-US, the other 50 locales; supervised: "
             "all 51), for scale.\n\n")
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
    from evaluation.plots import bar_chart, grouped_bar_chart

    per_locale = result["per_locale"]
    xl = result.get("crosslingual") or {}
    roles = xl.get("roles", {})
    metrics = {"EM": "em", "intent acc": "intent_acc", "slot F1": "slot_f1"}
    # One bar group per locale (sources first, then targets by EM), then the means and the references.
    order = sorted(per_locale, key=lambda loc: (roles.get(loc) != "source", -per_locale[loc]["em"], loc))
    groups = {f"{loc}{' (src)' if roles.get(loc) == 'source' else ''}": {m: per_locale[loc][k] for m, k in metrics.items()}
              for loc in order}
    if xl.get("target_mean"):
        groups["target mean"] = {m: xl["target_mean"][k] for m, k in metrics.items()}
    for ref in xl.get("references", []):
        if ref["setting"] == "zero-shot":
            groups[f"{ref['model'].split(',')[0]} zero-shot"] = {m: ref[k] for m, k in metrics.items()}
    return [
        grouped_bar_chart(groups, out_dir / f"{name}_locales.png",
                          title=f"MASSIVE {result['split']}, {xl.get('setting', 'supervised')}: "
                                f"{Path(result['model']).name}",
                          ylabel="score", series_order=list(metrics), ylim=(0.0, 1.0)),
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
    p.add_argument("--locales", nargs="+", default=None,
                   help="locales to score, or `all`: every <locale>.jsonl[.gz] in massive.data, one added after "
                   "training included (default: massive.locales, empty = all)")
    p.add_argument("--setting", choices=["zero-shot", "teacher-labelled", "supervised"], default=None,
                   help="the setting the model was trained under, named in the table (crosslingual.setting)")
    p.add_argument("--source-locales", nargs="+", default=None,
                   help="locales whose labels the model saw (crosslingual.source_locales; default en-US)")
    p.add_argument("--target-locales", nargs="+", default=None,
                   help="locales whose mean is the transfer figure (crosslingual.target_locales; default: "
                   "every scored locale that is not a source)")
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

    locales = args.locales
    if locales and "all" in locales:
        if len(locales) > 1:
            from core.config import ConfigError

            raise ConfigError(f"--locales: `all` stands alone (got {' '.join(locales)})")
        locales = []  # massive.locales empty = every locale file of the data directory
    # The crosslingual section is shared by every stage; its flags go in as its dotted overrides.
    for key, value in (("setting", args.setting), ("source_locales", args.source_locales),
                       ("target_locales", args.target_locales)):
        if value is not None:
            args.overrides = [*args.overrides, f"crosslingual.{key}={value if isinstance(value, str) else '[' + ','.join(value) + ']'}"]
    flags = {
        "locales": locales,
        "split": args.split,
        "max_examples": args.max_examples,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    return run_common(args, "massive", flags, evaluate_massive, massive_summary)


def massive_summary(result: dict[str, Any]) -> str:
    """The command's closing lines: the mean over every locale, and over the targets."""
    lines = [f"MASSIVE {result['split']} ({len(result['per_locale'])} locales, {result['num_examples']} utterances): "
             f"EM {result['em']:.4f}  intent acc {result['intent_acc']:.4f}  slot F1 {result['slot_f1']:.4f}"]
    xl = result.get("crosslingual") or {}
    if xl.get("target_mean"):
        m = xl["target_mean"]
        lines.append(f"{xl['setting']}, mean over {m['locales']} target locales: EM {m['em']:.4f}  "
                     f"intent acc {m['intent_acc']:.4f}  slot F1 {m['slot_f1']:.4f}")
    return "\n".join(lines)
