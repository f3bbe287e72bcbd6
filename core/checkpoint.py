"""Checkpoints and exact resume.

- `TrainState`: runtime state (step, tokens, data position, RNG-free), checkpointed as state.json.
- `rng_state`, `set_rng_state`, `seed_everything`: every rank's python, numpy and torch RNG.
- `CheckpointManager`: DeepSpeed checkpoints + every rank's RNG states + state.json + config, with
  a COMPLETE marker written last (holding the SHA-256 of every file); incomplete checkpoints (a
  crash mid-write) are ignored, and resume verifies the digests and loads weights-only.
- `refuse_to_start_over`, `restore_or_start`, `config_yaml`: a loop's set-up.
- `export_hf`: a Hugging Face save_pretrained directory (safetensors, fp32, ZeRO-3 consolidated).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from core.config import ConfigError, to_dict
from core.distributed import (
    barrier,
    full_fp32_state_dict,
    get_rank,
    is_rank0,
)
from core.fsutil import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text


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
        """Step directories whose COMPLETE marker is whole: a missing, unreadable or garbled marker
        (a crash or a damaged disk) means the step is incomplete, never "complete without digests"."""
        return [p for p in self.all_checkpoints() if read_marker(p) is not None]

    def latest_complete(self) -> Path | None:
        """The newest checkpoint whose COMPLETE marker exists (None if there is none)."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def save(self, engine: Any, state: TrainState, config_yaml: str | None = None) -> Path:
        """Save on every rank (collective); returns the checkpoint directory. A full disk is a
        CheckpointError that says so and names the newest intact checkpoint (the partial step is
        removed)."""
        path = self.path_for(state.step)
        try:
            return self._save(engine, state, config_yaml, path)
        except Exception as e:
            if not _disk_full(e, self.root):
                raise
            if is_rank0():
                shutil.rmtree(path, ignore_errors=True)
            intact = self.latest_complete()
            raise CheckpointError(
                f"the disk is full: writing checkpoint {path} failed ({_first_line(e)}; "
                f"{shutil.disk_usage(self.root).free if self.root.exists() else 0} bytes free); "
                + (f"the newest intact checkpoint is {intact}: free space and rerun with --resume"
                   if intact else "no checkpoint of this run is intact yet: free space and run it again")
            ) from None

    def _save(self, engine: Any, state: TrainState, config_yaml: str | None, path: Path) -> Path:
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
        if read_marker(path) is None:
            raise CheckpointError(f"checkpoint {path} is incomplete (its {COMPLETE_MARKER} marker is missing or "
                                  "garbled); resume from another step")
        verify_checkpoint(path)
        from core.distributed import UnsafeCheckpointError, weights_only_loads

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
                f"checkpoint {path} does not fit this run's model or optimizer ({first[:200]}); it passed its digest "
                f"check, so it is whole but was written with different settings ({seen}): resume with the same "
                "model, optimizer and ZeRO settings, or start a new run under another out= name"
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
    """A checkpoint's files do not match the digests its COMPLETE marker recorded, or cannot be written."""


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]


def _disk_full(e: BaseException, where: Path) -> bool:
    """Whether `e`, raised while writing under `where`, comes from a full disk or quota: an OSError
    says so (ENOSPC, EDQUOT); torch's zip writer only says the write failed, so then the free space
    decides."""
    import errno

    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(e)
    if "No space left" in text:
        return True
    if isinstance(e, RuntimeError) and ("inline_container" in text or "write failed" in text):
        probe = where if where.exists() else where.parent
        try:
            return shutil.disk_usage(probe).free < 1 << 20
        except OSError:
            return False
    return False


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


_LEGACY_MARKER = re.compile(r"^step (\d+)\s*$")


def read_marker(path: Path) -> dict[str, Any] | None:
    """The COMPLETE marker of the step directory `path`: {"step", "sha256"} (an older polyteacher's
    `step N` gives {"step": N} without digests), or None when it is missing or garbled."""
    try:
        text = (path / COMPLETE_MARKER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    legacy = _LEGACY_MARKER.match(text)
    if legacy:
        return {"step": int(legacy.group(1))}
    try:
        marker = json.loads(text)
    except ValueError:
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("sha256"), dict) \
            or not all(isinstance(v, str) for v in marker["sha256"].values()):
        return None
    if _STEP_DIR.match(path.name) and marker.get("step") != int(path.name.split("_")[1]):
        return None
    return marker


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError when a file of `path` is missing, added or changed against COMPLETE's
    digests, or the marker is missing or garbled. A marker without digests (an older polyteacher's
    `step N`) passes, with a note."""
    marker = read_marker(path)
    if marker is None:
        raise CheckpointError(f"checkpoint {path}: its {COMPLETE_MARKER} marker is missing or garbled; the step is "
                              "incomplete")
    recorded = marker.get("sha256")
    if recorded is None:
        if is_rank0():
            print(f"note: {path / COMPLETE_MARKER} records no digests (written before they were); loading it "
                  "weights-only without a digest check", file=sys.stderr, flush=True)
        return
    found = checkpoint_digests(path)
    for name in sorted(set(recorded) | set(found)):
        if recorded.get(name) != found.get(name):
            what = "is missing" if name not in found else "is not part of it" if name not in recorded else "changed"
            raise CheckpointError(
                f"checkpoint {path}: {name} {what} since it was written (digests in {COMPLETE_MARKER}): the "
                "checkpoint is damaged"
            )


def refuse_to_start_over(checkpoints: CheckpointManager, resume: bool, hint: str = "choose another --out") -> None:
    """A fresh run on top of existing checkpoints would mix two runs' checkpoints: raise ConfigError
    (`hint` says what else the user can do)."""
    latest = checkpoints.latest_complete()
    if not resume and latest is not None:
        raise ConfigError(
            f"checkpoints already exist under {checkpoints.root} (latest {latest.name}); pass --resume to "
            f"continue that run, or {hint}"
        )


def restore_or_start(checkpoints: CheckpointManager, engine: Any, resume: bool, stage: str,
                     config_text: str | None = None, world_size: int | None = None) -> TrainState:
    """With --resume, the newest intact checkpoint's engine, RNG and TrainState; else a fresh state.

    A newest step that fails its digest check is skipped, loudly, for the one before it. Before
    loading, the checkpoint's config.yaml is compared with this run's (`config_text`): another model
    or optimizer is refused (CheckpointError), any other change (learning rate, steps, ...) and another
    number of processes (`world_size`) are printed. Rank 0 says which checkpoint on stderr, prefixed
    with `stage`, and records a resume in metrics.jsonl (`{"stage", "name", "step", "time", "event":
    "resumed", "checkpoint"}`): the step records after it replace those the interrupted run logged
    after that step."""
    candidates = checkpoints.complete_checkpoints()
    if resume and candidates:
        latest = None
        for path in reversed(candidates):
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                if is_rank0():
                    print(f"{stage}: WARNING: {e}; falling back to the step before it", file=sys.stderr, flush=True)
                continue
            latest = path
            break
        if latest is None:
            raise CheckpointError(f"every checkpoint under {checkpoints.root} is damaged (see the warnings above); "
                                  "remove them to start over, or restore them from a copy")
        if latest != candidates[-1] and is_rank0():
            print(f"{stage}: WARNING: resuming from {latest.name}, not the newest step {candidates[-1].name}, which "
                  "is damaged", file=sys.stderr, flush=True)
        check_resume_settings(latest, config_text, world_size, stage)
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


MODEL_KEYS = ("d_model", "num_layers", "vocab_size", "d_ff", "num_heads", "d_kv")
"""A config section holding any of these describes a model: resuming with it changed is refused."""
OPTIMIZER_KEYS = ("train.optimizer", "train.zero_stage", "train.offload", "train.offload_params")
"""Settings whose optimizer state a checkpoint cannot carry over: resuming with them changed is refused."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def check_resume_settings(path: Path, config_text: str | None, world_size: int | None, stage: str) -> None:
    """Compare the checkpoint `path`'s config.yaml and process count with this run's: refuse another
    model or optimizer (CheckpointError, before anything is loaded), print every other change."""
    import yaml

    changes: list[str] = []
    saved_file = path / "config.yaml"
    if config_text is not None and saved_file.is_file():
        try:
            saved, now = yaml.safe_load(saved_file.read_text(encoding="utf-8")), yaml.safe_load(config_text)
        except (yaml.YAMLError, UnicodeDecodeError):
            saved, now = None, None
        if isinstance(saved, dict) and isinstance(now, dict):
            model_sections = {k for k, v in {**saved, **now}.items()
                              if isinstance(v, dict) and any(m in v for m in MODEL_KEYS)}
            old, new = _flatten(saved), _flatten(now)
            refused = []
            for key in sorted(set(old) | set(new)):
                if old.get(key) == new.get(key):
                    continue
                text = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                if key in OPTIMIZER_KEYS or key.split(".", 1)[0] in model_sections:
                    refused.append(text)
                changes.append(text)
            if refused:
                raise CheckpointError(
                    f"checkpoint {path} was written with another model or optimizer ({'; '.join(refused)}); "
                    "resume with its settings, or start a new run under another out= name")
    if world_size is not None and (path / "rng").is_dir():
        before = len(list((path / "rng").glob("rank_*.json")))
        if before and before != world_size:
            changes.append(f"processes: {before} -> {world_size}")
    if changes and is_rank0():
        print(f"{stage}: resuming {path.name} with changed settings: {'; '.join(changes)}", file=sys.stderr,
              flush=True)


def config_yaml(cfg: Any) -> str:
    """A stage config as YAML text, the config.yaml stored in every checkpoint."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


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
