"""Big-teacher placements (core/bigmodel.py): memory held, forward time and logit agreement.

For one teacher directory, on CPU, the frozen teacher's forward on the same batches when it is

- `plain`: loaded whole (the reference);
- `offload_<f>`: placed by accelerate's device map with the CPU allowed `f` of the fp32 weights,
  the rest offloaded to the disk (read back at each forward);
- `zero3_<n>`: sharded over n real ranks (gloo) by a ZeRO-3 engine without optimizer.

Columns: weights resident in the process (the ZeRO-3 partition of a rank), load seconds, forward
milliseconds per batch (median of --repeats after one warm-up), and the largest |logit - plain logit|.

    .venv/bin/python -m benchmarks.bigteacher --teacher RUN/teacher-ft
    .venv/bin/python -m benchmarks.bigteacher --preset small --tokenizer RUN/tokenizer   # a random teacher

Prints a table, writes benchmarks/results/bigteacher.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)


def batches(num: int, batch: int, src_len: int, tgt_len: int, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, vocab, (batch, src_len), generator=g),
             "attention_mask": torch.ones(batch, src_len, dtype=torch.long),
             "decoder_input_ids": torch.randint(3, vocab, (batch, tgt_len), generator=g)} for _ in range(num)]


def time_forward(model, data: list[dict], repeats: int) -> tuple[float, list]:
    """(median ms per batch, logits of each batch)."""
    import torch

    with torch.inference_mode():
        logits = [model(**b).logits for b in data]  # warm-up, and the values compared
        times = []
        for _ in range(repeats):
            for b in data:
                start = time.perf_counter()
                model(**b)
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), logits


def resident_bytes(model) -> int:
    """Bytes of the weights this process holds: its ZeRO-3 partitions, or every parameter not on the disk."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or p.device.type == "meta":
            continue
        seen.add(id(p))
        total += (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size()
    return total


ZERO3_WORKER = r"""
import json, sys, time, torch
from benchmarks.bigteacher import batches, resident_bytes, time_forward
from core.bigmodel import shard_zero3
from core.distributed import init_distributed
teacher, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
info = init_distributed(1)
start = time.perf_counter()
model = shard_zero3(teacher, "teacher", torch.float32, info)
load_s = time.perf_counter() - start
ms, logits = time_forward(model, batches(**settings["batches"]), settings["repeats"])
torch.save([x.clone() for x in logits], f"{out}/logits{info.rank}.pt")
json.dump({"load_s": load_s, "forward_ms": ms, "resident_bytes": resident_bytes(model)},
          open(f"{out}/rank{info.rank}.json", "w"))
"""


def run_zero3(teacher: Path, ranks: int, settings: dict, reference: list) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
        s.close()
        procs = []
        for rank in range(ranks):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                       LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            procs.append(subprocess.Popen([sys.executable, "-c", ZERO3_WORKER, str(teacher), out, json.dumps(settings)],
                                          env=env, stderr=subprocess.PIPE, text=True, cwd=REPO))
        for proc in procs:
            _, err = proc.communicate(timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"ZeRO-3 rank failed:\n{err[-3000:]}")
        ranks_out = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ranks)]
        logits = torch.load(Path(out) / "logits0.pt", weights_only=True)
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, reference))
    return {"resident_bytes": max(r["resident_bytes"] for r in ranks_out), "load_s": max(r["load_s"] for r in ranks_out),
            "forward_ms": max(r["forward_ms"] for r in ranks_out), "max_abs_logit_diff": diff,
            "note": f"per rank, {ranks} ranks x {os.environ['OMP_NUM_THREADS']} thread(s)"}


def random_teacher(preset: str, tokenizer_dir: Path, work: Path) -> Path:
    from core.fsutil import atomic_dir
    from core.models import ModelConfig, build_model
    from data_prep.tokenizer import load_tokenizer

    out = work / f"teacher-{preset}"
    if not out.is_dir():
        tokenizer = load_tokenizer(tokenizer_dir)
        model = build_model(ModelConfig(preset=preset), tokenizer, seed=0)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="teacher model directory (else a random --preset teacher)")
    p.add_argument("--preset", default="small", help="preset of the random teacher (without --teacher)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory of the random teacher")
    p.add_argument("--work", default=str(RESULTS / "bigteacher-models"), help="where the random teacher is saved")
    p.add_argument("--cpu-fractions", type=float, nargs="+", default=[0.5, 0.25],
                   help="max_memory of the CPU as fractions of the fp32 weights (the rest goes to the disk)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="ZeRO-3 world sizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=64)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "bigteacher.json"), help="JSON output path")
    args = p.parse_args()

    import torch

    from core.bigmodel import ModelLoadConfig, empty_model, infer_device_map, load_model
    from core.fsutil import atomic_write_json
    from core.tables import markdown_table

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.teacher:
        teacher = Path(args.teacher)
    elif args.tokenizer:
        teacher = random_teacher(args.preset, Path(args.tokenizer), Path(args.work))
    else:
        p.error("give --teacher DIR, or --tokenizer DIR for a random --preset teacher")
    started = time.time()
    empty_model(teacher)  # imports and file cache warm, so load times compare placements only
    start = time.perf_counter()
    plain = load_model(teacher)
    load_s = time.perf_counter() - start
    weights = resident_bytes(plain)
    settings = {"batches": {"num": args.num_batches, "batch": args.batch, "src_len": args.src_len,
                            "tgt_len": args.tgt_len, "vocab": min(plain.config.vocab_size, 2000)},
                "repeats": args.repeats}
    data = batches(**settings["batches"])
    ms, reference = time_forward(plain, data, args.repeats)
    results = {"plain": {"resident_bytes": weights, "load_s": load_s, "forward_ms": ms, "max_abs_logit_diff": 0.0,
                         "note": "whole model in memory"}}
    del plain
    for fraction in args.cpu_fractions:
        memory = {"cpu": int(weights * fraction)}
        with tempfile.TemporaryDirectory() as folder:
            load = ModelLoadConfig(device_map="auto", max_memory=memory, offload_folder=folder)
            device_map = infer_device_map(teacher, memory, torch.float32)
            start = time.perf_counter()
            model = load_model(teacher, load=load)
            load_s = time.perf_counter() - start
            ms, logits = time_forward(model, data, args.repeats)
        on_disk = sum(1 for where in device_map.values() if where == "disk")
        results[f"offload_{fraction:g}"] = {
            "resident_bytes": resident_bytes(model), "load_s": load_s, "forward_ms": ms,
            "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(logits, reference)),
            "note": f"max_memory cpu={memory['cpu']:,} B; {on_disk} of {len(device_map)} map entries on disk",
        }
        del model
    for ranks in args.ranks:
        results[f"zero3_{ranks}"] = run_zero3(teacher, ranks, settings, reference)

    rows = [[name, f"{r['resident_bytes'] / 2**20:.1f}", f"{r['resident_bytes'] / weights:.0%}", f"{r['load_s']:.2f}",
             f"{r['forward_ms']:.1f}", f"{r['max_abs_logit_diff']:.1e}", r["note"]] for name, r in results.items()]
    print(f"\nteacher {teacher} ({weights / 2**20:.1f} MiB fp32 weights); batch {args.batch} x {args.src_len} source x "
          f"{args.tgt_len} target tokens, {os.environ['OMP_NUM_THREADS']} thread(s) per process\n")
    print(markdown_table(["placement", "weights held MiB", "of plain", "load s", "forward ms", "max abs logit diff", "note"],
                         rows))
    atomic_write_json(args.out, {"teacher": str(teacher), "weights_bytes": weights, "settings": settings,
                                 "threads": int(os.environ["OMP_NUM_THREADS"]), "seconds": time.time() - started,
                                 "results": results})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
