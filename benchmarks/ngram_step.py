"""The hashed n-gram table of the encoder NLU student (student.nlu.TokenNgrams): the cost of one
training step of the table alone, with a dense gradient and transformers' Adafactor against a sparse
gradient and core.optim.RowSparseAdafactor (the update the NLU fine-tuning now uses), on one thread.

Each step: the table's forward on a MASSIVE-shaped batch (32 utterances of 20 tokens, orders 2-4),
a loss, backward, optimizer step. Milliseconds per step are the median of --repeats blocks of
--steps steps; "max |diff|" is the largest difference between the two tables after the same steps
(the sparse update is the dense one; it differs by float rounding only).

    .venv/bin/python -m benchmarks.ngram_step
    .venv/bin/python -m benchmarks.ngram_step --buckets 16384 65536 --batch 64

Prints a table, writes benchmarks/results/ngram_step.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from benchmarks.common import RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)


def run(buckets: int, batch: int, length: int, hidden: int, steps: int, repeats: int) -> dict:
    import torch
    from transformers.optimization import Adafactor

    from core.optim import RowSparseAdafactor
    from student.nlu import TokenNgrams

    torch.manual_seed(0)
    dense = TokenNgrams(buckets, [2, 3, 4], hidden)
    sparse = copy.deepcopy(dense)
    sparse.embed.sparse = True
    options = dict(lr=0.05, scale_parameter=True, relative_step=False, warmup_init=False, clip_threshold=1.0, beta1=None)
    optimizers = {
        "dense": (dense, Adafactor([{"params": list(dense.parameters()), "weight_decay": 0.01}], **options)),
        "sparse": (sparse, RowSparseAdafactor([{"params": list(sparse.parameters()), "weight_decay": 0.01}], **options)),
    }
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(5, 4000, (batch, length), generator=generator) for _ in range(steps)]
    mask = torch.ones(batch, length)
    touched = []
    for ids in data:
        rows = torch.cat([dense.buckets(ids, order).flatten() for order in dense.orders])
        touched.append(rows.unique().numel())
    row = {"buckets": buckets, "hidden": hidden, "batch": batch, "tokens": length,
           "rows_touched_per_step": statistics.mean(touched)}
    for name, (module, optimizer) in optimizers.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for ids in data:
                optimizer.zero_grad(set_to_none=True)
                features, count = module(ids, mask)
                (features.sum(dim=1) / count).pow(2).mean().backward()
                optimizer.step()
            times.append((time.perf_counter() - start) / steps * 1e3)
        row[f"{name}_ms"] = statistics.median(times)
    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
    row["max_abs_diff"] = (dense.embed.weight - sparse.embed.weight).abs().max().item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", type=int, nargs="+", default=[32768], help="table rows (the presets: 32768)")
    parser.add_argument("--batch", type=int, default=32, help="utterances per step (the presets' global batch)")
    parser.add_argument("--length", type=int, default=20, help="tokens per utterance")
    parser.add_argument("--hidden", type=int, default=128, help="table width (the tiny NLU student's d_model)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per optimizer (the median is reported)")
    args = parser.parse_args()

    import torch
    from tabulate import tabulate

    torch.set_num_threads(1)
    rows = [run(b, args.batch, args.length, args.hidden, args.steps, args.repeats) for b in args.buckets]
    print(tabulate([[r["buckets"], f"{r['rows_touched_per_step']:.0f}", f"{r['dense_ms']:.2f}", f"{r['sparse_ms']:.2f}",
                     f"{r['speedup']:.1f}x", f"{r['max_abs_diff']:.1e}"] for r in rows],
                   headers=["buckets", "rows touched", "dense ms/step", "sparse ms/step", "speed-up", "max |diff|"],
                   tablefmt="github"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "ngram_step.json"
    out.write_text(json.dumps({"threads": 1, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
