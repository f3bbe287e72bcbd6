"""polyteacher: student stage (MASSIVE fine-tuning, the model kinds and their registry, the encoder
NLU model, ONNX export and the onnxruntime predictor).

What other layers may use of it (evaluation, launch) is named here; the modules inside may move.
Names are resolved on first use, so `import student` stays cheap and torch-free (the runtime side
needs only onnxruntime, tokenizers and numpy)."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "OnnxPredictor": "student.runtime",
    "read_manifest": "student.runtime",
    "KINDS": "student.kinds",
    "ModelKind": "student.kinds",
    "PredictOptions": "student.kinds",
    "kind_of": "student.kinds",
    "kind_for_head": "student.kinds",
    "load_nlu_model": "student.kinds",
    "Seq2SeqPredictor": "student.text_to_text",
    "load_text_to_text": "student.text_to_text",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'student' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
