"""`polyteacher plan`: parameter count, ZeRO memory per device and throughput for a cluster shape.

Memory is for model states only (parameters, gradients, optimizer states; mixed precision with
Adam); activations, temporary buffers and fragmentation come on top. Where DeepSpeed has an
estimator it is used as is:

- ZeRO-2: `deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`
  (per GPU 2 P + 18 P / N without offload, 2 P with the optimizer on the CPU);
- ZeRO-3: `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs` (zero_init,
  1.5 buffer factor): no offload, optimizer offload, optimizer + parameter offload.

The rest follows the ZeRO paper and DeepSpeed's documentation:

- ZeRO-1: per GPU 2 P (16-bit parameters) + 2 P (16-bit gradients) + 12 P / N (fp32 master
  weights, Adam momentum and variance, partitioned); with the optimizer offloaded the GPU keeps
  4 P and the CPU side is DeepSpeed's ZeRO-2 offload figure;
- ZeRO-3 on NVMe (ZeRO-Infinity, parameters and optimizer states on NVMe): the GPU holds the
  largest layer gathered (4 x its parameters, as DeepSpeed's estimator), each node's NVMe holds
  18 P / num_nodes, and its CPU the pinned staging buffers (4 x largest layer x GPUs per node x 1.5).

Teacher inference for distillation (`teacher_inference`): the frozen teacher is run forward only, so
it needs its 16-bit weights (2 P; GPU teachers are bf16/fp16) and no gradients or optimizer states, per
placement (`core.bigmodel.inference_memory_rows`): a replica on every rank; sharded over all GPUs by
ZeRO-3 (`distill.teacher_shard=zero3`: 2 P / N plus the layer being gathered and the one prefetched);
accelerate's device map over one node's GPUs (one process per node, `teacher_load.device_map=auto`);
or streamed from the CPU layer by layer. Activations come on top.

Throughput: the training FLOPs per text token come from `core.models.model_flops_per_example`
averaged over the objective mixture (`data_prep.objectives.expected_lengths`, default mixture) for
packed rows of `--seq-len` tokens; tokens/s = budget / time; GPUs = FLOPs/s / (peak x MFU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from core.bigmodel import inference_memory_rows
from core.config import ConfigError

GIB = 1024**3


def register(sub: argparse._SubParsersAction) -> None:
    from core.models import PRESETS

    p = sub.add_parser(
        "plan",
        help="parameter count, ZeRO memory per device and throughput for a preset and a cluster",
        description="Print a teacher preset's parameter count, the memory per device of its model states "
        "(parameters, gradients, Adam states; no activations) for ZeRO stages 1-3 with and without CPU/NVMe "
        "offload (DeepSpeed's own estimators where they exist), and the throughput needed for a token budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="teacher model preset")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (processes) per node")
    p.add_argument(
        "--vocab-size", type=int, default=None,
        help="tokenizer vocabulary (default: the preset's reference vocabulary; padded to a multiple of 128)",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="packed row length in tokens")
    p.add_argument("--token-budget", type=float, default=300e9, help="text tokens to train on")
    p.add_argument("--days", type=float, default=None, help="wall-clock days to reach the budget (optional)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense 16-bit TFLOP/s of one GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU, for the 'fits' column")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = make_plan(
        preset=args.preset, nodes=args.nodes, gpus_per_node=args.gpus_per_node, vocab_size=args.vocab_size,
        seq_len=args.seq_len, token_budget=args.token_budget, days=args.days, peak_tflops=args.peak_tflops,
        mfu=args.mfu, gpu_memory_gib=args.gpu_memory_gib,
    )
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def _deepspeed_estimators() -> tuple[Any, Any]:
    # DeepSpeed logs its accelerator choice on stdout at import: keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def memory_rows(total: int, largest_layer: int, nodes: int, gpus_per_node: int) -> list[dict[str, Any]]:
    """Model-state memory per GPU and per node (bytes) for each ZeRO stage and offload choice."""
    zero2, zero3 = _deepspeed_estimators()
    num_gpus = nodes * gpus_per_node
    buffer_factor = 1.5  # DeepSpeed's default additional_buffer_factor
    rows: list[dict[str, Any]] = []

    def add(stage: int, offload: str, gpu: float, cpu: float, nvme: float, source: str) -> None:
        rows.append({
            "zero_stage": stage, "offload": offload, "gpu_bytes": int(gpu), "cpu_bytes_per_node": int(cpu),
            "nvme_bytes_per_node": int(nvme), "source": source,
        })

    cpu_zero2 = {
        offload: zero2(total, gpus_per_node, nodes, cpu_offload=offload, additional_buffer_factor=buffer_factor)
        for offload in (False, True)
    }  # {cpu_offload: (cpu bytes per node, gpu bytes)}
    add(1, "none", 2 * total + 2 * total + 12 * total / num_gpus, cpu_zero2[False][0], 0, "ZeRO paper: 4P + 12P/N")
    add(1, "optimizer->cpu", 4 * total, cpu_zero2[True][0], 0, "4P; CPU as DeepSpeed ZeRO-2")
    for offload in (False, True):
        cpu, gpu = cpu_zero2[offload]
        add(2, "optimizer->cpu" if offload else "none", gpu, cpu, 0, "deepspeed estimator")
    for offload, offload_params, label in (
        (False, False, "none"), (True, False, "optimizer->cpu"), (True, True, "optimizer+params->cpu"),
    ):
        cpu, gpu, _ = zero3(
            total, largest_layer, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload_params,
            zero_init=True, additional_buffer_factor=buffer_factor,
        )
        add(3, label, gpu, cpu, 0, "deepspeed estimator")
    add(
        3, "optimizer+params->nvme", 4 * largest_layer, 4 * largest_layer * gpus_per_node * buffer_factor,
        18 * total / nodes, "ZeRO-Infinity: 18P/nodes on NVMe",
    )
    return rows


def flops_per_text_token(preset: str, vocab_size: int | None, seq_len: int) -> float:
    """Training FLOPs per packed text token under the default objective mixture."""
    from core.models import model_flops_per_example
    from data_prep.objectives import ObjectiveConfig, expected_lengths

    total = 0.0
    for probability, src_len, tgt_len in expected_lengths(ObjectiveConfig(), seq_len).values():
        total += probability * model_flops_per_example(preset, vocab_size, round(src_len), round(tgt_len))
    return total / seq_len


def make_plan(
    preset: str,
    nodes: int = 1,
    gpus_per_node: int = 8,
    vocab_size: int | None = None,
    seq_len: int = 1024,
    token_budget: float = 300e9,
    days: float | None = None,
    peak_tflops: float = 989.0,
    mfu: float = 0.4,
    gpu_memory_gib: float = 80.0,
) -> dict[str, Any]:
    """Everything `polyteacher plan` prints, as a JSON-ready dict."""
    from core.models import ModelConfig, count_parameters

    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("--seq-len", seq_len)):
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if not 0.0 < mfu <= 1.0:
        raise ConfigError(f"--mfu: must be in (0, 1], got {mfu}")
    if peak_tflops <= 0 or token_budget <= 0 or (days is not None and days <= 0):
        raise ConfigError("--peak-tflops, --token-budget and --days must be positive")
    spec = ModelConfig(preset=preset).resolve()
    count = count_parameters(spec, vocab_size)
    num_gpus = nodes * gpus_per_node
    per_token = flops_per_text_token(preset, vocab_size, seq_len)
    gpu_flops = peak_tflops * 1e12 * mfu
    cluster_tokens_per_s = num_gpus * gpu_flops / per_token
    throughput: dict[str, Any] = {
        "seq_len": seq_len,
        "token_budget": token_budget,
        "train_flops_per_token": per_token,
        "total_train_flops": per_token * token_budget,
        "peak_tflops_per_gpu": peak_tflops,
        "mfu": mfu,
        "cluster_tokens_per_s": cluster_tokens_per_s,
        "cluster_days_for_budget": token_budget / cluster_tokens_per_s / 86400,
    }
    if days is not None:
        needed_tokens_per_s = token_budget / (days * 86400)
        throughput.update({
            "days": days,
            "needed_tokens_per_s": needed_tokens_per_s,
            "needed_flops_per_s": needed_tokens_per_s * per_token,
            "needed_gpus": needed_tokens_per_s * per_token / gpu_flops,
        })
    memory = memory_rows(count.total, count.largest_layer, nodes, gpus_per_node)
    teacher_inference = inference_memory_rows(count.total, count.largest_layer, nodes, gpus_per_node)
    for row in memory + teacher_inference:
        row["fits_gpu"] = row["gpu_bytes"] <= gpu_memory_gib * GIB
    return {
        "preset": preset,
        "model": {
            "num_layers": spec.num_layers, "num_decoder_layers": spec.num_decoder_layers, "d_model": spec.d_model,
            "num_heads": spec.num_heads, "d_kv": spec.d_kv, "d_ff": spec.d_ff,
            "feed_forward_proj": spec.feed_forward_proj, "tie_word_embeddings": spec.tie_word_embeddings,
            "vocab_size": count.vocab_size,
        },
        "parameters": {
            "total": count.total,
            "embeddings": count.embeddings + count.lm_head,
            "input_embedding": count.embeddings,
            "lm_head": count.lm_head,
            "encoder": count.encoder,
            "decoder": count.decoder,
            "largest_layer": count.largest_layer,
        },
        "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node, "num_gpus": num_gpus,
                    "gpu_memory_gib": gpu_memory_gib},
        "memory": memory,
        "teacher_inference": teacher_inference,
        "throughput": throughput,
    }


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f}"


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n else "-"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_plan(plan: dict[str, Any]) -> str:
    m, p, c, t = plan["model"], plan["parameters"], plan["cluster"], plan["throughput"]
    out = [
        f"preset {plan['preset']}: {m['num_layers']} encoder + {m['num_decoder_layers']} decoder layers, "
        f"d_model {m['d_model']}, {m['num_heads']} heads x {m['d_kv']}, d_ff {m['d_ff']} ({m['feed_forward_proj']}), "
        f"vocab {m['vocab_size']:,}, {'tied' if m['tie_word_embeddings'] else 'untied'} embeddings",
        "",
        _table(
            ["parameters", "count", "exact"],
            [
                ["total", _count(p["total"]), f"{p['total']:,}"],
                ["embeddings (input + output)", _count(p["embeddings"]), f"{p['embeddings']:,}"],
                ["encoder", _count(p["encoder"]), f"{p['encoder']:,}"],
                ["decoder", _count(p["decoder"]), f"{p['decoder']:,}"],
                ["largest layer", _count(p["largest_layer"]), f"{p['largest_layer']:,}"],
            ],
        ),
        "",
        f"model-state memory (params + grads + Adam, mixed precision; activations not included) on "
        f"{c['nodes']} node(s) x {c['gpus_per_node']} GPUs = {c['num_gpus']} GPUs:",
        _table(
            ["ZeRO", "offload", "per GPU", f"fits {c['gpu_memory_gib']:g} GiB", "CPU per node", "NVMe per node",
             "source"],
            [
                [str(r["zero_stage"]), r["offload"], _gib(r["gpu_bytes"]), "yes" if r["fits_gpu"] else "no",
                 _gib(r["cpu_bytes_per_node"]), _gib(r["nvme_bytes_per_node"]), r["source"]]
                for r in plan["memory"]
            ],
        ),
        "CPU per node: DeepSpeed's figures. For ZeRO-1/2 they include a full fp32 copy of the model per\n"
        "process at start-up (x1.5; with offload max(4P x all GPUs, 16P) x 1.5); ZeRO-3 assumes zero_init.",
        "",
        "teacher inference memory per GPU for distillation (frozen teacher, bf16/fp16 weights only; activations "
        "not included):",
        _table(
            ["placement", "per GPU", f"fits {c['gpu_memory_gib']:g} GiB", "CPU per node", "how"],
            [
                [r["placement"], _gib(r["gpu_bytes"]), "yes" if r["fits_gpu"] else "no", _gib(r["cpu_bytes_per_node"]),
                 r["note"]]
                for r in plan["teacher_inference"]
            ],
        ),
        "",
        f"throughput (rows of {t['seq_len']} tokens, default objective mixture; "
        f"{t['train_flops_per_token'] / 1e9:,.1f} GFLOP per text token for training):",
    ]
    rows = [
        ["token budget", f"{t['token_budget']:.3g} tokens ({t['total_train_flops']:.3g} FLOP)"],
        ["this cluster", f"{t['cluster_tokens_per_s']:,.0f} tokens/s at {t['mfu']:.0%} MFU of "
                         f"{t['peak_tflops_per_gpu']:g} TFLOP/s -> {t['cluster_days_for_budget']:,.1f} days"],
    ]
    if "days" in t:
        rows += [
            [f"budget in {t['days']:g} days", f"{t['needed_tokens_per_s']:,.0f} tokens/s = "
                                             f"{t['needed_flops_per_s'] / 1e15:,.1f} PFLOP/s"],
            ["GPUs needed", f"{t['needed_gpus']:,.0f} at {t['mfu']:.0%} MFU"],
        ]
    out += [f"  {key}: {value}" for key, value in rows]
    return "\n".join(out)
