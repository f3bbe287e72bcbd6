"""`polyteacher launch`: command lines for every launch mode, the SLURM script, errors, and the measured
process layout of `--nproc-per-node auto` (its choice rule fed measured numbers, one real probe)."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError
from core.distributed import cpu_info, free_port
from launch.cli import main
from launch.launcher import (
    LaunchOptions,
    cores_available,
    launcher_argv,
    process_env,
    record_layout,
    slurm_script,
)
from launch.layout import (
    Layout,
    candidate_layouts,
    choose_layout,
    layout_from_report,
    probe_layout,
    run_precision,
)

PRETRAIN = ["pretrain", "--run-dir", "runs/a b", "--preset", "tiny", "train.max_steps=10"]


def dry_run(capsys, *argv: str) -> str:
    assert main(["launch", "--accelerator", "cpu", "--dry-run", *argv]) == 0
    return capsys.readouterr().out


def test_single_node_uses_deepspeed_runner_on_cpu(capsys):
    out = dry_run(capsys, "--nproc-per-node", "2", "--master-port", "29123", "--", *PRETRAIN)
    command = shlex.split(out)
    assert command[0] == "DS_ACCELERATOR=cpu" and command[1].startswith("OMP_NUM_THREADS=")
    runner = command.index("deepspeed.launcher.runner")
    assert command[runner + 1 : runner + 3] == ["--num_gpus", "2"]
    assert "--master_port" in command and command[command.index("--master_port") + 1] == "29123"
    assert command[-len(PRETRAIN) - 2 :] == ["--module", "launch.cli", *PRETRAIN]  # argument with a space kept whole
    assert "--no_local_rank" in command


def test_hostfile_mode(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    command = shlex.split(dry_run(capsys, "--nproc-per-node", "8", "--hostfile", str(hostfile), "--nnodes", "2",
                                  "--master-addr", "10.0.0.1", "--", *PRETRAIN))
    assert command[command.index("--hostfile") + 1] == str(hostfile)
    assert command[command.index("--num_nodes") + 1] == "2"
    assert command[command.index("--master_addr") + 1] == "10.0.0.1"
    assert command[command.index("--master_port") + 1] == "29500"  # nodes must agree: the fixed default
    with pytest.raises(ConfigError, match="hostfile .* does not exist"):
        LaunchOptions(command=PRETRAIN, hostfile=str(tmp_path / "missing")).validate()


def test_multi_node_without_hostfile_runs_the_per_node_deepspeed_launcher(capsys):
    command = shlex.split(dry_run(capsys, "--nproc-per-node", "4", "--nnodes", "3", "--node-rank", "2",
                                  "--master-addr", "10.0.0.1", "--master-port", "29400", "--", *PRETRAIN))
    assert "deepspeed.launcher.launch" in command
    assert "--node_rank=2" in command and "--master_addr=10.0.0.1" in command and "--master_port=29400" in command
    info = next(a for a in command if a.startswith("--world_info="))
    layout = json.loads(base64.urlsafe_b64decode(info.split("=", 1)[1]))
    assert list(layout.values()) == [[0, 1, 2, 3]] * 3


def test_torchrun_multi_node(capsys):
    command = shlex.split(dry_run(capsys, "--launcher", "torchrun", "--nproc-per-node", "2", "--nnodes", "2",
                                  "--node-rank", "1", "--master-addr", "10.0.0.1", "--", "finetune", "--run-dir", "r"))
    start = command.index("torch.distributed.run")
    assert command[start + 1 : start + 6] == ["--nproc_per_node=2", "--nnodes=2", "--node_rank=1",
                                              "--master_addr=10.0.0.1", "--master_port=29500"]
    assert command[-5:] == ["-m", "launch.cli", "finetune", "--run-dir", "r"]


def test_slurm_script(tmp_path):
    opts = LaunchOptions(command=PRETRAIN, nproc_per_node=8, nnodes=4, slurm=True, partition="gpu", time="48:00:00",
                         account="proj", python="/opt/venv/bin/python")
    script = slurm_script(opts, gpu=True, workdir="/work/repo")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --partition=gpu", "#SBATCH --time=48:00:00", "#SBATCH --account=proj",
                     "cd /work/repo", 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'):
        assert expected in lines, expected
    assert "DS_ACCELERATOR" not in script  # GPUs: NCCL
    srun = next(line for line in lines if line.startswith("srun "))
    inner = shlex.split(srun)[-1]  # what each node's bash runs
    assert '--node_rank="$SLURM_NODEID"' in inner and '--master_addr="$MASTER_ADDR"' in inner
    assert shlex.split(inner.replace('"$SLURM_NODEID"', "0").replace('"$MASTER_ADDR"', "h"))[-len(PRETRAIN):] == PRETRAIN
    cpu = slurm_script(LaunchOptions(command=PRETRAIN, nproc_per_node=2, nnodes=2, slurm=True, launcher="torchrun"),
                       gpu=False, workdir="/w")
    assert "export DS_ACCELERATOR=cpu" in cpu and "--gpus-per-node" not in cpu
    assert "torch.distributed.run" in cpu and "--nnodes=2" in cpu
    # bash accepts the script.
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_slurm_flag_writes_the_script(tmp_path, capsys):
    out_path = tmp_path / "pretrain.sbatch"
    assert main(["launch", "--accelerator", "cpu", "--slurm", "--nnodes", "2", "--nproc-per-node", "2",
                 "--slurm-out", str(out_path), "--", *PRETRAIN]) == 0
    assert out_path.read_text().startswith("#!/bin/bash\n#SBATCH --job-name=polyteacher-pretrain")
    assert f"sbatch {out_path}" in capsys.readouterr().out


def test_cpu_environment_splits_cores():
    env = process_env(LaunchOptions(command=PRETRAIN, nproc_per_node=2), gpu=False, base={})
    assert env["DS_ACCELERATOR"] == "cpu"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    env = process_env(LaunchOptions(command=PRETRAIN), gpu=True, base={"DS_ACCELERATOR": "cpu"})
    assert "DS_ACCELERATOR" not in env


def test_bad_launch_requests_fail_clearly(capsys):
    assert main(["launch", "--dry-run", "--", "data", "prepare"]) == 2
    assert "allowed: pretrain, distill, finetune" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--node-rank 2 must be in"):
        LaunchOptions(command=PRETRAIN, nnodes=2, node_rank=2).validate()
    with pytest.raises(ConfigError, match="--hostfile needs --launcher deepspeed"):
        LaunchOptions(command=PRETRAIN, hostfile="x", launcher="torchrun").validate()
    with pytest.raises(ConfigError, match="no subcommand"):
        LaunchOptions(command=[]).validate()
    assert launcher_argv(LaunchOptions(command=PRETRAIN, nproc_per_node=2), 1234)[-len(PRETRAIN):] == PRETRAIN


def test_help_is_fast_and_documents_options():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--nproc-per-node", "--hostfile", "--nnodes", "--node-rank", "--launcher", "--slurm", "--dry-run"):
        assert flag in out
    out = subprocess.run([sys.executable, "-m", "launch.cli", "pretrain", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "train.zero_stage" in out and "--init-from" in out and "--resume" in out
    probe = "import sys, launch.cli; launch.cli.build_parser(); print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


# Measured on the development machines (issue 16 and benchmarks/results/pretrain_small.json): tokens/s
# of DeepSpeed training per layout, and matmul GFLOP/s of the probe.
EPYC_AVX512_BF16 = {(1, 2): 5591.0, (2, 1): 5088.0}  # small preset, bf16: ds1-zero0 vs ds2-zero0
EPYC_AVX2_FP32 = {(1, 2): 1441.0, (2, 1): 4035.0}  # 1 process with 2 threads was 2.8x slower


def test_layout_choice_prefers_the_fastest_and_fewer_processes_within_ten_percent():
    assert candidate_layouts(2) == [(1, 2), (2, 1)]
    assert candidate_layouts(6) == [(1, 6), (2, 3), (3, 2), (6, 1)]
    assert candidate_layouts(64, max_processes=8) == [(1, 64), (2, 32), (4, 16), (8, 8)]
    layout, reason = choose_layout(EPYC_AVX512_BF16, unit="tokens/s")
    assert layout == (1, 2) and "1 x 2 is the fastest" in reason and "2 x 1: 5,088 tokens/s (0.91)" in reason
    assert choose_layout(EPYC_AVX2_FP32)[0] == (2, 1)
    # 1 x 2 is 7% slower than 2 x 1: one process (no all-reduce, one model copy) still wins ...
    layout, reason = choose_layout({(1, 2): 930.0, (2, 1): 1000.0})
    assert layout == (1, 2) and "fewest processes within 10% of the fastest" in reason
    # ... but not at 12% slower, nor with a tolerance of 5%.
    assert choose_layout({(1, 2): 880.0, (2, 1): 1000.0})[0] == (2, 1)
    assert choose_layout({(1, 2): 930.0, (2, 1): 1000.0}, tolerance=0.05)[0] == (2, 1)
    # 4 cores: 4 x 1 is fastest, 2 x 2 within 10% and fewer processes; 1 x 4 is far behind.
    assert choose_layout({(1, 4): 150.0, (2, 2): 370.0, (4, 1): 400.0})[0] == (2, 2)
    with pytest.raises(ValueError, match="no measured layouts"):
        choose_layout({})


def pretrain_report(cpu: str, cores: int, results: list[tuple[str, int, int, object, float]]) -> dict:
    return {"benchmark": "pretrain", "cpu": cpu, "cores": cores, "precision_auto_picks": "bf16",
            "results": [{"precision": prec, "processes": p, "threads_per_process": t, "zero_stage": z,
                         "tokens_per_s": tps} for prec, p, t, z, tps in results]}


def test_layout_from_the_benchmark_table_of_this_machine():
    report = pretrain_report("AMD EPYC", 2, [
        ("fp32", 1, 2, None, 9000.0),  # the plain loop is not what launch runs: ignored
        ("fp32", 1, 2, 0, 3290.0), ("fp32", 2, 1, 0, 3900.0), ("fp32", 2, 1, 2, 3500.0),
        ("bf16", 1, 2, 0, 5591.0), ("bf16", 2, 1, 0, 5088.0), ("bf16", 2, 1, 2, 4750.0),
    ])
    tuned = {**report["results"][4], "variant": "bucket-2e6", "tokens_per_s": 6000.0}  # not the run's settings
    report["results"].append(tuned)
    assert layout_from_report(report, "AMD EPYC", 2, "fp32") == ({(1, 2): 3290.0, (2, 1): 3900.0}, "fp32")
    assert layout_from_report(report, "AMD EPYC", 2, "auto") == ({(1, 2): 5591.0, (2, 1): 5088.0}, "bf16")
    assert layout_from_report(report, "Intel Xeon", 2, "fp32") is None  # another CPU
    assert layout_from_report(report, "AMD EPYC", 4, "fp32") is None  # another core count
    loaded = {**report, "results": [{**r, "load_avg_before": 6.7} for r in report["results"]]}
    assert layout_from_report(loaded, "AMD EPYC", 2, "fp32") is None  # other jobs had the cores
    one_layout = pretrain_report("AMD EPYC", 2, [("fp32", 1, 2, 0, 3290.0)])
    assert layout_from_report(one_layout, "AMD EPYC", 2, "fp32") is None  # nothing to choose between
    assert run_precision(["pretrain", "train.precision=fp32"]) == "fp32"
    assert run_precision(["pretrain", "--preset", "tiny"]) == "auto"


def test_auto_uses_the_benchmark_table_and_records_the_choice(tmp_path, monkeypatch, capsys):
    cores = cores_available()
    results = [("fp32", 1, cores, 0, 1000.0), ("fp32", cores, 1, 0, 950.0)] if cores > 1 else []
    report = pretrain_report(cpu_info()[0], cores, results)
    (tmp_path / "pretrain_here.json").write_text(json.dumps(report))
    monkeypatch.setenv("POLYTEACHER_BENCHMARK_RESULTS", str(tmp_path))
    monkeypatch.setattr("os.getloadavg", lambda: (0.5, 0.5, 0.5))  # quiet: the table decides, no probe
    if cores == 1:
        pytest.skip("one core: only one layout exists")
    assert main(["launch", "--accelerator", "cpu", "--dry-run", "--nproc-per-node", "auto", "--", *PRETRAIN,
                 "train.precision=fp32"]) == 0
    out, err = capsys.readouterr()
    command = shlex.split(out)
    assert f"OMP_NUM_THREADS={cores}" in command
    # One process needs no launcher: the command itself, which joins a world of one.
    assert "deepspeed.launcher.runner" not in command
    assert command[-len(PRETRAIN) - 4 :] == ["-u", "-m", "launch.cli", *PRETRAIN, "train.precision=fp32"]
    assert "1 process(es)" in err and "pretrain_here.json" in err
    with pytest.raises(ConfigError, match="auto measures this machine only"):
        LaunchOptions(command=PRETRAIN, nproc_per_node=0, nnodes=2).validate()
    with pytest.raises(SystemExit):
        main(["launch", "--nproc-per-node", "0", "--", *PRETRAIN])
    assert "a number >= 1 or auto" in capsys.readouterr().err


def test_chosen_layout_reaches_the_processes_and_the_run_directory(tmp_path):
    layout = Layout(1, 2, "bf16", "probe", "1 x 2: 900 GFLOP/s (1.00), 2 x 1: 850 GFLOP/s (0.94); ...",
                    {"1x2": 900.0, "2x1": 850.0})
    opts = LaunchOptions(command=["pretrain", "--run-dir", str(tmp_path / "run"), "--preset", "tiny"])
    env = process_env(opts, gpu=False, base={"OMP_NUM_THREADS": "7"}, layout=layout)
    assert env["OMP_NUM_THREADS"] == "2" and json.loads(env["POLYTEACHER_LAYOUT"])["processes"] == 1
    path = record_layout(opts, layout)
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    assert path == tmp_path / "run" / "launch.jsonl"
    assert record["event"] == "layout" and record["threads"] == 2 and record["measured"]["2x1"] == 850.0
    assert record_layout(LaunchOptions(command=["pretrain", "--preset", "tiny"]), layout) is None


@pytest.mark.slow
def test_layout_probe_runs_processes_together_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("os.getloadavg", lambda: (0.5, 0.5, 0.5))  # a quiet machine: the probe is kept
    layout = probe_layout("test-cpu", 2, "fp32", size=128, seconds=0.1)
    assert layout.source == "probe" and layout.precision == "fp32"
    assert set(layout.measured) == {"1x2", "2x1"} and all(v > 0 for v in layout.measured.values())
    assert (layout.processes, layout.threads) in [(1, 2), (2, 1)] and "128x128 matmul" in layout.reason
    again = probe_layout("test-cpu", 2, "fp32", size=128, seconds=0.1)
    assert again.source == "probe (cached)" and again.measured == layout.measured
    cached = json.loads((tmp_path / "polyteacher" / "cpu_layout.json").read_text())
    assert list(cached) == [next(k for k in cached if k.startswith("test-cpu|2 cores|torch "))]


JOB = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
from core.distributed import init_distributed, shm_allreduce_buffer
info = init_distributed(num_threads=1)
import deepspeed.comm as ds_comm
import torch.distributed as dist
t = torch.full((4096,), float(info.rank + 1))
ds_comm.inference_all_reduce(t)  # DeepSpeed's shared-memory all-reduce: still mapped after the unlink
g = torch.tensor([float(info.rank + 1)])
dist.all_reduce(g)  # gloo, what training uses
left = [str(shm_allreduce_buffer(r)) for r in range(info.world_size) if shm_allreduce_buffer(r).exists()]
dist.barrier()
if info.rank == 0:
    open({out!r}, "w").write(json.dumps({{"shm": float(t[0]), "gloo": float(g[0]), "left": left}}))
"""


@pytest.mark.slow
def test_cpu_ranks_leave_no_shared_memory_buffers_behind(tmp_path):
    # DeepSpeed's CPU all-reduce buffers (~66 MB of /dev/shm per rank) used to outlive every job.
    script, out = tmp_path / "job.py", tmp_path / "out.json"
    script.write_text(JOB.format(repo=str(Path(__file__).resolve().parent.parent), out=str(out)))
    port = str(free_port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           port, "--no_local_rank", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result == {"shm": 3.0, "gloo": 3.0, "left": []}
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
