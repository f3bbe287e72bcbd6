"""Unit tests of the training infrastructure (core/checkpoint.py, core/loop.py, core/distributed.py).

Engine tests run DeepSpeed in this process (world size 1, gloo, CPU) on a T5 of a few hundred
thousand parameters; the multi-process runs are in test_pretrain.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest

from core.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    CheckpointManager,
    TrainState,
    rng_state,
    set_rng_state,
)
from core.config import ConfigError, load_config
from core.data import ResumableSampler, eval_micro_batches
from core.distributed import DistInfo, deepspeed_config, resolve_precision
from core.loop import NonFiniteLossError, check_finite
from core.metrics import MetricsLogger
from core.train_config import TrainConfig, lr_multiplier

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device="cpu", backend="gloo")


# ----------------------------------------------------------------------------- config


def test_train_config_rejects_inconsistent_values():
    with pytest.raises(ConfigError, match="global_batch_size=12 must be a multiple of train.micro_batch_size=8"):
        TrainConfig(micro_batch_size=8, global_batch_size=12).validate()
    with pytest.raises(ConfigError, match="zero_stage=4 is not allowed; allowed values: 0, 1, 2, 3"):
        TrainConfig(zero_stage=4).validate()
    with pytest.raises(ConfigError, match="needs train.zero_stage 1, 2 or 3"):
        TrainConfig(zero_stage=0, offload="cpu").validate()
    with pytest.raises(ConfigError, match="offload_params=true needs train.zero_stage=3"):
        TrainConfig(zero_stage=2, offload="cpu", offload_params=True).validate()
    with pytest.raises(ConfigError, match="warmup_steps=20 exceeds train.max_steps=10"):
        TrainConfig(max_steps=10, warmup_steps=20).validate()
    TrainConfig(zero_stage=3, offload="nvme", offload_params=True).validate()
    with pytest.raises(ConfigError, match="optimizer=adafactor needs train.zero_stage=0"):
        TrainConfig(optimizer="adafactor", zero_stage=2).validate()
    TrainConfig(optimizer="adafactor", zero_stage=0).validate()


def test_grad_accum_steps_against_world_size():
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=32)
    assert [cfg.grad_accum_steps(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match=r"global_batch_size=32 is not divisible .* world size \(3\) = 12"):
        cfg.grad_accum_steps(3)


def test_pretrain_config_checks_batch_against_launcher_world_size(monkeypatch):
    from teacher.config import PretrainConfig

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size \\(3\\)"):
        load_config(PretrainConfig, section="pretrain", preset="tiny")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(PretrainConfig, section="pretrain", preset="tiny", overrides=["train.optimizer=adamw", "train.zero_stage=3"])
    assert cfg.train.zero_stage == 3 and cfg.teacher.preset == "tiny"
    with pytest.raises(ConfigError, match="unknown config key train.zero"):
        load_config(PretrainConfig, section="pretrain", preset="tiny", overrides=["train.zero=3"])
    with pytest.raises(ConfigError, match="inside the run directory"):
        load_config(PretrainConfig, overrides=["out=../elsewhere"])


def test_every_preset_resolves():
    from teacher.config import PretrainConfig

    for preset in ("tiny", "small", "base", "large", "xl", "alexatm-20b"):
        for section in ("pretrain", "indomain"):
            cfg = load_config(PretrainConfig, section=section, preset=preset)
            assert cfg.teacher.preset == preset
            assert (cfg.init_from == "teacher") == (section == "indomain")


def test_precision_policy(monkeypatch):
    import core.distributed as distributed

    monkeypatch.setattr(distributed, "cpu_bf16_speedup", lambda: 4.0)  # an AMX / AVX512-BF16 CPU
    assert resolve_precision("auto", CPU1) == "bf16"
    monkeypatch.setattr(distributed, "cpu_bf16_speedup", lambda: 0.003)  # AVX2 only
    assert resolve_precision("auto", CPU1) == "fp32"
    assert resolve_precision("fp32", CPU1) == "fp32"
    assert resolve_precision("bf16", CPU1) == "bf16"
    with pytest.raises(ConfigError, match="'fp16' is not supported on CPU"):
        resolve_precision("fp16", CPU1)
    # bf16 on CPU is torch autocast over fp32 weights, not DeepSpeed's bf16 optimizer.
    ds = deepspeed_config(TrainConfig(precision="bf16"), CPU1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]
    assert "torch_autocast" not in deepspeed_config(TrainConfig(precision="fp32"), CPU1)


def test_cpu_bf16_probe_is_cached_per_machine(tmp_path, monkeypatch):
    from core.distributed import cpu_bf16_speedup

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = cpu_bf16_speedup(size=64, repeats=2)
    cache = json.loads((tmp_path / "polyteacher" / "cpu_precision.json").read_text())
    assert list(cache.values()) == [first] and first > 0
    assert "threads" in next(iter(cache))
    assert cpu_bf16_speedup(size=64, repeats=2) == first  # read back, not measured again


def test_cpu_bf16_probe_is_one_collective_per_job(tmp_path, monkeypatch):
    """Only rank 0 asks again (to log the choice): a second call must not all-reduce, or rank 0 waits
    for ranks that have moved on (this hung every 2-process CPU run with precision auto)."""
    import torch.distributed as tdist

    from core import distributed

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(distributed, "_AGREED_BF16_SPEEDUP", {})
    monkeypatch.setattr(distributed, "_dist_ready", lambda: True)
    calls = []

    def all_reduce(tensor, op=None):  # another rank measured a slower bf16
        calls.append(op)
        tensor.fill_(0.5)

    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    assert distributed.cpu_bf16_speedup(size=64, repeats=2) == 0.5
    assert distributed.cpu_bf16_speedup(size=64, repeats=2) == 0.5
    assert len(calls) == 1


def test_deepspeed_config_from_train_config():
    two = DistInfo(rank=0, local_rank=0, world_size=2, device="cpu", backend="gloo", local_world_size=2)
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=32, zero_stage=3, offload="cpu", offload_params=True,
                      grad_clip=0.5)
    ds = deepspeed_config(cfg, two)
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    gpu = DistInfo(rank=0, local_rank=0, world_size=1, device="cuda:0", backend="nccl")
    assert deepspeed_config(TrainConfig(precision="bf16"), gpu)["bf16"]["enabled"]


def test_zero_communication_keys_and_adamw_kernel_per_device():
    from core.distributed import CPU_ADAMW_IMPL, CPU_BUCKET_SIZE, CPU_OVERLAP_COMM, adamw_impl

    two = DistInfo(rank=0, local_rank=0, world_size=2, device="cpu", backend="gloo", local_world_size=2)
    gpu = DistInfo(rank=0, local_rank=0, world_size=1, device="cuda:0", backend="nccl")
    zero = deepspeed_config(TrainConfig(micro_batch_size=4, global_batch_size=8), two)["zero_optimization"]
    assert zero == {"stage": 2, "reduce_bucket_size": CPU_BUCKET_SIZE, "allgather_bucket_size": CPU_BUCKET_SIZE,
                    "overlap_comm": CPU_OVERLAP_COMM, "contiguous_gradients": True, "reduce_scatter": True}
    zero = deepspeed_config(TrainConfig(), gpu)["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == int(5e8)
    # Every key can be set; the all-gather bucket follows the reduce bucket unless given.
    cfg = load_config(TrainConfig, overrides=["reduce_bucket_size=2000000", "overlap_comm=true",
                                              "contiguous_gradients=false", "reduce_scatter=false"])
    zero = deepspeed_config(cfg, two)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (2_000_000, 2_000_000)
    assert zero["overlap_comm"] and not zero["contiguous_gradients"] and not zero["reduce_scatter"]
    cfg = TrainConfig(reduce_bucket_size=1000, allgather_bucket_size=3000, overlap_comm=False)
    zero = deepspeed_config(cfg, gpu)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"], zero["overlap_comm"]) == (1000, 3000, False)
    assert adamw_impl(TrainConfig(), CPU1) == CPU_ADAMW_IMPL
    assert adamw_impl(TrainConfig(), gpu) == "fused"
    assert adamw_impl(TrainConfig(zero_stage=2, offload="cpu"), gpu) == "foreach"  # states on the CPU
    assert adamw_impl(TrainConfig(adamw_impl="for-loop"), gpu) == "for-loop"
    with pytest.raises(ConfigError, match="reduce_bucket_size=-1 must be >= 0"):
        TrainConfig(reduce_bucket_size=-1).validate()
    with pytest.raises(ConfigError, match="adamw_impl: 'apex' is not allowed"):
        load_config(TrainConfig, overrides=["adamw_impl=apex"])
    with pytest.raises(ConfigError, match="allowed values: auto, foreach, fused, for-loop"):
        TrainConfig(adamw_impl="apex").validate()


# ----------------------------------------------------------------------------- schedule


def test_lr_schedule_values():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1, decay="cosine")
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(4, cfg) == pytest.approx(0.5)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg) == pytest.approx(0.1)
    linear = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.0, decay="linear")
    assert lr_multiplier(35, linear) == pytest.approx(0.75)
    constant = TrainConfig(max_steps=110, warmup_steps=10, decay="constant")
    assert lr_multiplier(100, constant) == 1.0
    values = [lr_multiplier(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ----------------------------------------------------------------------------- data order


def test_sampler_is_deterministic_and_sharded():
    n, micro, accum, world = 103, 4, 2, 3
    samplers = [ResumableSampler(n, micro, accum, rank, world, seed=7) for rank in range(world)]
    assert samplers[0].global_batch_size == 24 and samplers[0].steps_per_epoch == 4
    order = samplers[0].epoch_order(0)
    assert sorted(order.tolist()) == list(range(n))
    assert ResumableSampler(n, micro, accum, 0, world, seed=7).epoch_order(0).tolist() == order.tolist()
    assert samplers[0].epoch_order(1).tolist() != order.tolist()
    assert ResumableSampler(n, micro, accum, 0, world, seed=8).epoch_order(0).tolist() != order.tolist()
    # One step: the ranks' micro-batches are disjoint and together are the next 24 indices of the order.
    step = [samplers[r].micro_batches(0, 24) for r in range(world)]
    flat = [i for rank_batches in step for batch in rank_batches for i in batch]
    assert all(len(b) == micro for rank_batches in step for b in rank_batches)
    assert sorted(flat) == sorted(order[24:48].tolist())


def test_sampler_groups_batches_by_length():
    import numpy as np

    n, micro, accum, world = 1000, 4, 2, 2  # global batch 16, 62 steps per epoch
    lengths = np.random.default_rng(0).integers(3, 60, size=n)
    grouped = ResumableSampler(n, micro, accum, 0, world, seed=5, lengths=lengths, group_batches=8)
    plain = ResumableSampler(n, micro, accum, 0, world, seed=5)
    order = grouped.epoch_order(0)
    # Still a permutation, deterministic, with the partial batch left at the end (dropped).
    assert sorted(order.tolist()) == list(range(n))
    assert grouped.epoch_order(0).tolist() == ResumableSampler(n, micro, accum, 0, world, seed=5,
                                                               lengths=lengths, group_batches=8).epoch_order(0).tolist()

    def padding(sampler: ResumableSampler) -> int:
        """Padding tokens of one epoch when every micro-batch pads to its longest example."""
        total = 0
        for step in range(sampler.steps_per_epoch):
            for rank in range(world):
                rank_sampler = ResumableSampler(n, micro, accum, rank, world, seed=5, lengths=sampler.lengths,
                                                group_batches=sampler.group_batches)
                for batch in rank_sampler.micro_batches(0, step * sampler.global_batch_size):
                    total += int(lengths[batch].max() * len(batch) - lengths[batch].sum())
        return total

    assert padding(grouped) < 0.2 * padding(plain)
    # The ranks of one step get micro-batches of about the same length (nobody waits long).
    step = [ResumableSampler(n, micro, accum, r, world, seed=5, lengths=lengths, group_batches=8).micro_batches(0, 160)
            for r in range(world)]
    longest = [int(lengths[b].max()) for rank_batches in step for b in rank_batches]
    assert max(longest) - min(longest) <= 10  # a random batch of 16 spans most of 3..60
    # Batches come in a shuffled order, not sorted by length over the epoch.
    firsts = [int(lengths[order[k * 16 : (k + 1) * 16]].max()) for k in range(8)]
    assert firsts != sorted(firsts)
    with pytest.raises(ValueError, match="lengths"):
        ResumableSampler(n, micro, accum, 0, world, seed=5, lengths=lengths[:10])


def test_sampler_resume_gives_the_same_stream():
    sampler = ResumableSampler(50, 2, 2, rank=1, world_size=2, seed=3)  # 8 per step, 6 steps per epoch
    state = TrainState()
    stream = []
    for _ in range(15):
        stream.append((state.epoch, sampler.micro_batches(state.epoch, state.epoch_position)))
        sampler.advance(state)
    assert [e for e, _ in stream] == [0] * 6 + [1] * 6 + [2] * 3
    assert state.examples_seen == 15 * 8
    # Within an epoch no index repeats across steps (this rank's share).
    epoch0 = [i for e, batches in stream if e == 0 for b in batches for i in b]
    assert len(epoch0) == len(set(epoch0)) == 24
    # Restart from a checkpointed state (a fresh sampler, the state round-tripped through JSON).
    saved = TrainState()
    for _ in range(8):
        sampler.advance(saved)
    restored = TrainState.from_dict(json.loads(json.dumps(saved.to_dict())))
    fresh = ResumableSampler(50, 2, 2, rank=1, world_size=2, seed=3)
    resumed = []
    for _ in range(7):
        resumed.append((restored.epoch, fresh.micro_batches(restored.epoch, restored.epoch_position)))
        fresh.advance(restored)
    assert resumed == stream[8:]


def test_sampler_and_eval_batches_reject_too_little_data():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        ResumableSampler(10, 4, 2, 0, 2, seed=0)
    batches = [eval_micro_batches(30, 4, 10, rank, 2) for rank in range(2)]
    assert len(batches[0]) == len(batches[1]) == 3  # equal counts on every rank (ZeRO-3 forwards are collective)
    assert set(batches[0][0]).isdisjoint(batches[1][0])
    with pytest.raises(ConfigError, match="held-out data has 5 examples"):
        eval_micro_batches(5, 4, 2, 0, 2)


def test_rng_state_round_trip():
    import torch

    state = json.loads(json.dumps(rng_state()))
    first = (random.random(), np.random.rand(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == first


# ----------------------------------------------------------------------------- checkpoints and metrics


def _fake_checkpoint(root, step, complete):
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps(TrainState(step=step).to_dict()))
    if complete:
        (path / COMPLETE_MARKER).write_text(json.dumps({"step": step, "sha256": {}}))  # a marker without digests
    return path


def test_latest_complete_ignores_incomplete_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, "teacher", keep=2)
    assert manager.latest_complete() is None
    root = tmp_path / "checkpoints" / "teacher"
    _fake_checkpoint(root, 10, complete=True)
    _fake_checkpoint(root, 20, complete=True)
    crashed = _fake_checkpoint(root, 30, complete=False)  # a crash while writing step 30
    (root / "not_a_step").mkdir()
    assert manager.latest_complete() == root / "step_00000020"
    assert [manager.step_of(p) for p in manager.all_checkpoints()] == [10, 20, 30]
    with pytest.raises(CheckpointError, match="incomplete"):
        manager.load(engine=None, path=crashed)


def test_prune_keeps_the_last_k(tmp_path):
    manager = CheckpointManager(tmp_path, "teacher", keep=2)
    root = tmp_path / "checkpoints" / "teacher"
    for step in (5, 10, 15):
        _fake_checkpoint(root, step, complete=True)
    _fake_checkpoint(root, 12, complete=False)
    manager._prune()
    assert [manager.step_of(p) for p in manager.all_checkpoints()] == [10, 15]


def test_non_finite_loss_names_step_and_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, "teacher")
    check_finite(1.5, step=3, checkpoints=manager)
    with pytest.raises(NonFiniteLossError, match="no checkpoint exists yet"):
        check_finite(math.nan, step=3, checkpoints=manager)
    _fake_checkpoint(tmp_path / "checkpoints" / "teacher", 2, complete=True)
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at step 8 .*step_00000002 with --resume"):
        check_finite(math.inf, step=7, checkpoints=manager)


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    from core.fsutil import read_jsonl

    logger = MetricsLogger(tmp_path, "pretrain", name="teacher")
    logger.log(5, {"loss": 2.5, "lr": 1e-3, "note": "x"})
    logger.log(10, {"loss": 2.0, "eval_loss": float("nan")})
    logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["name"], r["step"], r["loss"]) for r in records] == [
        ("pretrain", "teacher", 5, 2.5), ("pretrain", "teacher", 10, 2.0)]
    assert list((tmp_path / "tb" / "teacher").glob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------- a real engine, one process


def _tiny_t5(dropout=0.1, seed=0):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                      dropout_rate=dropout, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def _batches(num, micro=4, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(3, 128, (micro, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids.flip(1)})
    return out


def _train(engine, batches):
    losses = []
    for batch in batches:
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
    return losses


@pytest.fixture(scope="module")
def dist():
    from core.distributed import init_distributed

    return init_distributed(num_threads=1)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_engine_schedule_accumulation_and_exact_checkpoint_resume(tmp_path, dist, zero_stage):
    from core.distributed import build_engine

    cfg = TrainConfig(micro_batch_size=4, global_batch_size=8, max_steps=6, warmup_steps=2, lr=1e-2,
                      zero_stage=zero_stage, min_lr_ratio=0.0)
    engine = build_engine(_tiny_t5(), cfg, dist)
    batches = _batches(12)
    _train(engine, batches[:6])  # 3 optimizer steps of 2 accumulated micro-batches
    assert engine.global_steps == 3
    assert engine.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-2 * lr_multiplier(3, cfg))
    manager = CheckpointManager(tmp_path, "t", keep=2)
    path = manager.save(engine, TrainState(step=3, examples_seen=24), config_yaml="x: 1\n")
    assert (path / COMPLETE_MARKER).is_file() and (path / "config.yaml").read_text() == "x: 1\n"
    # Dropout draws from torch's RNG: the continuation depends on the restored RNG state.
    after = _train(engine, batches[6:])
    engine2 = build_engine(_tiny_t5(seed=99), cfg, dist)
    state = manager.load(engine2)
    assert state.step == 3 and state.examples_seen == 24
    assert engine2.global_steps == 3
    assert _train(engine2, batches[6:]) == after  # exact in fp32 on CPU


def test_adafactor_engine_learns_with_the_schedule(dist):
    from transformers.optimization import Adafactor

    from core.distributed import build_engine

    cfg = TrainConfig(micro_batch_size=4, global_batch_size=4, max_steps=40, warmup_steps=5, lr=1e-2,
                      zero_stage=0, optimizer="adafactor")
    engine = build_engine(_tiny_t5(), cfg, dist)
    assert isinstance(engine.optimizer, Adafactor)
    batches = _batches(4)
    losses = _train(engine, batches * 10)
    assert engine.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-2 * lr_multiplier(40, cfg))
    assert sum(losses[-4:]) < 0.85 * sum(losses[:4])  # 40 steps on 4 batches of reversed random ids


def test_cpu_bf16_engine_autocasts_over_fp32_weights(dist):
    import torch

    from core.distributed import build_engine

    cfg = TrainConfig(micro_batch_size=4, global_batch_size=4, max_steps=4, warmup_steps=1, zero_stage=0,
                      precision="bf16")
    engine = build_engine(_tiny_t5(), cfg, dist)
    batches = _batches(4)
    assert engine(**batches[0]).logits.dtype == torch.bfloat16
    losses = _train(engine, batches)
    assert all(math.isfinite(x) for x in losses)
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}


@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
def test_zero2_engine_with_small_buckets_and_each_adamw_kernel_learns(dist, impl):
    from core.distributed import build_engine

    cfg = TrainConfig(micro_batch_size=4, global_batch_size=4, max_steps=30, warmup_steps=2, lr=1e-2, zero_stage=2,
                      reduce_bucket_size=5000, allgather_bucket_size=7000, reduce_scatter=False, adamw_impl=impl)
    engine = build_engine(_tiny_t5(dropout=0.0), cfg, dist)
    assert (engine.zero_reduce_bucket_size(), engine.zero_allgather_bucket_size()) == (5000, 7000)
    assert not engine.zero_overlap_comm() and engine.zero_contiguous_gradients()
    defaults = engine.basic_optimizer.defaults
    assert (defaults["foreach"], defaults["fused"]) == (impl == "foreach", impl == "fused")
    losses = _train(engine, _batches(2) * 15)
    assert sum(losses[-2:]) < 0.85 * sum(losses[:2])


@pytest.mark.slow
def test_compiled_engine_trains_and_keeps_parameter_names(dist):
    from core.distributed import build_engine

    cfg = TrainConfig(micro_batch_size=4, global_batch_size=4, max_steps=6, warmup_steps=1, lr=1e-2, zero_stage=0)
    eager = _train(build_engine(_tiny_t5(dropout=0.0), cfg, dist), _batches(2) * 3)
    model = _tiny_t5(dropout=0.0)
    names = [n for n, _ in model.named_parameters()]
    engine = build_engine(model, dataclasses.replace(cfg, compile=True), dist)
    assert engine.is_compiled
    compiled = _train(engine, _batches(2) * 3)
    assert compiled == pytest.approx(eager, rel=1e-3) and compiled[-1] < compiled[0]  # the same training
    assert [n for n, _ in engine.module.named_parameters()] == names  # checkpoints and exports unchanged


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_export_hf_consolidates_fp32_weights(tmp_path, dist, zero_stage):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from core.checkpoint import export_hf
    from core.distributed import build_engine, full_fp32_state_dict

    # fp32: the engine's loss is compared with a plain fp32 forward of the exported model.
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=4, max_steps=3, warmup_steps=0, lr=1e-2,
                      zero_stage=zero_stage, precision="fp32")
    model = _tiny_t5(dropout=0.0)
    engine = build_engine(model, cfg, dist)
    _train(engine, _batches(3))
    expected = full_fp32_state_dict(engine, model)
    out = export_hf(engine, model, None, tmp_path / "model")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert loaded.lm_head.weight.data_ptr() == loaded.shared.weight.data_ptr()  # tied embeddings survive
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # The export computes what the engine computes.
    batch = _batches(1, seed=5)[0]
    engine.eval()
    with torch.no_grad():
        assert float(loaded.eval()(**batch).loss) == pytest.approx(float(engine(**batch).loss), rel=1e-5)
    generated = loaded.generate(batch["input_ids"][:1], max_new_tokens=4)
    assert generated.shape[0] == 1 and generated.shape[1] >= 2


def test_measure_peak_tflops_is_positive():
    from core.metrics import measure_peak_tflops

    peak = measure_peak_tflops(num_threads=1, size=256, seconds=0.05)
    assert 0.0 < peak < 100.0


def test_pretrain_cli_reports_missing_data_before_starting(tmp_path, capsys):
    from launch.cli import main

    assert main(["pretrain", "--run-dir", str(tmp_path), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"training data not found at {tmp_path.resolve() / 'data' / 'train'}" in err
    assert main(["pretrain", "--run-dir", str(tmp_path), "--preset", "tiny", "train.zero_stage=7"]) == 2
    assert "train.zero_stage=7 is not allowed; allowed values: 0, 1, 2, 3" in capsys.readouterr().err


def test_train_step_stops_on_nan_before_the_update_is_applied():
    """core.loop.train_step, the one step every stage runs: the NaN guard fires before the last
    engine.step() of the step (the call that applies the accumulated update)."""
    import math

    import torch

    from core.checkpoint import TrainState
    from core.data import ResumableSampler
    from core.loop import MicroStep, NonFiniteLossError, train_step
    from core.metrics import LossWindow

    class Engine:
        def __init__(self):
            self.steps = 0

        def backward(self, loss):
            pass

        def step(self):
            self.steps += 1

    sampler = ResumableSampler(8, 2, 2, 0, 1, 0)
    state, window, engine = TrainState(), LossWindow(), Engine()
    losses = iter([1.0, 3.0, 1.0, math.nan])

    def forward(indices):
        return MicroStep(torch.tensor(next(losses)), {"part": 1.0}, tokens=len(indices))

    assert train_step(engine, sampler.micro_batches(0, 0), forward, state, sampler, window, None) == 2.0
    assert (engine.steps, state.step, state.tokens_seen, window.parts, window.micro_steps) == (2, 1, 4, {"part": 2.0}, 2)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        train_step(engine, sampler.micro_batches(state.epoch, state.epoch_position), forward, state, sampler, window, None)
    assert engine.steps == 3 and state.step == 1  # the second step's update was never applied
