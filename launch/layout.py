"""How many processes x threads a CPU node runs (`launch --nproc-per-node auto`): the candidates, the
rule that picks one, and the measurements it picks from (this machine's pretraining-benchmark table in
the per-machine cache, else a matmul probe, cached). launch/launcher.py applies the choice."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

# Subcommands that train (and so can run on several processes).


AUTO_NPROC = 0
"""`--nproc-per-node auto`: LaunchOptions.nproc_per_node is this until `resolve_layout` replaces it."""
LAYOUT_TOLERANCE = 0.10
"""Layouts within this fraction of the best measured throughput count as equal; the one with the fewest
processes wins (one copy of the model and optimizer, no gradient all-reduce)."""
LAYOUT_MAX_PROCESSES = 16
"""Largest process count the probe tries on one node."""
LAYOUT_ENV = "POLYTEACHER_LAYOUT"
"""Environment variable carrying the chosen layout (JSON) to the training processes."""
LAYOUT_TABLES = "layout-tables"
"""Folder of the per-machine cache (~/.cache/polyteacher/) holding pretraining-benchmark reports that may
choose the layout; the product never reads the repository's benchmarks/ folder."""
BENCHMARK_MAX_LOAD = 1.5
"""A benchmark table whose load average exceeded this many times the cores (other jobs running) does not
choose the layout: oversubscription punishes multi-threaded processes far more than the machine does."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Processes x threads per process on one CPU node, and why they were chosen."""

    processes: int
    """Processes per node."""
    threads: int
    """torch intra-op threads per process (OMP_NUM_THREADS)."""
    precision: str
    """The precision whose throughput decided it (fp32 or bf16)."""
    source: str
    """Where the numbers came from: "probe", "probe (cached)" or "benchmark <json path>"."""
    reason: str
    """One line: every candidate's number and the rule that picked this one."""
    measured: dict[str, float] = dataclasses.field(default_factory=dict)
    """"PxT" -> aggregate throughput (matmul GFLOP/s for the probe, tokens/s for a benchmark)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def candidate_layouts(cores: int, max_processes: int = LAYOUT_MAX_PROCESSES) -> list[tuple[int, int]]:
    """Every (processes, threads) with processes x threads == cores and processes <= max_processes."""
    return [(p, cores // p) for p in range(1, min(cores, max_processes) + 1) if cores % p == 0]


def choose_layout(rates: dict[tuple[int, int], float], tolerance: float = LAYOUT_TOLERANCE,
                  unit: str = "GFLOP/s") -> tuple[tuple[int, int], str]:
    """The layout to run from measured aggregate throughputs {(processes, threads): rate}: the fewest
    processes among those within `tolerance` of the best. Returns ((processes, threads), reason)."""
    if not rates:
        raise ValueError("choose_layout: no measured layouts")
    best = max(rates.values())
    if best <= 0:
        raise ValueError(f"choose_layout: no layout has a positive throughput: {rates}")
    eligible = [layout for layout, rate in rates.items() if rate >= (1.0 - tolerance) * best]
    chosen = min(eligible, key=lambda layout: (layout[0], -rates[layout]))
    parts = ", ".join(f"{p} x {t}: {rates[(p, t)]:,.0f} {unit} ({rates[(p, t)] / best:.2f})"
                      for p, t in sorted(rates))
    rule = ("the fastest" if rates[chosen] == best
            else f"the fewest processes within {tolerance:.0%} of the fastest")
    return chosen, f"{parts}; {chosen[0]} x {chosen[1]} is {rule}"


def run_precision(command: list[str]) -> str:
    """The train.precision the subcommand was given as an override (auto when none)."""
    value = "auto"
    for arg in command:
        if arg.startswith("train.precision="):
            value = arg.split("=", 1)[1].strip().strip("'\"")
    return value if value in ("fp32", "bf16") else "auto"


def _auto_picks(fp32: float, bf16: float) -> str:
    from core.distributed import BF16_MIN_SPEEDUP

    return "bf16" if bf16 >= BF16_MIN_SPEEDUP * fp32 else "fp32"


def layout_from_report(report: dict[str, Any], cpu: str, cores: int, precision: str
                       ) -> Optional[tuple[dict[tuple[int, int], float], str]]:
    """Tokens/s per layout of the DeepSpeed modes of a `benchmarks/pretrain.py` report measured on this
    CPU model with this many cores, in `precision` (auto: what the report says auto picks here), best
    mode per layout. None when the report is for another machine, was measured under load (above
    BENCHMARK_MAX_LOAD x cores) or measured fewer than two layouts."""
    if report.get("benchmark") != "pretrain" or report.get("cpu") != cpu or report.get("cores") != cores:
        return None
    loads = [r.get(k) for r in report.get("results", []) for k in ("load_avg_before", "load_avg_after")]
    if max((x for x in loads if isinstance(x, (int, float))), default=0.0) > BENCHMARK_MAX_LOAD * cores:
        return None  # measured while other jobs oversubscribed the cores: not this machine's own numbers
    if precision == "auto":
        precision = report.get("precision_auto_picks") or "fp32"
    rates: dict[tuple[int, int], float] = {}
    for r in report.get("results", []):
        if r.get("zero_stage") is None or r.get("precision") != precision or r.get("variant", "default") != "default":
            continue  # the plain loop is not what `launch` runs; other train.* settings are not the run's
        layout = (int(r["processes"]), int(r["threads_per_process"]))
        if layout[0] * layout[1] == cores:
            rates[layout] = max(rates.get(layout, 0.0), float(r["tokens_per_s"]))
    return (rates, precision) if len(rates) >= 2 else None


def layout_tables_dir() -> Path:
    """Where layout tables of this machine are kept: a folder of the per-machine cache."""
    from core.distributed import read_machine_cache

    return read_machine_cache(LAYOUT_TABLES)[0]


def remember_layout_table(report: dict[str, Any], name: str) -> Optional[Path]:
    """Keep a pretraining-benchmark report in the per-machine cache so that `launch --nproc-per-node auto`
    can choose from it; None when the cache cannot be written (the probe then decides)."""
    from core.distributed import write_machine_cache

    path = layout_tables_dir() / name
    write_machine_cache(path, report)
    return path if path.is_file() else None


def layout_from_benchmarks(cpu: str, cores: int, precision: str, results_dir: Optional[Path] = None) -> Optional[Layout]:
    """A layout from the newest pretraining benchmark JSON under `results_dir` measured on this machine
    type (env POLYTEACHER_BENCHMARK_RESULTS, else ~/.cache/polyteacher/layout-tables/), or None."""
    results_dir = Path(results_dir or os.environ.get("POLYTEACHER_BENCHMARK_RESULTS") or layout_tables_dir())
    files = sorted(results_dir.glob("pretrain*.json"), key=lambda f: f.stat().st_mtime, reverse=True) \
        if results_dir.is_dir() else []
    for path in files:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found = layout_from_report(report, cpu, cores, precision) if isinstance(report, dict) else None
        if found:
            rates, used = found
            (p, t), reason = choose_layout(rates, unit="tokens/s")
            return Layout(p, t, used, f"benchmark {path}", reason, {f"{a}x{b}": v for (a, b), v in rates.items()})
    return None


def _probe_worker(threads: int, dtypes: list[str], size: int, seconds: float, barrier: Any, queue: Any) -> None:
    """One process of a probed layout: `threads` torch threads timing a size x size matmul per dtype,
    started together with the layout's other processes (barrier); puts {dtype: GFLOP/s}."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b  # warm-up: thread pool, kernel choice, first touch
        barrier.wait()
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        out[name] = count * 2 * size**3 / elapsed / 1e9
    queue.put(out)


def probe_layouts(cores: int, dtypes: list[str], size: int = 1024, seconds: float = 1.0,
                  max_processes: int = LAYOUT_MAX_PROCESSES) -> dict[str, dict[tuple[int, int], float]]:
    """{dtype: {(processes, threads): aggregate GFLOP/s}}: for each candidate layout its processes time a
    representative matmul (size x size, T5-small-like activations x weights) concurrently for `seconds`
    per dtype, and their rates are summed."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold an OpenMP pool
    rates: dict[str, dict[tuple[int, int], float]] = {d: {} for d in dtypes}
    for procs, threads in candidate_layouts(cores, max_processes):
        barrier, queue = ctx.Barrier(procs), ctx.Queue()
        workers = [ctx.Process(target=_probe_worker, args=(threads, dtypes, size, seconds, barrier, queue))
                   for _ in range(procs)]
        for w in workers:
            w.start()
        results = [queue.get(timeout=300) for _ in workers]
        for w in workers:
            w.join()
        for d in dtypes:
            rates[d][(procs, threads)] = sum(r[d] for r in results)
    return rates


def probe_layout(cpu: str, cores: int, precision: str, size: int = 1024, seconds: float = 1.0) -> Layout:
    """The layout from `probe_layouts` in the run's precision (auto: per layout, bf16 where it is
    BF16_MIN_SPEEDUP faster than fp32 there), cached per CPU model, cores, torch version and matmul size
    in ~/.cache/polyteacher/cpu_layout.json (not when the load average exceeded BENCHMARK_MAX_LOAD x cores)."""
    from importlib.metadata import version

    from core.distributed import read_machine_cache, write_machine_cache

    dtypes = {"fp32": ["float32"], "bf16": ["bfloat16"]}.get(precision, ["float32", "bfloat16"])
    cache, known = read_machine_cache("cpu_layout.json")
    key = f"{cpu}|{cores} cores|torch {version('torch')}|matmul {size}"
    entry = known.get(key, {})
    source = "probe (cached)"
    if any(d not in entry for d in dtypes):
        load = os.getloadavg()[0]
        source = "probe" if load <= BENCHMARK_MAX_LOAD * cores else f"probe under load {load:.1f} (not cached)"
        for d, rates in probe_layouts(cores, dtypes, size, seconds).items():
            entry[d] = {f"{p}x{t}": v for (p, t), v in rates.items()}
        if source == "probe":  # numbers taken while other jobs held the cores are not kept for later runs
            known[key] = entry
        write_machine_cache(cache, known)

    def parsed(d: str) -> dict[tuple[int, int], float]:
        return {(int(k.split("x")[0]), int(k.split("x")[1])): float(v) for k, v in entry[d].items()}

    if precision == "auto":
        fp32, bf16 = parsed("float32"), parsed("bfloat16")
        picks = {lay: _auto_picks(fp32[lay], bf16[lay]) for lay in fp32}
        rates = {lay: (bf16 if picks[lay] == "bf16" else fp32)[lay] for lay in fp32}
        used = "bf16" if all(v == "bf16" for v in picks.values()) else \
            "fp32" if all(v == "fp32" for v in picks.values()) else "mixed"
    else:
        rates = parsed(dtypes[0])
        used = precision
    (p, t), reason = choose_layout(rates)
    reason = f"{size}x{size} matmul, {'auto precision' if precision == 'auto' else precision}: {reason}"
    return Layout(p, t, used, source, reason, {f"{a}x{b}": v for (a, b), v in rates.items()})
