"""Pipeline stages side by side (launch.schedule): the order and threads the scheduler chooses for a
dependency table (pure, no processes), then the runner with real processes: two stages overlap and
their dependant waits for both, a failure stops the stage beside it, a signal reaches every stage."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from launch.pipeline import RUNS_ALONE, STAGES, PipelineConfig
from launch.schedule import (
    FORWARDER,
    StageFailed,
    StageScheduler,
    Start,
    beside_others,
    parallel_slots,
    priority_order,
    run_commands,
    run_scheduled,
    simulate,
)

ROOT = Path(__file__).resolve().parents[1]
# A diamond with a long side branch: a -> (b, c) -> d, and a -> e -> f -> g (the longest chain).
DEPS = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c"), "e": ("a",), "f": ("e",), "g": ("f",)}
ORDER = list(DEPS)


def test_priority_puts_the_head_of_the_longest_chain_first_and_keeps_dependencies_first():
    # Equal weights (a first run): chains counted in stages; e heads 3 stages, b and c 2 each.
    assert priority_order(ORDER, DEPS) == ["a", "e", "b", "c", "f", "d", "g"]
    # Measured seconds change it: d is long, so b and c (its inputs) go before e.
    assert priority_order(ORDER, DEPS, {"a": 1, "b": 1, "c": 1, "d": 100, "e": 1, "f": 1, "g": 1}) == \
        ["a", "b", "c", "d", "e", "f", "g"]
    # The pipeline's own table: every stage comes after the stages it needs.
    order = priority_order([s.name for s in STAGES], {s.name: s.deps for s in STAGES})
    for stage in STAGES:
        assert all(order.index(d) < order.index(stage.name) for d in stage.deps), stage.name


def test_one_slot_runs_the_stages_one_after_another_alone_in_the_given_order():
    seconds = dict.fromkeys(ORDER, 10.0)
    out = simulate(ORDER, DEPS, seconds, slots=1, cores=2)
    assert [name for name, *_ in out] == ORDER
    assert all(threads is None for *_, threads in out)  # alone: the machine's own layout
    assert out[-1][2] == 70.0


def test_two_slots_start_ready_stages_in_priority_order_and_split_the_cores():
    seconds = {"a": 5.0, "b": 10.0, "c": 10.0, "d": 10.0, "e": 10.0, "f": 10.0, "g": 10.0}
    order = priority_order(ORDER, DEPS)
    out = {name: (start, end, threads) for name, start, end, threads in simulate(order, DEPS, seconds, 2, 2)}
    assert out["a"] == (0.0, 5.0, None)  # nothing else is ready: alone
    assert out["e"] == (5.0, 15.0, 1) and out["b"] == (5.0, 15.0, 1)  # e heads the longest chain
    assert out["f"] == (15.0, 25.0, 1) and out["c"] == (15.0, 25.0, 1)
    assert out["g"] == (25.0, 35.0, 1) and out["d"] == (25.0, 35.0, 1)
    # Half the sequential 65 s; in the table's order e would wait for b and c, and g end at 45 s.
    assert max(end for _, end, _ in out.values()) == 35.0
    assert max(e for _, _, e, _ in simulate(ORDER, DEPS, seconds, 2, 2)) == 45.0


def test_starting_stages_split_the_cores_the_running_ones_leave():
    sched = StageScheduler(["x", "y", "z", "w"], {"w": ("x",)}, ["x", "y", "z", "w"], slots=3, cores=8)
    # Three start together on 8 cores: 3 + 3 + 2, the remainder to the earlier ones.
    assert sched.next_starts() == [Start("x", 3, ("x", "y", "z")), Start("y", 3, ("x", "y", "z")),
                                   Start("z", 2, ("x", "y", "z"))]
    sched.finish("x")  # w is ready; y and z hold 5 cores
    assert sched.next_starts() == [Start("w", 3, ("y", "z", "w"))]
    assert sched.next_starts() == []  # no free slot
    # Stages outside to_run (complete, or left out) count as done for their dependants.
    sched = StageScheduler(["x", "w"], {"w": ("x",)}, ["w"], slots=2, cores=2)
    assert sched.next_starts() == [Start("w", None, ("w",))]


def test_a_stage_that_measures_time_runs_with_nothing_beside_it():
    # L (a latency measurement) is ready with b and c, first in priority; b and c wait until it ends,
    # then run side by side, and x after b.
    deps = {"a": (), "L": ("a",), "b": ("a",), "c": ("a",), "x": ("b",)}
    seconds = {"a": 1.0, "L": 5.0, "b": 3.0, "c": 10.0, "x": 3.0}
    out = {n: (s, e, t) for n, s, e, t in simulate(list(deps), deps, seconds, slots=2, cores=2, alone=["L"])}
    assert out["L"] == (1.0, 6.0, None)
    assert out["b"] == (6.0, 9.0, 1) and out["c"] == (6.0, 16.0, 1) and out["x"] == (9.0, 12.0, 1)
    # Lower in priority, L waits until nothing else runs.
    out = {n: (s, e, t) for n, s, e, t in simulate(["a", "b", "c", "x", "L"], deps, seconds, 2, 2, alone=["L"])}
    assert out["L"] == (11.0, 16.0, None)  # after c (1-11); x ran beside c meanwhile


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_a_stage_never_starts_before_the_stages_it_needs_have_ended(slots):
    rng = random.Random(slots)
    names = [s.name for s in STAGES]
    deps = {s.name: s.deps for s in STAGES}
    seconds = {name: rng.uniform(1, 100) for name in names}
    out = simulate(priority_order(names, deps, seconds), deps, seconds, slots, cores=2, alone=RUNS_ALONE)
    ends = {name: end for name, _, end, _ in out}
    assert set(ends) == set(names)
    for name, start, _, _ in out:
        assert all(ends[d] <= start for d in deps[name]), name
    # Never more than `slots` at once; the latency measurement with nothing beside it.
    for _, start, _, _ in out:
        assert sum(1 for _, s, e, _ in out if s <= start < e) <= slots
    (latency,) = [(s, e) for name, s, e, _ in out if name == "eval_latency"]
    assert all(e <= latency[0] or s >= latency[1] for name, s, e, _ in out if name != "eval_latency")


def test_slots_auto_and_the_config_field():
    assert parallel_slots(0, 2) == 2 and parallel_slots(0, 64) == 4 and parallel_slots(0, 1) == 1
    assert parallel_slots(3, 2) == 3
    assert load_config(PipelineConfig).max_parallel_stages == 0
    with pytest.raises(ConfigError, match="max_parallel_stages: -1 must be >= 1, or 0"):
        load_config(PipelineConfig, overrides=["max_parallel_stages=-1"])


def test_a_training_command_beside_other_stages_takes_one_process_and_its_share():
    auto = ["launch", "--nproc-per-node", "auto", "--", "finetune", "--run-dir", "r"]
    assert beside_others(auto, 3) == (["launch", "--nproc-per-node", "1", "--", "finetune", "--run-dir", "r"], 3)
    explicit = ["launch", "--nproc-per-node", "2", "--", "pretrain"]
    assert beside_others(explicit, 3) == (explicit, 1)  # the user's process count stays
    assert beside_others(["evaluate", "icl"], 2) == (["evaluate", "icl"], 2)


def _run(tmp_path: Path, deps: dict, work, slots: int = 2) -> list[str]:
    events: list[str] = []
    sched = StageScheduler(list(deps), deps, list(deps), slots=slots, cores=2)
    try:
        run_scheduled(sched, work, lambda s: events.append(f"start {s.name} {s.threads}"),
                      lambda name, _s: events.append(f"done {name}"), stop_running=FORWARDER.halt,
                      interrupted=lambda: None, poll_s=0.1)
    finally:
        FORWARDER.halted_by = ""
    return events


def test_two_real_stages_run_side_by_side_and_their_dependant_waits_for_both(tmp_path):
    spans: dict[str, tuple[float, float]] = {}

    def work(start: Start) -> None:
        t0 = time.monotonic()
        # A real polyteacher command per stage, each with its own log.
        run_commands(start.name, [["config", "pipeline"]], [tmp_path / f"{start.name}.log"], timeout_minutes=5,
                     threads=start.threads)
        spans[start.name] = (t0, time.monotonic())

    events = _run(tmp_path, {"x": (), "y": (), "z": ("x", "y")}, work)
    assert events[:2] == ["start x 1", "start y 1"]
    assert events[-2:] == ["start z None", "done z"]  # z alone: nothing else left
    (x0, x1), (y0, y1), (z0, _) = spans["x"], spans["y"], spans["z"]
    assert y0 < x1 and x0 < y1  # they overlapped
    assert z0 >= max(x1, y1)
    assert "max_parallel_stages" in (tmp_path / "z.log").read_text()


def test_a_failed_stage_stops_the_stage_beside_it_and_is_the_error(tmp_path):
    sleeper: list[subprocess.Popen] = []

    def work(start: Start) -> None:
        if start.name == "slow":  # a long stage, stopped with SIGTERM by the failure beside it
            with open(tmp_path / "slow.log", "w") as log:
                sleeper.append(FORWARDER.start("slow", [sys.executable, "-c", "import time; time.sleep(60)"], log,
                                               dict(os.environ)))
            try:
                if sleeper[0].wait(timeout=60) != 0:
                    raise StageFailed("slow stopped")
            finally:
                FORWARDER.procs.remove(sleeper[0])
        else:
            time.sleep(0.5)
            run_commands(start.name, [["config", "no-such-stage"]], [tmp_path / "bad.log"], timeout_minutes=5)

    t0 = time.monotonic()
    with pytest.raises(StageFailed, match=f"(?s)stage bad failed \\(exit 2\\).*last lines of {re.escape(str(tmp_path / 'bad.log'))}"):
        _run(tmp_path, {"slow": (), "bad": (), "after": ("slow",)}, work)
    assert sleeper[0].returncode == -signal.SIGTERM
    assert time.monotonic() - t0 < 30


STOPPED_PIPELINE = """
import subprocess, sys, time
from launch.schedule import FORWARDER, PipelineStopped, StageScheduler, run_scheduled

def work(start):
    with open(f"{sys.argv[1]}/{start.name}.log", "w") as log:
        proc = FORWARDER.start(start.name, [sys.executable, "-c", "import time; time.sleep(60)"], log, {})
    sys.stdout.write(f"{start.name} {proc.pid}\\n")  # one write: two stage threads print at once
    sys.stdout.flush()
    code = proc.wait()
    if FORWARDER.received:
        raise PipelineStopped(FORWARDER.received, start.name)

sched = StageScheduler(["x", "y", "z"], {"z": ("x",)}, ["x", "y", "z"], slots=2, cores=2)
with FORWARDER:
    try:
        run_scheduled(sched, work, lambda s: None, lambda n, s: print("done", n, flush=True), FORWARDER.halt,
                      lambda: PipelineStopped(FORWARDER.received, "") if FORWARDER.received else None, poll_s=0.1)
    except PipelineStopped as e:
        print("stopped:", e, "still pending:", sched.pending, flush=True)
        sys.exit(128 + e.signum)
"""


def test_a_signal_to_the_pipeline_reaches_every_running_stage_and_it_waits_for_them(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_PIPELINE, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    pids = dict(proc.stdout.readline().split() for _ in range(2))
    assert set(pids) == {"x", "y"}
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped: stopped by SIGTERM during stage" in out and "still pending: ['z']" in out
    assert "done" not in out  # neither stage counted as done, z never started
    for pid in pids.values():  # both stages' processes have exited (reaped by the pipeline)
        assert not Path(f"/proc/{pid}").exists()
