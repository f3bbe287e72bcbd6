"""What the benchmark scripts set before they import the project: one thread per process unless told
otherwise, DeepSpeed on CPU, quiet tokenizers; and where their results go. Import it before the
project (`from benchmarks.common import RESULTS`), running the benchmark as a module from the
repository root: `python -m benchmarks.NAME`."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
