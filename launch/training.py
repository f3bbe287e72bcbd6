"""Training-loop infrastructure shared by pretraining, distillation and fine-tuning.

- `TrainConfig`: the `train` section of every training stage's config.
- `lr_multiplier`: warmup + cosine/linear decay (what `build_engine` installs as a LambdaLR).
- `TrainState`: runtime state (step, tokens, data position, RNG-free), checkpointed as state.json.
- `ResumableSampler`: a deterministic permutation per (seed, epoch), sharded by rank, resumable
  from the checkpointed data position.
- `CheckpointManager`: DeepSpeed checkpoints + every rank's RNG states + state.json + config, with
  a COMPLETE marker written last (holding the SHA-256 of every file); incomplete checkpoints (a
  crash mid-write) are ignored, and resume verifies the digests and loads weights-only (below).
- `MetricsLogger`: metrics.jsonl + TensorBoard on rank 0.
- `NonFiniteLossError`, `check_finite`: stop on NaN/inf before the optimizer applies it.
- `StopOnSignal`, `maybe_stop`, `TrainingStopped`: SIGTERM (preemption) or SIGINT stops a loop at the
  next step boundary, every rank at the same step, after a checkpoint.
- `refuse_to_start_over`, `restore_or_start`, `is_due`, `config_yaml`, `LossWindow`: the set-up and
  bookkeeping the stages' loops share (each stage keeps its own explicit loop).
- `export_hf`: a Hugging Face save_pretrained directory (safetensors, fp32, ZeRO-3 consolidated).
- `progress_bar`, `measure_peak_tflops`.

Heavy libraries are imported inside functions: `TrainConfig` is read by the CLI at start-up.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

from launch.config import ConfigError, to_dict
from launch.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    full_fp32_state_dict,
    get_rank,
    is_rank0,
)
from launch.fsutil import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text

# ----------------------------------------------------------------------------- config


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
    was trained (transformers' implementation, update scaled by each matrix's RMS so lr is a
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
    of the device: on CPU CPU_BUCKET_SIZE (launch.distributed), on GPU DeepSpeed's 5e8."""
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
    CPU_ADAMW_IMPL (launch.distributed) measured fastest."""
    compile: bool = False
    """torch.compile the model in place (DeepSpeed's engine.compile(), inductor; parameter names and
    checkpoints unchanged), compiled during the first steps. Off by default for now: on the small teacher
    (2 x 1, bf16) it measured 1.4-1.7x the tokens/s, but only with other jobs loading the cores (load
    4-6), and a cold compile took ~170 s per process; the default switches when a quiet machine confirms
    >= 1.2x (benchmarks/pretrain.py --modes ds2-zero0 --precisions bf16 --variants default,compile
    --warmup-steps 3 --repeats 2)."""
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
    matmul peak at start-up (launch.training.measure_peak_tflops); on GPU a known datasheet value
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


# ----------------------------------------------------------------------------- state and data order


@dataclasses.dataclass
class TrainState:
    """Runtime state of a training run; saved as state.json in every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Non-pad input+target tokens processed, summed over ranks."""
    examples_seen: int = 0
    """Examples consumed, summed over ranks and epochs."""
    epoch: int = 0
    """Current pass over the training data."""
    epoch_position: int = 0
    """Examples of the current epoch's permutation already consumed (the data position)."""
    best_eval_loss: float | None = None
    """Lowest held-out loss so far."""
    wall_time_s: float = 0.0
    """Seconds spent in training steps (without evaluation and checkpointing), over all resumed segments."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def progress(self) -> dict[str, int]:
        """The data-progress fields every training log line carries."""
        return {"epoch": self.epoch, "examples_seen": self.examples_seen, "tokens_seen": self.tokens_seen}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"state.json has unknown keys {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**data)


class ResumableSampler:
    """Deterministic, rank-sharded data order that can restart from any checkpointed position.

    Each epoch is a permutation of range(num_examples) drawn from (seed, epoch). An optimizer step
    consumes the next `global_batch_size` indices of it: micro-step i of rank r takes the slice
    [(i * world_size + r) * micro_batch_size, ... + micro_batch_size) of that block. A trailing block
    smaller than a global batch is dropped so every rank runs the same number of steps.

    With `lengths` (one per example, e.g. tokens), batches are grouped by length: each run of
    `group_batches` global batches of the permutation is sorted by length, cut into global batches,
    and those are put back in a seeded random order. A batch then pads to a length close to that of
    each of its examples, and every rank's micro-batch has about the same length, so no rank waits
    for a long one; the epoch still visits every example once in a random batch order.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, grad_accum_steps: int, rank: int,
                 world_size: int, seed: int, lengths: Any = None, group_batches: int = 64) -> None:
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_examples} examples")
        if group_batches < 1:
            raise ValueError(f"group_batches must be >= 1, got {group_batches}")
        self.lengths = lengths
        self.group_batches = group_batches
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = num_examples // self.global_batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training data has {num_examples} examples, fewer than one global batch "
                f"({self.global_batch_size}); lower train.global_batch_size or add data"
            )
        self._cached: tuple[int, Any] | None = None

    def epoch_order(self, epoch: int) -> Any:
        """The permutation for `epoch` (numpy int64 array); identical on every rank."""
        if self._cached is None or self._cached[0] != epoch:
            import numpy as np

            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_examples)
            if self.lengths is not None:
                order = self._group_by_length(order, rng)
            self._cached = (epoch, order)
        return self._cached[1]

    def _group_by_length(self, order: Any, rng: Any) -> Any:
        import numpy as np

        lengths = np.asarray(self.lengths)
        batch = self.global_batch_size
        used = self.steps_per_epoch * batch  # the trailing partial batch stays at the end, dropped
        out = [order[used:]]
        for start in range(0, used, batch * self.group_batches):
            chunk = order[start : min(start + batch * self.group_batches, used)]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            blocks = chunk.reshape(-1, batch)
            out.insert(-1, blocks[rng.permutation(len(blocks))].reshape(-1))
        return np.concatenate(out)

    def micro_batches(self, epoch: int, position: int) -> list[list[int]]:
        """This rank's grad_accum_steps micro-batches (lists of dataset indices) for the step at `position`."""
        order = self.epoch_order(epoch)
        out = []
        for micro in range(self.grad_accum_steps):
            start = position + (micro * self.world_size + self.rank) * self.micro_batch_size
            out.append([int(i) for i in order[start : start + self.micro_batch_size]])
        return out

    def advance(self, state: TrainState) -> None:
        """Move `state`'s data position past one global batch, rolling over to the next epoch."""
        state.examples_seen += self.global_batch_size
        state.epoch_position += self.global_batch_size
        if state.epoch_position + self.global_batch_size > self.steps_per_epoch * self.global_batch_size:
            state.epoch += 1
            state.epoch_position = 0


def eval_micro_batches(num_examples: int, micro_batch_size: int, num_batches: int, rank: int,
                       world_size: int) -> list[list[int]]:
    """A fixed held-out subset: the first num_batches * micro_batch_size * world_size examples, sharded
    by rank; the same every evaluation so held-out losses are comparable.

    Every rank gets the same number of full micro-batches (under ZeRO-3 a forward is a collective, so
    uneven counts would hang); fewer than num_batches when the held-out set is small.
    """
    per_round = micro_batch_size * world_size
    available = min(num_batches, num_examples // per_round)
    if available < 1:
        raise ConfigError(
            f"the held-out data has {num_examples} examples, fewer than one evaluation round "
            f"(micro_batch_size {micro_batch_size} x world size {world_size}); add held-out data"
        )
    return [list(range(b * per_round + rank * micro_batch_size, b * per_round + (rank + 1) * micro_batch_size))
            for b in range(available)]


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states, JSON-serialisable."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

    def to_tensor(text: str) -> Any:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(to_tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([to_tensor(s) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints

_STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "COMPLETE"


class CheckpointManager:
    """Resumable checkpoints under `run_dir/checkpoints/<name>/step_%08d/`.

    A checkpoint holds DeepSpeed's files (model, optimizer, LR scheduler; one shard per rank under
    ZeRO), `rng/rank_%05d.json` per rank, `state.json` (TrainState), optionally `config.yaml`, and
    `COMPLETE`, written by rank 0 after every rank has finished: a directory without it is ignored.
    COMPLETE is JSON, {"step": N, "sha256": {relative path: digest}} over every other file.

    Safe resume: DeepSpeed's files are pickles, and unpickling runs whatever code a pickle names. `load`
    therefore (1) checks every file against the digests in COMPLETE (a corrupted or swapped file is
    refused; a checkpoint whose COMPLETE has no digests, from before they were recorded, is accepted
    with a note) and (2) loads inside `weights_only_loads()`, so a pickle naming anything beyond
    tensors, plain containers and DeepSpeed's own loss-scaler/ZeRO records is refused, not run. A
    checkpoint copied in from elsewhere can carry its own matching COMPLETE: the weights-only load is
    the guard against code, the digests against damage.
    """

    def __init__(self, run_dir: str | os.PathLike, name: str, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints" / name
        self.keep = keep

    @staticmethod
    def step_of(path: Path) -> int:
        match = _STEP_DIR.match(path.name)
        if not match:
            raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNNNN)")
        return int(match.group(1))

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def all_checkpoints(self) -> list[Path]:
        """Every step directory, complete or not, by step."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=self.step_of)

    def complete_checkpoints(self) -> list[Path]:
        return [p for p in self.all_checkpoints() if (p / COMPLETE_MARKER).is_file()]

    def latest_complete(self) -> Path | None:
        """The newest checkpoint whose COMPLETE marker exists (None if there is none)."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def save(self, engine: Any, state: TrainState, config_yaml: str | None = None) -> Path:
        """Save on every rank (collective); returns the checkpoint directory."""
        path = self.path_for(state.step)
        if is_rank0() and path.exists():
            # Left over from a run that crashed while writing this step; it was never COMPLETE.
            shutil.rmtree(path)
        barrier()
        engine.save_checkpoint(str(self.root), tag=path.name, save_latest=False)
        rank = get_rank()
        atomic_write_json(path / "rng" / f"rank_{rank:05d}.json", rng_state(), indent=0)
        barrier()
        if is_rank0():
            atomic_write_json(path / "state.json", state.to_dict())
            if config_yaml is not None:
                atomic_write_text(path / "config.yaml", config_yaml)
            marker = {"step": state.step, "sha256": checkpoint_digests(path)}
            atomic_write_text(path / COMPLETE_MARKER, json.dumps(marker, indent=1) + "\n")
            self._prune()
        barrier()
        return path

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        newest = self.step_of(complete[-1]) if complete else -1
        for old in complete[: -self.keep]:
            # Marker first: a crash mid-delete leaves an incomplete directory, which is ignored.
            (old / COMPLETE_MARKER).unlink()
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.all_checkpoints():
            if self.step_of(stale) < newest and not (stale / COMPLETE_MARKER).exists():
                shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine: Any, path: Path | None = None) -> TrainState:
        """Restore engine (weights, optimizer, scheduler), this rank's RNG states and the TrainState."""
        path = path or self.latest_complete()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker)")
        verify_checkpoint(path)
        from launch.distributed import UnsafeCheckpointError, weights_only_loads

        try:
            with weights_only_loads():
                loaded, _ = engine.load_checkpoint(
                    str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        except (RuntimeError, KeyError, ValueError) as e:
            if isinstance(e, (CheckpointError, UnsafeCheckpointError)):
                raise
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            config = path / "config.yaml"
            seen = f"its config is {config}" if config.is_file() else "it records no config.yaml"
            raise CheckpointError(
                f"checkpoint {path} does not fit this run's model or optimizer ({first[:200]}); it was written with "
                f"different settings ({seen}): resume with the same model, optimizer and ZeRO settings, or "
                "start a new run under another out= name"
            ) from None
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        rank = get_rank()
        rng_file = path / "rng" / f"rank_{rank:05d}.json"
        if not rng_file.is_file():
            raise FileNotFoundError(
                f"{rng_file} is missing: the checkpoint was written by fewer processes; resume with the "
                "same number of processes"
            )
        set_rng_state(json.loads(rng_file.read_text()))
        return TrainState.from_dict(json.loads((path / "state.json").read_text()))


class CheckpointError(RuntimeError):
    """A checkpoint's files do not match the digests its COMPLETE marker recorded."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_digests(path: Path) -> dict[str, str]:
    """SHA-256 of every file under the checkpoint directory `path` but COMPLETE, by relative path."""
    return {
        f.relative_to(path).as_posix(): _sha256(f)
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != COMPLETE_MARKER and not f.name.startswith(".")
    }


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError when a file of `path` is missing, added or changed against COMPLETE's
    digests. A marker without digests (an older polyteacher's `step N`) passes, with a note."""
    try:
        recorded = json.loads((path / COMPLETE_MARKER).read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        if is_rank0():
            print(f"note: {path / COMPLETE_MARKER} records no digests (written before they were); loading it "
                  "weights-only without a digest check", file=sys.stderr, flush=True)
        return
    found = checkpoint_digests(path)
    for name in sorted(set(recorded) | set(found)):
        if recorded.get(name) != found.get(name):
            what = "is missing" if name not in found else "is not part of it" if name not in recorded else "changed"
            raise CheckpointError(
                f"checkpoint {path}: {name} {what} since it was written (digests in {COMPLETE_MARKER}); "
                "refusing to resume from it: remove this step directory to resume from the one before"
            )


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


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the optimizer applies it."""


def check_finite(loss: float, step: int, checkpoints: CheckpointManager | None = None, what: str = "loss") -> None:
    """Raise NonFiniteLossError naming the step and the checkpoint to resume from when `loss` is NaN/inf.

    Pass a loss already averaged over ranks, so that every rank raises together.
    """
    if math.isfinite(loss):
        return
    latest = checkpoints.latest_complete() if checkpoints is not None else None
    resume = (
        f"resume from {latest} with --resume (e.g. with a lower train.lr)"
        if latest is not None
        else "no checkpoint exists yet; restart with a lower train.lr"
    )
    raise NonFiniteLossError(f"{what} is {loss} at step {step + 1} (after {step} optimizer steps); {resume}")


# ----------------------------------------------------------------------------- loop set-up and bookkeeping


def refuse_to_start_over(checkpoints: CheckpointManager, resume: bool, hint: str = "choose another --out") -> None:
    """A fresh run on top of existing checkpoints would mix two runs' checkpoints: raise ConfigError
    (`hint` says what else the user can do)."""
    latest = checkpoints.latest_complete()
    if not resume and latest is not None:
        raise ConfigError(
            f"checkpoints already exist under {checkpoints.root} (latest {latest.name}); pass --resume to "
            f"continue that run, or {hint}"
        )


def restore_or_start(checkpoints: CheckpointManager, engine: Any, resume: bool, stage: str) -> TrainState:
    """With --resume, the latest complete checkpoint's engine, RNG and TrainState; else a fresh state.
    Rank 0 says which on stderr, prefixed with `stage`, and records a resume in metrics.jsonl
    (`{"stage", "name", "step", "time", "event": "resumed", "checkpoint"}`): the step records after it
    replace those the interrupted run logged after that step."""
    latest = checkpoints.latest_complete()
    if resume and latest is not None:
        state = checkpoints.load(engine, latest)
        if is_rank0():
            print(f"{stage}: resumed from {latest} (step {state.step})", file=sys.stderr, flush=True)
            append_jsonl(checkpoints.root.parent.parent / "metrics.jsonl", {
                "stage": stage, "name": checkpoints.root.name, "step": state.step, "time": round(time.time(), 3),
                "event": "resumed", "checkpoint": latest.name,
            })
        return state
    if resume and is_rank0():
        print(f"{stage}: --resume but no complete checkpoint under {checkpoints.root}; starting at step 0",
              file=sys.stderr, flush=True)
    return TrainState()


class TrainingStopped(Exception):
    """A loop stopped early on a signal, after saving a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal_name(signum)} at step {step} after saving the checkpoint {checkpoint}; "
                         "rerun the same command with --resume to continue")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignal:
    """While installed, SIGTERM and SIGINT only ask the training loop to stop; a second SIGINT (Ctrl-C
    pressed again) stops the process at once. Repeated SIGTERMs are expected (every launcher layer
    passes one on) and change nothing. `agreed()`, called by every rank at each step boundary, returns the signal when
    any rank got one: ranks receive a signal at slightly different times, and a checkpoint is a
    collective that all must enter at the same step."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        import threading

        self.signum = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum and signum == self.signum == signal.SIGINT:
            self.close()  # Ctrl-C twice: no checkpoint, stop now
            signal.raise_signal(signum)
            return
        if self.signum:
            return
        self.signum = signum
        if is_rank0():
            again = " (Ctrl-C again: stop at once)" if signum == signal.SIGINT else ""
            print(f"\n{signal_name(signum)}: stopping after this step with a checkpoint{again}",
                  file=sys.stderr, flush=True)

    def agreed(self) -> int:
        """The signal any rank received (0: none); a collective."""
        got = all_reduce_sum([float(self.signum)])[0]
        return self.signum or (int(signal.SIGTERM) if got else 0)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def maybe_stop(stop: StopOnSignal, checkpoints: CheckpointManager, engine: Any, state: TrainState,
               max_steps: int, config_yaml: str | None = None) -> None:
    """At a step boundary: when a signal arrived on any rank, save a checkpoint of this step (unless
    one was just saved) and raise TrainingStopped on every rank. After the last step the run is left
    to finish (export) instead."""
    if state.step >= max_steps:
        return
    signum = stop.agreed()
    if not signum:
        return
    path = checkpoints.path_for(state.step)
    if checkpoints.latest_complete() != path:
        path = checkpoints.save(engine, state, config_yaml)
    stop.close()
    raise TrainingStopped(signum, state.step, path)


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Every `every` steps and at the last step (every=0: only at the last step)."""
    return step == max_steps or (every > 0 and step % every == 0)


def config_yaml(cfg: Any) -> str:
    """A stage config as YAML text, the config.yaml stored in every checkpoint."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


@dataclasses.dataclass
class LossWindow:
    """Running sums of the training loss and its named parts since the last log line."""

    loss: float = 0.0
    count: int = 0
    """Optimizer steps added."""
    micro_steps: int = 0
    """Micro-batches behind those steps (what per-micro-batch parts are divided by)."""
    parts: dict[str, float] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    tokens_at_start: int = 0

    def add(self, loss: float, parts: dict[str, float], micro_steps: int = 1) -> None:
        self.loss += loss
        self.count += 1
        self.micro_steps += micro_steps
        for key, value in parts.items():
            self.parts[key] = self.parts.get(key, 0.0) + value

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
        self.started = time.perf_counter()
        self.tokens_at_start = tokens_seen


# ----------------------------------------------------------------------------- export, progress, peak


def export_hf(engine: Any, model: Any, tokenizer: Any, out_dir: str | os.PathLike) -> Path | None:
    """Write `model` (fp32 master weights from the engine) + tokenizer as a Hugging Face directory.

    Collective: call on every rank. ZeRO-3 partitions are gathered parameter by parameter; rank 0
    writes safetensors into a temporary sibling directory that replaces `out_dir` when complete.
    Tied embeddings stay tied (save_pretrained stores them once, from_pretrained re-ties them).
    """
    state_dict = full_fp32_state_dict(engine, model)
    out = Path(out_dir)
    if is_rank0():
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    barrier()
    return out if is_rank0() else None


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
