"""Fine-tuning and distillation throughput: the training steps of the MASSIVE stages on 1 and 2 processes,
in fp32 and in bf16 autocast, on DeepSpeed as `polyteacher launch` runs them.

Tasks (each on MASSIVE-shaped batches: short utterances, short targets, as the presets fine-tune):

- finetune:  seq2seq fine-tuning of the teacher (`finetune --head seq2seq`): forward with labels,
             backward, AdamW step.
- nlu:       the encoder-only NLU student (`finetune --head encoder`, student.nlu.EncoderNLUModel):
             intent + slot heads, `nlu_loss`.
- distill:   task distillation (`distill --section taskdistill`): a frozen teacher forward under
             inference mode, then the half-depth student (distill.student_init.build_student) trained on
             `distill.losses.kd_loss` against the teacher's softened distribution.

Every (task, layout, precision) runs in fresh processes (layouts 1 x 2 and 2 x 1 threads on two
cores, plain data parallel, ZeRO-0 as the presets use for these stages) and reports tokens/s
(source + target tokens of the trained model), optimizer steps/s, achieved TFLOP/s and MFU against
the matmul peak of its precision. Model FLOPs: training = 3 x forward of the trained model
(core.models.model_flops_per_example); distillation adds the teacher's forward (1/3 of its
training FLOPs). The record names the CPU, its AMX / AVX-512 / AVX2 flags, both peaks, which
precision `train.precision=auto` picks, and the load average (the machine may be shared).

    .venv/bin/python -m benchmarks.finetune                                  # small teacher, every task
    .venv/bin/python -m benchmarks.finetune --model tiny --tasks distill --layouts 2x1 --precisions bf16

Writes benchmarks/results/finetune_<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.pretrain import cpu_record, load_average, measure_peak, parse_list, run_worker

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


TASKS = ("finetune", "nlu", "distill")
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}
NUM_INTENTS, NUM_SLOT_LABELS = 60, 56  # MASSIVE's label inventory


def flops_per_example(task: str, teacher_spec, student_spec, vocab: int, src: int, tgt: int) -> float:
    """Model FLOPs of one training example (see the module doc)."""
    from core.models import ModelSpec, model_flops_per_example

    if task == "finetune":
        return model_flops_per_example(teacher_spec, vocab, src, tgt)
    if task == "nlu":  # encoder only: no decoder layers, no output layer (the heads are negligible)
        import dataclasses

        encoder = dataclasses.replace(teacher_spec, num_decoder_layers=0)
        assert isinstance(encoder, ModelSpec)
        return model_flops_per_example(encoder, vocab, src, 0)
    return model_flops_per_example(student_spec, vocab, src, tgt) + model_flops_per_example(teacher_spec, vocab, src, tgt) / 3


def make_batches(task: str, num: int, micro: int, src: int, tgt: int, vocab: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(3, vocab, (micro, src), generator=g)
        mask = torch.ones(micro, src, dtype=torch.long)
        if task == "nlu":
            words = src // 2  # about two sub-words per word
            out.append({"input_ids": ids, "attention_mask": mask,
                        "word_starts": torch.arange(0, 2 * words, 2).repeat(micro, 1),
                        "intent_labels": torch.randint(0, NUM_INTENTS, (micro,), generator=g),
                        "slot_labels": torch.randint(0, NUM_SLOT_LABELS, (micro, words), generator=g)})
        else:
            out.append({"input_ids": ids, "attention_mask": mask,
                        "labels": torch.randint(3, vocab, (micro, tgt), generator=g)})
    return out


def worker(args: argparse.Namespace) -> None:
    """One process of one (task, layout, precision): warmup + measured steps; rank 0 writes the result."""
    import torch

    from core.config import merge, parse_overrides
    from core.distributed import barrier, build_engine, init_distributed
    from core.models import ModelConfig, ModelSpec, build_model
    from core.train_config import TrainConfig

    nproc, threads = LAYOUTS[args.layout]
    dist = init_distributed(num_threads=threads)
    cfg = merge(TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                            max_steps=10**6, warmup_steps=0, lr=1e-4, zero_stage=0, precision=args.precision),
                parse_overrides(json.loads(args.train_json)))
    cfg.validate()
    teacher = build_model(ModelConfig(preset=args.model), args.vocab_size, seed=0)
    teacher_spec = ModelSpec.from_t5_config(teacher.config, "teacher")
    student_spec = None
    frozen = None
    if args.task == "finetune":
        model = teacher
    elif args.task == "nlu":
        from student.nlu import OTHER, EncoderNLUModel, NLULabels

        labels = NLULabels(intents=[f"intent_{i}" for i in range(NUM_INTENTS)],
                           slot_labels=[OTHER, *(f"slot_{i}" for i in range(NUM_SLOT_LABELS - 1))])
        model = EncoderNLUModel.from_seq2seq(teacher, labels)
    else:
        from distill.student_init import StudentConfig, build_student

        model, _ = build_student(teacher, StudentConfig(), seed=0)
        student_spec = ModelSpec.from_t5_config(model.config, "student")
        frozen = teacher.eval().requires_grad_(False)
    engine = build_engine(model, cfg, dist)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def loss_of(batch: dict) -> torch.Tensor:
        if args.task == "finetune":
            return engine(**batch).loss
        if args.task == "nlu":
            from student.nlu import nlu_loss

            intent_logits, slot_logits = engine(batch["input_ids"], batch["attention_mask"])
            return nlu_loss(intent_logits, slot_logits, batch["word_starts"], batch["intent_labels"],
                            batch["slot_labels"])[0]
        from distill.losses import kd_loss, teacher_probs

        decoder_input_ids = frozen._shift_right(batch["labels"])
        with torch.inference_mode(), autocast:  # the teacher runs in the run's precision, as distill does
            t_logits = frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=decoder_input_ids).logits
        probs = teacher_probs(t_logits.clone())
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_input_ids)
        return kd_loss(out.logits, batch["labels"], teacher_probs_T=probs, alpha=0.5).total

    accum = cfg.grad_accum_steps(dist.world_size)
    batches = make_batches(args.task, accum, cfg.micro_batch_size, args.src_len, args.tgt_len, args.vocab_size,
                           seed=dist.rank)

    def step() -> None:
        for batch in batches:
            engine.backward(loss_of(batch))
            engine.step()

    for _ in range(args.warmup_steps):
        step()
    barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    barrier()
    elapsed = time.perf_counter() - start
    if dist.rank == 0:
        tgt = 0 if args.task == "nlu" else args.tgt_len
        examples = args.steps * args.global_batch_size
        flops = examples * flops_per_example(args.task, teacher_spec, student_spec, args.vocab_size, args.src_len, tgt)
        trained = sum(p.numel() for p in model.parameters())
        Path(args.result).write_text(json.dumps({
            "task": args.task, "layout": args.layout, "precision": args.precision, "processes": dist.world_size,
            "threads_per_process": torch.get_num_threads(), "trained_parameters": trained,
            "steps": args.steps, "seconds": elapsed, "step_seconds": elapsed / args.steps,
            "steps_per_s": args.steps / elapsed, "tokens_per_s": examples * (args.src_len + tgt) / elapsed,
            "tflops": flops / elapsed / 1e12, "train_overrides": json.loads(args.train_json),
        }))
    barrier()
    if dist.world_size > 1:
        import torch.distributed as torch_dist

        # Without it gloo's threads can abort the exit ("terminate called without an active exception").
        torch_dist.destroy_process_group()


def run_one(task: str, layout: str, precision: str, args: argparse.Namespace, result: Path) -> dict:
    nproc, threads = LAYOUTS[layout]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    worker_args = ["benchmarks.finetune", "--worker", "--task", task, "--layout", layout, "--precision", precision,
                   "--result", str(result), "--model", args.model, "--vocab-size", str(args.vocab_size),
                   "--src-len", str(args.src_len), "--tgt-len", str(args.tgt_len),
                   "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
                   "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                   "--train-json", json.dumps(args.train)]
    return run_worker(worker_args, nproc, env, result, f"{task} {layout} {precision}")


def print_table(results: list[dict]) -> None:
    from tabulate import tabulate

    rows = [[r["task"], r["precision"], f"{r['processes']} x {r['threads_per_process']}", f"{r['tokens_per_s']:,.0f}",
             f"{r['steps_per_s']:.2f}", f"{r['tflops'] * 1e3:.1f}", f"{r['mfu']:.1%}", f"{r['ratio_to_best']:.2f}",
             f"{r['load_avg_before']:.1f}/{r['load_avg_after']:.1f}"] for r in results]
    print(tabulate(rows, headers=["mode", "precision", "procs x thr", "tokens/s", "steps/s", "GFLOP/s", "MFU",
                                  "vs task's best", "load"], tablefmt="github"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="teacher size preset (tiny, small); the student is its half_depth")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {', '.join(LAYOUTS)} "
                   "(processes x threads)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32, bf16 (autocast)")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer size (padded to a multiple of 128)")
    p.add_argument("--src-len", type=int, default=32, help="utterance tokens per example (MASSIVE: ~10-30)")
    p.add_argument("--tgt-len", type=int, default=32, help="target tokens per example (intent + slot labels)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="examples per process per forward (presets: 16)")
    p.add_argument("--global-batch-size", type=int, default=32, help="examples per optimizer step (presets: 32)")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="train.* setting for every run (repeatable), e.g. --train adamw_impl=for-loop")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/finetune_<model>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", default=None, help=argparse.SUPPRESS)
    p.add_argument("--layout", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-json", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    tasks = parse_list(args.tasks, TASKS, "--tasks")
    layouts = parse_list(args.layouts, LAYOUTS, "--layouts")
    precisions = parse_list(args.precisions, ("fp32", "bf16"), "--precisions")
    out = Path(args.out or HERE / "results" / f"finetune_{args.model}.json")

    import torch

    from core.distributed import BF16_MIN_SPEEDUP, cpu_bf16_speedup
    from core.fsutil import atomic_write_json

    load_start = load_average()
    peaks = {"fp32": measure_peak(2), "bf16": measure_peak(2, "bfloat16")}
    torch.set_num_threads(1)
    auto = "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"
    tmp = out.with_suffix(".part.json")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for task in tasks:
        for precision in precisions:
            for layout in layouts:
                print(f"running {task} {layout} {precision} ...", file=sys.stderr, flush=True)
                results.append(run_one(task, layout, precision, args, tmp))
    tmp.unlink(missing_ok=True)
    for r in results:
        r["mfu"] = r["tflops"] / peaks[r["precision"]]
        r["ratio_to_best"] = r["tokens_per_s"] / max(x["tokens_per_s"] for x in results if x["task"] == r["task"])
    report = {
        "benchmark": "finetune",
        "command": " ".join(["benchmarks/finetune.py", *sys.argv[1:]]),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "vocab_size": args.vocab_size, "src_len": args.src_len, "tgt_len": args.tgt_len,
        "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size, "steps": args.steps,
        "device": "cpu", **cpu_record(), "cores": len(os.sched_getaffinity(0)),
        "peak_tflops_fp32_2threads": peaks["fp32"], "peak_tflops_bf16_2threads": peaks["bf16"],
        "precision_auto_picks": auto, "load_avg_start": load_start, "load_avg_end": load_average(),
        "results": results,
        "note": "shared machine: other jobs compete for the cores; see load_avg_* (1/5/15 min) and each row's "
                "load_avg_before/after",
    }
    atomic_write_json(out, report)
    print(f"\n{report['cpu']} ({', '.join(report['cpu_flags']) or 'no AVX2'}), {report['cores']} cores; {args.model} "
          f"teacher, batch {args.global_batch_size} x ({args.src_len}+{args.tgt_len}) tokens; peak matmul fp32 "
          f"{peaks['fp32'] * 1e3:.1f} GFLOP/s, bf16 {peaks['bf16'] * 1e3:.1f} (2 threads); precision=auto picks "
          f"{auto}; load average {load_start[0]:.1f} at start")
    print_table(results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
