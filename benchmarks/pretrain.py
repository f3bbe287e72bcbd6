"""Pretraining throughput: a plain PyTorch loop against DeepSpeed on 1 and 2 processes (ZeRO 0/1/2/3),
in fp32 and in bf16 autocast (fp32 weights and optimizer, what precision=bf16 does on CPU).

Every mode trains the same teacher preset on the same token shapes (global batch of
global_batch_size sequences, src_len encoder + tgt_len decoder tokens each, CPU) and reports
tokens/s, achieved TFLOP/s (model FLOPs, teacher.presets.model_flops_per_example) and MFU against
the matmul peak of its precision measured here with 2 threads, plus each mode's ratio to the plain
fp32 loop. The record names the CPU, its AMX / AVX-512 / AVX2 flags and both peaks, and which
precision `train.precision=auto` picks on it.

    .venv/bin/python benchmarks/pretrain.py                      # small preset, all modes, both precisions
    .venv/bin/python benchmarks/pretrain.py --model tiny --steps 10 --modes plain,ds2-zero0 --precisions bf16

Writes benchmarks/results/pretrain.json and prints a table. Numbers on a shared machine are noisy:
the table records the load average before and after each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

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

    from teacher.presets import ModelConfig, build_model, model_flops_per_example

    nproc, threads, zero_stage = MODES[args.mode]
    bf16 = args.precision == "bf16"
    model_cfg = ModelConfig(preset=args.model)
    model = build_model(model_cfg, args.vocab_size, seed=0)
    rank, world = 0, 1
    if zero_stage is None:
        torch.set_num_threads(threads)
        micro = args.micro_batch_size
        accum = args.global_batch_size // micro
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

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
        from launch.distributed import barrier, build_engine, init_distributed
        from launch.training import TrainConfig

        dist = init_distributed(num_threads=threads)
        rank, world = dist.rank, dist.world_size
        cfg = TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                          max_steps=10**6, warmup_steps=0, lr=1e-4, zero_stage=zero_stage, precision=args.precision)
        micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps(world)
        engine = build_engine(model, cfg, dist)

        def step(batches: list[dict]) -> None:
            for batch in batches:
                engine.backward(engine(**batch).loss)
                engine.step()

        sync = barrier
    batches = make_batches(accum, micro, args.src_len, args.tgt_len, args.vocab_size, seed=rank)
    for _ in range(args.warmup_steps):
        step(batches)
    sync()
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
    if rank == 0:
        examples = args.steps * args.global_batch_size
        flops = examples * model_flops_per_example(model_cfg, args.vocab_size, args.src_len, args.tgt_len)
        result = {
            "mode": args.mode, "precision": args.precision, "processes": world, "threads_per_process": torch.get_num_threads(),
            "zero_stage": zero_stage, "steps": args.steps, "seconds": elapsed,
            "step_seconds": elapsed / args.steps,
            "tokens_per_s": examples * (args.src_len + args.tgt_len) / elapsed,
            "tflops": flops / elapsed / 1e12,
            "gradient_allreduce_s": allreduce_s,
        }
        Path(args.result).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_mode(mode: str, precision: str, args: argparse.Namespace, result: Path) -> dict:
    nproc, threads, zero_stage = MODES[mode]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    worker_args = [str(HERE / "pretrain.py"), "--worker", "--mode", mode, "--result", str(result),
                   "--model", args.model, "--vocab-size", str(args.vocab_size), "--src-len", str(args.src_len),
                   "--tgt-len", str(args.tgt_len), "--micro-batch-size", str(args.micro_batch_size),
                   "--global-batch-size", str(args.global_batch_size), "--steps", str(args.steps),
                   "--warmup-steps", str(args.warmup_steps), "--precision", precision]
    if nproc == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--no_local_rank", *worker_args]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"mode {mode}/{precision} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["load_avg_before"], out["load_avg_after"] = load_before, os.getloadavg()[0]
    return out


def measure_peak(threads: int, dtype: str = "float32") -> float:
    import torch

    from launch.training import measure_peak_tflops

    torch.set_num_threads(threads)
    return max(measure_peak_tflops(threads, size=1024, seconds=1.0, dtype=dtype) for _ in range(3))


def cpu_record() -> dict:
    """The CPU model and the instruction-set flags that decide its fp32 and bf16 speed."""
    from launch.distributed import cpu_info

    model, flags = cpu_info()
    return {"cpu": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


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
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32, bf16 (autocast)")
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "pretrain.json"), help="result JSON path")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; allowed: {', '.join(MODES)}")

    from launch.fsutil import atomic_write_json
    from teacher.presets import count_parameters

    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if not precisions or any(x not in ("fp32", "bf16") for x in precisions):
        raise SystemExit(f"--precisions {args.precisions!r}: allowed values fp32, bf16")
    from launch.distributed import BF16_MIN_SPEEDUP, cpu_bf16_speedup

    peak_2 = measure_peak(2)
    peak_1 = measure_peak(1)
    peaks = {"fp32": peak_2, "bf16": measure_peak(2, "bfloat16")}
    import torch

    torch.set_num_threads(1)  # what each training process of the 2 x 1 layout sees
    auto = "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"
    results = []
    tmp = Path(args.out).with_suffix(".part.json")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    for precision in precisions:
        for mode in modes:
            print(f"running {mode} {precision} ...", file=sys.stderr, flush=True)
            results.append(run_mode(mode, precision, args, tmp))
    tmp.unlink(missing_ok=True)
    plain = next((r for r in results if r["mode"] == "plain" and r["precision"] == "fp32"), None)
    for r in results:
        r["mfu"] = r["tflops"] / peaks[r["precision"]]
        r["ratio_to_plain"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain else None
    report = {
        "benchmark": "pretrain",
        "model": args.model, "parameters": count_parameters(args.model, args.vocab_size).total,
        "vocab_size": args.vocab_size, "src_len": args.src_len, "tgt_len": args.tgt_len,
        "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
        "steps": args.steps, "device": "cpu", **cpu_record(), "cores": len(os.sched_getaffinity(0)),
        "peak_tflops_fp32_2threads": peak_2, "peak_tflops_fp32_1thread": peak_1,
        "peak_tflops_bf16_2threads": peaks["bf16"], "precision_auto_picks": auto,
        "results": results,
        "note": "shared machine: other jobs compete for the cores; see load_avg_before/after per mode",
    }
    atomic_write_json(args.out, report)
    print(f"\n{report['cpu']} ({', '.join(report['cpu_flags']) or 'no AVX2'}); {args.model} "
          f"({report['parameters'] / 1e6:.1f} M params), batch {args.global_batch_size} x ({args.src_len}+{args.tgt_len}) "
          f"tokens; peak matmul fp32 {peak_2 * 1e3:.1f} GFLOP/s (2 threads), {peak_1 * 1e3:.1f} (1 thread), "
          f"bf16 {peaks['bf16'] * 1e3:.1f} (2 threads); precision=auto picks {auto}")
    print(f"{'mode':<15}{'prec':>5}{'procs x thr':>12}{'tokens/s':>11}{'GFLOP/s':>9}{'MFU':>7}{'vs plain':>9}{'s/step':>8}{'load':>11}")
    for r in results:
        ratio = f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] is not None else "-"
        print(f"{r['mode']:<15}{r['precision']:>5}{r['processes']:>6} x {r['threads_per_process']:<3}{r['tokens_per_s']:>11.0f}"
              f"{r['tflops'] * 1e3:>9.2f}{r['mfu']:>7.1%}{ratio:>9}{r['step_seconds']:>8.2f}"
              f"{r['load_avg_before']:>5.1f}/{r['load_avg_after']:<5.1f}")
    for r in results:
        if r.get("gradient_allreduce_s"):
            print(f"{r['mode']} {r['precision']}: one fp32 gradient all-reduce over gloo takes {r['gradient_allreduce_s']:.3f} s "
                  f"({r['gradient_allreduce_s'] / r['step_seconds']:.1%} of a step)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
