"""Safe resume (issue 14, case 5): checkpoints are digest-checked and loaded weights-only, so a
crafted pickle copied into a run directory is refused instead of run."""

from __future__ import annotations

import json

import pytest
from test_training import _batches, _tiny_t5, _train

from core.checkpoint import COMPLETE_MARKER, CheckpointError, CheckpointManager, TrainState
from core.distributed import UnsafeCheckpointError
from core.train_config import TrainConfig


@pytest.fixture(scope="module")
def dist():
    from core.distributed import init_distributed

    return init_distributed(num_threads=1)


class _Payload:
    """Unpickling this creates the file `target`: what a malicious checkpoint would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _saved(tmp_path, dist, zero_stage=0):
    from core.distributed import build_engine

    cfg = TrainConfig(micro_batch_size=4, global_batch_size=4, max_steps=4, warmup_steps=1, lr=1e-2,
                      zero_stage=zero_stage)
    engine = build_engine(_tiny_t5(), cfg, dist)
    _train(engine, _batches(2))
    manager = CheckpointManager(tmp_path, "t")
    path = manager.save(engine, TrainState(step=2))
    return cfg, manager, path


def test_complete_marker_records_a_digest_of_every_file(tmp_path, dist):
    _, _, path = _saved(tmp_path, dist)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker["step"] == 2
    assert "state.json" in marker["sha256"] and "rng/rank_00000.json" in marker["sha256"]
    assert any(name.endswith(".pt") for name in marker["sha256"])


def test_resume_refuses_a_file_changed_after_it_was_written(tmp_path, dist):
    from core.distributed import build_engine

    cfg, manager, path = _saved(tmp_path, dist)
    (path / "state.json").write_text(json.dumps(TrainState(step=99).to_dict()))
    with pytest.raises(CheckpointError, match="state.json changed"):
        manager.load(build_engine(_tiny_t5(), cfg, dist))


def test_resume_never_runs_a_pickle_even_with_matching_digests(tmp_path, dist):
    import torch

    from core.checkpoint import checkpoint_digests
    from core.distributed import build_engine

    cfg, manager, path = _saved(tmp_path, dist)
    ran = tmp_path / "code-ran"
    model_file = next(path.glob("*model_states.pt"))
    state = torch.load(model_file, map_location="cpu", weights_only=False)
    state["payload"] = _Payload(ran)
    torch.save(state, model_file)
    # A crafted checkpoint brings its own COMPLETE: digests cannot tell; the weights-only load must.
    (path / COMPLETE_MARKER).write_text(json.dumps({"step": 2, "sha256": checkpoint_digests(path)}))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        manager.load(build_engine(_tiny_t5(), cfg, dist))
    assert not ran.exists()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_loads_zero_checkpoints_weights_only(tmp_path, dist, zero_stage):
    from core.distributed import build_engine

    cfg, manager, _ = _saved(tmp_path, dist, zero_stage)
    assert manager.load(build_engine(_tiny_t5(seed=3), cfg, dist)).step == 2


def test_legacy_marker_without_digests_still_loads(tmp_path, dist):
    from core.distributed import build_engine

    cfg, manager, path = _saved(tmp_path, dist)
    (path / COMPLETE_MARKER).write_text("step 2\n")
    assert manager.load(build_engine(_tiny_t5(), cfg, dist)).step == 2


def test_resume_into_a_different_model_shape_names_the_checkpoint_config(tmp_path, dist):
    # Issue 14, case 10: a changed model shape gave DeepSpeed's size-mismatch traceback with no hint.
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from core.checkpoint import checkpoint_digests
    from core.distributed import build_engine

    cfg, manager, path = _saved(tmp_path, dist)
    (path / "config.yaml").write_text("teacher:\n  d_model: 32\n")  # as a stage saves it

    (path / COMPLETE_MARKER).write_text(json.dumps({"step": 2, "sha256": checkpoint_digests(path)}))
    torch.manual_seed(0)
    wider = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=48, d_kv=8, d_ff=64, num_layers=1,
                                                num_decoder_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1,
                                                decoder_start_token_id=0))
    with pytest.raises(CheckpointError, match="does not fit this run's model") as info:
        manager.load(build_engine(wider, cfg, dist))
    assert str(path / "config.yaml") in str(info.value) and "\n" not in str(info.value)


def test_a_resume_is_recorded_in_metrics(tmp_path, dist):
    # Issue 14, case 11: a resumed run repeated steps in metrics.jsonl with no record of the resume.
    from core.checkpoint import restore_or_start
    from core.distributed import build_engine
    from core.fsutil import read_jsonl

    cfg, manager, path = _saved(tmp_path, dist)
    state = restore_or_start(manager, build_engine(_tiny_t5(), cfg, dist), resume=True, stage="pretrain")
    assert state.step == 2
    [record] = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["event"] == "resumed" and record["step"] == 2 and record["name"] == "t"
    assert record["stage"] == "pretrain" and record["checkpoint"] == path.name


def test_sigterm_stops_at_the_step_boundary_after_a_checkpoint(tmp_path, dist):
    # Issue 14, clean shutdown: SIGTERM (preemption) or SIGINT saves a checkpoint, then stops.
    import os
    import signal

    from core.distributed import build_engine
    from core.loop import StopOnSignal, TrainingStopped, maybe_stop

    cfg, manager, _ = _saved(tmp_path, dist)
    engine = build_engine(_tiny_t5(), cfg, dist)
    before = signal.getsignal(signal.SIGTERM)  # whatever this process had (other tests, plugins)
    stop = StopOnSignal()
    try:
        state = TrainState(step=3)
        maybe_stop(stop, manager, engine, state, max_steps=10)  # no signal: nothing happens
        assert manager.latest_complete() == manager.path_for(2)
        os.kill(os.getpid(), signal.SIGTERM)  # only sets the flag
        maybe_stop(stop, manager, engine, TrainState(step=10), max_steps=10)  # the last step: let it finish
        with pytest.raises(TrainingStopped, match="stopped by SIGTERM at step 3") as info:
            maybe_stop(stop, manager, engine, state, max_steps=10)
        assert info.value.exit_code == 128 + signal.SIGTERM
        assert manager.latest_complete() == manager.path_for(3)
        assert signal.getsignal(signal.SIGTERM) is before  # handlers given back
    finally:
        stop.close()


def test_a_signal_handled_during_the_stop_vote_waits_for_the_next_boundary(monkeypatch):
    # The CI race: on one rank SIGTERM was handled after that rank's share (0) went into the
    # all-reduce; the other ranks saw 0 and took another step while this rank stopped and checkpointed.
    import signal

    import core.loop as loop

    stop = loop.StopOnSignal()
    try:
        def reduce_then_signal(values):
            stop._handle(signal.SIGTERM, None)  # arrives while the collective runs
            return list(values)  # every rank's share was 0

        monkeypatch.setattr(loop, "all_reduce_sum", reduce_then_signal)
        assert stop.agreed() == 0  # every rank goes on: the vote said no
        monkeypatch.setattr(loop, "all_reduce_sum", lambda values: list(values))
        assert stop.agreed() == signal.SIGTERM  # and at the next boundary every rank stops
        other_rank = loop.StopOnSignal()
        try:
            monkeypatch.setattr(loop, "all_reduce_sum", lambda values: [values[0] + float(signal.SIGTERM)])
            assert other_rank.agreed() == signal.SIGTERM  # a rank without the signal stops too
        finally:
            other_rank.close()
    finally:
        stop.close()
