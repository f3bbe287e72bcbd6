"""polyteacher: student stage (MASSIVE fine-tuning, the encoder NLU model, ONNX export and the
onnxruntime predictor).

What other layers may use of it (evaluation, launch) is named here; the modules inside may move.
Names are resolved on first use, so `import student` stays cheap and torch-free (the runtime side
needs only onnxruntime, tokenizers and numpy)."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "OnnxPredictor": "student.runtime",
    "read_manifest": "student.runtime",
    "load_nlu_model": "student.nlu",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'student' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
