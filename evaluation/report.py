"""REPORT.md and summary.json for a pipeline run directory, and the claims the report tests.

Reads what the evaluation commands wrote under `eval/` (their JSON schemas: docs/internals.md,
"Evaluation outputs"), the teacher's pretraining records in `metrics.jsonl`, the stage timings and
the resolved configs, and writes:

- `summary.json`: {"claims": {"comparisons": [...], "pretraining": [...]} (see `collect_claims`),
  "massive": {model: {"em", "intent_acc", "slot_f1", "per_locale": {...}}}, "icl": {...} (all intents),
  "icl_heldout": {...} (held-out intents, both models; see `collect_icl_heldout`), "translation": {...}, "fairness": {...}, "latency_ms": {model: {"p50", "p95"}}, "size_mb": {model:
  MB}, "stage_seconds": {stage: s}, "wall_seconds": s of the latest pipeline run or null}
- `REPORT.md`: the claims with their paired evidence, a summary table, per-locale tables, the
  held-out-intent ICL tables per language pair with their k-shot figure, every evaluation's plots
  (copied to `plots/`), the resolved configs and the wall time per stage.

Whatever a skipped stage did not write is shown as "-" (null in summary.json), never an error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.fsutil import atomic_write_json, atomic_write_text
from core.tables import markdown_table
from massive.scoring import GENERATION_METRICS

FAIRNESS_PAIRS = "pairs"
"""The base name (`evaluate fairness --name`) of the gender-pair measures under eval/fairness/."""


@dataclasses.dataclass(frozen=True)
class MassiveComparison:
    """One claim of the project, tested by `evaluate compare` on two eval_massive results (B - A on the
    same ids, paired); the report's Claims section has one row per comparison."""

    name: str  # writes eval/massive/compare_<name>.json and .md
    a: str  # model names of the pipeline's eval_massive (launch.pipeline.MASSIVE_MODELS)
    b: str
    question: str  # what the comparison answers, as the report asks it
    ratio: bool = False  # the claim is about the share of A's EM that B keeps (B / A)
    identical: bool = False  # the claim is about B predicting what A predicts


MASSIVE_COMPARISONS: tuple[MassiveComparison, ...] = (
    MassiveComparison("pretraining", "scratch", "teacher",
                      "does pretraining help fine-tuning? (the same size fine-tuned from random weights -> pretrained)"),
    MassiveComparison("distillation", "teacher", "student_fp32", "what share of the teacher's EM does the student keep?",
                      ratio=True),
    MassiveComparison("quantization", "student_fp32", "student_int8", "does int8 change the student's predictions?",
                      identical=True),
    MassiveComparison("crr", "student_kd", "student", "what does CRR cost in EM? (plain-KD student -> CRR student)"),
    MassiveComparison("zero_shot", "scratch_zero_shot", "teacher_zero_shot",
                      "does pretraining carry the labels to locales without any? (zero-shot locales: the same size "
                      "from random weights -> pretrained)"),
    MassiveComparison("nlu_teacher", "student_nlu_gold", "student_nlu",
                      "does the teacher term help the NLU student? (the same model on gold labels alone -> "
                      "with the teacher term)"),
)



@dataclasses.dataclass(frozen=True)
class IclHeldoutResult:
    """One `evaluate icl --protocol heldout` result of the pipeline's eval_icl (eval/icl/<name>.json)."""

    name: str  # the result's --name under eval/icl/
    model: str  # the model directory in the run dir
    role: str  # how the report names the model


# In-context learning on held-out intents (docs/icl.md): the in-context trained teacher beside the model
# it started from, on the same prompts; the second is the reference the first is read against.
ICL_HELDOUT_RESULTS: tuple[IclHeldoutResult, ...] = (
    IclHeldoutResult("heldout-icl", "teacher-icl", "in-context trained"),
    IclHeldoutResult("heldout-base", "teacher-indomain", "without in-context training"),
)

WALL_SECONDS = "pipeline_wall"
"""The key of stage_seconds.json that is no stage: the wall time of the latest `polyteacher pipeline`
that ran stages (they run side by side, so it is less than their sum); summary.json's wall_seconds."""

MASSIVE_METRICS = ("em", "intent_acc", "slot_f1")
# How well-formed a text-to-text model's generated targets are (None for classifiers and ONNX).
METRIC_TITLES = {"em": "exact match", "intent_acc": "intent accuracy", "slot_f1": "slot F1"}
# The metric every comparison claim is stated in: exact match, the strictest of the three.
CLAIM_METRIC = "em"
# The pretraining runs (the "name" of their metrics.jsonl records) checked against the unigram line.
PRETRAIN_RUNS = ("teacher", "teacher-indomain")
# A teacher's held-out loss must fall well below the unigram cross-entropy of its data (DESIGN.md,
# Optimisation); "well below" is taken as under half.
PRETRAIN_TARGET_RATIO = 0.5


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _find_json(directory: Path, must_have: str | None = None) -> dict[str, Any] | None:
    """The first JSON object in `directory` (sorted) that has key `must_have`."""
    if not directory.is_dir():
        return None
    for path in sorted(directory.glob("*.json")):
        data = _load_json(path)
        if isinstance(data, dict) and (must_have is None or must_have in data):
            return data
    return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file; none when it is missing, and a line a killed run left
    unfinished is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def comparison_claim(massive_dir: Path, comparison: MassiveComparison) -> dict[str, Any]:
    """One row of the claims: `evaluate compare`'s eval/massive/compare_<name>.json reduced to the
    claim's metric; every value null when the comparison was not run. B / A only for a claim about
    the share of A's score that B keeps, identical predictions only for one about B predicting what A
    predicts."""
    data = _load_json(massive_dir / f"compare_{comparison.name}.json")
    data = data if isinstance(data, dict) else {}
    metric = (data.get("metrics") or {}).get(CLAIM_METRIC) or {}
    diff_ci = metric.get("diff_ci")
    identical = data.get("identical_predictions") or {}
    # The eval_massive results compared (their directory names), which the pipeline may choose per
    # run: the pretraining claim compares pretrained-ft when it has a budget of its own.
    a, b = (Path(data[k]).parent.name if isinstance(data.get(k), str) else default
            for k, default in (("a", comparison.a), ("b", comparison.b)))
    return {
        "name": comparison.name,
        "question": comparison.question,
        "a": a,
        "b": b,
        "metric": CLAIM_METRIC,
        "value_a": metric.get("a"),
        "value_b": metric.get("b"),
        "diff": metric.get("diff"),
        "diff_ci": diff_ci,
        "excludes_zero": None if diff_ci is None else bool(diff_ci[0] > 0 or diff_ci[1] < 0),
        "ratio": metric.get("ratio") if comparison.ratio else None,
        "ratio_ci": metric.get("ratio_ci") if comparison.ratio else None,
        "identical_predictions": identical.get("share") if comparison.identical else None,
        "confidence": data.get("confidence"),
        "num_ids": data.get("num_ids"),
    }


def pretraining_claim(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The pretraining run `name` against the unigram line: its last held-out denoising loss, the
    held-out unigram cross-entropy it logged at step 0, and their ratio (nulls for what is missing).
    A run logged twice (a rerun) counts with its latest records."""
    losses = [r for r in records if r.get("name") == name and "eval_loss_denoise" in r]
    unigram = [r for r in records if r.get("name") == name and r.get("step") == 0 and "heldout_unigram_ce" in r]
    loss = losses[-1]["eval_loss_denoise"] if losses else None
    reference = unigram[-1]["heldout_unigram_ce"] if unigram else None
    ratio = loss / reference if loss is not None and reference else None
    return {
        "name": name,
        "step": losses[-1].get("step") if losses else None,
        "eval_loss_denoise": loss,
        "heldout_unigram_ce": reference,
        "ratio": ratio,
        "target_ratio": PRETRAIN_TARGET_RATIO,
        "meets_target": None if ratio is None else ratio < PRETRAIN_TARGET_RATIO,
    }


def collect_claims(run_dir: Path) -> dict[str, Any]:
    """{"comparisons": [`comparison_claim` per MASSIVE_COMPARISONS], "pretraining":
    [`pretraining_claim` per PRETRAIN_RUNS]}."""
    records = _read_jsonl(run_dir / "metrics.jsonl")
    return {
        "comparisons": [comparison_claim(run_dir / "eval" / "massive", c) for c in MASSIVE_COMPARISONS],
        "pretraining": [pretraining_claim(records, name) for name in PRETRAIN_RUNS],
    }


def collect_summary(run_dir: Path) -> dict[str, Any]:
    eval_dir = run_dir / "eval"
    summary: dict[str, Any] = {"claims": collect_claims(run_dir), "massive": {}, "icl": {}, "icl_heldout": {},
                               "translation": {}, "fairness": {}, "latency_ms": {}, "size_mb": {}, "stage_seconds": {},
                               "wall_seconds": None}
    massive_dir = eval_dir / "massive"
    if massive_dir.is_dir():
        for model_dir in sorted(p for p in massive_dir.iterdir() if p.is_dir()):
            data = _find_json(model_dir, "per_locale")
            if data is None:
                continue
            xl = data.get("crosslingual") or {}
            summary["massive"][model_dir.name] = {
                **{m: data.get(m) for m in (*MASSIVE_METRICS, *GENERATION_METRICS)},
                "parameters": data.get("parameters"),
                "setting": xl.get("setting"),
                "target_mean": xl.get("target_mean"),
                "per_locale": {
                    loc: {m: vals.get(m) for m in MASSIVE_METRICS}
                    for loc, vals in sorted(data.get("per_locale", {}).items())
                },
            }
    # eval/icl holds the all-intents result (per locale) beside the held-out-intent ones.
    for key, must_have in (("icl", "per_locale"), ("translation", None)):
        data = _find_json(eval_dir / key, must_have)
        if data is not None:
            summary[key] = data
    summary["icl_heldout"] = collect_icl_heldout(eval_dir / "icl")
    # eval/fairness holds fairness.json (flips and disparity of the MASSIVE models) and disparity.json (generation
    # disparity of the task-agnostic models): one entry, the disparity results under "disparity".
    fairness = _load_json(eval_dir / "fairness" / "fairness.json")
    if isinstance(fairness, dict):
        summary["fairness"] = fairness
    disparity = _load_json(eval_dir / "fairness" / "disparity.json")
    if isinstance(disparity, dict):
        for key in ("disparity", "polarity"):  # generation measures (evaluation.fairness.GENERATION_MEASURES)
            summary["fairness"][key] = {name: entry.get(key) for name, entry
                                        in disparity.get("models", {}).items() if entry.get(key)}
            summary["fairness"][f"{key}_comparisons"] = disparity.get(f"{key}_comparisons", {})
    # pairs.json (the pipeline's `--metrics pairs --name pairs`): the independent name and template pairs
    # of the MASSIVE models (evaluation.fairness_pairs), under "pairs".
    pairs = _load_json(eval_dir / "fairness" / f"{FAIRNESS_PAIRS}.json")
    if isinstance(pairs, dict) and pairs.get("pairs"):
        summary["fairness"]["pairs"] = pairs["pairs"]
    for entry in summary["fairness"].get("models", {}).values():
        for scores in entry.get("consistency", {}).values():
            scores.pop("records", None)  # per-utterance outcomes stay in eval/fairness/*.json
    for per_language in [*summary["fairness"].get("disparity", {}).values(),
                         *summary["fairness"].get("polarity", {}).values(),
                         *(e.get(key, {}) for e in summary["fairness"].get("models", {}).values()
                           for key in ("disparity", "polarity"))]:
        for scores in per_language.values():
            scores.pop("gaps", None)  # so do the per-pair gaps
    latency = _find_json(eval_dir / "latency")
    if latency:
        models = latency.get("models", latency)
        for name, vals in models.items():
            if not isinstance(vals, dict):
                continue
            if "p50" in vals:
                summary["latency_ms"][name] = {"p50": vals.get("p50"), "p95": vals.get("p95")}
            if "size_mb" in vals:
                summary["size_mb"][name] = vals["size_mb"]
    timings = _load_json(run_dir / "stage_seconds.json")
    if isinstance(timings, dict):
        summary["wall_seconds"] = timings.pop(WALL_SECONDS, None)
        summary["stage_seconds"] = timings
    return summary


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.3g}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    return markdown_table(header, rows).rstrip("\n")


def plot_massive_by_locale(summary: dict[str, Any], plots_dir: Path) -> list[Path]:
    """One figure per MASSIVE metric with every model side by side in each locale and in the mean
    (the TF-IDF reference among them where it has the metric): plots/massive_<metric>_by_locale.png."""
    from evaluation.plots import grouped_bar_chart

    models = summary["massive"]
    written = []
    for metric in MASSIVE_METRICS:
        scored = [m for m, vals in models.items() if vals.get(metric) is not None]
        if not scored:
            continue
        locales = sorted({loc for m in scored for loc in models[m]["per_locale"]})
        groups: dict[str, dict[str, float]] = {
            loc: {m: models[m]["per_locale"][loc][metric] for m in scored
                  if models[m]["per_locale"].get(loc, {}).get(metric) is not None}
            for loc in locales
        }
        groups["mean"] = {m: models[m][metric] for m in scored}
        written.append(grouped_bar_chart(
            groups, plots_dir / f"massive_{metric}_by_locale.png", title=f"MASSIVE {METRIC_TITLES[metric]} per locale",
            ylabel=METRIC_TITLES[metric], series_order=scored, ylim=(0.0, 1.0),
        ))
    return written


def _copy_plots(run_dir: Path) -> list[Path]:
    """The evaluation plots under plots/, except the per-model MASSIVE bars that
    `plot_massive_by_locale` puts side by side in one figure per metric, and the per-model held-out-intent
    curves that `plot_icl_heldout` puts in one figure."""
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    copied = []
    for png in sorted((run_dir / "eval").rglob("*.png")):
        rel = png.relative_to(run_dir / "eval")
        if rel.parts[0] == "massive" and png.name.endswith("_em.png"):
            continue
        if rel.parts[0] == "icl" and png.stem in {r.name for r in ICL_HELDOUT_RESULTS}:
            continue
        target = plots_dir / "_".join(rel.parts)
        shutil.copyfile(png, target)
        copied.append(target)
    return copied


def _flatten(prefix: str, obj: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif not isinstance(obj, list):
        out.append((prefix, obj))


def _yes_no(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _points(v: float | None) -> str:
    """A difference of two scores in percentage points, signed."""
    return "-" if v is None else f"{100 * v:+.1f}"


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _interval(pair: list[float] | None, fmt: Callable[[float], str]) -> str:
    return "-" if pair is None else f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def render_claims(claims: dict[str, Any]) -> str:
    confidence = next((c["confidence"] for c in claims["comparisons"] if c["confidence"] is not None), None)
    level = "" if confidence is None else f"{confidence:.0%} "
    rows = []
    for c in claims["comparisons"]:
        ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f} {_interval(c['ratio_ci'], lambda x: f'{x:.2f}')}"
        rows.append([c["question"], f"{c['a']} -> {c['b']}", _fmt(c["value_a"], True), _fmt(c["value_b"], True),
                     _points(c["diff"]), _interval(c["diff_ci"], _points), _yes_no(c["excludes_zero"]), ratio,
                     _fmt(c["identical_predictions"], True)])
    metric = CLAIM_METRIC.upper()
    parts = [
        f"MASSIVE {metric} (mean over locales, %) of A and B on the same test ids; B - A in points with a "
        f"{level}paired bootstrap interval over ids (details: eval/massive/compare_*.md).\n",
        _table(["question", "A -> B", f"{metric} A %", f"{metric} B %", "B - A", f"{level}CI of B - A",
                   "CI excludes 0", f"B / A ({level}CI)", "identical predictions %"], rows),
        f"\nTeacher pretraining: the last held-out denoising loss against the held-out unigram "
        f"cross-entropy of the data (nats/token); target: ratio below {PRETRAIN_TARGET_RATIO}.\n",
        _table(["run", "step", "eval_loss_denoise", "unigram CE", "ratio", f"below {PRETRAIN_TARGET_RATIO}"],
                  [[p["name"], _fmt(p["step"]), _num(p["eval_loss_denoise"], ".3f"),
                    _num(p["heldout_unigram_ce"], ".3f"), _num(p["ratio"], ".2f"), _yes_no(p["meets_target"])]
                   for p in claims["pretraining"]]),
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- held-out-intent ICL

ICL_HELDOUT_PLOT = "icl_heldout_kshot.png"
"""The report's k-shot figure of the held-out-intent ICL results (under plots/)."""
# What must agree for two held-out results to have been scored on the same prompts.
_PROMPT_KEYS = ("split", "way", "shots", "num_queries", "heldout_intents", "example_prompt")


def icl_heldout_findings(result: dict[str, Any]) -> dict[str, Any]:
    """Which (pair, k) cells of one held-out result are above or below chance, above the same model
    at the smallest k, and above the TF-IDF reference, each by its paired interval excluding 0."""
    shots = [str(k) for k in result["shots"]]
    cells = [(f"{key} k={k}", s, k) for key, s in result["pairs"].items() for k in shots]
    with_demos = [c for c in cells if c[2] != shots[0]]
    return {
        "cells": len(cells),
        "cells_with_demos": len(with_demos),
        "above_chance": [c for c, s, k in cells if s["vs_chance_ci"][k][0] > 0],
        "below_chance": [c for c, s, k in cells if s["vs_chance_ci"][k][1] < 0],
        "above_k0": [c for c, s, k in with_demos if s["vs_k0_ci"][k][0] > 0],
        "above_tfidf": [c for c, s, k in with_demos if s["vs_tfidf_ci"][k] is not None and s["vs_tfidf_ci"][k][0] > 0],
    }


def collect_icl_heldout(icl_dir: Path) -> dict[str, Any]:
    """summary.json's "icl_heldout": the held-out-intent results of ICL_HELDOUT_RESULTS that eval_icl
    wrote ({} when none): the prompt set ({"split", "way", "chance", "shots", "num_queries",
    "heldout_intents", "ci_method", "calibration", "content_free"}), "same_prompts" (null with fewer than two results), and per result
    name {"model", "role", "pairs", "mean", "findings"}, the pairs and means as icl_heldout.py writes them."""
    loaded = {r.name: _load_json(icl_dir / f"{r.name}.json") for r in ICL_HELDOUT_RESULTS}
    results = {n: d for n, d in loaded.items() if isinstance(d, dict) and d.get("kind") == "icl_heldout"}
    if not results:
        return {}
    first = next(iter(results.values()))

    def prompt_set(d: dict[str, Any]) -> str:
        return json.dumps([*(d.get(k) for k in _PROMPT_KEYS), (d.get("config") or {}).get("icl", {}).get("seed")])

    return {
        **{k: first.get(k) for k in ("split", "way", "chance", "shots", "num_queries", "heldout_intents", "ci_method",
                                     "calibration", "content_free")},
        "same_prompts": None if len(results) < 2 else len({prompt_set(d) for d in results.values()}) == 1,
        "models": {r.name: {"model": r.model, "role": r.role, "pairs": results[r.name]["pairs"],
                            "mean": results[r.name].get("mean", {}), "findings": icl_heldout_findings(results[r.name])}
                   for r in ICL_HELDOUT_RESULTS if r.name in results},
    }


def _pct_ci(value: float | None, ci: list[float] | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    fmt = _points if signed else (lambda x: f"{100 * x:.1f}")
    return f"{fmt(value)} {_interval(ci, fmt)}"


def _heldout_rows(entry: dict[str, Any], key: str, means: bool) -> list[list[str]]:
    """Rows k of one language pair (or mean over pairs of a kind): each model's accuracy and its
    difference from the smallest k, the TF-IDF reference and chance."""
    rows = []
    for k in map(str, entry["shots"]):
        row = [k]
        tfidf: tuple[float | None, list[float] | None] = (None, None)
        for r in ICL_HELDOUT_RESULTS:
            s = (entry["models"].get(r.name) or {}).get("mean" if means else "pairs", {}).get(key)
            if s is None:
                row += ["-", "-"]
                continue
            row += [_pct_ci(s["accuracy"][k], s["accuracy_ci"][k]), _pct_ci(s["vs_k0"][k], s["vs_k0_ci"][k], signed=True)]
            if tfidf[0] is None:
                tfidf = (s["tfidf"][k], s["tfidf_ci"][k])
        rows.append([*row, "n/a" if tfidf[0] is None else _pct_ci(*tfidf), f"{100 * entry['chance']:.1f}"])
    return rows


def _findings_text(entry: dict[str, Any]) -> list[str]:
    lines = []
    k0 = entry["shots"][0]
    beats_chance = beats_tfidf = False
    for r in ICL_HELDOUT_RESULTS:
        m = entry["models"].get(r.name)
        if m is None:
            lines.append(f"- {r.role} ({r.model}): not run")
            continue
        f = m["findings"]

        def cells(found: list[str]) -> str:
            return f" ({', '.join(found)})" if found else ""

        lines.append(
            f"- {r.role} ({r.model}): above chance in {len(f['above_chance'])} of {f['cells']} (pair, k) "
            f"cells{cells(f['above_chance'])}, below it in {len(f['below_chance'])}{cells(f['below_chance'])}; "
            f"above its own k={k0} in {len(f['above_k0'])} of {f['cells_with_demos']}{cells(f['above_k0'])}; "
            f"above the TF-IDF reference in {len(f['above_tfidf'])} of {f['cells_with_demos']}{cells(f['above_tfidf'])}."
        )
        beats_chance |= bool(f["above_chance"])
        beats_tfidf |= bool(f["above_tfidf"])
    lines.append(f"- In short: {'some' if beats_chance else 'no'} (pair, k) cell of either model is above chance, and "
                 f"{'some' if beats_tfidf else 'no'} cell is above the TF-IDF nearest-neighbour reference.")
    return lines


def render_icl_heldout(entry: dict[str, Any], plot: Path | None) -> str:
    if not entry:
        return "_not run_"
    same = {None: "only one model was scored", True: "yes", False: "NO (the results differ in split, k, ids or seed)"}
    parts = [
        f"{entry['split']} queries of the held-out intents ({', '.join(entry['heldout_intents'])}), never labelled in "
        f"in-context training; {entry['num_queries']} query ids shared by every locale, {entry['way']}-way candidate "
        f"sets (chance {100 * entry['chance']:.1f}%), k demonstrations per candidate label. Same language: "
        f"demonstrations and query in L; across languages: en-US demonstrations, query in L. Accuracy in %, "
        f"[interval]: {entry['ci_method']}; the difference from k={entry['shots'][0]} is paired on the same queries. "
        f"Both models on the same prompts: {same[entry['same_prompts']]}. "
        + (f"Candidates ranked with contextual calibration (Zhao et al. 2021: each label's log-prob minus its "
           f"log-prob with the same demonstrations and the content-free query {entry['content_free']}).\n"
           if entry.get("calibration") == "contextual" else "Candidates ranked by their log-prob, uncalibrated.\n"),
        *_findings_text(entry),
    ]
    if plot is not None:
        parts.append(f"\n![held-out-intent k-shot curves](plots/{plot.name})\n")
    header = ["k", *(h for r in ICL_HELDOUT_RESULTS for h in (f"{r.role} %", f"vs k={entry['shots'][0]} (points)")),
              "TF-IDF NN %", "chance %"]
    pairs = next(iter(entry["models"].values()))["pairs"]
    means = next(iter(entry["models"].values()))["mean"]
    for key, s in pairs.items():
        kind = "same language" if s["kind"] == "same" else "across languages"
        parts.append(f"\n### {key} ({kind})\n")
        parts.append(_table(header, _heldout_rows(entry, key, means=False)))
    for kind in means:
        parts.append(f"\n### mean over the {'same-language' if kind == 'same' else 'cross-language'} pairs\n")
        parts.append(_table(header, _heldout_rows(entry, kind, means=True)))
    return "\n".join(parts)


def plot_icl_heldout(entry: dict[str, Any], path: Path) -> Path | None:
    """One figure: accuracy against k per language pair, a colour per pair; the in-context trained
    model solid, the model without in-context training dash-dotted, the TF-IDF reference dashed, chance
    dotted. None without results."""
    if not entry:
        return None
    from evaluation.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shots = entry["shots"]
    # (line, marker, marker filled) per model: equal accuracies of the two stay told apart.
    styles = dict(zip((r.name for r in ICL_HELDOUT_RESULTS), (("-", "o", True), ("-.", "s", False))))
    pair_keys = list(dict.fromkeys(key for m in entry["models"].values() for key in m["pairs"]))
    for c, key in enumerate(pair_keys):
        color = colors[c % len(colors)]
        # A small shift along k per pair, so that pairs with equal accuracies do not hide each other.
        xs = [k + 0.06 * (c - (len(pair_keys) - 1) / 2) for k in shots]
        tfidf_drawn = False
        for r in ICL_HELDOUT_RESULTS:
            s = (entry["models"].get(r.name) or {}).get("pairs", {}).get(key)
            if s is None:
                continue
            line, marker, filled = styles.get(r.name, ("-", "o", True))
            ax.plot(xs, [s["accuracy"][str(k)] for k in shots], linestyle=line, marker=marker, color=color,
                    markerfacecolor=color if filled else "none", label=f"{key}: {r.role}")
            ref = [(k, s["tfidf"][str(k)]) for k in shots if s["tfidf"][str(k)] is not None]
            if ref and not tfidf_drawn:
                ax.plot(*zip(*ref), linestyle="--", color=color, alpha=0.5, label=f"{key}: TF-IDF NN")
                tfidf_drawn = True
    ax.axhline(entry["chance"], color="grey", linestyle=":", label=f"chance (1/{entry['way']})")
    ax.set_xlabel("demonstrations per candidate label (k)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(shots)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"held-out intents, {entry['way']}-way, {entry['split']}, {entry['num_queries']} query ids")
    return _save(fig, path)


def render_report(run_dir: Path, summary: dict[str, Any], plots: list[Path], icl_plot: Path | None = None) -> str:
    parts: list[str] = [f"# polyteacher run report: `{run_dir.name}`\n"]
    parts.append("## Claims\n")
    parts.append(render_claims(summary["claims"]))
    parts.append("\n## Summary\n")
    rows = []
    for model, vals in summary["massive"].items():
        lat = summary["latency_ms"].get(model, {})
        params = vals.get("parameters")
        rows.append([model, vals.get("setting") or "", _fmt(vals.get("em"), True), _fmt(vals.get("intent_acc"), True),
                     _fmt(vals.get("slot_f1"), True), f"{params / 1e6:.2f}" if params else "n/a", _fmt(lat.get("p50")),
                     _fmt(lat.get("p95")), _fmt(summary["size_mb"].get(model))])
    parts.append(_table(["model", "setting", "EM %", "intent acc %", "slot F1 %", "params M", "p50 ms", "p95 ms",
                         "size MB"], rows)
                 if rows else "_No MASSIVE evaluation found._")
    parts.append("\n## MASSIVE per locale (EM / intent accuracy / slot F1, %)\n")
    models = list(summary["massive"])
    locales = sorted({loc for m in models for loc in summary["massive"][m]["per_locale"]})
    loc_rows = []
    for loc in locales:
        row = [loc]
        for m in models:
            v = summary["massive"][m]["per_locale"].get(loc, {})
            row.append(" / ".join(_fmt(v.get(k), True) for k in MASSIVE_METRICS))
        loc_rows.append(row)
    parts.append(_table(["locale", *models], loc_rows) if loc_rows else "_none_")
    generating = [m for m in models if summary["massive"][m].get("stop_rate") is not None]
    if generating:
        parts.append("\n## Generated targets of the text-to-text models (%, before parsing repairs them)\n")
        parts.append(_table(
            ["model", "stopped", "labels or spans fit the words", "known intent"],
            [[m, *(_fmt(summary["massive"][m][k], True) for k in GENERATION_METRICS)] for m in generating],
        ))
    for key, title in (("icl", "In-context intent classification"), ("translation", "1-shot FLORES-200 translation"),
                       ("fairness", "Fairness")):
        parts.append(f"\n## {title}\n")
        table = summary[key].get("markdown") if isinstance(summary[key], dict) else None
        # The evaluation's own file first, then the others by name (fairness: disparity.md, pairs.md); the
        # held-out ICL results have a section of their own.
        md_files = sorted((f for f in (run_dir / "eval" / key).glob("*.md")
                           if f.stem not in {r.name for r in ICL_HELDOUT_RESULTS}),
                          key=lambda f: (f.stem != key, f.name)) \
            if (run_dir / "eval" / key).is_dir() else []
        if md_files:
            parts.append("\n\n".join(f.read_text(encoding="utf-8").strip() for f in md_files))
        elif table:
            parts.append(table)
        elif summary[key]:
            flat: list[tuple[str, Any]] = []
            _flatten("", summary[key], flat)
            parts.append(_table(["key", "value"], [[k, _fmt(v)] for k, v in flat[:200]]))
        else:
            parts.append("_not run_")
        if key == "icl":
            parts.append("\n## In-context learning on held-out intents\n")
            parts.append(render_icl_heldout(summary["icl_heldout"], icl_plot))
    parts.append("\n## Latency and size (batch 1, one thread)\n")
    lat_rows = [[m, _fmt(v.get("p50")), _fmt(v.get("p95")), _fmt(summary["size_mb"].get(m))]
                for m, v in summary["latency_ms"].items()]
    parts.append(_table(["model", "p50 ms", "p95 ms", "size MB"], lat_rows) if lat_rows else "_not run_")
    parts.append("\n## Plots\n")
    for png in plots:
        parts.append(f"![{png.stem}](plots/{png.name})\n")
    if not plots:
        parts.append("_no plots_")
    parts.append("\n## Wall time per stage (s)\n")
    parts.append(_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in summary["stage_seconds"].items()]))
    parts.append(f"\nTotal: {sum(summary['stage_seconds'].values()):.0f} s\n")
    if summary.get("wall_seconds") is not None:
        parts.append(f"\nWall time of the latest `polyteacher pipeline` (stages side by side, up to the report): "
                     f"{summary['wall_seconds']:.0f} s\n")
    parts.append("\n## Resolved configuration\n")
    for cfg_file in [run_dir / "pipeline.yaml", run_dir / "config.yaml", *sorted(run_dir.glob("*/config.yaml"))]:
        if cfg_file.is_file():
            parts.append(f"<details><summary>{cfg_file.relative_to(run_dir)}</summary>\n\n```yaml\n"
                         f"{cfg_file.read_text(encoding='utf-8').strip()}\n```\n</details>\n")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    summary = collect_summary(run_dir)
    plots = _copy_plots(run_dir)
    plots = plot_massive_by_locale(summary, run_dir / "plots") + plots
    icl_plot = plot_icl_heldout(summary["icl_heldout"], run_dir / "plots" / ICL_HELDOUT_PLOT)
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "REPORT.md", render_report(run_dir, summary, plots, icl_plot))
    return summary
