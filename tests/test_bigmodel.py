"""Big teachers (core/bigmodel.py): a teacher whose weights exceed max_memory loads with CPU + disk
offload where accelerate's device map says, gives the plain load's logits, distils and evaluates; and a
teacher sharded over 2 real ranks by a ZeRO-3 engine without optimizer (slow) gives the unsharded
teacher's logits and distils."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.bigmodel import ModelLoadConfig, parse_max_memory, parse_max_memory_flag, resolve_offload_folder
from core.config import ConfigError, load_config
from core.distributed import free_port
from core.fsutil import UnsafePathError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _weights_bytes(model_dir: Path) -> int:
    from core.bigmodel import empty_model

    model = empty_model(model_dir)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 4
    return total


@pytest.fixture(scope="module")
def forced_offload(tiny_teacher_dir: Path) -> dict:
    """max_memory for the CPU of 80% of the tiny teacher's fp32 weights: part of it must go to the disk."""
    size = _weights_bytes(tiny_teacher_dir)
    return {"cpu": f"{int(size * 0.8) // 1000}KB", "weights_bytes": size}


def _batch(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 2000, (3, 11), generator=g),
        "attention_mask": torch.ones(3, 11, dtype=torch.long),
        "decoder_input_ids": torch.randint(3, 2000, (3, 7), generator=g),
    }


# ----------------------------------------------------------------------------- config


def test_load_config_values_and_errors(tmp_path):
    assert parse_max_memory({"cpu": "50MB", "0": "10GiB", 1: 2**30}) == {"cpu": "50MB", 0: "10GiB", 1: 2**30}
    assert parse_max_memory_flag("cpu=50MB, 0=10GiB") == {"cpu": "50MB", "0": "10GiB"}
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        parse_max_memory({"gpu": "1GB"})
    with pytest.raises(ConfigError, match="not a size"):
        parse_max_memory({"cpu": "lots"})
    with pytest.raises(ConfigError, match="DEVICE=SIZE"):
        parse_max_memory_flag("cpu:50MB")
    with pytest.raises(ConfigError, match="only with device_map=auto"):
        ModelLoadConfig(max_memory={"cpu": "1GB"}).validate()
    # Offload folders stay inside the run directory unless given absolute.
    assert resolve_offload_folder("offload", tmp_path) == str((tmp_path / "offload").resolve())
    assert resolve_offload_folder("/somewhere/else", tmp_path) == "/somewhere/else"
    with pytest.raises(UnsafePathError):
        resolve_offload_folder("../outside", tmp_path)

    from distill.config import DistillConfig
    from evaluation.config import EvalConfig

    cfg = load_config(DistillConfig, "distill", "tiny", ["teacher_load.device_map=auto",
                                                         "teacher_load.max_memory={cpu: 5MB, 0: 1GiB}"])
    assert cfg.teacher_load.max_memory == {"cpu": "5MB", 0: "1GiB"} and cfg.teacher_shard == "none"
    with pytest.raises(ConfigError, match="choose one"):
        load_config(DistillConfig, "distill", "tiny", ["teacher_shard=zero3", "teacher_load.device_map=auto"])
    with pytest.raises(ConfigError, match="not allowed"):
        load_config(DistillConfig, "distill", "tiny", ["teacher_shard=fsdp"])
    assert load_config(EvalConfig, "evaluate", "tiny", ["load.device_map=auto"]).load.device_map == "auto"


def test_resolve_dtype_policy():
    import torch

    from core.bigmodel import resolve_dtype

    assert resolve_dtype("auto", on_gpu=False) == torch.float32
    assert resolve_dtype("bfloat16", on_gpu=False) == torch.bfloat16
    with pytest.raises(ConfigError, match="float16 weights are not supported on CPU"):
        resolve_dtype("float16", on_gpu=False)


# ----------------------------------------------------------------------------- accelerate: forced offload


def test_offloaded_teacher_is_placed_by_the_device_map_and_matches_a_plain_load(tmp_path, tiny_teacher_dir,
                                                                                forced_offload):
    import torch

    from core.bigmodel import infer_device_map, input_device, load_model, placement

    memory = {"cpu": forced_offload["cpu"]}
    device_map = infer_device_map(tiny_teacher_dir, memory, torch.float32)
    assert set(device_map.values()) == {"cpu", "disk"}, device_map

    load = ModelLoadConfig(device_map="auto", max_memory=memory)
    with pytest.raises(ConfigError, match="set offload_folder"):
        load_model(tiny_teacher_dir, load=load)
    load.offload_folder = str(tmp_path / "offload")
    model = load_model(tiny_teacher_dir, load=load)
    assert model.hf_device_map == device_map
    assert input_device(model) == torch.device("cpu")

    # Every weight is where the device map puts its module: "disk" weights are not in memory.
    where = placement(model)
    for name, device in where.items():
        module = max((m for m in device_map if m == "" or name.startswith(m + ".")), key=len)
        assert device == device_map[module], (name, device, module)
    resident = sum(p.numel() * 4 for p in model.parameters() if p.device.type != "meta")
    assert 0 < resident < forced_offload["weights_bytes"] * 0.8

    plain = load_model(tiny_teacher_dir)
    batch = _batch()
    with torch.inference_mode():
        expected = plain(**batch).logits
        got = model(**batch).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
        # generate goes through the same hooks
        assert torch.equal(model.generate(input_ids=batch["input_ids"], max_new_tokens=4),
                           plain.generate(input_ids=batch["input_ids"], max_new_tokens=4))


def test_student_init_from_an_offloaded_teacher_equals_the_plain_one(tmp_path, tiny_teacher_dir, forced_offload):
    """build_student copies the mapped layers from the safetensors when the teacher is offloaded."""
    import torch

    from core.bigmodel import is_materialized, load_model
    from distill.config import DistillConfig
    from distill.distill import student_init_source
    from distill.student_init import build_student

    cfg = DistillConfig()
    load = ModelLoadConfig(device_map="auto", max_memory={"cpu": forced_offload["cpu"]},
                           offload_folder=str(tmp_path / "offload"))
    offloaded = load_model(tiny_teacher_dir, load=load)
    assert not is_materialized(offloaded)
    source = student_init_source(tiny_teacher_dir, offloaded, cfg)
    plain = load_model(tiny_teacher_dir)
    assert student_init_source(tiny_teacher_dir, plain, cfg) is plain
    a, info_a = build_student(source, cfg.student, seed=0)
    b, info_b = build_student(plain, cfg.student, seed=0)
    assert info_a == info_b and info_a.from_teacher
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _distill_run(tmp_path: Path, tiny_packed_dir: Path, tiny_tokenizer_dir: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tiny_packed_dir, run / "data")
    shutil.copytree(tiny_tokenizer_dir, run / "tokenizer")
    return run


TWO_STEPS = ["train.max_steps=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2",
             "train.save_every=2", "train.num_eval_batches=1", "train.micro_batch_size=4"]


def _train_steps(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("stage") == "distill" and "loss" in r]


@pytest.mark.slow
def test_distillation_runs_two_steps_with_an_offloaded_teacher(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir,
                                                               tiny_packed_dir, forced_offload):
    run = _distill_run(tmp_path, tiny_packed_dir, tiny_tokenizer_dir)
    cmd = [
        sys.executable, "-m", "launch.cli", "distill", "--run-dir", str(run), "--teacher", str(tiny_teacher_dir),
        "--out", "student", "--preset", "tiny", "teacher_load.device_map=auto",
        f"teacher_load.max_memory={{cpu: {forced_offload['cpu']}}}", "teacher_load.offload_folder=offload",
        "train.global_batch_size=4", *TWO_STEPS,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _train_steps(run) == [1, 2]
    assert "offloaded to the" in proc.stderr  # transformers' notice that part of the teacher is off memory
    summary = json.loads((run / "student" / "distillation.json").read_text())
    assert summary["final_step"] == 2 and summary["student_init"]["from_teacher"]
    assert summary["config"]["teacher_load"]["device_map"] == "auto"

    # An offload folder outside the run directory is refused before any work.
    cmd[cmd.index("teacher_load.offload_folder=offload")] = "teacher_load.offload_folder=../elsewhere"
    cmd[cmd.index("student")] = "student2"
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "escapes the run directory" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_evaluate_massive_and_icl_accept_the_offload_options(tmp_path, capsys, tiny_teacher_dir, massive_dir,
                                                             forced_offload):
    from launch.cli import main

    run = tmp_path / "R"
    run.mkdir()
    shutil.copytree(tiny_teacher_dir, run / "teacher")
    offload = ["--device-map", "auto", "--max-memory", f"cpu={forced_offload['cpu']}", "--offload-folder", "offload"]
    common = ["--run-dir", str(run), "--model", "teacher", f"massive.data={massive_dir}", f"icl.data={massive_dir}"]
    massive = ["--locales", "en-US", "--max-examples", "4", "--batch-size", "4", "bootstrap_samples=10"]
    icl = ["icl.locales=[en-US]", "icl.shots=[0,1]", "icl.max_examples=4", "bootstrap_samples=10"]
    for name, extra in (("plain", []), ("offloaded", offload)):
        assert main(["evaluate", "massive", *common, "--name", f"massive-{name}", *extra, *massive]) == 0
        assert main(["evaluate", "icl", *common, "--name", f"icl-{name}", *extra, *icl]) == 0
    results = {name: json.loads((run / "eval" / f"{name}.json").read_text())
               for name in ("massive-plain", "massive-offloaded", "icl-plain", "icl-offloaded")}
    assert results["massive-offloaded"]["config"]["load"] == {
        "device_map": "auto", "max_memory": {"cpu": forced_offload["cpu"]},
        "offload_folder": str((run / "offload").resolve())}
    assert results["massive-offloaded"]["records"] == results["massive-plain"]["records"]
    assert results["icl-offloaded"]["accuracy"] == results["icl-plain"]["accuracy"]
    assert results["icl-offloaded"]["config"]["load"]["device_map"] == "auto"
    # The same options through dotted overrides, and an escaping folder refused.
    assert main(["evaluate", "icl", *common, "--name", "icl-dotted", "load.device_map=auto",
                 f"load.max_memory={{cpu: {forced_offload['cpu']}}}", "load.offload_folder=offload", *icl]) == 0
    assert json.loads((run / "eval" / "icl-dotted.json").read_text())["accuracy"] == results["icl-plain"]["accuracy"]
    capsys.readouterr()
    assert main(["evaluate", "icl", *common, *offload[:4], "--offload-folder", "../x", *icl]) != 0
    assert "escapes the run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ZeRO-3: 2 ranks

PROBE = r"""
import json, sys, torch
from core.distributed import init_distributed
from core.bigmodel import load_model, local_partition_numel, shard_zero3
teacher_dir, out = sys.argv[1], sys.argv[2]
info = init_distributed(1)
plain = load_model(teacher_dir)
sharded = shard_zero3(teacher_dir, "teacher", torch.float32, info)
g = torch.Generator().manual_seed(info.rank)  # a different batch on each rank
batch = {"input_ids": torch.randint(3, 2000, (3, 11), generator=g),
         "decoder_input_ids": torch.randint(3, 2000, (3, 7), generator=g)}
batch["attention_mask"] = torch.ones_like(batch["input_ids"])
with torch.inference_mode():
    expected = plain(**batch).logits
    got = sharded(**batch).logits
    again = sharded(**batch).logits
json.dump({"max_abs_diff": float((got - expected).abs().max()), "repeat_diff": float((again - got).abs().max()),
           "local": local_partition_numel(sharded), "total": local_partition_numel(plain)},
          open(f"{out}/rank{info.rank}.json", "w"))
"""


@pytest.mark.slow
def test_two_rank_zero3_teacher_matches_the_unsharded_one_and_distils(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir,
                                                                      tiny_packed_dir):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE, str(tiny_teacher_dir), str(tmp_path)],
                                      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-5000:]
    for rank in range(2):
        probe = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert probe["max_abs_diff"] <= 1e-5 and probe["repeat_diff"] == 0.0, probe
        # Each rank holds half of the weights (partitions are padded to equal sizes).
        assert probe["local"] <= probe["total"] // 2 + 1000, probe

    run = _distill_run(tmp_path, tiny_packed_dir, tiny_tokenizer_dir)
    cmd = [
        sys.executable, "-m", "launch.cli", "launch", "--nproc-per-node", "2", "--",
        "distill", "--run-dir", str(run), "--teacher", str(tiny_teacher_dir), "--out", "student", "--preset", "tiny",
        "teacher_shard=zero3", "train.global_batch_size=8", *TWO_STEPS,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _train_steps(run) == [1, 2]
    summary = json.loads((run / "student" / "distillation.json").read_text())
    assert summary["final_step"] == 2 and summary["student_init"]["from_teacher"]
    assert summary["config"]["teacher_shard"] == "zero3"
