"""Fault injection (issue 37): every case of `benchmarks/faults.py` run as a real command in a sandbox
(exit code and one-line message, no traceback, nothing outside the command's output changed, no
process alive 10 s after exit, no listening socket outside 127.0.0.1 during a one-node launch), and
the checkpoint cases run on a real DeepSpeed engine in this process: a garbled COMPLETE, a damaged
newest step, a resume with another optimizer or learning rate, a full disk (a real 1 MiB-scale tmpfs).

Fast cases take about 15 s in all; the slow ones (data prep, pipeline, a 2-rank launch) about 3 min.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import faults  # the driver, importable because pytest runs from the repository root

FAST = [c for c in faults.CASES if not c.slow]
SLOW = [c for c in faults.CASES if c.slow]


def _check(case: faults.Case, tmp_path: Path) -> None:
    outcome = faults.run_case(case, tmp_path)
    print(faults.table([outcome]))
    assert outcome.ok, f"{case.name}: {outcome.problems} (message: {outcome.message})"
    if outcome.exit_code not in (None, -9):
        assert outcome.message.startswith("polyteacher"), outcome.message


@pytest.mark.parametrize("case", FAST, ids=[c.name for c in FAST])
def test_fault(case, tmp_path):
    _check(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[c.name for c in SLOW])
def test_fault_slow(case, tmp_path):
    _check(case, tmp_path)


def test_driver_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "faults.json"
    assert faults.main(["-k", "export_overwrite_c", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[-3].split()[:2] == ["case", "exit"]
    records = json.loads(out.read_text())
    assert [r["case"] for r in records] == ["export_overwrite_checkpoints", "export_overwrite_cwd"]
    assert all(r["exit_code"] == 2 and r["problems"] == [] and r["message"] for r in records)


# ----------------------------------------------------------------------------- checkpoints, in process


@pytest.fixture(scope="module")
def dist():
    from core.distributed import init_distributed

    return init_distributed(num_threads=1)


def _engine(dist, optimizer: str = "adamw"):
    from test_training import _tiny_t5

    from core.distributed import build_engine
    from core.train_config import TrainConfig

    cfg = TrainConfig(micro_batch_size=4, global_batch_size=4, max_steps=4, warmup_steps=1, lr=1e-2,
                      zero_stage=0, optimizer=optimizer)
    return build_engine(_tiny_t5(), cfg, dist)


def _config_text(optimizer: str = "adamw", lr: float = 0.01) -> str:
    return f"teacher:\n  d_model: 32\ntrain:\n  optimizer: {optimizer}\n  lr: {lr}\n"


def _two_steps(root: Path, dist):
    from test_training import _batches, _train

    from core.checkpoint import CheckpointManager, TrainState

    engine = _engine(dist)
    manager = CheckpointManager(root, "t", keep=3)
    _train(engine, _batches(2))
    first = manager.save(engine, TrainState(step=2), _config_text())
    second = manager.save(engine, TrainState(step=4), _config_text())
    return manager, first, second


def test_a_garbled_complete_marker_means_the_step_is_incomplete(tmp_path, dist):
    from core.checkpoint import COMPLETE_MARKER

    manager, first, second = _two_steps(tmp_path, dist)
    for garbage in ('{"step": 4, "sha', '{"step": 4}', "[]", "\xff"):
        (second / COMPLETE_MARKER).write_text(garbage, encoding="latin-1")
        assert manager.latest_complete() == first, garbage


def test_resume_falls_back_past_a_damaged_newest_step_loudly(tmp_path, dist, capsys):
    from core.checkpoint import restore_or_start

    manager, first, second = _two_steps(tmp_path, dist)
    (second / "state.json").write_text(json.dumps({"step": 99}))
    state = restore_or_start(manager, _engine(dist), resume=True, stage="pretrain", config_text=_config_text())
    assert state.step == 2
    err = capsys.readouterr().err
    assert "WARNING" in err and "state.json changed" in err and f"resuming from {first.name}" in err


def test_resume_with_another_optimizer_is_refused_before_loading(tmp_path, dist):
    from core.checkpoint import CheckpointError, restore_or_start

    manager, _, second = _two_steps(tmp_path, dist)
    # engine=None: anything that tried to load into it would fail differently; the refusal comes first.
    with pytest.raises(CheckpointError, match=r"another model or optimizer \(train.optimizer: 'adamw' -> 'adafactor'\)"):
        restore_or_start(manager, None, resume=True, stage="pretrain", config_text=_config_text("adafactor"))


def test_resume_with_another_learning_rate_says_what_changed(tmp_path, dist, capsys):
    from core.checkpoint import restore_or_start

    manager, _, second = _two_steps(tmp_path, dist)
    state = restore_or_start(manager, _engine(dist), resume=True, stage="pretrain",
                             config_text=_config_text(lr=0.02), world_size=2)
    assert state.step == 4
    err = capsys.readouterr().err
    assert "changed settings: train.lr: 0.01 -> 0.02; processes: 1 -> 2" in err


@contextlib.contextmanager
def _tmpfs(path: Path, size: int):
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip()}); needs root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_while_checkpointing_says_so_and_names_the_intact_checkpoint(tmp_path, dist):
    """A real ENOSPC: the checkpoints live on a tmpfs with room for one checkpoint and a half."""
    from test_training import _batches, _train

    from core.checkpoint import CheckpointError, CheckpointManager, TrainState

    engine = _engine(dist)
    _train(engine, _batches(2))
    probe = CheckpointManager(tmp_path / "probe", "t").save(engine, TrainState(step=2))
    one = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    with _tmpfs(tmp_path / "disk", (one * 3 // 2 // 4096 + 2) * 4096) as disk:
        manager = CheckpointManager(disk, "t", keep=5)
        first = manager.save(engine, TrainState(step=2))
        with pytest.raises(CheckpointError) as info:
            manager.save(engine, TrainState(step=4))
        message = str(info.value)
        assert "the disk is full" in message and f"the newest intact checkpoint is {first}" in message
        assert "\n" not in message
        assert manager.latest_complete() == first and not manager.path_for(4).exists()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_dead_holders_running_children_keep_the_lock(tmp_path):
    """The holder of a run directory's lock is gone (kill -9) but a stage it started still runs: the
    next command must not take the lock over."""
    from core.fsutil import LOCK_ENV, LOCK_FILE, RunDirLockedError, run_dir_lock

    run = tmp_path / "R"
    holder = (
        "import os, subprocess, sys, time\n"
        f"sys.path.insert(0, {str(faults.ROOT)!r})\n"
        "from core.fsutil import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1], 'polyteacher pipeline'):\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "    print(child.pid, flush=True)\n"
        "    os._exit(0)\n"  # the holder dies without releasing; its child runs on
    )
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    proc = subprocess.run([sys.executable, "-c", holder, str(run)], capture_output=True, text=True, env=env, timeout=60)
    child = int(proc.stdout.split()[0])
    try:
        assert (run / LOCK_FILE).exists()
        with pytest.raises(RunDirLockedError, match=f"pid\\(s\\) {child} it started still run"):
            with run_dir_lock(run, "polyteacher data prepare"):
                pass
    finally:
        os.kill(child, 9)
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    with run_dir_lock(run, "polyteacher data prepare"):  # stale now: taken over
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
