"""Clean shutdown of `polyteacher launch` (issue 14, case 3): a signal to the launch process reaches
every process of the run. Real processes: a stand-in launcher that starts two ranks and, like
DeepSpeed's runner, dies on SIGTERM without passing it on; and a real 2-rank CPU launch, whose ranks
save a checkpoint at the next step boundary and stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RANK = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
RUNNER = f"""
import subprocess, sys, time
ranks = [subprocess.Popen([sys.executable, "-c", {RANK!r}, f"{{sys.argv[1]}}/rank{{i}}.pid"]) for i in range(2)]
time.sleep(120)
"""
LAUNCH = """
import sys
from launch import launcher
sys.exit(launcher.run_process_tree([sys.executable, "-c", sys.argv[1], sys.argv[2]], dict(__import__("os").environ),
                                   grace_s=5))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launch_reaches_every_rank(tmp_path, signum):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launch = subprocess.Popen([sys.executable, "-c", LAUNCH, RUNNER, str(tmp_path)], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True)
    pid_files = [tmp_path / f"rank{i}.pid" for i in range(2)]
    try:
        assert _wait_for(lambda: all(p.exists() and p.read_text() for p in pid_files), 30)
        ranks = [int(p.read_text()) for p in pid_files]
        os.kill(launch.pid, signum)  # the launch process only, not its group
        assert launch.wait(timeout=30) == 128 + signum
        assert _wait_for(lambda: not any(_alive(pid) for pid in ranks), 10), "a rank outlived the launch"
        assert f"stopped by {signal.Signals(signum).name}" in launch.stderr.read()
    finally:
        if launch.poll() is None:
            launch.kill()
        for p in pid_files:
            if p.exists() and p.read_text():
                try:
                    os.kill(int(p.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@pytest.mark.slow
def test_sigterm_to_a_two_rank_launch_checkpoints_then_stops_every_rank(tmp_path, tiny_tokenizer_dir, tiny_packed_dir):
    from test_pretrain import env, launch_cmd, make_run_dir

    run = make_run_dir(tmp_path / "run", tiny_tokenizer_dir, tiny_packed_dir)
    cmd = launch_cmd("--run-dir", str(run), "--preset", "tiny", "train.max_steps=100000", "train.log_every=1",
                     "train.save_every=100000", "train.eval_every=100000", "train.micro_batch_size=2",
                     "train.global_batch_size=4", "train.warmup_steps=1", "train.precision=fp32")
    metrics = run / "metrics.jsonl"
    with open(run / "log.txt", "w") as log:
        launch = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Training has started on both ranks once a step is logged.
            assert _wait_for(lambda: metrics.exists() and '"loss"' in metrics.read_text(), 120), \
                (run / "log.txt").read_text()[-3000:]
            tree = _descendants(launch.pid)
            assert len(tree) >= 3  # the DeepSpeed runner and its two ranks (at least)
            os.kill(launch.pid, signal.SIGTERM)  # the launch process only
            assert launch.wait(timeout=60) == 128 + signal.SIGTERM
            assert _wait_for(lambda: not any(_alive(pid) for pid in tree), 10), "a rank outlived the launch"
            written = metrics.read_text()
            time.sleep(2)
            assert metrics.read_text() == written  # nothing writes after the launch returned
            # Both ranks stopped at the same step boundary, after a checkpoint; no model was exported.
            log_text = (run / "log.txt").read_text()
            stopped = sorted(set(re.findall(r"stopped by SIGTERM at step (\d+)", log_text)))
            assert len(stopped) == 1, log_text[-3000:]
            assert (run / "checkpoints" / "teacher" / f"step_{int(stopped[0]):08d}" / "COMPLETE").is_file()
            assert not (run / "teacher").exists()
        finally:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)
            for pid in _descendants(launch.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
