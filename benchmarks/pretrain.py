"""Pretraining throughput: a plain PyTorch loop against DeepSpeed on 1 and 2 processes (ZeRO 0/1/2/3),
in fp32 and in bf16 autocast (fp32 weights and optimizer, what precision=bf16 does on CPU).

Every mode trains the same teacher preset on the same token shapes (global batch of
global_batch_size sequences, src_len encoder + tgt_len decoder tokens each, CPU) and reports
tokens/s, achieved TFLOP/s (model FLOPs, core.models.model_flops_per_example) and MFU against
the matmul peak of its precision measured here with 2 threads, plus each mode's ratio to the plain
fp32 loop. The record names the CPU, its AMX / AVX-512 / AVX2 flags and both peaks, and which
precision `train.precision=auto` picks on it.

    .venv/bin/python -m benchmarks.pretrain                      # small preset, all modes, both precisions
    .venv/bin/python -m benchmarks.pretrain --model tiny --steps 10 --modes plain,ds2-zero0 --precisions bf16

Writes benchmarks/results/pretrain.json and prints a table. Numbers on a shared machine are noisy:
the table records the load average before and after each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# mode -> (processes, threads per process, ZeRO stage or None for the plain loop)
MODES = {
    "plain": (1, 2, None),
    "plain-1thread": (1, 1, None),
    "ds1-zero0": (1, 2, 0),
    "ds2-zero0": (2, 1, 0),
    "ds2-zero1": (2, 1, 1),
    "ds2-zero2": (2, 1, 2),
    "ds2-zero3": (2, 1, 3),
}
DEFAULT_MODES = "plain,plain-1thread,ds1-zero0,ds2-zero0,ds2-zero1,ds2-zero2,ds2-zero3"
# Named train.* settings a mode can run with (--variants); "default" is the project's configuration.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "bucket-5e7": ["reduce_bucket_size=50000000"],
    "bucket-1e7": ["reduce_bucket_size=10000000"],
    "bucket-2e6": ["reduce_bucket_size=2000000"],
    "overlap": ["overlap_comm=true"],
    "no-contiguous": ["contiguous_gradients=false"],
    "no-reduce-scatter": ["reduce_scatter=false"],
    "adamw-for-loop": ["adamw_impl=for-loop"],
    "adamw-foreach": ["adamw_impl=foreach"],
    "adamw-fused": ["adamw_impl=fused"],
    "compile": ["compile=true"],
}
TUNE_MODES = "ds1-zero0,ds2-zero2"
TUNE_VARIANTS = ("default,bucket-5e7,bucket-1e7,bucket-2e6,overlap,no-contiguous,no-reduce-scatter,"
                 "adamw-for-loop,adamw-fused")
CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def make_batches(num: int, micro: int, src_len: int, tgt_len: int, vocab: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        out.append({
            "input_ids": torch.randint(3, vocab, (micro, src_len), generator=g),
            "attention_mask": torch.ones(micro, src_len, dtype=torch.long),
            "labels": torch.randint(3, vocab, (micro, tgt_len), generator=g),
        })
    return out


def worker(args: argparse.Namespace) -> None:
    """One process of one mode: train warmup + measured steps, rank 0 writes the result JSON."""
    import torch

    from core.config import merge, parse_overrides
    from core.distributed import DistInfo, adamw_impl
    from core.models import ModelConfig, build_model, model_flops_per_example
    from core.train_config import TrainConfig

    nproc, threads, zero_stage = MODES[args.mode]
    bf16 = args.precision == "bf16"
    model_cfg = ModelConfig(preset=args.model)
    model = build_model(model_cfg, args.vocab_size, seed=0)
    rank, world = 0, 1
    cfg = merge(TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                            max_steps=10**6, warmup_steps=0, lr=1e-4, zero_stage=zero_stage or 0,
                            precision=args.precision), parse_overrides(json.loads(args.train_json)))
    cfg.validate()
    if zero_stage is None:
        torch.set_num_threads(threads)
        micro = args.micro_batch_size
        accum = args.global_batch_size // micro
        impl = adamw_impl(cfg, DistInfo(0, 0, 1, "cpu", "gloo"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=impl == "foreach", fused=impl == "fused")
        if cfg.compile:
            model.compile()

        def step(batches: list[dict]) -> None:
            for batch in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**batch).loss
                (loss / len(batches)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def sync() -> None:
            pass
    else:
        from core.distributed import barrier, build_engine, init_distributed

        dist = init_distributed(num_threads=threads)
        rank, world = dist.rank, dist.world_size
        micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps(world)
        engine = build_engine(model, cfg, dist)

        def step(batches: list[dict]) -> None:
            for batch in batches:
                engine.backward(engine(**batch).loss)
                engine.step()

        sync = barrier
    batches = make_batches(accum, micro, args.src_len, args.tgt_len, args.vocab_size, seed=rank)
    start = time.perf_counter()
    for _ in range(args.warmup_steps):
        step(batches)  # with compile=true the first steps compile
    sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step(batches)
    sync()
    elapsed = time.perf_counter() - start
    allreduce_s = None
    if world > 1:
        # What one full-gradient all-reduce costs over gloo here (ZeRO 1/2 move about this much per step).
        import torch.distributed as torch_dist

        grads = torch.ones(sum(p.numel() for p in model.parameters()))
        timings = []
        for _ in range(3):
            torch_dist.barrier()
            t0 = time.perf_counter()
            torch_dist.all_reduce(grads)
            timings.append(time.perf_counter() - t0)
        allreduce_s = min(timings)
        torch_dist.barrier()
    if rank == 0:
        examples = args.steps * args.global_batch_size
        flops = examples * model_flops_per_example(model_cfg, args.vocab_size, args.src_len, args.tgt_len)
        result = {
            "mode": args.mode, "precision": args.precision, "variant": args.variant,
            "train_overrides": json.loads(args.train_json), "processes": world,
            "threads_per_process": torch.get_num_threads(),
            "zero_stage": zero_stage, "steps": args.steps, "seconds": elapsed, "warmup_seconds": warmup_s,
            "step_seconds": elapsed / args.steps,
            "tokens_per_s": examples * (args.src_len + args.tgt_len) / elapsed,
            "tflops": flops / elapsed / 1e12,
            "gradient_allreduce_s": allreduce_s,
        }
        Path(args.result).write_text(json.dumps(result))
    if world > 1:
        import torch.distributed as torch_dist

        # Without it gloo's threads can abort the exit ("terminate called without an active exception").
        torch_dist.destroy_process_group()


def run_mode(mode: str, precision: str, args: argparse.Namespace, result: Path, variant: str = "default") -> dict:
    nproc, threads, zero_stage = MODES[mode]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    worker_args = ["benchmarks.pretrain", "--worker", "--mode", mode, "--result", str(result),
                   "--model", args.model, "--vocab-size", str(args.vocab_size), "--src-len", str(args.src_len),
                   "--tgt-len", str(args.tgt_len), "--micro-batch-size", str(args.micro_batch_size),
                   "--global-batch-size", str(args.global_batch_size), "--steps", str(args.steps),
                   "--warmup-steps", str(args.warmup_steps), "--precision", precision, "--variant", variant,
                   "--train-json", json.dumps([*VARIANTS[variant], *args.train])]
    return run_worker(worker_args, nproc, env, result, f"mode {mode}/{precision}/{variant}")


def run_worker(worker_args: list[str], nproc: int, env: dict, result: Path, what: str) -> dict:
    """Run a benchmark worker module (`worker_args[0]`, e.g. "benchmarks.pretrain", run from the repository
    root) on `nproc` CPU processes (DeepSpeed's launcher beyond one) and return the JSON it wrote to
    `result`, with the load average before and after."""
    from core.distributed import free_port

    if nproc == 1:
        cmd = [sys.executable, "-m", *worker_args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--no_local_rank", "--module", *worker_args]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["load_avg_before"], out["load_avg_after"] = load_before, os.getloadavg()[0]
    return out


def measure_peak(threads: int, dtype: str = "float32") -> float:
    import torch

    from core.metrics import measure_peak_tflops

    torch.set_num_threads(threads)
    return max(measure_peak_tflops(threads, size=1024, seconds=1.0, dtype=dtype) for _ in range(3))


def cpu_record() -> dict:
    """The CPU model and the instruction-set flags that decide its fp32 and bf16 speed."""
    from core.distributed import cpu_info

    model, flags = cpu_info()
    return {"cpu": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def parse_list(text: str, allowed: dict | tuple, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if not items or unknown:
        raise SystemExit(f"{what} {text!r}: unknown {unknown}; allowed: {', '.join(allowed)}")
    return items


def applies(variant: str, mode: str) -> bool:
    """ZeRO communication variants only change modes with several processes and ZeRO >= 1."""
    nproc, _, zero_stage = MODES[mode]
    return variant.startswith(("default", "adamw", "compile")) or (nproc > 1 and bool(zero_stage))


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other jobs on the cores make every number here slower)."""
    return [round(x, 2) for x in os.getloadavg()]


def add_ratios(results: list[dict]) -> None:
    """Each row's tokens/s against the plain fp32 loop and against the fastest single-process row of its
    precision (the acceptance target for 2-process ZeRO-2 is >= 0.9 of that)."""
    plain = next((r for r in results if r["mode"] == "plain" and r["precision"] == "fp32"
                  and r.get("variant", "default") == "default"), None)
    for r in results:
        single = [x["tokens_per_s"] for x in results if x["processes"] == 1 and x["precision"] == r["precision"]]
        r["ratio_to_plain"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain else None
        r["ratio_to_best_single_process"] = r["tokens_per_s"] / max(single) if single else None


def print_table(results: list[dict]) -> None:
    from tabulate import tabulate

    rows = []
    for r in results:
        rows.append([r["mode"], r.get("variant", "default"), r["precision"],
                     f"{r['processes']} x {r['threads_per_process']}", f"{r['tokens_per_s']:,.0f}",
                     f"{1 / r['step_seconds']:.2f}", f"{r['tflops'] * 1e3:.1f}", f"{r['mfu']:.1%}",
                     "-" if r.get("ratio_to_best_single_process") is None else f"{r['ratio_to_best_single_process']:.2f}",
                     f"{r['load_avg_before']:.1f}/{r['load_avg_after']:.1f}"])
    print(tabulate(rows, headers=["mode", "variant", "precision", "procs x thr", "tokens/s", "steps/s", "GFLOP/s",
                                  "MFU", "vs best 1-proc", "load"], tablefmt="github"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="teacher size preset (tiny, small)")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer size (padded to a multiple of 128)")
    p.add_argument("--src-len", type=int, default=128, help="encoder tokens per example")
    p.add_argument("--tgt-len", type=int, default=128, help="decoder tokens per example")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per process per forward")
    p.add_argument("--global-batch-size", type=int, default=16, help="sequences per optimizer step, all processes")
    p.add_argument("--steps", type=int, default=8, help="measured optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {', '.join(MODES)} (default: all; "
                   f"with --tune {TUNE_MODES})")
    p.add_argument("--precisions", default=None, help="comma-separated subset of fp32, bf16 (autocast); default both "
                   "(with --tune: what precision=auto picks here)")
    p.add_argument("--variants", default=None, help=f"comma-separated train.* settings per mode, of: {', '.join(VARIANTS)} "
                   "(default: default; with --tune the ZeRO communication and AdamW ones)")
    p.add_argument("--tune", action="store_true", help="ZeRO overheads on CPU: 1-process ZeRO-0 against 2-process ZeRO-2 "
                   "under each bucket size, overlap_comm, contiguous_gradients, reduce_scatter and AdamW kernel")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.* setting for every mode and variant (repeatable), e.g. --train reduce_bucket_size=1e7")
    p.add_argument("--repeats", type=int, default=1, help="run every (mode, variant) this many times, interleaved "
                   "(on a shared machine the best of them is the least disturbed)")
    p.add_argument("--out", default=None, help="result JSON path (default: benchmarks/results/pretrain_<model>.json, "
                   "with --tune pretrain_zero_tuning.json)")
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--train-json", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    modes = parse_list(args.modes or (TUNE_MODES if args.tune else DEFAULT_MODES), MODES, "--modes")
    variants = parse_list(args.variants or (TUNE_VARIANTS if args.tune else "default"), VARIANTS, "--variants")
    out = Path(args.out or HERE / "results" / ("pretrain_zero_tuning.json" if args.tune else f"pretrain_{args.model}.json"))

    import datetime

    import torch

    from core.distributed import BF16_MIN_SPEEDUP, cpu_bf16_speedup
    from core.fsutil import atomic_write_json
    from core.models import count_parameters
    from launch.layout import remember_layout_table

    load_start = load_average()
    peak_2 = measure_peak(2)
    peak_1 = measure_peak(1)
    peaks = {"fp32": peak_2, "bf16": measure_peak(2, "bfloat16")}
    torch.set_num_threads(1)  # what each training process of the 2 x 1 layout sees
    auto = "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"
    precisions = parse_list(args.precisions or (auto if args.tune else "fp32,bf16"), ("fp32", "bf16"), "--precisions")
    results = []
    tmp = out.with_suffix(".part.json")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    runs = [(m, pr, v) for pr in precisions for m in modes for v in variants if applies(v, m)]
    measured: dict[tuple, dict] = {}
    failures: list[dict] = []

    def write_report() -> dict:
        """The JSON so far (rewritten after every run: a crash or a kill keeps what was measured)."""
        results = [dict(measured[k]) for k in runs if k in measured]
        for r in results:
            r["mfu"] = r["tflops"] / peaks[r["precision"]]
        add_ratios(results)
        report = {
            "benchmark": "pretrain",
            "command": " ".join(["benchmarks/pretrain.py", *sys.argv[1:]]),
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": args.model, "parameters": count_parameters(args.model, args.vocab_size).total,
            "vocab_size": args.vocab_size, "src_len": args.src_len, "tgt_len": args.tgt_len,
            "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
            "steps": args.steps, "repeats": args.repeats, "device": "cpu", **cpu_record(),
            "cores": len(os.sched_getaffinity(0)),
            "peak_tflops_fp32_2threads": peak_2, "peak_tflops_fp32_1thread": peak_1,
            "peak_tflops_bf16_2threads": peaks["bf16"], "precision_auto_picks": auto,
            "load_avg_start": load_start, "load_avg_end": load_average(),
            "results": results, "failures": failures,
            "note": "shared machine: other jobs compete for the cores; see load_avg_* (1/5/15 min) and each row's "
                    "load_avg_before/after; with --repeats the best run is kept and all are listed",
        }
        atomic_write_json(out, report)
        if not args.tune:  # a copy where `launch --nproc-per-node auto` looks for this machine's table
            remember_layout_table(report, out.name)
        return report

    for rep in range(args.repeats):
        for mode, precision, variant in runs:
            print(f"running {mode} {precision} {variant} ({rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            try:
                r = run_mode(mode, precision, args, tmp, variant)
            except RuntimeError as e:  # one crashed run (a rank killed by the OOM killer) must not lose the rest
                print(f"  failed: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
                failures.append({"mode": mode, "precision": precision, "variant": variant, "repeat": rep + 1,
                                 "error": str(e)[-1500:]})
                continue
            key = (mode, precision, variant)
            r["repeats"] = [*measured.get(key, {}).get("repeats", []), round(r["tokens_per_s"], 1)]
            if key not in measured or r["tokens_per_s"] > measured[key]["tokens_per_s"]:
                measured[key] = r
            else:
                measured[key]["repeats"] = r["repeats"]
            write_report()
    tmp.unlink(missing_ok=True)
    report = write_report()
    results = report["results"]
    print(f"\n{report['cpu']} ({', '.join(report['cpu_flags']) or 'no AVX2'}), {report['cores']} cores; {args.model} "
          f"({report['parameters'] / 1e6:.1f} M params), batch {args.global_batch_size} x ({args.src_len}+{args.tgt_len}) "
          f"tokens; peak matmul fp32 {peak_2 * 1e3:.1f} GFLOP/s (2 threads), {peak_1 * 1e3:.1f} (1 thread), "
          f"bf16 {peaks['bf16'] * 1e3:.1f} (2 threads); precision=auto picks {auto}; load average "
          f"{load_start[0]:.1f} at start")
    print_table(results)
    for r in results:
        if r.get("gradient_allreduce_s"):
            print(f"{r['mode']} {r['precision']} {r['variant']}: one fp32 gradient all-reduce over gloo takes "
                  f"{r['gradient_allreduce_s']:.3f} s ({r['gradient_allreduce_s'] / r['step_seconds']:.1%} of a step)")
    for f in report["failures"]:
        print(f"failed: {f['mode']} {f['precision']} {f['variant']} (repeat {f['repeat']}); see 'failures' in the JSON")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
