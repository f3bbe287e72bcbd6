"""The one rule for loading a model directory, with the same messages in every command.

A model directory is a Hugging Face `save_pretrained` directory with `config.json` and safetensors
weights (`model.safetensors`, or a sharded `model.safetensors.index.json`). Pickle weights
(`pytorch_model.bin`) are refused everywhere: unpickling a file can run code, and a directory that
loads in one command but not in another is worse than one clear refusal. The message says how to
convert such a directory once, for a user who trusts its source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")

ONNX_MANIFEST = "manifest.json"
"""What marks an ONNX export directory (written by `polyteacher export`, read by student/runtime.py)."""
NLU_LABELS = "nlu_labels.json"
"""What marks an encoder NLU model directory (written by student/nlu.py)."""


def model_kind(model_dir: str | os.PathLike) -> str | None:
    """"onnx" (an export directory), "encoder_nlu" (a PyTorch encoder with NLU heads), "seq2seq" (a
    Hugging Face seq2seq directory), or None (none of these: no manifest, no config.json)."""
    model_dir = Path(model_dir)
    if (model_dir / ONNX_MANIFEST).is_file():
        return "onnx"
    if (model_dir / NLU_LABELS).is_file():
        return "encoder_nlu"
    if (model_dir / "config.json").is_file():
        return "seq2seq"
    return None


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files of a model directory in name order: every `*.safetensors` (one file or the
    shards of a sharded checkpoint), the only weights polyteacher loads; for an NLU ensemble, its
    members' (member-0/model.safetensors, ...)."""
    model_dir = Path(model_dir)
    if is_nlu_ensemble(model_dir):
        members = json.loads((model_dir / NLU_LABELS).read_text(encoding="utf-8"))["members"]
        return [f for name in members if (model_dir / name).is_dir() for f in weight_files(model_dir / name)]
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix == ".safetensors")


def is_nlu_ensemble(model_dir: str | os.PathLike) -> bool:
    """An encoder NLU ensemble directory (student.nlu.NLUEnsemble): nlu_labels.json lists member
    sub-directories, which hold the weights (each is checked when it is loaded)."""
    path = Path(model_dir) / NLU_LABELS
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("members"))
    except (json.JSONDecodeError, AttributeError):
        return False


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or in a format polyteacher does not load."""


def check_model_dir(path: str | os.PathLike, what: str = "model directory") -> Path:
    """`path` when it is a loadable model directory, else ModelDirError (one line, naming it)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{what} {path}: no such directory")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{what} {path}: not a model directory (no config.json)")
    _check_config_json(path / "config.json")
    if any((path / name).is_file() for name in SAFETENSORS_FILES) or is_nlu_ensemble(path):
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        return path
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickles:
        raise ModelDirError(
            f"{what} {path}: its weights are a pickle ({pickles[0]}), which polyteacher does not load "
            "(unpickling can run code); if you trust its source, convert it to safetensors once: python -c "
            "\"import sys; from transformers import AutoModelForSeq2SeqLM as M; "
            "M.from_pretrained(sys.argv[1], use_safetensors=False).save_pretrained(sys.argv[1])\" "
            f"{path}  (then remove {pickles[0]})"
        )
    raise ModelDirError(f"{what} {path}: no weights (model.safetensors); the directory is incomplete")


def _check_config_json(path: Path) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelDirError(f"{path}: byte {e.start} is not UTF-8; config.json is damaged: restore it from the "
                            "model's source") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); config.json is "
                            "damaged: restore it from the model's source") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{path}: a JSON {type(config).__name__}, not an object; restore config.json from the "
                            "model's source")


def check_safetensors(path: Path) -> None:
    """ModelDirError unless `path` is a whole safetensors file: its header parses and the file is as
    long as the header says (a copy cut short, a full disk)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("the header is cut short")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelDirError(f"{path}: not a readable safetensors file ({e}); copy or export the model "
                            "again") from None
    if 8 + n + end != size:
        raise ModelDirError(f"{path}: {size} bytes, but its header describes {8 + n + end}: the file is "
                            f"{'truncated' if size < 8 + n + end else 'longer than its contents'}; copy or "
                            "export the model again")


def load_seq2seq_model(path: str | os.PathLike, what: str = "model directory", **kwargs: Any) -> Any:
    """`AutoModelForSeq2SeqLM.from_pretrained` of a checked directory: safetensors only, no remote code.
    A config.json that does not fit the weights (another size, an edited field) is a ModelDirError."""
    from transformers import AutoModelForSeq2SeqLM

    path = check_model_dir(path, what)
    try:
        return AutoModelForSeq2SeqLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False,
                                                     **kwargs)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        text = str(e)
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(e).__name__]
        why = ("weights in model.safetensors have other shapes than config.json describes"
               if "mismatch" in text else lines[0][:300])
        raise ModelDirError(f"{what} {path}: config.json and model.safetensors do not fit together ({why}); "
                            "restore the directory as it was saved") from None
