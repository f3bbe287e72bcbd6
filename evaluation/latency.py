"""Latency and size of MASSIVE predictors at batch 1 on one thread, and `polyteacher evaluate latency`.

Each model is timed end to end on real MASSIVE test utterances, one at a time: tokenization,
model (encoder + greedy decoding, or the encoder NLU graph), detokenization and parsing into
intent + slots, i.e. the `predict_words` of the predictor the directory gets:

- ONNX export (manifest.json): student.runtime.OnnxPredictor, onnxruntime with 1 intra-op thread;
- encoder NLU directory (nlu_labels.json): student.nlu.EncoderNLUModel (or NLUEnsemble).predict_words in PyTorch;
- Hugging Face seq2seq directory: PyTorch greedy `generate` (num_beams 1).

Both seq2seq paths stop at eos or after max_new_tokens (given: the same budget for both; not
given: the export's max_target_length and DEFAULT_MAX_NEW_TOKENS for PyTorch).

Memory is measured, not assumed (`measure_footprint`): a fresh process imports the backend's
libraries, loads the model and answers one utterance; another imports the same and loads nothing;
the difference of their resident memory (VmRSS, and of their peaks, VmHWM) is what the model
costs, and the first process's time from start to answer is the cold start. Throughput is
utterances per second in calls of 32 (`measure_throughput`).

Output JSON ({"<model>": {"p50", "p95", "mean", "size_mb", "added_rss_mb" (and its parts by kind of
mapping: "added_anon_mb", "added_library_mb", "added_model_files_mb", "added_other_mb"), "cold_start_s",
"throughput_utt_s", ...}}, milliseconds, seconds and 10^6 bytes), the file the pipeline's report
reads, plus a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MAX_NEW_TOKENS = 128


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def model_size_bytes(model_dir: Path) -> int:
    """Bytes of the model's weights: the ONNX graphs of an export, else the weight files."""
    from student import kind_of

    return kind_of(model_dir).size_bytes(Path(model_dir))


def load_timed_predictor(model_dir: Path, num_threads: int = 1, max_new_tokens: int | None = None,
                         batch_size: int = 1) -> Any:
    """The predictor `measure` times for a directory (`batch_size` utterances a call, `num_threads`
    threads; a PyTorch text-to-text model generates at most DEFAULT_MAX_NEW_TOKENS without `max_new_tokens`)."""
    from student import PredictOptions, kind_of

    options = PredictOptions(device="cpu", num_threads=num_threads, torch_threads=num_threads, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, fixed_budget=DEFAULT_MAX_NEW_TOKENS)
    return kind_of(model_dir).predictor(Path(model_dir), options)


def time_calls(fn: Callable[[list[str]], Any], utterances: list[list[str]], warmup: int = 3,
               progress: str | None = None) -> list[float]:
    """Milliseconds of fn([words]) per utterance, after `warmup` untimed calls."""
    from tqdm import tqdm

    for words in utterances[:warmup]:
        fn([words])
    times = []
    for words in tqdm(utterances, desc=progress, disable=progress is None, leave=False):
        start = time.perf_counter()
        fn([words])
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure(model_dir: str | Path, utterances: list[list[str]], num_threads: int = 1, warmup: int = 3,
            max_new_tokens: int | None = None, name: str | None = None) -> dict[str, Any]:
    """{"p50", "p95", "mean", "min" (ms), "size_mb", "backend", "num_examples", "num_threads"} for one model."""
    from student import kind_of

    model_dir = Path(model_dir)
    if not utterances:
        raise ValueError("no utterances to time")
    predictor = load_timed_predictor(model_dir, num_threads, max_new_tokens)
    times = time_calls(predictor.predict_words, utterances, warmup=warmup, progress=f"latency {name or model_dir.name}")
    kind = kind_of(model_dir)
    return {
        "p50": percentile(times, 50),
        "p95": percentile(times, 95),
        "mean": statistics.fmean(times),
        "min": min(times),
        "size_mb": model_size_bytes(model_dir) / 1e6,
        "backend": kind.backend,
        **kind.served_as(predictor),
        "num_examples": len(times),
        "num_threads": num_threads,
        "model_dir": str(model_dir),
    }


# ----------------------------------------------------------------------------- memory, cold start, throughput

# What a fresh process imports before it loads a model, by backend: the "no model" process imports
# the same, so the difference is what the model itself adds.
_CHILD = r"""
import json, os, sys, time
started = float(sys.argv[1]); model_dir = sys.argv[2]; backend = sys.argv[3]; threads = int(sys.argv[4])
words = json.loads(sys.argv[5])
if backend == "onnxruntime":
    import numpy, onnxruntime, tokenizers  # noqa: F401
    import student.runtime  # noqa: F401
else:
    import torch, transformers  # noqa: F401
    from transformers import AutoModelForSeq2SeqLM  # noqa: F401  (resolves the lazy module)
    import evaluation.massive  # noqa: F401
    torch.set_num_threads(threads)
import student.kinds  # noqa: F401  (what load_timed_predictor reads first, for either backend)
answered = None
if model_dir:
    from evaluation.latency import load_timed_predictor
    predictor = load_timed_predictor(model_dir, num_threads=threads)
    predictor.predict_words([words])
    answered = time.time()
status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("Vm")}
# Resident kB by kind of mapping: anonymous memory (heap, arenas, packed weights: what the model
# holds privately), shared-library pages (code the model's kernels touched), the export's own
# files (memory-mapped weights) and the rest.
parts = {"anon_kb": 0, "library_kb": 0, "model_files_kb": 0, "other_kb": 0}
where, export_root = "anon_kb", os.path.realpath(model_dir) if model_dir else None
for line in open("/proc/self/smaps"):
    fields = line.split()
    if fields and not fields[0].endswith(":"):
        path = fields[5] if len(fields) >= 6 else ""
        where = ("anon_kb" if path in ("", "[heap]") else "model_files_kb" if export_root and path.startswith(export_root)
                 else "library_kb" if ".so" in os.path.basename(path) else "other_kb")
    elif fields and fields[0] == "Rss:":
        parts[where] += int(fields[1])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, i.e. the parent's peak at fork.
print(json.dumps({"rss_kb": status["VmRSS"], "peak_kb": status["VmHWM"], **parts,
                  "cold_start_s": None if answered is None else answered - started}))
"""


# The parts of added_rss_mb, by kind of mapping (_CHILD's `<part>_kb`): added_<part>_mb.
FOOTPRINT_PARTS = ("anon", "library", "model_files", "other")
# Memory columns of the latency and export tables: the added RSS and its two large parts.
MEMORY_HEADERS = ["added RSS MB", "of it anonymous", "of it library code"]


def memory_cells(r: dict[str, Any]) -> list[str]:
    """MEMORY_HEADERS' cells of one result ("-" where memory was not measured)."""
    return [("-" if r.get(key) is None else f"{r[key]:.1f}") for key in ("added_rss_mb", "added_anon_mb", "added_library_mb")]


def _child_footprint(model_dir: Path | None, backend: str, words: list[str], num_threads: int) -> dict[str, Any]:
    import json
    import os
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(num_threads))
    started = time.time()
    out = subprocess.run([sys.executable, "-c", _CHILD, repr(started), str(model_dir or ""), backend,
                          str(num_threads), json.dumps(words)], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {model_dir or 'no model'} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_footprint(model_dir: str | Path, words: list[str], num_threads: int = 1, repeats: int = 2) -> dict[str, Any]:
    """Resident memory and cold start of a fresh process that loads `model_dir` and answers one
    utterance (`words`), against a fresh process that imports the same libraries and loads nothing:
    {"added_rss_mb": VmRSS with - without, "added_peak_mb": VmHWM with - without, "rss_mb",
    "baseline_rss_mb", "cold_start_s": process start to the first answer}. Medians of `repeats`
    pairs of processes (MB = 10^6 bytes)."""
    model_dir = Path(model_dir)
    from student import kind_of

    backend = kind_of(model_dir).backend
    runs = []
    for _ in range(repeats):
        base = _child_footprint(None, backend, words, num_threads)
        with_model = _child_footprint(model_dir, backend, words, num_threads)
        runs.append((base, with_model))

    def median(values: list[float]) -> float:
        return statistics.median(values)

    kb = 1024 / 1e6
    return {
        "rss_mb": median([w["rss_kb"] * kb for _, w in runs]),
        "baseline_rss_mb": median([b["rss_kb"] * kb for b, _ in runs]),
        "added_rss_mb": median([(w["rss_kb"] - b["rss_kb"]) * kb for b, w in runs]),
        "added_peak_mb": median([(w["peak_kb"] - b["peak_kb"]) * kb for b, w in runs]),
        **{f"added_{part}_mb": median([(w[f"{part}_kb"] - b[f"{part}_kb"]) * kb for b, w in runs]) for part in FOOTPRINT_PARTS},
        "cold_start_s": median([w["cold_start_s"] for _, w in runs]),
        "memory_backend": backend,
    }


def measure_throughput(model_dir: str | Path, utterances: list[list[str]], batch_size: int = 32,
                       num_threads: int = 1, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Utterances per second answered in calls of `batch_size` utterances (one warm-up call first)."""
    model_dir = Path(model_dir)
    predictor = load_timed_predictor(model_dir, num_threads, max_new_tokens, batch_size)
    predictor.predict_words(utterances[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(utterances), batch_size):
        predictor.predict_words(utterances[i:i + batch_size])
    seconds = time.perf_counter() - start
    return {"throughput_utt_s": len(utterances) / seconds, "throughput_batch": batch_size}


def massive_utterances(data: str, locales: list[str], split: str, max_examples: int) -> list[list[str]]:
    """Word lists of `max_examples` utterances of each locale's `split`: the same sample of ids in
    every locale (`evaluation.massive.sample_shared_ids`, seed 0 so every run times the same
    utterances), whose lengths follow the split's rather than those of the file's first rows."""
    from core.config import resolve_data_path
    from massive.loader import load_massive
    from massive.scoring import sample_shared_ids, select_ids

    loaded = load_massive(resolve_data_path(data), locales=locales, partitions=(split,), progress=False)
    per_locale = {locale: loaded.examples(locale=locale, partition=split) for locale in locales}
    ids = sample_shared_ids(per_locale, max_examples, seed=0)
    return [list(e.words) for examples in per_locale.values() for e in select_ids(examples, ids)]


def latency_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table (tabulate): model, backend, precision, p50, p95, size and, where measured, the
    memory a model adds to a fresh process (with its anonymous and shared-library parts), its cold
    start and its throughput at batch 32."""
    from tabulate import tabulate

    def f(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = [[name, r["backend"], r["precision"], f(r["p50"], ".2f"), f(r["p95"], ".2f"), f(r["size_mb"], ".2f"),
             *memory_cells(r), f(r.get("cold_start_s"), ".2f"), f(r.get("throughput_utt_s"), ".1f")]
            for name, r in results.items()]
    headers = ["model", "backend", "precision", "p50 ms", "p95 ms", "size MB", *MEMORY_HEADERS, "cold start s",
               "utt/s at batch 32"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


# ----------------------------------------------------------------------------- CLI


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "latency",
        help="latency (p50/p95 at batch 1, one thread), size, memory, cold start and throughput of models",
        description=(
            "Time each model's end-to-end prediction (tokenize, model, parse) on MASSIVE utterances one at a "
            "time with one thread. A model is an ONNX export (onnxruntime), an encoder NLU directory or a "
            "Hugging Face seq2seq directory (PyTorch greedy generate). Writes latency.json "
            '({"<model>": {"p50", "p95", "mean", "size_mb", ...}}, ms and MB) and latency.md into --out.'
        ),
    )
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR", help="models to time, e.g. student_int8=runs/x/onnx/int8")
    p.add_argument("--out", required=True, help="output directory (latency.json, latency.md)")
    p.add_argument("--run-dir", default=None, help="run directory that relative model paths and --out are inside")
    p.add_argument("--preset", default=None, help="preset name (launch/presets) or YAML path; its evaluate section is used")
    p.add_argument("--data", default=None, help="MASSIVE directory (`@data/` = under the data root; default: latency.data)")
    p.add_argument("--locales", nargs="+", default=None, help="locales whose utterances are timed (default: latency.locales)")
    p.add_argument("--split", default=None, choices=["train", "dev", "test"], help="MASSIVE partition (default: latency.split)")
    p.add_argument("--max-examples", type=int, default=None, help="utterances per locale (default: latency.max_examples)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for onnxruntime and PyTorch (default: latency.threads)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default: latency.warmup)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"generation budget of every seq2seq model (default: latency.max_new_tokens; unset: an "
                   f"export's max_target_length, {DEFAULT_MAX_NEW_TOKENS} for PyTorch)")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="fresh processes (each with and without the model) measuring the resident memory a model "
                   "adds and its cold start; the median is reported (0 skips; default: latency.memory_repeats)")
    p.add_argument("--throughput-batch", type=int, default=None,
                   help="utterances per call for the throughput measurement (0 skips; default: latency.throughput_batch)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted overrides of the evaluate section after the options, e.g. latency.warmup=5")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from core.config import ConfigError, given_flags, load_config
    from core.fsutil import atomic_write_json, atomic_write_text, safe_path
    from evaluation.cli import parse_models
    from evaluation.config import EvalConfig
    from massive.loader import check_locales

    # The evaluate section of --preset, then the overrides, then the flags given (core.config's rule).
    flags = given_flags(data=args.data, locales=args.locales, split=args.split, max_examples=args.max_examples,
                        threads=args.threads, warmup=args.warmup, max_new_tokens=args.max_new_tokens,
                        memory_repeats=args.memory_repeats, throughput_batch=args.throughput_batch)
    cfg = load_config(EvalConfig, section="evaluate", preset=args.preset, overrides=args.overrides,
                      flags={"latency": flags}).latency
    try:
        locales = check_locales(cfg.locales)
    except ValueError as e:
        raise ConfigError(f"--locales: {e}") from e
    models = parse_models(args.models, run_dir=args.run_dir)
    out = Path(args.out)
    if args.run_dir and not out.is_absolute():
        out = safe_path(args.run_dir, out)
    utterances = massive_utterances(cfg.data, locales, cfg.split, cfg.max_examples)
    results = {
        name: measure(d, utterances, num_threads=cfg.threads, warmup=cfg.warmup,
                      max_new_tokens=cfg.max_new_tokens, name=name)
        for name, d in models.items()
    }
    for name, d in models.items():
        if cfg.memory_repeats:
            results[name].update(measure_footprint(d, utterances[0], num_threads=cfg.threads,
                                                   repeats=cfg.memory_repeats))
        if cfg.throughput_batch:
            results[name].update(measure_throughput(d, utterances, batch_size=cfg.throughput_batch,
                                                    num_threads=cfg.threads, max_new_tokens=cfg.max_new_tokens))
    atomic_write_json(out / "latency.json", results)
    table = latency_table(results)
    atomic_write_text(out / "latency.md", f"# Latency (batch 1, {cfg.threads} thread(s), {len(utterances)} utterances)\n\n{table}")
    print(table, end="")
    return 0
