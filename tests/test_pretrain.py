"""Integration tests of teacher pretraining: real multi-process DeepSpeed runs on CPU through
`polyteacher launch` (tiny model, seq_len 64, 16 steps, one thread per process).

- ZeRO-3 on 2 processes: the held-out loss falls; the exported directory loads with
  AutoModelForSeq2SeqLM, generates, and reproduces the run's final held-out loss.
- SIGKILL after a checkpoint, then --resume: the following steps' losses equal the uninterrupted
  run's (fp32 on CPU, dropout on: tolerance 1e-6 relative); an incomplete checkpoint is ignored.
- Two "nodes" on loopback (torchrun, one process each, ZeRO-2): they rendezvous, the held-out loss
  falls and both ranks end with the same weights and loss.
- NaN guard: lr=1e+30 stops the run with the step and the checkpoint to resume from.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.distributed import free_port
from core.fsutil import read_jsonl

pytestmark = pytest.mark.slow

MAX_STEPS = 16
COMMON = [
    "--preset", "tiny",
    f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=2",
    "train.lr=0.003", "train.log_every=1", "train.eval_every=8", "train.num_eval_batches=4", "train.save_every=4",
    "train.keep_checkpoints=3", "teacher.dropout=0.1",
    # fp32: the exported model's plain forward is compared with the run's held-out loss.
    "train.precision=fp32",
]
LAUNCH_TIMEOUT_S = 600


def make_run_dir(root: Path, tokenizer_dir: Path, packed_dir: Path) -> Path:
    """A run directory holding copies of the tokenizer and packed data (symlinks would escape it), marked
    as `data prepare` marks one: the tests keep their logs in it, which only a run directory may hold."""
    from core.fsutil import mark_run_dir

    run = root
    run.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    shutil.copytree(packed_dir, run / "data")
    mark_run_dir(run)
    return run


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    return out


def launch_cmd(*args: str, nproc: int = 2, launch_flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "launch", "--accelerator", "cpu", "--nproc-per-node", str(nproc),
            *launch_flags, "--", "pretrain", *args]


def run_launch(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed; log:\n{log.read_text()[-6000:]}"
    return proc


def step_records(run: Path, key: str) -> dict[int, float]:
    """{step: value} from metrics.jsonl; a step logged twice (a killed run, then its resume) keeps the last."""
    return {r["step"]: r[key] for r in read_jsonl(run / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_tokenizer_dir, tiny_packed_dir) -> Path:
    """An uninterrupted 2-process ZeRO-3 run of MAX_STEPS steps."""
    run = make_run_dir(tmp_path_factory.mktemp("zero3") / "run", tiny_tokenizer_dir, tiny_packed_dir)
    run_launch(launch_cmd("--run-dir", str(run), *COMMON, "train.optimizer=adamw", "train.zero_stage=3"), run / "log.txt")
    return run


def test_zero3_two_processes_learn(zero3_run):
    eval_loss = step_records(zero3_run, "eval_loss")
    assert sorted(eval_loss) == [0, 8, MAX_STEPS]
    assert eval_loss[MAX_STEPS] < eval_loss[8] < eval_loss[0]
    assert eval_loss[MAX_STEPS] < eval_loss[0] - 0.5  # ln(2048) = 7.6 at initialisation
    records = [r for r in read_jsonl(zero3_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    last = records[-1]
    assert last["stage"] == "pretrain" and last["tokens_per_s"] > 0 and 0 < last["mfu"] < 1
    assert last["examples_seen"] == 8 * MAX_STEPS and last["tokens_seen"] > 8 * MAX_STEPS * 64
    assert {"loss_denoise", "loss_clm", "lr", "grad_norm"} <= set(last)
    assert (zero3_run / "config.yaml").is_file() and list((zero3_run / "tb" / "teacher").iterdir())
    complete = sorted(p.parent.name for p in (zero3_run / "checkpoints" / "teacher").glob("step_*/COMPLETE"))
    assert complete == ["step_00000008", "step_00000012", "step_00000016"]  # keep_checkpoints=3
    log = (zero3_run / "log.txt").read_text()
    assert "[rank 0/2] pretrain done: step 16" in log and "[rank 1/2] pretrain done: step 16" in log


def test_exported_teacher_loads_generates_and_matches_the_run(zero3_run):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from core.config import load_saved_config
    from core.data import eval_micro_batches
    from data_prep.objectives import OBJECTIVE_NAMES, PretrainCollator, loss_by_objective
    from data_prep.packing import load_packed
    from teacher.config import PretrainConfig

    model = AutoModelForSeq2SeqLM.from_pretrained(zero3_run / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(zero3_run / "teacher")
    assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()  # tiny: tied embeddings
    inputs = tokenizer(["Hello world, this is a test."], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[0] == 1 and 2 <= generated.shape[1] <= 9
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)
    # The consolidated fp32 weights give the held-out loss the 2 ZeRO-3 ranks measured at the last step.
    cfg = load_saved_config(PretrainConfig, zero3_run / "config.yaml")
    collator = PretrainCollator.from_tokenizer(cfg.objective, tokenizer, seed=cfg.train.seed)
    heldout = load_packed(zero3_run / "data" / "heldout")
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for rank in range(2):
            for indices in eval_micro_batches(len(heldout), 4, 4, rank, 2):
                batch = collator.collate(heldout[indices]["input_ids"], indices)
                objective = batch.pop("objective")
                out = model(**batch)
                for name, (s, n) in loss_by_objective(out.logits, batch["labels"], objective).items():
                    assert name in OBJECTIVE_NAMES
                    loss_sum += float(s)
                    tokens += float(n)
    assert loss_sum / tokens == pytest.approx(step_records(zero3_run, "eval_loss")[MAX_STEPS], rel=1e-5)


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(zero3_run, tmp_path, tiny_tokenizer_dir,
                                                             tiny_packed_dir):
    run = make_run_dir(tmp_path / "run", tiny_tokenizer_dir, tiny_packed_dir)
    cmd = launch_cmd("--run-dir", str(run), *COMMON, "train.optimizer=adamw", "train.zero_stage=3")
    marker = run / "checkpoints" / "teacher" / "step_00000008" / "COMPLETE"
    with open(run / "log1.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + LAUNCH_TIMEOUT_S
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-training
        proc.wait()
    assert marker.exists(), (run / "log1.txt").read_text()[-4000:]
    killed_steps = step_records(run, "loss")
    assert max(killed_steps) < MAX_STEPS, "the run finished before it could be killed"
    # A checkpoint directory that a crash left half-written (no COMPLETE) must be ignored.
    stale = run / "checkpoints" / "teacher" / "step_00000015"
    stale.mkdir()
    (stale / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    run_launch([*cmd, "--resume"], run / "log2.txt")
    resumed_log = (run / "log2.txt").read_text()
    resumed_from = int(re.search(r"resumed from \S*step_(\d+) \(step (\d+)\)", resumed_log).group(1))
    # The ranks outlive the killed launcher by a step: seeing their starter gone, they save at the next
    # step boundary (core.distributed's parent watch), so the resume may start past the last save_every.
    assert resumed_from >= 8
    reference = step_records(zero3_run, "loss")
    resumed = step_records(run, "loss")
    for step in range(resumed_from + 1, MAX_STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert step_records(run, "eval_loss")[MAX_STEPS] == pytest.approx(
        step_records(zero3_run, "eval_loss")[MAX_STEPS], rel=1e-6)
    assert not stale.exists()  # pruned once newer complete checkpoints exist


def test_two_nodes_on_loopback_rendezvous_and_agree(tmp_path, tiny_tokenizer_dir, tiny_packed_dir):
    run = make_run_dir(tmp_path / "run", tiny_tokenizer_dir, tiny_packed_dir)
    port = str(free_port())
    procs, logs = [], []
    for node_rank in (0, 1):
        flags = ("--launcher", "torchrun", "--nnodes", "2", "--node-rank", str(node_rank),
                 "--master-addr", "127.0.0.1", "--master-port", port)
        log = run / f"node{node_rank}.txt"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(subprocess.Popen(launch_cmd("--run-dir", str(run), *COMMON, "train.optimizer=adamw", "train.zero_stage=2",
                                                     nproc=1, launch_flags=flags),
                                          env=env(), stdout=f, stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=LAUNCH_TIMEOUT_S) == 0, log.read_text()[-6000:]
    done = {}
    for node_rank, log in enumerate(logs):
        match = re.search(r"\[rank (\d)/2\] pretrain done: step (\d+) loss (\S+) weights_abs_sum (\S+)", log.read_text())
        assert match, log.read_text()[-3000:]
        assert int(match.group(1)) == node_rank and int(match.group(2)) == MAX_STEPS
        done[node_rank] = (match.group(3), match.group(4))
    assert done[0] == done[1]  # same loss and bit-identical weights on both "nodes"
    eval_loss = step_records(run, "eval_loss")
    assert eval_loss[MAX_STEPS] < eval_loss[0] - 0.5


def test_nan_guard_stops_with_step_and_checkpoint(tmp_path, tiny_tokenizer_dir, tiny_packed_dir):
    from core.config import load_config
    from core.loop import NonFiniteLossError
    from teacher.config import PretrainConfig
    from teacher.pretrain import pretrain

    run = make_run_dir(tmp_path / "run", tiny_tokenizer_dir, tiny_packed_dir)
    cfg = load_config(PretrainConfig, section="pretrain", preset="tiny", overrides=[
        "train.lr=1.0e+30", "train.warmup_steps=0", "train.grad_clip=0", "train.micro_batch_size=4",
        "train.global_batch_size=4", "train.max_steps=10", "train.save_every=1", "train.num_eval_batches=1",
        "train.zero_stage=0", "train.eval_every=0"])
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step (\d+) .*resume from .*step_\d+ with --resume"):
        pretrain(cfg, run)
    assert not (run / "teacher").exists()


def test_stage2_continues_from_the_teacher_on_indomain_data(zero3_run, tmp_path, tiny_tokenizer_dir, tiny_packed_dir):
    """--section indomain: init_from the exported teacher, data-indomain, same loop (in this process)."""
    from core.config import load_config
    from teacher.config import PretrainConfig
    from teacher.pretrain import pretrain

    run = make_run_dir(tmp_path / "run", tiny_tokenizer_dir, tiny_packed_dir)
    shutil.copytree(tiny_packed_dir, run / "data-indomain")
    shutil.copytree(zero3_run / "teacher", run / "teacher")
    cfg = load_config(PretrainConfig, section="indomain", preset="tiny", overrides=[
        "train.max_steps=4", "train.micro_batch_size=4", "train.global_batch_size=4", "train.warmup_steps=1",
        "train.num_eval_batches=4", "train.zero_stage=0", "train.eval_every=0", "train.save_every=0"])
    assert (cfg.init_from, cfg.data, cfg.out) == ("teacher", "data-indomain", "teacher-indomain")
    out = pretrain(cfg, run)
    assert out == run / "teacher-indomain" and (out / "model.safetensors").is_file()
    stage2 = [r for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in stage2] == [0, 4]
    # Starts where stage 1 ended, far below a random initialisation's held-out loss.
    assert stage2[0]["eval_loss"] < step_records(zero3_run, "eval_loss")[0] - 0.5
    assert (run / "checkpoints" / "teacher-indomain" / "step_00000004" / "COMPLETE").is_file()
    # Running again without --resume would mix two runs' checkpoints: refused.
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoints already exist .* pass --resume"):
        pretrain(cfg, run)
