"""Shared test fixtures.

The data root comes from POLYTEACHER_DATA or ../shared (core.config.data_root). Tests that need
data the root lacks are skipped with the reason, never silently passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.config import data_root

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


# Set by single-process DeepSpeed engines built inside a test; a later test's subprocess must not
# inherit them (a stale MASTER_PORT makes its rendezvous fail with EADDRINUSE).
_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "CROSS_RANK", "CROSS_SIZE")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    saved = {k: os.environ.get(k) for k in _DISTRIBUTED_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def shared_root() -> Path:
    return data_root()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set POLYTEACHER_DATA to the shared data root)")
    return path


@pytest.fixture(scope="session")
def massive_dir(shared_root: Path) -> Path:
    """Directory of official MASSIVE <locale>.jsonl.gz files."""
    return _require(shared_root / "massive" / "data", "MASSIVE data")


@pytest.fixture(scope="session")
def corpora_dir(shared_root: Path) -> Path:
    return _require(shared_root / "corpora", "monolingual corpora")


@pytest.fixture(scope="session")
def flores_dir(shared_root: Path) -> Path:
    return _require(shared_root / "corpora" / "flores200" / "dev", "FLORES-200 dev")


# Fixtures shared across stages live in their own modules (one owner each); importing them here
# makes them visible to every test.
from fixtures_data import *  # noqa: E402,F401,F403
from fixtures_models import *  # noqa: E402,F401,F403
