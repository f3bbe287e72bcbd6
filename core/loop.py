"""The one training loop that pretraining, distillation and fine-tuning share.

Every stage's entry function reads as the same table of contents: config -> data -> model -> engine
-> `refuse_to_start_over` + `restore_or_start` -> `run_training(cfg.train, state, engine, sampler,
checkpoints, cfg_yaml, StagePieces(...), desc)` -> export. `run_training` is the only training loop:

    while state.step < train.max_steps:
        train_step(engine, pieces.micro_batches(state), pieces.forward(state), state, sampler, window, checkpoints)
        pieces.maybe_log(state, bar)   # the stage's record, when log_due
        pieces.maybe_eval(state)       # the stage's held-out evaluation, when eval_due; keep_best
        maybe_save(train, state, engine, checkpoints, cfg_yaml)
        maybe_stop(stop, checkpoints, engine, state, train.max_steps, cfg_yaml)

with the progress bar, the wall-time clock and the signal handlers around it. The stages differ only
in the pieces they pass (`StagePieces`): their micro-batches, `forward` (one micro-batch ->
MicroStep) and what their maybe_log / maybe_eval compute.

- `MicroStep`, `train_step`: one optimizer step over a rank's micro-batches; the NaN guard runs on
  the rank-mean loss before the last `engine.step()`, the one that applies the update.
- `maybe_save`, `log_due`, `eval_due`, `keep_best`, `is_due` (every N steps and at the last step):
  when to log, evaluate and checkpoint.
- `NonFiniteLossError`, `check_finite`: stop on NaN/inf before the optimizer applies the update.
- `StopOnSignal`, `maybe_stop`, `TrainingStopped`: SIGTERM (preemption) or SIGINT stops a loop at the
  next step boundary, every rank at the same step, after a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.checkpoint import CheckpointManager, TrainState
from core.data import ResumableSampler
from core.distributed import all_reduce_mean, all_reduce_sum, is_rank0
from core.metrics import LossWindow, progress_bar
from core.train_config import TrainConfig


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
        """The signal any rank received (0: none); a collective.

        The decision rests on the reduced value alone: a signal handled on this rank after its share
        went into the all-reduce (the other ranks did not see it) is acted on at the next boundary.
        Reading `self.signum` afresh here let one rank stop and checkpoint while the others took
        another step, and the ranks' next collectives no longer matched."""
        local = self.signum
        got = all_reduce_sum([float(local)])[0]
        return (local or int(signal.SIGTERM)) if got else 0

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


def log_due(state: TrainState, train: TrainConfig) -> bool:
    return is_due(state.step, train.log_every, train.max_steps)


def eval_due(state: TrainState, train: TrainConfig) -> bool:
    return is_due(state.step, train.eval_every, train.max_steps)


def keep_best(state: TrainState, eval_loss: float) -> None:
    """Remember the lowest held-out loss (checkpointed with the state)."""
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss = eval_loss


# ----------------------------------------------------------------------------- one optimizer step


@dataclasses.dataclass
class MicroStep:
    """What a stage's `forward` returns for one micro-batch."""

    loss: Any
    """The differentiable loss of the micro-batch (a scalar tensor)."""
    parts: dict[str, float] = dataclasses.field(default_factory=dict)
    """Named numbers for the log line, summed over the step's micro-batches into the window."""
    tokens: int = 0
    """Non-pad tokens this rank processed."""


def train_step(engine: Any, micro_batches: Sequence[Any], forward: Callable[[Any], MicroStep], state: TrainState,
               sampler: ResumableSampler, window: LossWindow, checkpoints: CheckpointManager) -> float:
    """One optimizer step over this rank's micro-batches; returns the loss averaged over micro-batches
    and ranks.

    DeepSpeed accumulates gradients over `engine.step()` calls and applies the update at the last
    micro-batch of the step: the loss is checked for NaN/inf before that call, on the rank mean, so
    every rank stops together and the weights never take a non-finite update.
    """
    start = time.perf_counter()
    micro_losses: list[float] = []
    parts: dict[str, float] = {}
    local_tokens = 0
    for i, batch in enumerate(micro_batches):
        micro = forward(batch)
        engine.backward(micro.loss)
        micro_losses.append(float(micro.loss.detach()))
        for key, value in micro.parts.items():
            parts[key] = parts.get(key, 0.0) + value
        local_tokens += micro.tokens
        if i == len(micro_batches) - 1:
            step_loss = all_reduce_mean(sum(micro_losses) / len(micro_losses))
            check_finite(step_loss, state.step, checkpoints)
        engine.step()
    state.step += 1
    state.tokens_seen += int(all_reduce_sum([float(local_tokens)])[0])
    sampler.advance(state)
    window.add(step_loss, parts, len(micro_batches), local_tokens, time.perf_counter() - start)
    return step_loss


def maybe_save(train: TrainConfig, state: TrainState, engine: Any, checkpoints: CheckpointManager,
               config_yaml: str) -> None:
    if is_due(state.step, train.save_every, train.max_steps):
        checkpoints.save(engine, state, config_yaml)


@dataclasses.dataclass
class StagePieces:
    """What a stage gives the loop (`run_training`): how to train one step, and what to record."""

    micro_batches: Callable[[TrainState], Sequence[Any]]
    """The state -> this rank's micro-batches of the step (from the sampler's current position)."""
    forward: Callable[[TrainState], Callable[[Any], MicroStep]]
    """The state -> the step's `forward` (one micro-batch -> MicroStep); a stage whose data stream
    depends on the epoch builds it per step."""
    maybe_log: Callable[[TrainState, Any], None]
    """The stage's log record when `log_due`, given the state and the progress bar."""
    maybe_eval: Callable[[TrainState], None]
    """The stage's held-out evaluation when `eval_due` (`keep_best` inside)."""


def run_training(train: TrainConfig, state: TrainState, engine: Any, sampler: ResumableSampler,
                 checkpoints: CheckpointManager, config_yaml: str, pieces: StagePieces, desc: str,
                 window: LossWindow | None = None) -> LossWindow:
    """THE training loop of every stage: steps until `train.max_steps`, with the progress bar, the
    wall-time clock (kept across resumes in `state.wall_time_s`), logging and evaluation when due,
    checkpoints when due, and a clean stop at a step boundary on SIGTERM/SIGINT (`maybe_stop` saves
    and raises TrainingStopped). Returns the loss window (the stages report from it)."""
    window = window if window is not None else LossWindow()
    engine.train()
    bar = progress_bar(train.max_steps, initial=state.step, desc=desc)
    segment_start = time.perf_counter() - state.wall_time_s
    stop = StopOnSignal()
    try:
        while state.step < train.max_steps:
            step_loss = train_step(engine, pieces.micro_batches(state), pieces.forward(state), state, sampler,
                                   window, checkpoints)
            state.wall_time_s = time.perf_counter() - segment_start
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            pieces.maybe_log(state, bar)
            pieces.maybe_eval(state)
            maybe_save(train, state, engine, checkpoints, config_yaml)
            maybe_stop(stop, checkpoints, engine, state, train.max_steps, config_yaml)
    finally:
        stop.close()
        bar.close()
    return window
