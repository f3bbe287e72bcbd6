"""`PretrainConfig`: the `pretrain` (general domain), `indomain` (stage 2) and `icl` (in-context
training, docs/icl.md) preset sections."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from core.config import ConfigError
from core.fsutil import safe_path
from core.models import ModelConfig
from core.train_config import TrainConfig
from data_prep.icl import IclTrainConfig
from data_prep.objectives import ObjectiveConfig


@dataclasses.dataclass
class PretrainConfig:
    """Teacher pretraining: general-domain (stage 1) or continued in-domain (stage 2, init_from set)."""

    out: str = "teacher"
    """Name of the output model directory under the run directory; also names the checkpoints
    (checkpoints/<out>/) and the TensorBoard run (tb/<out>/)."""
    init_from: Optional[str] = None
    """Hugging Face model directory to continue from (stage 2, e.g. "teacher"), relative to the run
    directory or absolute; null = a new model built from `teacher`."""
    data: str = "data"
    """Packed data directory under the run directory, with train/ and heldout/ inside (data = general
    domain, data-indomain = MASSIVE train utterances)."""
    tokenizer: str = "tokenizer"
    """Tokenizer directory under the run directory (ignored with init_from: the model directory holds
    its own)."""
    teacher: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Model size (ignored with init_from: the loaded model keeps its shape)."""
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    """Denoising / causal-LM mixture."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Batch sizes, steps, optimiser, schedule, ZeRO stage, precision, intervals, seed."""
    icl: IclTrainConfig = dataclasses.field(default_factory=IclTrainConfig)
    """In-context training (`--section icl` sets icl.enabled): prompts of k demonstrations and a query
    drawn from MASSIVE train outside the held-out scenarios replace the packed `data`; the held-out
    loss is on such prompts from MASSIVE dev."""

    def validate(self) -> None:
        for name in ("out", "data", "tokenizer"):
            value = getattr(self, name)
            if not value or Path(value).is_absolute() or ".." in Path(value).parts:
                raise ConfigError(f"{name}={value!r} must be a non-empty path inside the run directory")
        if self.icl.enabled:
            self.icl.validate()
        if self.init_from is not None and not self.init_from:
            raise ConfigError("init_from must be null or a model directory")
        # Under a launcher the world size is known before any process group exists: check the batch
        # arithmetic now, before minutes of start-up.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.train.grad_accum_steps(world_size)


@dataclasses.dataclass(frozen=True)
class PretrainPaths:
    """Where a pretraining run reads and writes, all checked to stay in the run directory."""

    run_dir: Path
    train_data: Path
    heldout_data: Path
    tokenizer: Path
    init_from: Optional[Path]
    out: Path


def resolve_paths(cfg: PretrainConfig, run_dir: str | os.PathLike) -> PretrainPaths:
    run = Path(run_dir).resolve()
    data = safe_path(run, cfg.data)
    init_from = None
    if cfg.init_from is not None:
        candidate = Path(cfg.init_from).expanduser()
        init_from = candidate.resolve() if candidate.is_absolute() else safe_path(run, cfg.init_from)
    return PretrainPaths(
        run_dir=run,
        train_data=data / "train",
        heldout_data=data / "heldout",
        tokenizer=init_from if init_from is not None else safe_path(run, cfg.tokenizer),
        init_from=init_from,
        out=safe_path(run, cfg.out),
    )
