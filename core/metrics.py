"""Metrics: metrics.jsonl + TensorBoard, the loss window between log lines, progress and peak FLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

from core.checkpoint import TrainState
from core.distributed import (
    DistInfo,
    all_reduce_mean,
    is_rank0,
)
from core.fsutil import append_jsonl
from core.train_config import TrainConfig

# ----------------------------------------------------------------------------- metrics, NaN guard


class MetricsLogger:
    """Appends `{"stage", "name", "step", ...metrics}` lines to run_dir/metrics.jsonl and TensorBoard
    scalars to run_dir/tb/<name>/; does nothing on ranks other than 0. `name` (the output directory,
    e.g. teacher vs teacher-indomain, both stage "pretrain") tells apart two runs of one stage."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, name: str | None = None,
                 tensorboard: bool = True) -> None:
        self.stage = stage
        self.name = name
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = is_rank0()
        self._writer = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb" / (name or stage)))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        named = {"name": self.name} if self.name else {}
        record = {"stage": self.stage, **named, "step": int(step), "time": round(time.time(), 3), **metrics}
        append_jsonl(self.path, record)
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(f"{self.stage}/{key}", value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclasses.dataclass
class LossWindow:
    """Running sums since the last log line, this rank's: the training loss, its named parts, tokens
    and time inside train steps. `core.loop.train_step` adds one step at a time; a stage's maybe_log
    reduces over ranks what it logs and then calls `reset`."""

    loss: float = 0.0
    count: int = 0
    """Optimizer steps added."""
    micro_steps: int = 0
    """Micro-batches behind those steps (what per-micro-batch parts are divided by)."""
    parts: dict[str, float] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    tokens_at_start: int = 0
    local_tokens: int = 0
    """Non-pad tokens this rank processed."""
    train_seconds: float = 0.0
    """Time inside train steps only: throughput without evaluation and checkpointing."""
    last_loss: float = math.nan
    """The latest step's loss (kept across resets)."""

    def add(self, loss: float, parts: dict[str, float], micro_steps: int = 1, local_tokens: int = 0,
            seconds: float = 0.0) -> None:
        self.loss += loss
        self.count += 1
        self.micro_steps += micro_steps
        for key, value in parts.items():
            self.parts[key] = self.parts.get(key, 0.0) + value
        self.local_tokens += local_tokens
        self.train_seconds += seconds
        self.last_loss = loss

    def throughput(self, state: TrainState, lr: float) -> dict[str, Any]:
        """Learning rate, tokens and steps per second since the last reset, and `state.progress()`."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "lr": lr,
            "tokens_per_s": (state.tokens_seen - self.tokens_at_start) / elapsed,
            "steps_per_s": self.count / elapsed,
            **state.progress(),
        }

    def reset(self, tokens_seen: int) -> None:
        self.loss, self.count, self.micro_steps, self.parts = 0.0, 0, 0, {}
        self.local_tokens, self.train_seconds = 0, 0.0
        self.started = time.perf_counter()
        self.tokens_at_start = tokens_seen


def progress_bar(total: int, initial: int = 0, desc: str = "", enabled: bool | None = None) -> Any:
    """A tqdm bar on rank 0 (disabled elsewhere); steps as units."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                disable=not (is_rank0() if enabled is None else enabled))


def measure_peak_tflops(num_threads: int | None = None, size: int = 1024, seconds: float = 0.5,
                        dtype: str = "float32") -> float:
    """Best `dtype` (float32 or bfloat16) matmul throughput (TFLOP/s) of this process on CPU with
    `num_threads` torch threads."""
    import torch

    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
        b = torch.randn(size, size, generator=torch.Generator().manual_seed(1)).to(getattr(torch, dtype))
        torch.mm(a, b)  # warm-up: thread pool and caches
        best = 0.0
        deadline = time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            torch.mm(a, b)
            elapsed = time.perf_counter() - start
            best = max(best, 2 * size**3 / elapsed / 1e12)
            if time.perf_counter() > deadline:
                break
        return best
    finally:
        torch.set_num_threads(previous)


# Dense bf16 datasheet peaks (TFLOP/s) for devices MFU is commonly reported against.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def default_peak_tflops(train_cfg: TrainConfig, dist_info: DistInfo) -> float | None:
    """train.peak_tflops, else the measured CPU peak (agreed over ranks), else a known GPU's peak."""
    if train_cfg.peak_tflops > 0:
        return train_cfg.peak_tflops
    if not dist_info.on_gpu:
        return all_reduce_mean(measure_peak_tflops())
    import torch

    name = torch.cuda.get_device_name()
    for key, value in GPU_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
