"""Big-model inference: loading a frozen model (a teacher) that does not fit on one device.

Two ways, chosen by config (`ModelLoadConfig` for accelerate, `distill.teacher_shard` for ZeRO-3):

- **One process, several devices (accelerate).** `device_map="auto"`: the model is first built on
  the meta device under accelerate's `init_empty_weights` (no memory), accelerate's
  `infer_auto_device_map` places whole `T5Block`s (the model's `_no_split_modules`) on the GPUs in
  order, then the CPU, then the disk, within `max_memory` per device; `from_pretrained` then loads
  the safetensors straight into that map. Modules on the CPU or the disk are brought onto their
  execution device for their forward only (accelerate's hooks); weights on the disk are read from
  the model's own safetensors file when their dtype is the stored one, otherwise written once into
  `offload_folder`. Used by every `evaluate` command (`load.*`) and by `distill` (`teacher_load.*`).
- **Several ranks (distillation).** `shard_zero3`: the teacher is built under `deepspeed.zero.Init`
  (each rank allocates only its partition; rank 0 reads the safetensors layer by layer into the
  partitions) and wrapped in a ZeRO-3 engine without an optimizer: each module's parameters are
  all-gathered just before its forward and released after it, so a rank holds P / world_size of the
  weights plus the layers in flight. The arithmetic is the unsharded model's, so its logits are the
  same. This module is, with `core/distributed.py` and the checkpoint code (`core/checkpoint.py`), the only one that
  imports DeepSpeed.

Precision (`resolve_dtype`): "auto" is bf16 on a GPU that supports it (else fp16) and fp32 on CPU
(fp16 is refused on CPU, as for training; bf16 training on CPU runs the fp32 teacher under the same
bf16 autocast as the student: `autocast_forward`).

Model directories are checked and loaded by `core.modeldir`'s one rule: safetensors only, never
remote code.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from core.distributed import DistInfo

# accelerate's size strings (accelerate.utils.convert_file_size_to_int): 10**k for KB/MB/GB, 2**k for
# KiB/MiB/GiB; a trailing lowercase b means bits.
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMG]i?[Bb])\s*$", re.IGNORECASE)

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class ModelLoadConfig:
    """Where the weights of a frozen model go when it does not fit on one device (accelerate)."""

    device_map: Literal["none", "auto"] = "none"
    """none: the whole model on one device (`device`); auto: accelerate's device map, GPUs first, then the CPU, then the disk, within max_memory."""
    max_memory: dict = dataclasses.field(default_factory=dict)
    """device_map=auto: the most memory each device may hold, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB} ("cpu", or a GPU index; sizes as accelerate reads them: 500MB, 2GiB, or bytes); empty = what each device has free. What does not fit goes to the disk (offload_folder)."""
    offload_folder: str = ""
    """device_map=auto: directory for weights offloaded to the disk (relative: inside the run directory, or inside --out when there is none; absolute: as given). Empty = disk offload refused."""

    def validate(self) -> None:
        parse_max_memory(self.max_memory)
        if self.max_memory and self.device_map == "none":
            raise ConfigError("max_memory is used only with device_map=auto; set device_map=auto or drop max_memory")
        if self.offload_folder and self.device_map == "none":
            raise ConfigError("offload_folder is used only with device_map=auto; set device_map=auto or drop offload_folder")


def parse_max_memory(max_memory: dict) -> dict[int | str, int | str]:
    """`max_memory` with GPU indices as ints ("0" -> 0) and sizes checked; ConfigError naming the bad entry."""
    out: dict[int | str, int | str] = {}
    for key, value in max_memory.items():
        device: int | str
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            device = key
        elif isinstance(key, str) and key.isdigit():
            device = int(key)
        elif key == "cpu":
            device = "cpu"
        else:
            raise ConfigError(f"max_memory: unknown device {key!r}; allowed: 'cpu' or a GPU index (0, 1, ...)")
        if isinstance(value, bool) or not (
            (isinstance(value, int) and value > 0) or (isinstance(value, str) and _SIZE.match(value))
        ):
            raise ConfigError(
                f"max_memory.{key}: {value!r} is not a size; use bytes or a number with a unit (500MB, 2GiB, 1.5GB)"
            )
        out[device] = value.strip() if isinstance(value, str) else value
    return out


def parse_max_memory_flag(text: str) -> dict[str, str]:
    """`--max-memory cpu=50MB,0=10GiB` -> {"cpu": "50MB", "0": "10GiB"} (checked by ModelLoadConfig)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = item.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise ConfigError(f"--max-memory: {item!r} is not DEVICE=SIZE (e.g. cpu=50GiB,0=70GiB)")
        out[device.strip()] = size.strip()
    return out


def resolve_offload_folder(value: str, root: str | os.PathLike) -> str:
    """An absolute offload folder: `value` when absolute (a user-given path), else inside `root`
    (refusing paths that escape it, as every run-relative path)."""
    from core.fsutil import safe_path

    if not value:
        return ""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else safe_path(root, value))


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """The torch dtype of weights: "auto" -> bf16 on a GPU that supports it, else fp16; fp32 on CPU."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype: {name!r} is not allowed; allowed values: {', '.join(map(repr, DTYPES))}")
    if name == "auto":
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "float16" and not on_gpu:
        raise ConfigError("dtype: float16 weights are not supported on CPU (no fast fp16 matmul there); use float32 or bfloat16")
    return getattr(torch, name)


# ----------------------------------------------------------------------------- one process: accelerate


def empty_model(model_dir: str | os.PathLike) -> Any:
    """The model of a checked directory built on the meta device (accelerate's `init_empty_weights`):
    names, shapes and tied weights, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from core.modeldir import check_model_dir

    config = AutoConfig.from_pretrained(str(check_model_dir(model_dir)), trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=False)
    model.tie_weights()
    return model


def infer_device_map(model_dir: str | os.PathLike, max_memory: dict, dtype: torch.dtype) -> dict[str, int | str]:
    """accelerate's device map for the model in `model_dir` at `dtype`: {module name: GPU index, "cpu"
    or "disk"}; whole `_no_split_modules` (T5Block) per device, GPUs in order, then CPU, then disk."""
    from accelerate import infer_auto_device_map

    model = empty_model(model_dir)
    return dict(infer_auto_device_map(
        model, max_memory=parse_max_memory(max_memory) or None,
        no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []), dtype=dtype,
    ))


def load_model(model_dir: str | os.PathLike, what: str = "model directory", *, device: str = "cpu",
               dtype: torch.dtype | None = None, load: ModelLoadConfig | None = None) -> Any:
    """A frozen seq2seq model (eval mode, no gradients) from a checked directory.

    device_map=none: the whole model on `device`. device_map=auto: placed by `infer_device_map`
    (its map is `model.hf_device_map`); disk offload needs `load.offload_folder` (absolute, see
    `resolve_offload_folder`). Feed inputs on `input_device(model)`.
    """
    import torch

    from core.modeldir import check_model_dir, load_seq2seq_model

    load = load or ModelLoadConfig()
    dtype = dtype or torch.float32
    path = check_model_dir(model_dir, what)
    if load.device_map == "none":
        model = load_seq2seq_model(path, what, dtype=dtype).to(device)
    else:
        max_memory = parse_max_memory(load.max_memory)
        if torch.device(device).type == "cpu":
            # device=cpu: no GPU in the map, whatever the machine has.
            from accelerate.utils import get_max_memory

            max_memory = {"cpu": max_memory.get("cpu", get_max_memory()["cpu"])}
        device_map = infer_device_map(path, max_memory, dtype)
        on_disk = sorted(name or "(the whole model)" for name, where in device_map.items() if where == "disk")
        if on_disk and not load.offload_folder:
            shown = ", ".join(on_disk[:4]) + (f" and {len(on_disk) - 4} more" if len(on_disk) > 4 else "")
            raise ConfigError(
                f"{what} {path}: max_memory {load.max_memory or '(free memory)'} leaves {shown} for the disk; "
                "set offload_folder (a directory for offloaded weights) or give the devices more max_memory"
            )
        kwargs: dict[str, Any] = {"device_map": device_map}
        if on_disk:
            Path(load.offload_folder).mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = load.offload_folder
        model = load_seq2seq_model(path, what, dtype=dtype, **kwargs)
    model.eval().requires_grad_(False)
    return model


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its first module (its embedding) for a dispatched
    model (accelerate's hooks move them on from there; "cpu" for one on the disk), else the device
    of its first parameter."""
    import torch

    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        return torch.device("cpu" if first in ("cpu", "disk") else first)
    return next(model.parameters()).device


def placement(model: Any) -> dict[str, str]:
    """{parameter name: where its weight is now}: "cpu", "cuda:N", or "disk" (on the meta device,
    read by accelerate's hook at each forward); tied parameters once, under their first name."""
    seen: set[int] = set()
    out: dict[str, str] = {}
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        out[name] = "disk" if param.device.type == "meta" else str(param.device)
    return out


def autocast_forward(model: Any, dtype: torch.dtype) -> Any:
    """Run `model`'s forward (and so `generate`) under CPU autocast to `dtype` (weights stay as they
    are); returns the model."""
    import torch

    model.forward = torch.autocast("cpu", dtype=dtype)(model.forward)
    return model


def is_materialized(model: Any) -> bool:
    """Every parameter holds its full weights in memory (not on the disk/meta device, not a ZeRO-3
    partition)."""
    return not any(p.device.type == "meta" or hasattr(p, "ds_id") for p in model.parameters())


def load_subset(model_dir: str | os.PathLike, prefixes: list[str], dtype: torch.dtype | None = None) -> Any:
    """The model of `model_dir` on the meta device with only the tensors whose names start with one
    of `prefixes` read from its safetensors (on the CPU): what a student initialised from a few
    teacher layers needs, without the whole teacher in memory."""
    import json

    import torch
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    from core.modeldir import check_model_dir

    path = check_model_dir(model_dir)
    dtype = dtype or torch.float32
    model = empty_model(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    wanted = tuple(prefixes)
    for file in files:
        with safe_open(str(path / file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(wanted):
                    set_module_tensor_to_device(model, name, "cpu", value=f.get_tensor(name).to(dtype))
    model.tie_weights()  # setting a tied tensor replaced one of its parameters: share it again
    model.eval().requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- several ranks: ZeRO-3


def zero3_inference_config(dtype: torch.dtype, dist_info: DistInfo) -> dict[str, Any]:
    """DeepSpeed config of a frozen ZeRO-3 model: no optimizer, every parameter partitioned
    (persistence threshold 0: a frozen model has no gradients to reduce, so only the weights are
    worth sharding, small ones included)."""
    import torch

    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": dist_info.world_size,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "overlap_comm": dist_info.on_gpu,
        },
        "bf16": {"enabled": dist_info.on_gpu and dtype == torch.bfloat16},
        "fp16": {"enabled": dist_info.on_gpu and dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def shard_zero3(model_dir: str | os.PathLike, what: str, dtype: torch.dtype, dist_info: DistInfo) -> Any:
    """The frozen model of `model_dir` sharded over every rank with ZeRO-3 (collective: every rank
    calls it). Returns the module (eval mode, no gradients): call it as the unsharded model; every
    rank must run the same number of forwards (each one gathers parameters from all ranks). The
    engine stays reachable as `model.__dict__["zero3_engine"]`."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from core.modeldir import load_seq2seq_model

    ds_config = zero3_inference_config(dtype, dist_info)
    # While this object lives, from_pretrained builds the model under deepspeed.zero.Init (each rank
    # allocates only its partition) and rank 0 loads the checkpoint into the partitions module by
    # module. It is a process-wide switch: drop it before anything else (the student) is built.
    hf_switch = HfDeepSpeedConfig(ds_config)
    try:
        model = load_seq2seq_model(model_dir, what, dtype=dtype)
    finally:
        del hf_switch
        unset_hf_deepspeed_config()
    model.eval().requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    # Not a submodule (the engine holds the model): kept alive with it, outside nn.Module's registry.
    model.__dict__["zero3_engine"] = engine
    return model


def local_partition_numel(model: Any) -> int:
    """Elements of the model's weights this rank holds (its ZeRO-3 partitions, else every parameter)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
    return total


# ----------------------------------------------------------------------------- planning


def inference_memory_rows(total: int, largest_layer: int, nodes: int, gpus_per_node: int,
                          bytes_per_param: int = 2) -> list[dict[str, Any]]:
    """Weights memory per GPU (bytes) of a frozen model run forward only, for the ways of placing it:
    a replica on every rank; ZeRO-3 over all GPUs (P / N per GPU plus the layer being gathered and
    the one prefetched); accelerate's device map over one node's GPUs (one process per node); the
    same with everything but one layer offloaded to the CPU. Activations come on top."""
    num_gpus = nodes * gpus_per_node
    p, layer = total * bytes_per_param, largest_layer * bytes_per_param
    return [
        {"placement": "replica per rank", "gpu_bytes": p, "cpu_bytes_per_node": 0,
         "note": "teacher_shard=none"},
        {"placement": f"ZeRO-3 over {num_gpus} GPUs", "gpu_bytes": p // num_gpus + 2 * layer, "cpu_bytes_per_node": 0,
         "note": "teacher_shard=zero3: P/N + 2 gathered layers"},
        {"placement": f"device_map=auto over {gpus_per_node} GPUs", "gpu_bytes": -(-p // gpus_per_node) + layer,
         "cpu_bytes_per_node": 0, "note": "one process (evaluate, 1-rank distill): P/G + 1 layer"},
        {"placement": "device_map=auto, CPU offload", "gpu_bytes": 2 * layer, "cpu_bytes_per_node": p,
         "note": "one process: layers stream from the CPU"},
    ]
