"""The runtime install (runtime/pyproject.toml, `polyteacher-runtime`): in a fresh virtual environment
with only onnxruntime, tokenizers and numpy from the package index, `polyteacher-predict` answers an
utterance from an exported model, and torch cannot even be imported there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{cmd}: {out.stderr[-2000:]}"
    return out


@pytest.mark.slow
def test_runtime_install_answers_without_torch(trained_int8: Path, tmp_path: Path):
    # Without PYTHONPATH: this checkout on the path would make pip and Python see its modules.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels,
          REPO / "runtime"], env=env)
    (wheel,) = wheels.glob("polyteacher_runtime-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], env=env)
    pip = venv / "bin" / "pip"
    _run([pip, "install", "-q", "onnxruntime", "tokenizers", "numpy"], env=env, cwd=tmp_path)
    _run([pip, "install", "-q", "--no-deps", wheel], env=env, cwd=tmp_path)
    python = venv / "bin" / "python"
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    out = _run([venv / "bin" / "polyteacher-predict", "--model", trained_int8, "--locale", "en-US", "wake me up at five am"],
               env=env, cwd=tmp_path)
    (record,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert record["words"] == ["wake", "me", "up", "at", "five", "am"] and len(record["labels"]) == 6
    # The modules came from the installed package, not from this checkout.
    where = _run([python, "-c", "import student.runtime as r, sys; print(r.__file__); "
                  "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"], env=env, cwd=tmp_path)
    path, heavy = where.stdout.splitlines()
    assert path.startswith(str(venv)) and heavy == "[]"
