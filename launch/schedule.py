"""Pipeline stages side by side: which stages may start now, with how many threads, and a runner.

`polyteacher pipeline` (launch.pipeline) hands its stage table here: the names in priority order
(`priority_order`: the head of the longest remaining chain of stages first) and each stage's
dependencies. `StageScheduler` is the bookkeeping alone (no processes, no clock): a stage starts as
soon as every stage it depends on is done and one of `slots` is free; among the stages ready at one
moment the earlier in the priority order goes first. `run_scheduled` runs it, one thread per running
stage, each thread waiting on that stage's processes.

Threads per stage, decided when the stage starts and kept until it ends:

- a stage that starts while no other stage runs and no other is ready runs *alone*: `threads` is
  None, and the stage keeps the pipeline's sequential behaviour (training through `launch
  --nproc-per-node auto`, processes x threads measured for the whole machine). It stays alone: a
  stage becomes ready only when another one ends, and none other runs;
- otherwise the stages starting together split the cores that the running stages do not hold, the
  earlier ones taking the remainder, at least one thread each (`threads` = its share; the pipeline
  gives a training command one process with OMP_NUM_THREADS = the share).

A stage keeps its share when the stages beside it end early and nothing else is ready: a core may
then idle until it ends, which is simpler than resizing a running DeepSpeed job and costs little
here, where the tail of the graph is short stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

AUTO_MAX_PARALLEL_STAGES = 4
"""The cap of `max_parallel_stages: 0` (auto = the cores available, at most this). The stage graph
rarely has more than four stages ready at once, and each stage is a Python process with torch (and
DeepSpeed) loaded: more slots would add memory, not speed."""


def priority_order(order: Sequence[str], deps: Mapping[str, Sequence[str]],
                   seconds: Optional[Mapping[str, float]] = None) -> list[str]:
    """`order` sorted by the longest chain of stages that still waits on each (its own time
    included), longest first; ties keep `order`. A stage's time is `seconds[name]` (a previous run's
    stage_seconds.json), else the mean of the known ones (all equal on a first run: the chain counts
    stages). Starting the head of the longest chain first is the classic list-scheduling rule: the
    stages that only feed the report (exports of side models, short evaluations) fill the gaps.
    Dependencies still come before their dependants (a chain through a stage is longer than the
    stage's own)."""
    seconds = seconds or {}
    known = [float(v) for k, v in seconds.items() if k in set(order) and isinstance(v, (int, float)) and v > 0]
    default = sum(known) / len(known) if known else 1.0
    weight = {name: float(seconds[name]) if isinstance(seconds.get(name), (int, float)) and seconds[name] > 0
              else default for name in order}
    # Tiny positive weights keep a dependency strictly ahead of its dependants even at 0 s.
    weight = {name: max(w, 1e-3) for name, w in weight.items()}
    dependants: dict[str, list[str]] = {name: [] for name in order}
    for name in order:
        for d in deps.get(name, ()):
            if d in dependants:
                dependants[d].append(name)
    chain: dict[str, float] = {}
    for name in reversed(order):  # dependants come later in `order`
        chain[name] = weight[name] + max((chain[k] for k in dependants[name]), default=0.0)
    position = {name: i for i, name in enumerate(order)}
    return sorted(order, key=lambda name: (-chain[name], position[name]))


def parallel_slots(requested: int, cores: int) -> int:
    """How many stages may run at once: `requested`, or for 0 (auto) the cores, at most
    AUTO_MAX_PARALLEL_STAGES; at least 1."""
    if requested > 0:
        return requested
    return max(1, min(cores, AUTO_MAX_PARALLEL_STAGES))


SEQUENCE_FLAG = "--run-sequence"
"""`python -m launch.cli --run-sequence FILE`: run the polyteacher commands of FILE (a JSON list of argv
lists) one after another in one process (launch.cli.run_sequence); the pipeline's OneProcess steps."""


def beside_others(argv: list[str], threads: int) -> tuple[list[str], int]:
    """A command of a stage that runs beside others, within its share of `threads` cores: a training
    launch with `--nproc-per-node auto` takes one process (auto measures the whole machine, which is
    not this stage's), an explicit N keeps N; returns the command and OMP_NUM_THREADS (per process)."""
    if argv[:1] != ["launch"] or "--nproc-per-node" not in argv:
        return argv, threads
    i = argv.index("--nproc-per-node") + 1
    argv = [*argv[:i], "1" if argv[i] == "auto" else argv[i], *argv[i + 1:]]
    return argv, max(1, threads // int(argv[i]))


@dataclasses.dataclass(frozen=True)
class Start:
    """A stage the scheduler starts now."""

    name: str
    threads: Optional[int]
    """Its share of the cores; None: it runs alone, with the machine's own layout."""
    beside: tuple[str, ...] = ()
    """The stages running while it starts (those starting with it included)."""


class StageScheduler:
    """Which stages start when, given their dependencies, `slots` and `cores` (see the module doc).

    `order`: every stage name, in priority order (a stage's dependencies come before it);
    `deps`: name -> the names it needs; `to_run`: the stages to run; a dependency outside it (a
    complete or left-out stage) counts as done; the stages in `alone` (they measure time) start only
    when nothing else runs, and nothing starts beside them. Call `next_starts()` for the stages to start now and
    `finish(name)` when one ended; `blocked()` lists what can never start (a failure upstream)."""

    def __init__(self, order: Sequence[str], deps: Mapping[str, Sequence[str]], to_run: Collection[str],
                 slots: int, cores: int, alone: Collection[str] = ()) -> None:
        if slots < 1 or cores < 1:
            raise ValueError(f"slots ({slots}) and cores ({cores}) must be >= 1")
        unknown = set(to_run) - set(order)
        if unknown:
            raise ValueError(f"stages to run that are not in the order: {', '.join(sorted(unknown))}")
        position = {name: i for i, name in enumerate(order)}
        for name in order:
            late = [d for d in deps.get(name, ()) if d in position and position[d] > position[name]]
            if late:
                raise ValueError(f"stage {name} comes before its dependencies {', '.join(late)} in the order")
        self.order = [name for name in order if name in set(to_run)]
        self.deps = {name: tuple(d for d in deps.get(name, ()) if d in set(to_run)) for name in self.order}
        self.slots, self.cores, self.alone = slots, cores, frozenset(alone)
        self.pending: list[str] = list(self.order)
        self.running: dict[str, Optional[int]] = {}
        self.done: set[str] = set()
        self.failed: set[str] = set()

    def ready(self) -> list[str]:
        """Pending stages whose dependencies are all done, in priority order."""
        return [name for name in self.pending if all(d in self.done for d in self.deps[name])]

    def next_starts(self) -> list[Start]:
        """Start every ready stage that fits in a free slot (marking them running), with its threads."""
        ready = self.ready()
        if self.alone & set(self.running):
            return []
        if ready and ready[0] in self.alone and not self.running:
            ready = ready[:1]
        else:  # a stage that must run alone waits until nothing else runs
            ready = [name for name in ready if name not in self.alone]
        starting = ready[: max(0, self.slots - len(self.running))]
        if not starting:
            return []
        if not self.running and len(starting) == 1:  # alone: with more slots, nothing else is ready either
            shares: list[Optional[int]] = [None]
        else:
            held = sum(self.cores if t is None else t for t in self.running.values())
            free = max(0, self.cores - held)
            shares = [max(1, free // len(starting) + (1 if i < free % len(starting) else 0))
                      for i in range(len(starting))]
        for name, threads in zip(starting, shares):
            self.pending.remove(name)
            self.running[name] = threads
        beside = tuple(self.running)
        return [Start(name, threads, beside) for name, threads in zip(starting, shares)]

    def finish(self, name: str, ok: bool = True) -> None:
        """`name` ended: done (its dependants may start), or failed (`ok` False: they never start)."""
        del self.running[name]
        (self.done if ok else self.failed).add(name)

    def blocked(self) -> list[str]:
        """Pending stages that can never start: nothing runs and none of them is ready."""
        return [] if self.running or self.ready() else list(self.pending)


def simulate(order: Sequence[str], deps: Mapping[str, Sequence[str]], seconds: Mapping[str, float],
             slots: int, cores: int, alone: Collection[str] = ()) -> list[tuple[str, float, float, Optional[int]]]:
    """The schedule `run_scheduled` follows when each stage takes `seconds[name]` whatever its
    threads: (name, start, end, threads) per stage of `seconds`, in start order. For tests and for
    choosing the order; no processes."""
    sched = StageScheduler(order, deps, list(seconds), slots, cores, alone)
    now, ends, out = 0.0, {}, []
    while sched.pending or sched.running:
        for start in sched.next_starts():
            ends[start.name] = now + seconds[start.name]
            out.append((start.name, now, ends[start.name], start.threads))
        if not sched.running:
            raise ValueError(f"stages that can never start: {', '.join(sched.blocked())}")
        name = min(sched.running, key=lambda n: (ends[n], sched.order.index(n)))
        now = ends[name]
        sched.finish(name)
    return out


def run_scheduled(sched: StageScheduler, work: Callable[[Start], None], on_start: Callable[[Start], None],
                  on_done: Callable[[str, float], None], stop_running: Callable[[str], None],
                  interrupted: Callable[[], Optional[BaseException]], poll_s: float = 0.5) -> None:
    """Run `sched`'s stages, `work(start)` in a thread of its own per stage (it returns when the stage
    ended, or raises). `on_start` and `on_done(name, seconds)` run in this thread, in event order.

    The first stage that raises stops the rest: no stage starts any more, `stop_running(name of the
    failed stage)` asks the running ones to stop (they save and exit), and once every one has ended
    that first exception is raised (what the stopped stages raise then is their consequence, not
    reported). `interrupted()` returns the exception to raise when a signal stopped the run (its
    stages got the signal already): then no stage starts either, and it is raised once all ended.
    This thread only waits, so it stays free to handle signals."""
    events: queue.Queue = queue.Queue()
    threads: dict[str, threading.Thread] = {}
    starts: dict[str, float] = {}
    failure: Optional[BaseException] = None

    def body(start: Start) -> None:
        try:
            work(start)
        except BaseException as e:  # noqa: BLE001 - handed to the scheduling thread, which raises it
            events.put((start.name, e))
        else:
            events.put((start.name, None))

    while True:
        stop = failure or interrupted()
        if stop is None:
            for start in sched.next_starts():
                on_start(start)
                starts[start.name] = time.monotonic()
                threads[start.name] = threading.Thread(target=body, args=(start,), name=f"stage-{start.name}",
                                                       daemon=True)
                threads[start.name].start()
        if not sched.running:
            break
        try:
            name, error = events.get(timeout=poll_s)
        except queue.Empty:
            continue
        threads.pop(name).join()
        sched.finish(name, ok=error is None)
        if error is None:
            on_done(name, time.monotonic() - starts[name])
        elif failure is None:
            failure = error
            if sched.running and interrupted() is None:
                stop_running(name)
    if failure is not None:
        raise failure
    if sched.pending:
        stop = interrupted()
        if stop is not None:
            raise stop
        # A bug in the table: a stage waits on one that is neither done nor to run.
        raise RuntimeError(f"stages that could never start: {', '.join(sched.pending)}")


# ----------------------------------------------------------------------------- the stages' processes


class StageFailed(RuntimeError):
    """A stage's command failed or ran past the timeout; the message names the stage and its log."""


class PipelineStopped(Exception):
    """SIGTERM or SIGINT stopped the pipeline after its running stages saved and exited."""

    def __init__(self, signum: int, stage: str) -> None:
        self.signum = signum
        where = f"during stage {stage}; the stage saved and exited" if stage else "between stages"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}. Rerun the same command to continue: "
                         "finished stages are kept")


class _Forwarder:
    """While stages run, SIGTERM and SIGINT to the pipeline go to every running stage's processes (each
    runs in a session of its own, so a terminal's Ctrl-C reaches them once, through here), and the
    pipeline waits for them to save and exit instead of leaving them running on their own. `halt`
    stops them the same way (SIGTERM) when a stage beside them failed. Stages run in threads of their
    own (launch.schedule): `lock` makes starting a process and signalling them all exclusive, so no
    process starts after a stop without its signal; reentrant, for a signal that arrives in `halt`."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.received: int = 0
        self.halted_by: str = ""  # the failed stage whose failure stopped the others
        self.lock = threading.RLock()

    def __enter__(self) -> _Forwarder:
        self.received, self.halted_by = 0, ""
        self._previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, _frame: object) -> None:
        self.received = self.received or signum
        self.signal_all(signum)

    def signal_all(self, signum: int) -> None:
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signum)

    def halt(self, failed_stage: str) -> None:
        with self.lock:
            self.halted_by = self.halted_by or failed_stage
            self.signal_all(signal.SIGTERM)

    def start(self, stage: str, argv: list[str], log: Any, env: dict[str, str]) -> subprocess.Popen:
        """Start one command of `stage`, unless the pipeline is stopping."""
        with self.lock:
            if self.received:
                raise PipelineStopped(self.received, stage)
            if self.halted_by:
                raise StageFailed(f"stage {stage} not continued: stage {self.halted_by} failed")
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.procs.append(proc)
            return proc


FORWARDER = _Forwarder()


def run_commands(stage: str, commands: list[list[str]], logs: list[Path], timeout_minutes: int,
                 threads: int | None = None) -> None:
    """Run polyteacher `commands` side by side, appending each one's output to its log; StageFailed
    naming the first that fails (the others are stopped) or runs past the timeout; PipelineStopped
    when a signal stopped them (every one has exited). Threads: a stage running alone (`threads`
    None) runs one command with the environment as it is, several split the cores (OMP_NUM_THREADS
    each); beside other stages, its commands split `threads` (`beside_others`)."""
    from launch.launcher import PARENT_ENV, cores_available, parent_token

    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: parent_token()}
    if threads is None and len(commands) > 1:
        env["OMP_NUM_THREADS"] = str(max(1, cores_available() // len(commands)))
    procs: list[subprocess.Popen] = []
    deadline = time.time() + timeout_minutes * 60
    try:
        for argv, log_path in zip(commands, logs):
            cmd_env = env
            if threads is not None:
                argv, omp = beside_others(argv, max(1, threads // len(commands)))
                cmd_env = {**env, "OMP_NUM_THREADS": str(omp)}
            with open(log_path, "a", encoding="utf-8") as log:
                log.write("$ polyteacher " + " ".join(argv) + "\n")
                log.flush()
                procs.append(FORWARDER.start(stage, [sys.executable, "-m", "launch.cli", *argv], log, cmd_env))
        for proc, argv, log_path in zip(procs, commands, logs):
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise StageFailed(f"stage {stage}: polyteacher {' '.join(argv)} ran past "
                                  f"pipeline.timeout_minutes={timeout_minutes}; log: {log_path}") from None
            if FORWARDER.received:
                for other in procs:
                    other.wait()
                raise PipelineStopped(FORWARDER.received, stage)
            if code != 0 and FORWARDER.halted_by:
                raise StageFailed(f"stage {stage} stopped (exit {code}): stage {FORWARDER.halted_by} failed")
            if code != 0:
                tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
                raise StageFailed(f"stage {stage} failed (exit {code}): polyteacher {' '.join(argv)}\n"
                                  f"last lines of {log_path}:\n{tail}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            with FORWARDER.lock:
                FORWARDER.procs.remove(proc)
