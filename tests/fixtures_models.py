"""Model fixtures shared by tests: tiny randomly initialised teacher and student directories.

- `tiny_model_cfg`: the `tiny` teacher preset (`teacher.presets.ModelConfig`), 2+2 layers,
  d_model 128, tied embeddings.
- `tiny_teacher_dir`: that model, randomly initialised with seed 0 on the `tiny_tokenizer_dir`
  tokenizer (vocab 2000, padded to 2048 rows), saved with `save_pretrained` (safetensors) together
  with its tokenizer: `AutoModelForSeq2SeqLM.from_pretrained(dir)` and
  `AutoTokenizer.from_pretrained(dir)` both load it. Treat it as read-only (session-scoped).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TEACHER_SEED = 0


@pytest.fixture(scope="session")
def tiny_model_cfg():
    from teacher.presets import ModelConfig

    return ModelConfig(preset="tiny")


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir: Path, tiny_model_cfg) -> Path:
    """A seeded random tiny T5 teacher plus its tokenizer in one directory."""
    from data_prep.tokenizer import load_tokenizer
    from launch.fsutil import atomic_dir
    from teacher.presets import build_model

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(tiny_model_cfg, tokenizer, seed=TINY_TEACHER_SEED)
    out = tmp_path_factory.mktemp("tiny_teacher") / "teacher"
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
