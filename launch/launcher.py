"""`polyteacher launch`: start a training subcommand on K processes per node.

    polyteacher launch --nproc-per-node 2 -- pretrain --run-dir runs/demo --preset tiny

Every process runs `python -m launch.cli <subcommand> ...`; the training code reads its rank from the
environment (`core.distributed.init_distributed`). Ways to start them:

- one node (default): DeepSpeed's launcher (`python -m deepspeed.launcher.runner --num_gpus K`), or
  torchrun with `--launcher torchrun`;
- many nodes from one command: `--hostfile F` (DeepSpeed's launcher reaches the nodes over pdsh/ssh);
- many nodes, one command per node (no ssh): `--nnodes N --node-rank R --master-addr A --master-port P`
  on each node; with DeepSpeed this runs its per-node launcher (`deepspeed.launcher.launch` with the
  world layout), with torchrun its static rendezvous;
- SLURM: `--slurm` writes an sbatch script (srun starts one launcher per node, MASTER_ADDR is the
  first host of the allocation) and prints its path instead of running anything.

Without a GPU the processes use DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) and gloo, each with
cores / K threads (OMP_NUM_THREADS); with GPUs NCCL, one GPU per process. `--dry-run` prints the
command and environment instead of running them.

`--nproc-per-node auto` chooses processes x threads by measurement (`resolve_layout`): one process per
GPU; on CPU the pretraining benchmark's table for this CPU model and core count when the user's cache
holds one (~/.cache/polyteacher/layout-tables/, where `python -m benchmarks.pretrain` leaves a copy of
its report: tokens/s of its DeepSpeed modes), else a probe in which each candidate
layout P x T (P * T = cores) runs P processes timing a matmul in the run's precision together for ~1 s
(cached per machine); tables and probes taken with the load average above 1.5 x cores are not used
or kept, and while the machine is that busy a fresh probe decides. Within 10% of the fastest the
fewest processes win. The choice and every
candidate's number are printed, passed to the processes ($POLYTEACHER_LAYOUT) and appended to
RUN_DIR/launch.jsonl. One process still runs on the DeepSpeed engine.

SIGINT and SIGTERM to `polyteacher launch` reach every process it started (`run_process_tree`): the
launcher and its ranks run as one process group, which gets the signal, and `launch` returns only
when all of them have exited (128 + the signal number). When `launch` itself dies without a word
(kill -9, out of memory), its ranks notice (`watch_parent`) and stop as on SIGTERM.

On one node the processes talk over loopback only: they meet through a file store instead of a TCP
rendezvous port (which torch binds on every interface), and gloo binds to `lo`
(GLOO_SOCKET_IFNAME). Across nodes the rendezvous is --master-addr, as the user names it.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from core.config import ConfigError
from core.distributed import free_port
from launch.layout import (
    AUTO_NPROC,
    BENCHMARK_MAX_LOAD,
    LAYOUT_ENV,
    Layout,
    layout_from_benchmarks,
    probe_layout,
    run_precision,
)

# Subcommands that train (and so can run on several processes).
TRAINING_COMMANDS = ("pretrain", "distill", "finetune")
DEFAULT_MASTER_PORT = 29500


@dataclasses.dataclass
class LaunchOptions:
    """What `polyteacher launch` was asked to start (the parsed flags)."""

    command: list[str]
    """The training subcommand and its arguments, e.g. ["pretrain", "--run-dir", "runs/x"]."""
    nproc_per_node: int = 1
    """Processes per node (GPUs per node, or CPU processes); 0 (AUTO_NPROC, `--nproc-per-node auto`) = every
    GPU, or on CPU the layout chosen by measurement (`resolve_layout`)."""
    nnodes: int = 1
    """Number of nodes."""
    node_rank: int = 0
    """This node's index, 0 .. nnodes-1 (multi-node without a hostfile)."""
    master_addr: str = "127.0.0.1"
    """Address of node 0 (the rendezvous host)."""
    master_port: Optional[int] = None
    """Rendezvous port; None = a free port on one node, 29500 across nodes."""
    hostfile: Optional[str] = None
    """DeepSpeed hostfile ("host slots=K" per line); DeepSpeed's launcher reaches the nodes over ssh."""
    launcher: str = "deepspeed"
    """deepspeed or torchrun."""
    accelerator: str = "auto"
    """auto (GPU when torch sees one), cpu or gpu."""
    slurm: bool = False
    slurm_out: Optional[str] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    job_name: Optional[str] = None
    account: Optional[str] = None
    python: str = dataclasses.field(default_factory=lambda: sys.executable)

    def validate(self) -> None:
        if not self.command:
            raise ConfigError(
                "launch: no subcommand given; usage: polyteacher launch --nproc-per-node K -- pretrain ... "
                f"(allowed subcommands: {', '.join(TRAINING_COMMANDS)})"
            )
        if self.command[0] not in TRAINING_COMMANDS:
            raise ConfigError(
                f"launch: {self.command[0]!r} is not a training subcommand; allowed: {', '.join(TRAINING_COMMANDS)}"
            )
        if self.nproc_per_node < 0 or self.nnodes < 1:
            raise ConfigError("launch: --nproc-per-node must be >= 1 or auto, and --nnodes >= 1")
        if self.nproc_per_node == AUTO_NPROC and (self.nnodes > 1 or self.slurm or self.hostfile):
            raise ConfigError("launch: --nproc-per-node auto measures this machine only; give a number with "
                              "--nnodes > 1, --hostfile or --slurm")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"launch: --node-rank {self.node_rank} must be in [0, {self.nnodes - 1}] for --nnodes {self.nnodes}")
        if self.launcher not in ("deepspeed", "torchrun"):
            raise ConfigError(f"launch: --launcher {self.launcher!r}; allowed values: deepspeed, torchrun")
        if self.accelerator not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"launch: --accelerator {self.accelerator!r}; allowed values: auto, cpu, gpu")
        if self.hostfile is not None:
            if self.launcher != "deepspeed":
                raise ConfigError("launch: --hostfile needs --launcher deepspeed (torchrun has no hostfile; run one "
                                  "command per node with --nnodes/--node-rank, or use --slurm)")
            if self.slurm:
                raise ConfigError("launch: --hostfile and --slurm exclude each other (SLURM allocates the nodes)")
            if not Path(self.hostfile).is_file():
                raise ConfigError(f"launch: hostfile {self.hostfile} does not exist")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"launch: --master-port {self.master_port} must be in 1..65535")

    @property
    def module_command(self) -> list[str]:
        """What each process runs after `python`: the CLI as a module plus the subcommand."""
        return ["-m", "launch.cli", *self.command]


# ----------------------------------------------------------------------------- process layout (auto)

def resolve_layout(opts: LaunchOptions, gpu: bool) -> Optional[Layout]:
    """Replace `--nproc-per-node auto`: one process per GPU; on CPU the layout of the benchmark table for
    this machine, else the (cached) probe; while the load average exceeds BENCHMARK_MAX_LOAD x cores, a
    fresh probe (what the machine gives now). None when a number was given."""
    if opts.nproc_per_node != AUTO_NPROC:
        return None
    if gpu:
        import torch

        opts.nproc_per_node = max(1, torch.cuda.device_count())
        return None
    from core.distributed import cpu_info

    cpu, cores, precision = cpu_info()[0], cores_available(), run_precision(opts.command)
    # With other jobs holding the cores a multi-threaded process stalls at every parallel region (10-30x
    # slower measured), single-threaded ones do not: a quiet machine's table would mislead, so measure now.
    busy = os.getloadavg()[0] > BENCHMARK_MAX_LOAD * cores
    layout = (None if busy else layout_from_benchmarks(cpu, cores, precision)) or probe_layout(cpu, cores, precision)
    opts.nproc_per_node = layout.processes
    return layout


def record_layout(opts: LaunchOptions, layout: Layout) -> Optional[Path]:
    """Append the chosen layout to RUN_DIR/launch.jsonl when the subcommand names a --run-dir."""
    from core.fsutil import append_jsonl

    command = opts.command
    run_dir = next((command[i + 1] for i, a in enumerate(command[:-1]) if a == "--run-dir"), None)
    run_dir = run_dir or next((a.split("=", 1)[1] for a in command if a.startswith("--run-dir=")), None)
    if not run_dir:
        return None
    path = Path(run_dir) / "launch.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, {"time": round(time.time(), 3), "event": "layout", "command": command,
                        **layout.to_dict()})
    return path


def use_gpu(accelerator: str) -> bool:
    if accelerator == "cpu":
        return False
    if accelerator == "gpu":
        return True
    import torch  # only here: `polyteacher --help` must not pay for it

    return torch.cuda.is_available()


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def process_env(opts: LaunchOptions, gpu: bool, base: Optional[dict[str, str]] = None,
                layout: Optional[Layout] = None) -> dict[str, str]:
    """Environment for the launcher (inherited by every process); a measured `layout` sets the threads."""
    env = dict(os.environ if base is None else base)
    if layout is not None and not gpu:
        env["OMP_NUM_THREADS"] = str(layout.threads)
        env[LAYOUT_ENV] = json.dumps(layout.to_dict())
    if gpu:
        if env.get("DS_ACCELERATOR") == "cpu":  # left over from a CPU shell; GPUs were asked for
            del env["DS_ACCELERATOR"]
    else:
        env["DS_ACCELERATOR"] = "cpu"
        # K processes share the node's cores; oversubscription makes every all-reduce wait.
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores_available() // opts.nproc_per_node)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if one_node(opts):
        # Nothing of a one-node run listens beyond this machine (see `local_store_path`).
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    env[PARENT_ENV] = parent_token()
    return env


def one_node(opts: LaunchOptions) -> bool:
    """Whether every process runs on this machine (no hostfile, no SLURM, one node)."""
    return opts.nnodes == 1 and not opts.hostfile and not opts.slurm


# ----------------------------------------------------------------------------- processes die together

PARENT_ENV = "POLYTEACHER_PARENT"
"""`PID:START` of the polyteacher process that started this one (a pipeline stage, a launched rank):
the child stops when that process is gone (`watch_parent`)."""
PARENT_GRACE_S = 5.0
"""Seconds a child whose parent died gets to save and exit after its SIGTERM before it ends at once: a
user who killed the launcher wants the run gone, and a checkpoint cut short is never COMPLETE."""


def parent_token(pid: int | None = None) -> str:
    from core.fsutil import process_start

    pid = os.getpid() if pid is None else pid
    return f"{pid}:{process_start(pid) or ''}"


def _parent_gone(token: str) -> bool:
    from core.fsutil import _pid_alive, process_start

    pid_text, _, start = token.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if not _pid_alive(pid):
        return True
    state = None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z" or bool(start and process_start(pid) not in (None, start))


def watch_parent(poll_s: float = 0.5) -> None:
    """When PARENT_ENV names a process, stop this one as on SIGTERM once that process is gone: a
    pipeline or launcher killed with -9 must not leave its stages or ranks running (and writing)
    on their own. A daemon thread; whatever still runs PARENT_GRACE_S later exits at once."""
    import threading

    token = os.environ.get(PARENT_ENV)
    if not token or token == parent_token():
        return

    def watch() -> None:
        while not _parent_gone(token):
            time.sleep(poll_s)
        print(f"polyteacher: the process that started this one ({token.split(':')[0]}) is gone; stopping",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GRACE_S)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="polyteacher-parent-watch", daemon=True).start()


GROUP_WATCHDOG = """
import os, signal, sys, time
pgid, grace, parent = int(sys.argv[1]), float(sys.argv[2]), os.getppid()

def group_alive():
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

while os.getppid() == parent and group_alive():
    time.sleep(0.5)
if group_alive():
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive():
        os.killpg(pgid, signal.SIGKILL)
"""
"""Run by `run_process_tree` beside the launcher's process group: when `polyteacher launch` is gone
(its parent pid changes), SIGTERM to the group, SIGKILL what is left PARENT_GRACE_S later; it exits
by itself once the group is gone."""


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a child before exec: the kernel sends it `signum` when its parent dies (prctl
    PR_SET_PDEATHSIG), so a launcher killed with -9 does not leave its process runner behind."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the ranks' watch_parent still stops them
        pass


def world_info(nnodes: int, nproc_per_node: int) -> str:
    """DeepSpeed's world layout {host: [local slots]} as base64 JSON; names only fix the node order."""
    layout = {f"node{n}": list(range(nproc_per_node)) for n in range(nnodes)}
    return base64.urlsafe_b64encode(json.dumps(layout).encode()).decode()


def launcher_argv(opts: LaunchOptions, master_port: int, node_rank: str | int | None = None,
                  master_addr: str | None = None) -> list[str]:
    """The command line that starts this node's processes (node_rank/master_addr may be shell variables)."""
    node_rank = opts.node_rank if node_rank is None else node_rank
    master_addr = opts.master_addr if master_addr is None else master_addr
    py = opts.python
    if opts.launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", f"--nproc_per_node={opts.nproc_per_node}",
                f"--nnodes={opts.nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port}", *opts.module_command]
    if opts.hostfile is not None:
        argv = [py, "-m", "deepspeed.launcher.runner", "--hostfile", opts.hostfile,
                "--master_port", str(master_port)]
        if opts.nnodes > 1:
            argv += ["--num_nodes", str(opts.nnodes)]
        if opts.master_addr != "127.0.0.1":
            argv += ["--master_addr", opts.master_addr]
        argv += ["--num_gpus", str(opts.nproc_per_node)]
        return [*argv, "--no_local_rank", "--module", "launch.cli", *opts.command]
    if opts.nnodes > 1 or opts.slurm:
        # One launcher per node, no ssh: DeepSpeed's per-node launcher with the whole world's layout.
        return [py, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info(opts.nnodes, opts.nproc_per_node)}",
                f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}",
                "--no_local_rank", "--module", "launch.cli", *opts.command]
    if opts.nproc_per_node == 1:
        # One process on one node needs no launcher: it joins a world of one on its own
        # (core.distributed.init_distributed), and DeepSpeed's runner and per-node launcher would cost
        # two more Python start-ups with DeepSpeed imported (~3-4 s a stage on 2 CPU cores).
        return [py, "-u", "-m", "launch.cli", *opts.command]
    return [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(opts.nproc_per_node),
            "--master_addr", master_addr, "--master_port", str(master_port), "--no_local_rank", "--module",
            "launch.cli", *opts.command]


def resolve_port(opts: LaunchOptions) -> int:
    if opts.master_port is not None:
        return opts.master_port
    # On one node a free port avoids clashing with other jobs; nodes must agree, so a fixed default.
    return DEFAULT_MASTER_PORT if (opts.nnodes > 1 or opts.slurm or opts.hostfile) else free_port()


def slurm_script(opts: LaunchOptions, gpu: bool, workdir: str | None = None) -> str:
    """An sbatch script: one launcher per node via srun, MASTER_ADDR = the allocation's first host."""
    port = opts.master_port or DEFAULT_MASTER_PORT
    job = opts.job_name or f"polyteacher-{opts.command[0]}"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --nodes={opts.nnodes}",
             "#SBATCH --ntasks-per-node=1"]
    if gpu:
        lines.append(f"#SBATCH --gpus-per-node={opts.nproc_per_node}")
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    lines.append(f"#SBATCH --output={job}-%j.out")
    inner = launcher_argv(opts, port, node_rank="__NODE_RANK__", master_addr="__MASTER_ADDR__")
    inner_text = shlex.join(inner).replace("__NODE_RANK__", '"$SLURM_NODEID"').replace("__MASTER_ADDR__", '"$MASTER_ADDR"')
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(workdir or os.getcwd())}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT={port}",
    ]
    if not gpu:
        lines.append("export DS_ACCELERATOR=cpu")
        lines.append(f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( $(nproc) / {opts.nproc_per_node} ))}}"')
    lines.append("export TOKENIZERS_PARALLELISM=false")
    # srun starts one task per node; the single quotes defer $SLURM_NODEID to each node's shell.
    lines.append(f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(inner_text)}")
    return "\n".join(lines) + "\n"


def run_launch(opts: LaunchOptions, dry_run: bool = False) -> int:
    opts.validate()
    gpu = use_gpu(opts.accelerator)
    if opts.slurm:
        from core.fsutil import atomic_write_text

        script = slurm_script(opts, gpu)
        path = Path(opts.slurm_out or f"{opts.job_name or 'polyteacher-' + opts.command[0]}.sbatch")
        if dry_run:
            print(script, end="")
            return 0
        atomic_write_text(path, script)
        os.chmod(path, 0o755)
        print(f"wrote {path}; submit it with: sbatch {shlex.quote(str(path))}")
        return 0
    layout = resolve_layout(opts, gpu)
    if layout is not None:
        print(f"polyteacher launch: {layout.processes} process(es) x {layout.threads} thread(s), chosen by "
              f"{layout.source} ({layout.precision}): {layout.reason}", file=sys.stderr, flush=True)
    argv = launcher_argv(opts, resolve_port(opts))
    env = process_env(opts, gpu, layout=layout)
    if dry_run:
        changed = {k: env[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS") if k in env}
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in changed.items()) + " " + shlex.join(argv))
        return 0
    if layout is not None:
        record_layout(opts, layout)
    print(f"polyteacher launch: {shlex.join(argv)}", file=sys.stderr, flush=True)
    if not one_node(opts):
        return run_process_tree(argv, env)
    import tempfile

    from core.distributed import STORE_ENV

    with tempfile.TemporaryDirectory(prefix="polyteacher-store-") as store:
        env[STORE_ENV] = os.path.join(store, "store")
        return run_process_tree(argv, env)


# Seconds the processes get to exit after the launcher itself exited (they save a checkpoint at the
# next step boundary on SIGTERM/SIGINT) before the rest of the tree is killed.
SHUTDOWN_GRACE_S = 120.0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def run_process_tree(argv: list[str], env: dict[str, str], grace_s: float | None = None) -> int:
    """Run `argv` (a process launcher) and everything it starts as one process group, and wait for all.

    The launcher runs in a new session, so its ranks share a process group of their own. SIGINT and
    SIGTERM sent to this process (Ctrl-C, `kill`, SLURM preemption) go to that whole group, not only
    to the launcher: DeepSpeed's runner dies on SIGTERM without passing it on, which used to leave the
    ranks training (and writing) on their own. After the launcher exits, ranks still running get
    SIGTERM, and whatever is left `grace_s` later SIGKILL. Returns the launcher's exit code, or 128 +
    the signal number when a signal stopped the run.
    """
    grace_s = SHUTDOWN_GRACE_S if grace_s is None else grace_s
    # A job started in the background by a non-interactive shell inherits SIGINT ignored; the ranks
    # must still stop (and checkpoint) when a forwarded SIGINT reaches them.
    def child_setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent()

    proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=child_setup)
    pgid = proc.pid
    # Outside the group, a watchdog ends the whole group if this process dies without a word (kill -9):
    # DeepSpeed's per-node launcher would otherwise keep waiting on its ranks.
    subprocess.Popen([sys.executable, "-c", GROUP_WATCHDOG, str(pgid), str(PARENT_GRACE_S)], env=env,
                     start_new_session=True, stdin=subprocess.DEVNULL)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        _signal_group(pgid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"polyteacher launch: stopped by {signal.Signals(received[0]).name}; every process of the run has "
              "exited", file=sys.stderr, flush=True)
        return 128 + received[0]
    return code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run a training subcommand (pretrain, distill, finetune) on several processes or nodes",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  polyteacher launch --nproc-per-node 2 -- pretrain --run-dir runs/demo --preset tiny\n"
            "  polyteacher launch --nproc-per-node auto -- pretrain --run-dir runs/demo --preset small\n"
            "  polyteacher launch --nproc-per-node 8 --hostfile hosts -- pretrain --run-dir runs/big --preset xl\n"
            "  polyteacher launch --nproc-per-node 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 "
            "--master-port 29500 -- pretrain ...\n"
            "  polyteacher launch --launcher torchrun --nproc-per-node 4 -- finetune --run-dir runs/demo ...\n"
            "  polyteacher launch --slurm --nnodes 4 --nproc-per-node 8 --partition gpu --time 48:00:00 "
            "--slurm-out pretrain.sbatch -- pretrain --run-dir runs/big --preset alexatm-20b\n"
        ),
    )
    p.add_argument("--nproc-per-node", type=_nproc, default=1,
                   help="processes per node (GPUs per node, or CPU processes), or auto: every GPU; on CPU the "
                   "processes x threads that measured fastest here (this CPU's pretraining-benchmark table kept in "
                   "~/.cache/polyteacher/layout-tables/ by `python -m benchmarks.pretrain`, "
                   "else a ~1 s matmul probe per layout, cached in ~/.cache/polyteacher/cpu_layout.json; within "
                   "10%% the fewest processes); the choice is logged and appended to RUN_DIR/launch.jsonl")
    p.add_argument("--hostfile", default=None,
                   help="DeepSpeed hostfile, one 'host slots=K' line per node; DeepSpeed's launcher starts all nodes "
                   "over pdsh/ssh from this one command")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (run this command on each node)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (rendezvous)")
    p.add_argument("--master-port", type=int, default=None,
                   help=f"rendezvous port (default: a free port on one node, {DEFAULT_MASTER_PORT} across nodes)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed",
                   help="process launcher: DeepSpeed's (default) or torchrun")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto",
                   help="auto: GPUs (NCCL) when torch sees one, else CPU processes (DS_ACCELERATOR=cpu, gloo)")
    p.add_argument("--slurm", action="store_true", help="write an sbatch script instead of running")
    p.add_argument("--slurm-out", default=None, help="path of the sbatch script (default: polyteacher-<command>.sbatch)")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", default=None, help="SLURM time limit, e.g. 48:00:00")
    p.add_argument("--job-name", default=None, help="SLURM job name (default: polyteacher-<command>)")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--dry-run", action="store_true", help="print the command (or the sbatch script) without running it")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help=f"-- then the training subcommand and its arguments ({', '.join(TRAINING_COMMANDS)})")
    p.set_defaults(func=run)


def _nproc(text: str) -> int:
    if text.strip().lower() == "auto":
        return AUTO_NPROC
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number >= 1 or auto")
    return value


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return LaunchOptions(
        command=command, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.master_addr, master_port=args.master_port, hostfile=args.hostfile, launcher=args.launcher,
        accelerator=args.accelerator, slurm=args.slurm, slurm_out=args.slurm_out, partition=args.partition,
        time=args.time, job_name=args.job_name, account=args.account,
    )


def run(args: argparse.Namespace) -> int:
    return run_launch(options_from_args(args), dry_run=args.dry_run)
