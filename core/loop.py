"""The training loop's shared pieces: NaN guard, stop on signal, due steps.

- `NonFiniteLossError`, `check_finite`: stop on NaN/inf before the optimizer applies the update.
- `StopOnSignal`, `maybe_stop`, `TrainingStopped`: SIGTERM (preemption) or SIGINT stops a loop at the
  next step boundary, every rank at the same step, after a checkpoint.
- `is_due`: every N steps and at the last step.
"""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path
from typing import Any

from core.checkpoint import CheckpointManager, TrainState
from core.distributed import (
    all_reduce_sum,
    is_rank0,
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the optimizer applies it."""


def check_finite(loss: float, step: int, checkpoints: CheckpointManager | None = None, what: str = "loss") -> None:
    """Raise NonFiniteLossError naming the step and the checkpoint to resume from when `loss` is NaN/inf.

    Pass a loss already averaged over ranks, so that every rank raises together.
    """
    if math.isfinite(loss):
        return
    latest = checkpoints.latest_complete() if checkpoints is not None else None
    resume = (
        f"resume from {latest} with --resume (e.g. with a lower train.lr)"
        if latest is not None
        else "no checkpoint exists yet; restart with a lower train.lr"
    )
    raise NonFiniteLossError(f"{what} is {loss} at step {step + 1} (after {step} optimizer steps); {resume}")


class TrainingStopped(Exception):
    """A loop stopped early on a signal, after saving a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal_name(signum)} at step {step} after saving the checkpoint {checkpoint}; "
                         "rerun the same command with --resume to continue")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignal:
    """While installed, SIGTERM and SIGINT only ask the training loop to stop; a second SIGINT (Ctrl-C
    pressed again) stops the process at once. Repeated SIGTERMs are expected (every launcher layer
    passes one on) and change nothing. `agreed()`, called by every rank at each step boundary, returns the signal when
    any rank got one: ranks receive a signal at slightly different times, and a checkpoint is a
    collective that all must enter at the same step."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        import threading

        self.signum = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum and signum == self.signum == signal.SIGINT:
            self.close()  # Ctrl-C twice: no checkpoint, stop now
            signal.raise_signal(signum)
            return
        if self.signum:
            return
        self.signum = signum
        if is_rank0():
            again = " (Ctrl-C again: stop at once)" if signum == signal.SIGINT else ""
            print(f"\n{signal_name(signum)}: stopping after this step with a checkpoint{again}",
                  file=sys.stderr, flush=True)

    def agreed(self) -> int:
        """The signal any rank received (0: none); a collective."""
        got = all_reduce_sum([float(self.signum)])[0]
        return self.signum or (int(signal.SIGTERM) if got else 0)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def maybe_stop(stop: StopOnSignal, checkpoints: CheckpointManager, engine: Any, state: TrainState,
               max_steps: int, config_yaml: str | None = None) -> None:
    """At a step boundary: when a signal arrived on any rank, save a checkpoint of this step (unless
    one was just saved) and raise TrainingStopped on every rank. After the last step the run is left
    to finish (export) instead."""
    if state.step >= max_steps:
        return
    signum = stop.agreed()
    if not signum:
        return
    path = checkpoints.path_for(state.step)
    if checkpoints.latest_complete() != path:
        path = checkpoints.save(engine, state, config_yaml)
    stop.close()
    raise TrainingStopped(signum, state.step, path)


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Every `every` steps and at the last step (every=0: only at the last step)."""
    return step == max_steps or (every > 0 and step % every == 0)
