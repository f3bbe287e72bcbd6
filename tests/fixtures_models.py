"""Model fixtures shared by tests: tiny randomly initialised teacher and student directories.

- `tiny_model_cfg`: the `tiny` teacher preset (`core.models.ModelConfig`), 2+2 layers,
  d_model 128, tied embeddings.
- `tiny_teacher_dir`: that model, randomly initialised with seed 0 on the `tiny_tokenizer_dir`
  tokenizer (vocab 2000, padded to 2048 rows), saved with `save_pretrained` (safetensors) together
  with its tokenizer: `AutoModelForSeq2SeqLM.from_pretrained(dir)` and
  `AutoTokenizer.from_pretrained(dir)` both load it. Treat it as read-only (session-scoped).

Exported models for tests/test_export.py and tests/test_runtime.py, built once per session under the
pytest base temp directory by `session_export(tmp_path_factory, request, name)` (names listed there):
a d_model-64 T5 trained for TRAIN_STEPS steps on MASSIVE en-US text-to-text pairs (confident logits,
so int8 agreement is meaningful), an untrained d_model-64 T5 (seed 1; greedy outputs vary with the
input, which exercises the KV-cache path), an encoder NLU model on the tiny teacher, and their fp32
and int8 ONNX exports. Fixtures: `export_examples`, `trained_dir`, `trained_fp32`, `trained_int8`,
`random_fp32`, `nlu_int8`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

TINY_TEACHER_SEED = 0
TRAIN_STEPS = 60


@pytest.fixture(scope="session")
def tiny_model_cfg():
    from core.models import ModelConfig

    return ModelConfig(preset="tiny")


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir: Path, tiny_model_cfg) -> Path:
    """A seeded random tiny T5 teacher plus its tokenizer in one directory."""
    from core.models import build_model
    from data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(tiny_model_cfg, tokenizer, seed=TINY_TEACHER_SEED)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("tiny_teacher") / "teacher")


def save_model_dir(model, tokenizer, out: Path) -> Path:
    """`save_pretrained` of a model and its tokenizer into one new directory, atomically."""
    from core.fsutil import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


# ----------------------------------------------------------------------------- exported models


def _export_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "export-cache"
    path.mkdir(exist_ok=True)
    return path


def massive_examples(massive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """{"train": en-US train examples, "test": en-US + ja-JP test examples}, loaded once per session."""
    from massive.loader import load_massive

    cache = _export_cache_dir(tmp_path_factory) / "massive-arrow"
    data = load_massive(massive_dir, locales=["en-US", "ja-JP"], partitions=("train", "test"), cache_dir=cache,
                        progress=False)
    train = [e for e in data.examples(locale="en-US", partition="train")]
    test = data.examples(locale="en-US", partition="test")[:24] + data.examples(locale="ja-JP", partition="test")[:8]
    return {"train": train, "test": test}


def _small_t5(tokenizer, seed: int):
    from core.models import ModelConfig, build_model

    return build_model(ModelConfig(preset="tiny", d_model=64, d_ff=128, num_heads=2, d_kv=32), tokenizer, seed=seed)


def train_tiny_student(out: Path, tokenizer_dir: Path, train_examples: list) -> Path:
    """A d_model-64 T5 trained TRAIN_STEPS plain PyTorch steps on short MASSIVE en-US pairs."""
    import torch

    from data_prep.tokenizer import load_tokenizer
    from massive.format import to_text_to_text

    tokenizer = load_tokenizer(tokenizer_dir)
    model = _small_t5(tokenizer, seed=0)
    pairs = [to_text_to_text(e.words, e.slots, e.intent) for e in train_examples if len(e.words) <= 6]
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        batch = rng.sample(pairs, 16)
        enc = tokenizer([s for s, _ in batch], return_tensors="pt", padding=True)
        labels = tokenizer([t for _, t in batch], return_tensors="pt", padding=True)["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return save_model_dir(model, tokenizer, out)


def build_random_student(out: Path, tokenizer_dir: Path) -> Path:
    """An untrained d_model-64 T5 (seed 1) whose greedy output depends on the input (seed 0 and the
    tiny preset emit pad, the decoder start token, everywhere: tied embeddings copy it)."""
    from data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    return save_model_dir(_small_t5(tokenizer, seed=1), tokenizer, out)


def build_nlu_dir(out: Path, teacher_dir: Path) -> Path:
    """An EncoderNLUModel on the tiny teacher's encoder with random heads (5 intents, 4 slot labels) and
    hashed token 2- and 3-gram embeddings added to its inputs (the tiny preset's NLU layout)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from data_prep.tokenizer import load_tokenizer
    from student.nlu import EncoderNLUModel, NLULabels

    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir)
    labels = NLULabels(intents=["alarm_set", "alarm_query", "weather_query", "play_music", "datetime_query"],
                       slot_labels=["Other", "time", "date", "place_name"], max_length=32, source_model=str(teacher_dir),
                       ngram_buckets=257, ngram_orders=[2, 3], ngram_inputs=True)
    torch.manual_seed(0)
    model = EncoderNLUModel.from_seq2seq(seq2seq, labels, tokenizer=load_tokenizer(teacher_dir)).eval()
    return model.save_pretrained(out)


def session_export(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, name: str) -> Path:
    """Session-wide cached model and export directories by name:

    trained (HF dir), trained-fp32, trained-int8, random (HF dir), random-fp32, nlu (HF dir), nlu-fp32, nlu-int8.
    """
    from student.export import export
    from student.export_config import ExportConfig

    path = _export_cache_dir(tmp_path_factory) / name
    if path.exists():
        return path
    base, _, precision = name.partition("-")
    if precision == "fp32":
        return export(session_export(tmp_path_factory, request, base), path, ExportConfig())
    if precision == "int8":
        return export(session_export(tmp_path_factory, request, f"{base}-fp32"), path, ExportConfig(int8=True))
    if name == "trained":
        examples = massive_examples(request.getfixturevalue("massive_dir"), tmp_path_factory)
        return train_tiny_student(path, request.getfixturevalue("tiny_tokenizer_dir"), examples["train"])
    if name == "random":
        return build_random_student(path, request.getfixturevalue("tiny_tokenizer_dir"))
    if name == "nlu":
        return build_nlu_dir(path, request.getfixturevalue("tiny_teacher_dir"))
    raise KeyError(name)


@pytest.fixture(scope="session")
def export_examples(massive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    return massive_examples(massive_dir, tmp_path_factory)


def _session_export_fixture(name: str):
    """A session fixture returning `session_export(..., name)`."""

    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory, request) -> Path:
        return session_export(tmp_path_factory, request, name)

    return fixture


trained_dir = _session_export_fixture("trained")
trained_fp32 = _session_export_fixture("trained-fp32")
trained_int8 = _session_export_fixture("trained-int8")
random_fp32 = _session_export_fixture("random-fp32")
nlu_int8 = _session_export_fixture("nlu-int8")
