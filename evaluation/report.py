"""REPORT.md and summary.json for a pipeline run directory, and the claims the report tests.

Reads what the evaluation commands wrote under `eval/` (their JSON schemas: docs/internals.md,
"Evaluation outputs"), the teacher's pretraining records in `metrics.jsonl`, the stage timings and
the resolved configs, and writes:

- `summary.json`: {"claims": {"comparisons": [...], "pretraining": [...]} (see `collect_claims`),
  "massive": {model: {"em", "intent_acc", "slot_f1", "per_locale": {...}}}, "icl": {...},
  "translation": {...}, "fairness": {...}, "latency_ms": {model: {"p50", "p95"}}, "size_mb": {model:
  MB}, "stage_seconds": {stage: s}, "wall_seconds": s of the latest pipeline run or null}
- `REPORT.md`: the claims with their paired evidence, a summary table, per-locale tables, every
  evaluation's plots (copied to `plots/`), the resolved configs and the wall time per stage.

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
    summary: dict[str, Any] = {"claims": collect_claims(run_dir), "massive": {}, "icl": {}, "translation": {},
                               "fairness": {}, "latency_ms": {}, "size_mb": {}, "stage_seconds": {},
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
    for key in ("icl", "translation"):
        data = _find_json(eval_dir / key)
        if data is not None:
            summary[key] = data
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
    `plot_massive_by_locale` puts side by side in one figure per metric."""
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    copied = []
    for png in sorted((run_dir / "eval").rglob("*.png")):
        rel = png.relative_to(run_dir / "eval")
        if rel.parts[0] == "massive" and png.name.endswith("_em.png"):
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


def render_report(run_dir: Path, summary: dict[str, Any], plots: list[Path]) -> str:
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
        md_files = sorted((run_dir / "eval" / key).glob("*.md"), key=lambda f: f.stem != key) \
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
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "REPORT.md", render_report(run_dir, summary, plots))
    return summary
