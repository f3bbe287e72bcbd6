"""One writer per run directory (issue 14, case 4): a lock held by every writing command, stale
when its process is gone. Real processes: a holder, and the `polyteacher` CLI beside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.fsutil import LOCK_ENV, LOCK_FILE, RunDirLockedError, run_dir_lock
from launch.cli import main

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from core.fsutil import run_dir_lock
with run_dir_lock(sys.argv[1], "polyteacher pretrain (holder)"):
    print("held", flush=True)
    time.sleep(120)
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k not in (LOCK_ENV, "RANK")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _polyteacher(*argv):
    return subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def holder(tmp_path):
    run = tmp_path / "R"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_second_writer_is_refused_then_a_dead_holders_lock_is_taken_over(holder, monkeypatch):
    run, proc = holder
    record = json.loads((run / LOCK_FILE).read_text())
    assert record["pid"] == proc.pid and "holder" in record["command"]
    # A second writing command fails at once, in one line naming the holder.
    second = _polyteacher("pretrain", "--run-dir", str(run), "--preset", "tiny")
    assert second.returncode == 2
    err = second.stderr.strip().splitlines()[-1]
    assert err.startswith("polyteacher: RunDirLockedError:") and f"pid {proc.pid}" in err and str(run) in err
    monkeypatch.delenv(LOCK_ENV, raising=False)
    with pytest.raises(RunDirLockedError, match="in use by"):
        with run_dir_lock(run, "another"):
            pass
    # kill -9: the holder cannot clean up; its lock is stale and the next command takes it over.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    third = _polyteacher("pretrain", "--run-dir", str(run), "--preset", "tiny")
    assert third.returncode == 2 and "training data not found" in third.stderr  # past the lock
    assert not (run / LOCK_FILE).exists()  # released on exit


def test_lock_is_shared_with_child_processes_and_released(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCK_ENV, raising=False)
    run = tmp_path / "R"
    with run_dir_lock(run, "pipeline"):
        token = json.loads((run / LOCK_FILE).read_text())["token"]
        assert os.environ[LOCK_ENV] == token
        # A stage started by the holder (it inherits the token) runs under the same lock.
        child = subprocess.run([sys.executable, "-c", "import sys; from core.fsutil import run_dir_lock\n"
                                "with run_dir_lock(sys.argv[1], 'stage'): print('ok')", str(run)],
                               cwd=ROOT, env={**_env(), LOCK_ENV: token}, capture_output=True, text=True, timeout=60)
        assert child.stdout.strip() == "ok", child.stderr
        assert (run / LOCK_FILE).exists()
    assert not (run / LOCK_FILE).exists() and LOCK_ENV not in os.environ


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    run = tmp_path / "R"
    run.write_text("not a directory")
    assert main(["pretrain", "--run-dir", str(run), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a file, not a directory" in err
