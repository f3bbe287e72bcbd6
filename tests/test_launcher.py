"""`polyteacher launch`: command lines for every launch mode, the SLURM script, errors (no processes run)."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import sys

import pytest

from launch.cli import main
from launch.config import ConfigError
from launch.launcher import LaunchOptions, launcher_argv, process_env, slurm_script

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
