"""Process groups, ranks and the DeepSpeed engine.

This module, the checkpoint code (`core/checkpoint.py`) and `core/bigmodel.py` (the ZeRO-3 engine of a sharded frozen
teacher) are the only places that import DeepSpeed or torch.distributed. Training loops call
`init_distributed()` once, build their model, and get an engine from `build_engine(model, train_cfg,
dist)`; afterwards they touch the engine only through forward, backward, step, save_checkpoint and
load_checkpoint.

Without a GPU DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu, which must be set before
deepspeed is first imported) with the gloo backend; with GPUs it uses NCCL. A single plain process
without any launcher environment works too (world size 1).

Precision policy: `precision="auto"` means bf16 on a GPU that supports it (else fp16 on GPU). On CPU it
is measured: `cpu_bf16_speedup()` times a bf16 against an fp32 matmul (cached per CPU model, torch
version and thread count), and auto picks bf16 where it is at least BF16_MIN_SPEEDUP times faster
(CPUs with AMX or AVX512-BF16: 2.5-6x measured), fp32 elsewhere (on AVX2-only CPUs bf16 matmuls are
~300x slower). bf16 on CPU is torch autocast (DeepSpeed's `torch_autocast`): weights, gradients'
master copies and optimizer states stay fp32, matmuls run in bf16. fp16 on CPU is refused.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.config import ConfigError
from core.train_config import TrainConfig, lr_multiplier


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0 .. world_size-1."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    world_size: int
    """Number of processes in the job (data-parallel degree)."""
    device: str
    """torch device string: "cpu" or "cuda:<local_rank>"."""
    backend: str
    """torch.distributed backend: "gloo" (CPU) or "nccl" (GPU)."""
    local_world_size: int = 1
    """Number of processes on this node (used to split CPU threads between them)."""

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


# ----------------------------------------------------------------------------- process group


def _gpu_available() -> bool:
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


STORE_ENV = "POLYTEACHER_FILE_STORE"
"""Path of the file the processes of a one-node launch meet through (set by `polyteacher launch`)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_world_size() -> int:
    # torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE.
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def cpu_threads_per_process(local_world_size: int) -> int:
    """CPU cores available to this process divided evenly between the processes on the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def init_distributed(num_threads: int = 0, timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or create) the process group and return this process's DistInfo.

    Works under DeepSpeed's launcher and torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the
    environment) and in a plain single process (world size 1 on a free loopback port).
    `num_threads`: torch intra-op threads per process on CPU; 0 = $OMP_NUM_THREADS when set, else the
    cores available divided by the processes on this node.
    Calling it again returns the same DistInfo.
    """
    has_gpu = _gpu_available()
    if not has_gpu:
        # Must be set before the first `import deepspeed`, which picks its accelerator at import.
        os.environ["DS_ACCELERATOR"] = "cpu"
    alone = "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    if alone:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if alone or os.environ.get(STORE_ENV):
        # Every process is on this machine: gloo's and NCCL's own sockets bind to loopback only.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")

    import deepspeed
    import deepspeed.comm as ds_comm
    import torch
    import torch.distributed as dist

    backend = "nccl" if has_gpu else "gloo"
    if not dist.is_initialized() and (alone or os.environ.get(STORE_ENV)):
        # torch's TCPStore listens on every interface whatever MASTER_ADDR says; processes on one
        # machine meet through a store that opens no port at all.
        world = int(os.environ["WORLD_SIZE"])
        store = dist.HashStore() if alone else dist.FileStore(os.environ[STORE_ENV], world)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if not dist.is_initialized() or not ds_comm.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = _local_world_size()
    if has_gpu:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
        # Oversubscribed cores make every rank wait for the slowest one in each all-reduce.
        env_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        torch.set_num_threads(num_threads or env_threads or cpu_threads_per_process(local_world))
        _release_shm_allreduce_buffer(dist.get_rank(), dist.get_world_size())
    atexit.unregister(_leave_process_group)  # registered once however often this is called
    atexit.register(_leave_process_group)
    return DistInfo(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=device,
        backend=backend,
        local_world_size=local_world,
    )


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter does (registered with atexit).

    A gloo group left to the interpreter's shutdown can abort the process (SIGABRT, exit 250 under
    DeepSpeed's launcher) when a peer closes its sockets first: a finished job then reports failure.
    Destroying it here closes the connections in order while every module is still alive."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def shm_allreduce_buffer(rank: int) -> Path:
    """The /dev/shm file of DeepSpeed's CPU shared-memory all-reduce for `rank` of this job (named by uid,
    MASTER_ADDR and MASTER_PORT; created when every rank of the job is on this node)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _release_shm_allreduce_buffer(rank: int, world_size: int) -> None:
    """Remove this rank's shared-memory all-reduce buffer name once every rank has mapped every buffer.

    DeepSpeed maps one ~66 MB /dev/shm buffer per rank at start-up and never unlinks it, so every CPU
    job left them behind in RAM until reboot (16 GB of them filled a 24 GB machine). After the
    barrier each rank holds its mappings; they stay valid without the names and vanish with the
    processes."""
    import torch.distributed as dist

    if world_size > 1:
        dist.barrier()
    try:
        shm_allreduce_buffer(rank).unlink(missing_ok=True)
    except OSError:
        pass  # not ours to remove (another user's job on the same port): leave it


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (RANK from the launcher's environment before the group exists; 0 without one)."""
    if not _dist_ready():
        return int(os.environ.get("RANK", "0"))
    import torch.distributed as dist

    return dist.get_rank()


def is_rank0() -> bool:
    """True on global rank 0, and in a process that never joined a group."""
    if not _dist_ready():
        return int(os.environ.get("RANK", "0")) == 0
    import torch.distributed as dist

    return dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if _dist_ready():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_mean(value: Any) -> float:
    """Mean of a scalar (float or 0-d tensor) over all ranks, as a Python float on every rank."""
    import torch

    tensor = value.detach().float().reshape(()) if torch.is_tensor(value) else torch.tensor(float(value))
    if _dist_ready():
        import torch.distributed as dist

        # gloo reduces CPU tensors; NCCL needs the tensor on this rank's GPU.
        if dist.get_backend() == "nccl":
            tensor = tensor.to(f"cuda:{torch.cuda.current_device()}")
        else:
            tensor = tensor.cpu()
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return float(tensor.item())


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over all ranks (one collective for the whole list)."""
    import torch

    tensor = torch.tensor(values, dtype=torch.float64)
    if _dist_ready():
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            tensor = tensor.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu().tolist()]


# ----------------------------------------------------------------------------- engine


BF16_MIN_SPEEDUP = 1.5
"""precision=auto on CPU uses bf16 autocast when a bf16 matmul is at least this much faster than fp32."""


def resolve_precision(precision: str, dist_info: DistInfo) -> str:
    """"auto" -> bf16/fp16 on GPU; on CPU bf16 where the matmul probe shows a real gain, else fp32;
    refuse fp16 on CPU (see module doc)."""
    if precision == "auto":
        if not dist_info.on_gpu:
            return "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not dist_info.on_gpu:
        raise ConfigError(
            "train.precision='fp16' is not supported on CPU (no fast fp16 matmul there); allowed values on "
            "CPU: 'auto', 'fp32', 'bf16' (autocast)"
        )
    return precision


def read_machine_cache(name: str) -> tuple[Path, dict[str, Any]]:
    """(path, contents) of a per-machine probe cache, ~/.cache/polyteacher/NAME (under $XDG_CACHE_HOME
    when set); {} when it is absent or unreadable."""
    import json

    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polyteacher" / name
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return path, {}


def write_machine_cache(path: Path, data: dict[str, Any]) -> None:
    """Replace a probe cache atomically; a read-only home only costs the probe again next time."""
    import json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass


# This process's agreed value of `cpu_bf16_speedup` (after the all-reduce), by cache file and key: a
# second call must not be a collective, since only rank 0 asks again (to log the choice).
_AGREED_BF16_SPEEDUP: dict[tuple[str, str], float] = {}


def cpu_bf16_speedup(size: int = 512, repeats: int = 8) -> float:
    """bf16 / fp32 matmul throughput of this CPU at the current torch thread count (> 1: bf16 is
    faster). Measured once per CPU model, torch version and thread count, then read from
    ~/.cache/polyteacher/cpu_precision.json; every rank of a job gets the smallest value of all ranks,
    so they all choose alike. The first call in a distributed job is a collective (every rank must
    make it); later calls return the agreed value without communicating."""
    import time

    import torch

    cache, known = read_machine_cache("cpu_precision.json")
    key = f"{cpu_info()[0]}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    if _dist_ready() and (str(cache), key) in _AGREED_BF16_SPEEDUP:
        return _AGREED_BF16_SPEEDUP[(str(cache), key)]
    if key not in known:
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b  # warm-up (kernel selection, first-touch)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            rates[dtype] = repeats / max(time.perf_counter() - start, 1e-9)
        known[key] = rates[torch.bfloat16] / rates[torch.float32]
        write_machine_cache(cache, known)
    speedup = float(known[key])
    if _dist_ready():
        import torch.distributed as tdist

        value = torch.tensor([speedup], dtype=torch.float64)
        tdist.all_reduce(value, op=tdist.ReduceOp.MIN)
        speedup = float(value.item())
        _AGREED_BF16_SPEEDUP[(str(cache), key)] = speedup
    return speedup


def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, instruction-set flags) from /proc/cpuinfo; platform's processor name and no
    flags where that file is absent."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


CPU_BUCKET_SIZE = int(5e8)
"""ZeRO reduce/all-gather bucket (elements) on CPU when train.reduce_bucket_size is 0: DeepSpeed's own
(one bucket for models of up to 500 M parameters). 2e6 measured the same (0.97 of the best single
process against 0.97, small teacher, 2 x 1, bf16: benchmarks/results/pretrain_zero_tuning.json)."""
CPU_OVERLAP_COMM = False
"""overlap_comm on CPU when train.overlap_comm is unset: gloo has no streams to overlap on, and the
extra copies cost (0.93 of the best single process against 0.97 without, same record)."""
CPU_ADAMW_IMPL = "foreach"
"""AdamW kernel on CPU when train.adamw_impl is auto: foreach, one batched op per step over all
tensors (torch defaults to a per-tensor loop on CPU). Not yet separated from noise on a quiet
machine (benchmarks/pretrain.py --modes ds1-zero0,ds2-zero2 --variants default,adamw-for-loop,adamw-fused)."""
GPU_BUCKET_SIZE = int(5e8)
"""DeepSpeed's own default bucket."""


def zero_comm_config(train_cfg: TrainConfig, dist_info: DistInfo) -> dict[str, Any]:
    """The ZeRO communication keys (buckets, overlap, contiguous gradients, reduce-scatter) of the
    zero_optimization section: train.* where set, else the device's measured default (CPU_*).
    On CPU the defaults come from benchmarks/pretrain.py --tune (benchmarks/results/pretrain_zero_tuning.json):
    gloo has no streams to overlap on, so overlap_comm only adds copies there."""
    on_gpu = dist_info.on_gpu
    reduce_bucket = train_cfg.reduce_bucket_size or (GPU_BUCKET_SIZE if on_gpu else CPU_BUCKET_SIZE)
    overlap = train_cfg.overlap_comm if train_cfg.overlap_comm is not None else (True if on_gpu else CPU_OVERLAP_COMM)
    return {
        "reduce_bucket_size": int(reduce_bucket),
        "allgather_bucket_size": int(train_cfg.allgather_bucket_size or reduce_bucket),
        "overlap_comm": bool(overlap),
        "contiguous_gradients": bool(train_cfg.contiguous_gradients),
        "reduce_scatter": bool(train_cfg.reduce_scatter),
    }


def adamw_impl(train_cfg: TrainConfig, dist_info: DistInfo) -> str:
    """The AdamW kernel: train.adamw_impl, or auto = fused on GPU (not with offload: the states are on
    the CPU then), CPU_ADAMW_IMPL on CPU."""
    if train_cfg.adamw_impl != "auto":
        return train_cfg.adamw_impl
    if dist_info.on_gpu:
        return "fused" if train_cfg.offload == "none" else "foreach"
    return CPU_ADAMW_IMPL


def deepspeed_config(train_cfg: TrainConfig, dist_info: DistInfo) -> dict[str, Any]:
    """The DeepSpeed config dict for `train_cfg` on this job (validated against the world size)."""
    grad_accum = train_cfg.grad_accum_steps(dist_info.world_size)
    precision = resolve_precision(train_cfg.precision, dist_info)
    zero: dict[str, Any] = {"stage": train_cfg.zero_stage, **zero_comm_config(train_cfg, dist_info)}
    if train_cfg.zero_stage == 3:
        # Lets export_hf gather full weights on rank 0 layer by layer.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train_cfg.offload != "none":
        target: dict[str, Any] = {"device": train_cfg.offload, "pin_memory": dist_info.on_gpu}
        if train_cfg.offload == "nvme":
            target["nvme_path"] = train_cfg.nvme_path
        zero["offload_optimizer"] = dict(target)
        if train_cfg.offload_params:
            zero["offload_param"] = dict(target)
    # bf16 on CPU: torch autocast around the engine's forward, fp32 weights and optimizer states.
    autocast = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if precision == "bf16" and not dist_info.on_gpu else {}
    return {
        **autocast,
        "train_batch_size": train_cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train_cfg.grad_clip if train_cfg.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16" and dist_info.on_gpu},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # We pass torch's AdamW (fused on GPU); DeepSpeed would otherwise insist on its CPU Adam
        # (a C++ extension built at run time) whenever the optimizer is offloaded.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def describe_setup(train_cfg: TrainConfig, dist_info: DistInfo, ds_config: dict[str, Any]) -> str:
    """One line: processes x threads (and who chose them: `polyteacher launch --nproc-per-node auto` passes
    its choice in $POLYTEACHER_LAYOUT), precision and why, ZeRO stage and AdamW kernel."""
    import json

    import torch

    precision = "bf16" if ds_config.get("torch_autocast") or ds_config["bf16"]["enabled"] else \
        "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    why = "set"
    if train_cfg.precision == "auto":
        why = "auto: bf16 supported on this GPU" if dist_info.on_gpu else \
            f"auto: bf16 matmul {cpu_bf16_speedup():.1f}x fp32 here, bf16 from {BF16_MIN_SPEEDUP}x"
    layout = f"{dist_info.world_size} process(es)"
    if not dist_info.on_gpu:
        layout += f" x {torch.get_num_threads()} thread(s)"
        try:
            chosen = json.loads(os.environ.get("POLYTEACHER_LAYOUT", ""))
            layout += f" (chosen by {chosen['source']})"
        except (ValueError, KeyError, TypeError):
            pass
    optimizer = "adafactor" if train_cfg.optimizer == "adafactor" else f"adamw {adamw_impl(train_cfg, dist_info)}"
    return (f"{layout}; precision {precision} ({why}); ZeRO-{train_cfg.zero_stage}; {optimizer}"
            + ("; torch.compile" if train_cfg.compile else ""))


def _wrap_extras(model: Any, extra_params: Iterable[Any]) -> Any:
    """Put extra trainable modules/parameters beside the model in one nn.Module.

    DeepSpeed only reduces gradients of (and checkpoints) parameters inside the engine's module;
    a loss-side projection (e.g. hidden-state distillation) must live there too. Forward is the
    model's forward; the extras are reachable as `engine.module.extras`.
    """
    import torch

    extras = list(extra_params)
    if not extras:
        return model

    class ParamHolder(torch.nn.Module):
        def __init__(self, param: torch.nn.Parameter) -> None:
            super().__init__()
            self.param = param

    class ModelWithExtras(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.extras = torch.nn.ModuleList(
                [e if isinstance(e, torch.nn.Module) else ParamHolder(e) for e in extras]
            )

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.model(*args, **kwargs)

    return ModelWithExtras()


def _param_groups(module: Any, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and norm scales (1-d tensors) are not decayed: decaying them only pulls activations to 0.
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(groups: list[dict[str, Any]], train_cfg: TrainConfig, dist_info: DistInfo,
                    max_grad_norm: float = 0.0) -> Any:
    """The torch optimizer of train_cfg.optimizer over `groups` (lr set by the schedule); max_grad_norm
    > 0: the optimizer clips (Adafactor only: for sparse gradients, which DeepSpeed cannot clip)."""
    import torch

    if train_cfg.optimizer == "adafactor":
        from core.optim import RowSparseAdafactor

        # relative_step=False: the lr comes from our schedule (warmup, decay), and with
        # scale_parameter it is multiplied by each tensor's RMS, as in T5's training. Dense gradients
        # get transformers' Adafactor; sparse ones (an n-gram table) the same update on their rows.
        return RowSparseAdafactor(
            groups, max_grad_norm=max_grad_norm, lr=train_cfg.lr, scale_parameter=True, relative_step=False, warmup_init=False,
            clip_threshold=1.0, beta1=None,
        )
    impl = adamw_impl(train_cfg, dist_info)
    return torch.optim.AdamW(
        groups,
        lr=train_cfg.lr,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        eps=train_cfg.adam_eps,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )


def build_engine(model: Any, train_cfg: TrainConfig, dist_info: DistInfo, extra_params: Iterable[Any] = ()) -> Any:
    """A DeepSpeed engine around `model` (and `extra_params`, modules or parameters) for `train_cfg`.

    AdamW or Adafactor (train.optimizer) with decoupled weight decay (not on biases/norms), linear warmup then cosine/linear decay
    to `lr * min_lr_ratio` as a torch LambdaLR that DeepSpeed steps once per optimizer step and saves
    in its checkpoints, gradient clipping, ZeRO stage, offload and precision from the config.
    """
    import deepspeed
    import torch

    ds_config = deepspeed_config(train_cfg, dist_info)
    if dist_info.is_rank0:
        print(f"polyteacher: {describe_setup(train_cfg, dist_info, ds_config)}", file=sys.stderr, flush=True)
    if train_cfg.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError(
                "train.activation_checkpointing=true needs a model with gradient_checkpointing_enable() "
                f"(a transformers model); got {type(model).__name__}"
            )
        model.gradient_checkpointing_enable()
    module = _wrap_extras(model, extra_params)
    sparse = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    if sparse and (train_cfg.optimizer != "adafactor" or train_cfg.zero_stage != 0):
        raise ConfigError(
            f"embeddings with sparse gradients ({', '.join(sparse)}) train only with train.optimizer=adafactor "
            f"and train.zero_stage=0; got {train_cfg.optimizer}, ZeRO-{train_cfg.zero_stage}"
        )
    max_grad_norm = 0.0
    if sparse:
        # DeepSpeed's clipping leaves sparse gradients unscaled: the optimizer clips instead.
        max_grad_norm, ds_config["gradient_clipping"] = ds_config["gradient_clipping"], 0.0
        # DeepSpeed rebuilds sparse gradients from their own (valid) indices; opting out of torch's
        # invariant checks, as its warning asks, keeps them off and the log quiet.
        torch.sparse.check_sparse_tensor_invariants.disable()
    optimizer = build_optimizer(_param_groups(module, train_cfg.weight_decay), train_cfg, dist_info, max_grad_norm)

    def make_scheduler(opt: Any) -> Any:
        def multiplier(step: int) -> float:
            return lr_multiplier(step, train_cfg)

        return torch.optim.lr_scheduler.LambdaLR(opt, multiplier)

    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=make_scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    if train_cfg.compile:
        # In place (module.compile()): parameter names, checkpoints and exports stay those of the model.
        engine.compile()
    return engine


@contextlib.contextmanager
def gathered_params(params: Iterable[Any], modifier_rank: int | None = None):
    """Full (un-partitioned) parameters inside the block under ZeRO-3; a no-op otherwise."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def full_fp32_state_dict(engine: Any, model: Any) -> dict[str, Any] | None:
    """The model's full fp32 state dict on rank 0 (None on other ranks); every rank must call it.

    Reads DeepSpeed's fp32 master weights (ZeRO-1/2/3 partitions or the bf16 optimizer's copy) with
    `safe_get_full_fp32_param`, parameter by parameter, so ZeRO-3 never holds the whole model at once.
    Tied parameters keep all their names (HF's save_pretrained de-duplicates them).
    """
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    rank0 = is_rank0()
    by_id: dict[int, Any] = {}
    for _, param in model.named_parameters():
        if id(param) in by_id:
            continue
        full = safe_get_full_fp32_param(param)  # collective under ZeRO-3
        if full is None:
            with gathered_params([param]):
                full = param.detach().float()
        by_id[id(param)] = full.detach().to("cpu", torch.float32).clone() if rank0 else None
    if not rank0:
        return None
    out: dict[str, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in by_id:
            out[name] = by_id[id(tensor)]
        else:  # buffers: never partitioned
            out[name] = tensor.detach().to("cpu").clone()
    return out


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs more than tensors and plain containers to load (it could run code)."""


def _checkpoint_safe_globals() -> list[Any]:
    """The few DeepSpeed classes its own checkpoints pickle (loss scalers, the ZeRO stage enum, tensor
    fragment addresses): plain data, rebuilt by torch's weights-only unpickler without running code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Any:
    """Inside the block every `torch.load` (DeepSpeed's checkpoint engine and ZeRO's own loads) is a
    weights-only load with `_checkpoint_safe_globals` allowed, whatever `weights_only` the caller
    passed: a pickle that names any other global is refused with UnsafeCheckpointError instead of
    being executed."""
    import pickle

    import torch

    original = torch.load
    allowed = _checkpoint_safe_globals()

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), str(e).strip())
            raise UnsafeCheckpointError(
                f"refusing to load {f}: it is not a plain-tensor checkpoint ({detail.splitlines()[0][:200]}); "
                "polyteacher never unpickles code from checkpoints; resume only from checkpoints it wrote"
            ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
