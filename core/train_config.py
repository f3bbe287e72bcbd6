"""The `train` section of every training stage's config, and the learning-rate schedule.

- `TrainConfig`: optimisation, batch, precision, ZeRO, checkpoint and logging settings.
- `lr_multiplier`: warmup + cosine/linear decay (what `build_engine` installs as a LambdaLR).

Read by the CLI at start-up: no heavy imports here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from core.config import ConfigError


@dataclasses.dataclass
class TrainConfig:
    micro_batch_size: int = 8
    """Examples per process per forward/backward pass."""
    global_batch_size: int = 16
    """Examples per optimizer step over all processes; a multiple of micro_batch_size * world size
    (the quotient is the number of gradient-accumulation micro-steps)."""
    max_steps: int = 100
    """Optimizer steps to train for."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (end of the decay)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup, down to lr * min_lr_ratio at max_steps."""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """adamw: torch AdamW (lr absolute, adam_* and weight_decay apply). adafactor: Adafactor as T5
    was trained (transformers' implementation, with sparse embedding gradients updated row-wise by
    core.optim.RowSparseAdafactor; update scaled by each matrix's RMS so lr is a
    relative step of about 1e-2, factored second moments, no first moment, update clipping 1.0).
    adafactor needs zero_stage 0: ZeRO 1-3 hand the optimizer flat partitions, which lose the
    per-matrix shapes that Adafactor factors and scales by."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norm scales)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.98
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states partitioned), 2 (+ gradients),
    3 (+ parameters)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision: auto = bf16 on GPUs that support it (else fp16); on CPU bf16 autocast where a
    measured bf16 matmul is at least 1.5x faster than fp32 (AMX, AVX512-BF16), else fp32. bf16 on CPU
    is torch autocast with fp32 weights and optimizer states; fp16 on CPU is refused."""
    offload: Literal["none", "cpu", "nvme"] = "none"
    """ZeRO-Offload of optimizer states to CPU memory or NVMe (needs zero_stage >= 1)."""
    offload_params: bool = False
    """Also offload parameters (ZeRO-Infinity; needs zero_stage 3 and offload != none)."""
    nvme_path: str = "/local_nvme"
    """Directory on a fast local NVMe drive for offload=nvme."""
    reduce_bucket_size: int = 0
    """Gradient elements per ZeRO 1/2 reduce bucket (and per all-reduce bucket of ZeRO-0); 0 = the default
    of the device: on CPU CPU_BUCKET_SIZE (core.distributed), on GPU DeepSpeed's 5e8."""
    allgather_bucket_size: int = 0
    """Parameter elements per ZeRO 1/2 all-gather bucket after the optimizer step; 0 = as reduce_bucket_size."""
    overlap_comm: bool | None = None
    """Overlap ZeRO's gradient reduction with backward (DeepSpeed overlap_comm); None = on GPU (NCCL
    streams) and off on CPU (gloo has no streams; measured in benchmarks/results/pretrain_zero_tuning.json)."""
    contiguous_gradients: bool = True
    """ZeRO copies gradients into one contiguous buffer as they are produced (less fragmentation, one
    copy per gradient)."""
    reduce_scatter: bool = True
    """ZeRO 1/2 reduce gradients with one reduce per owning rank's slice (True) instead of a full
    all-reduce of each bucket (False)."""
    adamw_impl: Literal["auto", "foreach", "fused", "for-loop"] = "auto"
    """torch AdamW kernel: foreach (one batched op per step over all tensors), fused (one C++ kernel,
    GPU and recent CPU builds), for-loop (one op per tensor); auto = fused on GPU, on CPU the one
    CPU_ADAMW_IMPL (core.distributed) measured fastest."""
    compile: bool = False
    """torch.compile the model in place (DeepSpeed's engine.compile(), inductor; parameter names and
    checkpoints unchanged), compiled during the first steps. Off by default: on a quiet 2-core AMD EPYC
    the small teacher (2 x 1, bf16) trained 1.17x faster compiled (7,288 against 6,210 tokens/s), below
    the 1.2x a default needs, and a cold compile costs ~170 s per process (benchmarks/pretrain.py --modes
    ds2-zero0 --precisions bf16 --variants default,compile --warmup-steps 3)."""
    activation_checkpointing: bool = False
    """Recompute activations in backward (model.gradient_checkpointing_enable()): less memory, ~30% more
    compute."""
    log_every: int = 10
    """Write metrics (loss per objective, lr, tokens/s, MFU) every this many optimizer steps."""
    eval_every: int = 50
    """Compute the held-out loss every this many optimizer steps (and at the end); 0 = only at the end."""
    num_eval_batches: int = 8
    """Micro-batches per process for each held-out evaluation."""
    save_every: int = 100
    """Save a resumable checkpoint every this many optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep this many most recent complete checkpoints; older ones are deleted."""
    seed: int = 1234
    """Seed for model initialisation, data order and dropout."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device, the denominator of MFU. 0 = on CPU measure this process's fp32
    matmul peak at start-up (core.metrics.measure_peak_tflops); on GPU a known datasheet value
    (bf16 dense) for the device when listed, else MFU is not reported."""
    num_threads: int = 0
    """torch intra-op threads per process on CPU; 0 = $OMP_NUM_THREADS when set, else the cores available
    divided by the processes on the node (2 cores, 2 processes: 1 thread each)."""

    def validate(self) -> None:
        positive = ("micro_batch_size", "global_batch_size", "max_steps", "log_every", "num_eval_batches",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "num_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.peak_tflops < 0:
            raise ConfigError("train.weight_decay, train.grad_clip and train.peak_tflops must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage} is not allowed; allowed values: 0, 1, 2, 3")
        if self.offload != "none" and self.zero_stage == 0:
            raise ConfigError(f"train.offload={self.offload!r} needs train.zero_stage 1, 2 or 3")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"train.optimizer={self.optimizer!r} is not allowed; allowed values: adamw, adafactor")
        if self.optimizer == "adafactor" and self.zero_stage != 0:
            raise ConfigError(
                f"train.optimizer=adafactor needs train.zero_stage=0 (got {self.zero_stage}): ZeRO 1-3 give the "
                "optimizer flat partitions without the matrix shapes Adafactor scales by; use "
                "train.optimizer=adamw for ZeRO"
            )
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0 (0 = the device's default)")
        if self.adamw_impl not in ("auto", "foreach", "fused", "for-loop"):
            raise ConfigError(f"train.adamw_impl={self.adamw_impl!r} is not allowed; allowed values: auto, foreach, "
                              "fused, for-loop")
        if self.offload_params and (self.zero_stage != 3 or self.offload == "none"):
            raise ConfigError("train.offload_params=true needs train.zero_stage=3 and train.offload 'cpu' or 'nvme'")

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step: global_batch_size / (micro_batch_size * world_size)."""
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass:
            allowed = [per_pass * k for k in range(1, 5)]
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by train.micro_batch_size "
                f"({self.micro_batch_size}) x world size ({world_size}) = {per_pass}; allowed values: multiples "
                f"of {per_pass} (e.g. {', '.join(map(str, allowed))}), or change train.micro_batch_size"
            )
        return self.global_batch_size // per_pass


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer update `step` (0-based) as a fraction of cfg.lr.

    Linear warmup (step+1)/warmup_steps, then cosine or linear decay from 1 to min_lr_ratio at
    max_steps (held there afterwards).
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape
