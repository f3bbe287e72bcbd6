"""Fault injection: run polyteacher commands the way a careless or hostile user would, and check that
nothing is lost, nothing is left running and nothing is exposed.

    python -m benchmarks.faults [--slow] [--json out.json] [-k NAME]

Every case builds its own sandbox (a tiny fake run, a folder of the user's files, a broken input),
runs one `python -m launch.cli ...` command in it, and checks:

- the exit code and that stderr says what is wrong in a line (the message column);
- no traceback reaches the user;
- no file outside the command's own output changed (every file of the sandbox is hashed before and
  after; the outputs a case may write are listed with it);
- no process of the command is alive 10 s after it exited (each command runs with a unique token in
  its environment, which every process it starts inherits; /proc is searched for it);
- for the one-node launch: no socket of the command listens outside 127.0.0.1 while it runs.

It prints a table (case, exit code, message, verdict) and writes JSON. `tests/test_fault_injection.py`
runs every case through `run_case`. A full disk is real: a 1 MiB tmpfs mounted under the sandbox
(needs root or CAP_SYS_ADMIN; the case is skipped otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("POLYTEACHER_FAULT_ROOT") or Path(__file__).resolve().parent.parent)
"""The checkout whose code the commands run (POLYTEACHER_FAULT_ROOT: another one, e.g. an older commit)."""
TOKEN_ENV = "POLYTEACHER_FAULT_CASE"
LINGER_S = 10.0


@dataclasses.dataclass
class Outcome:
    case: str
    exit_code: int | None
    message: str
    problems: list[str]
    seconds: float
    skipped: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[Path], dict[str, Any]]
    """Makes the sandbox; returns {"argv", "expect_code", "expect" (substring of stderr), "outputs"
    (paths relative to the sandbox the command may change), "cwd" (relative), "run" (a custom runner)}."""
    slow: bool = False


# ----------------------------------------------------------------------------- checks


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[rel] = "dir"
    return out


def changed_outside(before: dict[str, str], after: dict[str, str], outputs: list[str]) -> list[str]:
    def allowed(rel: str) -> bool:
        return any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outputs)

    return sorted(rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel) and not allowed(rel))


def processes_with(token: str) -> list[int]:
    needle = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def wait_gone(token: str, seconds: float = LINGER_S) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        alive = processes_with(token)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def listening_sockets(pids: list[int]) -> list[str]:
    """`addr:port` of every TCP socket in LISTEN state that one of `pids` holds."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:
                continue
            addr_hex, port_hex = fields[1].split(":")
            port = int(port_hex, 16)
            if width == 8:
                addr = ".".join(str(b) for b in bytes.fromhex(addr_hex)[::-1])
            else:
                words = [bytes.fromhex(addr_hex[i:i + 8])[::-1].hex() for i in range(0, 32, 8)]
                addr = "[" + ":".join(w[j:j + 4] for w in words for j in (0, 4)) + "]"
            found.append(f"{addr}:{port}")
    return found


def is_loopback(addr_port: str) -> bool:
    addr = addr_port.rsplit(":", 1)[0]
    return addr.startswith("127.") or addr in ("[0000:0000:0000:0000:0000:0000:0000:0001]",
                                               "[0000:0000:0000:0000:0000:ffff:7f00:0001]")


def env_for(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "POLYTEACHER_RUN_LOCK",
                        "POLYTEACHER_PARENT")}
    env.update({TOKEN_ENV: token, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


def message_of(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "[WARNING]" not in line
             and "Setting accelerator" not in line]
    return lines[-1].strip() if lines else ""


def run_case(case: Case, base: Path) -> Outcome:
    sandbox = base / case.name
    sandbox.mkdir(parents=True)
    spec = case.build(sandbox)
    if spec.get("skip"):
        return Outcome(case.name, None, "", [], 0.0, skipped=spec["skip"])
    token = uuid.uuid4().hex
    before = snapshot(sandbox)
    started = time.monotonic()
    cwd = sandbox / spec.get("cwd", ".")
    env = env_for(token)
    problems: list[str] = []
    runner = spec.get("run")
    if runner is not None:
        code, stderr, extra = runner(sandbox, cwd, env, token)
        problems += extra
    else:
        proc = subprocess.run([sys.executable, "-m", "launch.cli", *spec["argv"]], cwd=cwd, env=env,
                              capture_output=True, text=True, errors="replace", timeout=600)
        code, stderr = proc.returncode, proc.stderr
    seconds = time.monotonic() - started
    left = wait_gone(token)
    commands = {pid: _cmdline(pid) for pid in left}
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        problems.append(f"processes alive {LINGER_S:.0f} s after exit: {left} ({'; '.join(commands.get(p, '?') for p in left)})")
    if "Traceback (most recent call last)" in stderr:
        problems.append("a traceback reached the user")
    expect_code = spec.get("expect_code", 2)
    if expect_code is not None and code != expect_code:
        problems.append(f"exit code {code}, expected {expect_code}")
    message = message_of(stderr)
    expect = spec.get("expect")
    if expect and expect not in stderr:
        problems.append(f"stderr lacks {expect!r}")
    changed = changed_outside(before, snapshot(sandbox), spec.get("outputs", []))
    if changed:
        problems.append(f"changed outside the output: {changed[:5]}")
    return Outcome(case.name, code, message, problems, round(seconds, 1))


@contextlib.contextmanager
def stderr_file(sandbox: Path):
    """A file (beside the sandbox) for a command's stderr, and a function reading it back: processes
    the command leaves running keep a pipe open, which would block the driver, but not a file."""
    path = sandbox.parent / f"{sandbox.name}.stderr"
    with open(path, "w") as f:
        yield f, lambda: path.read_text(errors="replace")


# ----------------------------------------------------------------------------- fixtures


def write_safetensors(path: Path, size: int = 16) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(size)}, str(path))


def fake_model(path: Path) -> Path:
    """A directory that passes the model-directory checks (they run before any loading)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "t5"}\n')
    write_safetensors(path / "model.safetensors")
    (path / "tokenizer.json").write_text("{}")
    return path


def fake_run(path: Path) -> Path:
    """A run directory: its marker and configs, a model, checkpoints with a COMPLETE marker."""
    (path / "configs").mkdir(parents=True)
    (path / "configs" / "data.yaml").write_text("seed: 1\n")
    (path / "config.yaml").write_text("seed: 1\n")
    (path / ".polyteacher-run").write_text('{"kind": "run"}\n')
    fake_model(path / "teacher")
    step = path / "checkpoints" / "teacher" / "step_00000010"
    step.mkdir(parents=True)
    (step / "state.json").write_text('{"step": 10}')
    (step / "COMPLETE").write_text('{"step": 10, "sha256": {}}')
    return path


def user_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("the user's own notes\n")
    (path / "config.yaml").write_text("mine: true\n")
    return path


def corpus_preset(sandbox: Path, files: dict[str, bytes]) -> Path:
    """A preset whose data section reads only the sandbox's corpus files (en-US) and shares one
    MASSIVE cache between cases."""
    corpus = sandbox / "corpus"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    name = next(iter(files))
    kind_suffix = name.split("en-US", 1)[1]
    preset = sandbox / "preset"
    preset.mkdir()
    cache = Path(os.environ.get("POLYTEACHER_FAULT_CACHE", sandbox.parent / "massive-cache"))
    (preset / "data.yaml").write_text(
        "locales: [en-US]\n"
        "corpus:\n  sources:\n    - name: user\n      kind: text\n"
        f"      path: {corpus}/{{locale}}{kind_suffix}\n"
        "massive:\n  exclude_all_locales: false\n"
        f"  cache_dir: {cache}\n"
        "tokenizer:\n  vocab_size: 1000\n  label_tokens: false\n"
    )
    return preset


# ----------------------------------------------------------------------------- cases


def _export(out: str, *extra: str, model: str = "R/teacher") -> list[str]:
    return ["export", "--model", model, "--out", out, *extra]


def case_export_into_checkpoints(s: Path) -> dict[str, Any]:
    fake_run(s / "R")
    return {"argv": _export("R/checkpoints", "--overwrite"), "expect": "run directory or checkpoint"}


def case_export_into_another_run(s: Path) -> dict[str, Any]:
    fake_run(s / "R")
    fake_run(s / "other")
    return {"argv": _export("other", "--overwrite"), "expect": "run directory or checkpoint"}


def case_export_into_folder_of_runs(s: Path) -> dict[str, Any]:
    fake_run(s / "R")
    fake_run(s / "runs" / "a")
    fake_run(s / "runs" / "b")
    return {"argv": _export("runs", "--overwrite"), "expect": "holds one at"}


def case_export_into_cwd(s: Path) -> dict[str, Any]:
    fake_model(s / "m")
    return {"argv": _export(".", "--overwrite", model="m"), "expect": "current directory"}


def case_export_into_foreign_dir(s: Path) -> dict[str, Any]:
    fake_model(s / "m")
    user_dir(s / "mine")
    return {"argv": _export("mine", "--overwrite", model="m"), "expect": "--overwrite replaces only an earlier export"}


def case_export_of_an_export_without_int8(s: Path) -> dict[str, Any]:
    (s / "onnx").mkdir()
    (s / "onnx" / "manifest.json").write_text('{"precision": "fp32"}')
    return {"argv": _export("out", model="onnx"), "expect": "already an ONNX export"}


def case_export_while_another_exports(s: Path) -> dict[str, Any]:
    fake_model(s / "m")
    holder = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from core.fsutil import output_lock\n"
              "with output_lock(sys.argv[1], 'polyteacher export (first)'):\n"
              "    open(sys.argv[2], 'w').close(); time.sleep(60)\n")

    def run(sandbox: Path, cwd: Path, env: dict[str, str], token: str) -> tuple[int, str, list[str]]:
        ready = sandbox.parent / f"{sandbox.name}.ready"
        first = subprocess.Popen([sys.executable, "-c", holder, str(sandbox / "out"), str(ready)], cwd=cwd, env=env)
        try:
            deadline = time.monotonic() + 60
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            proc = subprocess.run([sys.executable, "-m", "launch.cli", *_export("out", model="m")], cwd=cwd, env=env,
                                  capture_output=True, text=True, timeout=300)
        finally:
            first.terminate()
            first.wait()
        return proc.returncode, proc.stderr, []

    return {"run": run, "expect": "in use by", "outputs": [".out.polyteacher.lock"]}


def case_truncated_safetensors(s: Path) -> dict[str, Any]:
    fake_model(s / "m")
    data = (s / "m" / "model.safetensors").read_bytes()
    (s / "m" / "model.safetensors").write_bytes(data[:-10])
    return {"argv": _export("out", model="m"), "expect": "truncated"}


def case_malformed_config_json(s: Path) -> dict[str, Any]:
    fake_model(s / "m")
    (s / "m" / "config.json").write_text('{"model_type": "t5",\n  "d_model": }\n')
    return {"argv": _export("out", model="m"), "expect": "config.json:2: not valid JSON"}


def case_config_json_of_another_size(s: Path) -> dict[str, Any]:
    """A real (tiny) T5 whose config.json was edited to another width."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(s / "m")
    (s / "m" / "tokenizer.json").write_text("{}")
    edited = json.loads((s / "m" / "config.json").read_text())
    edited["d_model"] = 24
    (s / "m" / "config.json").write_text(json.dumps(edited))
    return {"argv": _export("out", model="m"), "expect": "config.json and model.safetensors do not fit together"}


def case_data_prepare_into_user_folder(s: Path) -> dict[str, Any]:
    user_dir(s / "mine")
    return {"argv": ["data", "prepare", "--run-dir", "mine", "--preset", "tiny"],
            "expect": "holds files polyteacher did not write", "outputs": ["mine/.polyteacher.lock"]}


def case_lock_path_is_a_directory(s: Path) -> dict[str, Any]:
    fake_run(s / "R")
    (s / "R" / ".polyteacher.lock").mkdir()
    return {"argv": ["data", "prepare", "--run-dir", "R", "--preset", "tiny"], "expect": "is a directory"}


def case_preset_is_an_unrelated_folder(s: Path) -> dict[str, Any]:
    (s / "folder").mkdir()
    (s / "folder" / "notes.txt").write_text("the user's own notes\n")
    return {"argv": ["data", "prepare", "--run-dir", "R", "--preset", "folder"], "expect": "not a preset",
            "outputs": ["R"]}


def _prepare(s: Path, files: dict[str, bytes]) -> list[str]:
    preset = corpus_preset(s, files)
    return ["data", "prepare", "--run-dir", "R", "--preset", str(preset), "--quiet"]


def case_corpus_not_utf8(s: Path) -> dict[str, Any]:
    argv = _prepare(s, {"en-US.txt": b"a fine sentence here\nbad \xff\xfe bytes here\n"})
    return {"argv": argv, "expect": "en-US.txt:2: byte 25", "outputs": ["R"]}


def case_corpus_truncated_gz(s: Path) -> dict[str, Any]:
    data = gzip.compress(b"".join(b"sentence number %d of the corpus\n" % i for i in range(2000)))
    argv = _prepare(s, {"en-US.txt.gz": data[: len(data) // 2]})
    return {"argv": argv, "expect": "truncated or damaged", "outputs": ["R"]}


def case_corpus_all_empty(s: Path) -> dict[str, Any]:
    argv = _prepare(s, {"en-US.txt": b""})
    return {"argv": argv, "expect": "has no sentences for any of the locales", "outputs": ["R"]}


def long_corpus(lines: int = 200_000) -> bytes:
    """Enough text that the data stage runs for many seconds (an orphan would outlive the 10 s check)."""
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    return b"".join((" ".join(rng.choices(words, k=8)) + f" {i}\n").encode() for i in range(lines))


def start_pipeline_stage(preset: Path, cwd: Path, env: dict[str, str], token: str, err_file: Any) -> Any:
    """`pipeline --out R` started in the background, returned once its first stage runs (two processes
    carry the case's token) and has had a second to start working."""
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "pipeline", "--out", "R", "--preset", str(preset)],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(processes_with(token)) < 2:
        time.sleep(0.1)
    time.sleep(1.0)
    return proc


def case_pipeline_sigterm_reaches_the_stage(s: Path) -> dict[str, Any]:
    preset = corpus_preset(s, {"en-US.txt": long_corpus()})

    def run(sandbox: Path, cwd: Path, env: dict[str, str], token: str) -> tuple[int, str, list[str]]:
        with stderr_file(sandbox) as (err_file, read):
            proc = start_pipeline_stage(preset, cwd, env, token, err_file)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
            err = read()
        problems = [] if proc.returncode == 128 + signal.SIGTERM else [f"pipeline exit {proc.returncode}"]
        return proc.returncode, err, problems

    return {"run": run, "expect_code": None, "expect": "stopped by SIGTERM", "outputs": ["R"]}


def case_launch_kill9_leaves_no_rank(s: Path) -> dict[str, Any]:
    """kill -9 of `polyteacher launch` with two ranks: they stop; while they run, nothing they hold
    listens outside 127.0.0.1. The ranks run a tiny pretraining of a fake-free run made by the
    project's own data prep of a 200-sentence corpus."""
    preset = corpus_preset(s, {"en-US.txt": b"".join(b"this is sentence number %d of a tiny corpus\n" % i
                                                     for i in range(2000))})
    (preset / "pretrain.yaml").write_text(
        "teacher:\n  preset: tiny\ntrain:\n  max_steps: 100000\n  micro_batch_size: 2\n  global_batch_size: 4\n"
        "  save_every: 100000\n  eval_every: 100000\n  log_every: 1\n  num_threads: 1\n  zero_stage: 0\n")
    with open(preset / "data.yaml", "a") as f:
        f.write("packing:\n  seq_len: 64\n  heldout_fraction: 0.2\n")

    def run(sandbox: Path, cwd: Path, env: dict[str, str], token: str) -> tuple[int, str, list[str]]:
        prep = subprocess.run([sys.executable, "-m", "launch.cli", "data", "prepare", "--run-dir", "R", "--preset",
                               str(preset), "--quiet"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        if prep.returncode != 0:
            return prep.returncode, prep.stderr, [f"data prepare failed: {message_of(prep.stderr)}"]
        err_path = sandbox.parent / f"{sandbox.name}.stderr"
        err_file = open(err_path, "w")  # a file, not a pipe: ranks left running must not block this driver
        launch = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "--nproc-per-node", "2", "--",
                                   "pretrain", "--run-dir", "R", "--preset", str(preset)], cwd=cwd, env=env,
                                  stdout=subprocess.DEVNULL, stderr=err_file)
        err_file.close()
        problems: list[str] = []
        seen: set[str] = set()
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not (sandbox / "R" / "metrics.jsonl").exists():
            seen |= set(listening_sockets(processes_with(token)))
            if launch.poll() is not None:
                break
            time.sleep(0.5)
        for _ in range(6):  # training: keep watching the sockets a little
            seen |= set(listening_sockets(processes_with(token)))
            time.sleep(0.5)
        exposed = {a for a in seen if not is_loopback(a)}
        if launch.poll() is not None:
            problems.append(f"launch exited early ({launch.returncode})")
        if exposed:
            problems.append(f"listening outside 127.0.0.1: {sorted(exposed)}")
        launch.kill()
        launch.wait()
        err = err_path.read_text(errors="replace")
        return launch.returncode, f"{err}\nlistening sockets of the run: {sorted(seen) or 'none'}", problems

    return {"run": run, "expect_code": -signal.SIGKILL, "outputs": ["R"]}


def case_pipeline_kill9_stops_the_stage(s: Path) -> dict[str, Any]:
    """kill -9 of `pipeline`: it cannot forward anything; its running stage notices and stops."""
    preset = corpus_preset(s, {"en-US.txt": long_corpus()})

    def run(sandbox: Path, cwd: Path, env: dict[str, str], token: str) -> tuple[int, str, list[str]]:
        with stderr_file(sandbox) as (err_file, read):
            proc = start_pipeline_stage(preset, cwd, env, token, err_file)
            proc.kill()
            proc.wait(timeout=60)
            err = read()
        return proc.returncode, err, []

    return {"run": run, "expect_code": -signal.SIGKILL, "outputs": ["R"]}


# ----------------------------------------------------------------------------- predict (the device runtime)


def tiny_export(cache: Path) -> Path:
    """A real fp32 ONNX export of an untrained small T5 with a tokenizer trained on MASSIVE en-US train
    utterances of the data root, built once per driver run (cached beside the sandboxes)."""
    out = cache / "export"
    if (out / "manifest.json").is_file():
        return out
    from core.config import data_root
    from core.fsutil import atomic_dir
    from core.models import ModelConfig, build_model
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import load_tokenizer, train_tokenizer
    from student.export import export
    from student.export_config import ExportConfig

    with gzip.open(data_root() / "massive" / "data" / "en-US.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["utt"] for _, line in zip(range(3000), f)]
    tokenizer_dir = train_tokenizer(texts, cache / "tokenizer",
                                    TokenizerConfig(vocab_size=600, character_coverage=0.99, num_sentinels=10), seed=0)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(ModelConfig(preset="tiny", d_model=64, d_ff=128, num_heads=2, d_kv=32), tokenizer, seed=1)
    with atomic_dir(cache / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return export(cache / "model", out, ExportConfig())


def _predict_cache(s: Path) -> Path:
    return Path(os.environ.get("POLYTEACHER_FAULT_CACHE", s.parent / "predict-cache"))


def _feed(argv: list[Any], stdin: bytes):
    """A runner that gives the command `stdin` (the driver's default runs it with none)."""
    def run(sandbox: Path, cwd: Path, env: dict[str, str], token: str) -> tuple[int, str, list[str]]:
        proc = subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=cwd, env=env, input=stdin,
                              capture_output=True, timeout=600)
        return proc.returncode, proc.stderr.decode(errors="replace"), []
    return run


def case_predict_bad_lines_on_stdin(s: Path) -> dict[str, Any]:
    """Good lines around a non-UTF-8 line, malformed JSON, an unknown locale and an empty line: each bad
    line is reported with its number, the rest answered, exit 0."""
    model = str(tiny_export(_predict_cache(s)))
    stdin = b"wake me up at five am\ncaf\xe9 au lait\n{\"utt\": \"broken\n" \
            b"{\"utt\": \"hi\", \"locale\": \"xx-XX\"}\n\nplay some jazz\n"
    return {"run": _feed(["predict", "--model", model], stdin), "expect_code": 0, "expect": "stdin:2: not UTF-8"}


def case_predict_non_utf8_argument(s: Path) -> dict[str, Any]:
    model = str(tiny_export(_predict_cache(s)))
    return {"run": _feed(["predict", "--model", model, b"\xff oops", "wake me up"], b""), "expect_code": 0,
            "expect": "argument:1: not UTF-8"}


def case_predict_nothing_answered(s: Path) -> dict[str, Any]:
    model = str(tiny_export(_predict_cache(s)))
    return {"run": _feed(["predict", "--model", model], b"\xff\xfe\n{\"utt\": \n"), "expect_code": 1,
            "expect": "nothing answered"}


def case_predict_on_a_hugging_face_folder(s: Path) -> dict[str, Any]:
    fake_model(s / "m")
    return {"argv": ["predict", "--model", "m", "hi"], "expect": "a Hugging Face model directory"}


def case_predict_manifest_points_outside(s: Path) -> dict[str, Any]:
    import shutil

    shutil.copytree(tiny_export(_predict_cache(s)), s / "export")
    manifest = json.loads((s / "export" / "manifest.json").read_text())
    manifest["tokenizer"] = "../elsewhere.json"
    (s / "export" / "manifest.json").write_text(json.dumps(manifest))
    (s / "elsewhere.json").write_text("{}")
    return {"argv": ["predict", "--model", "export", "hi"], "expect": "points outside the export directory"}


CASES = [
    Case("export_overwrite_checkpoints", case_export_into_checkpoints),
    Case("export_overwrite_another_run", case_export_into_another_run),
    Case("export_overwrite_folder_of_runs", case_export_into_folder_of_runs),
    Case("export_overwrite_cwd", case_export_into_cwd),
    Case("export_overwrite_foreign_dir", case_export_into_foreign_dir),
    Case("export_onnx_without_int8", case_export_of_an_export_without_int8),
    Case("export_two_writers", case_export_while_another_exports),
    Case("export_truncated_safetensors", case_truncated_safetensors),
    Case("export_malformed_config_json", case_malformed_config_json),
    Case("export_config_json_other_size", case_config_json_of_another_size, slow=True),
    Case("prepare_into_user_folder", case_data_prepare_into_user_folder),
    Case("lock_path_is_a_directory", case_lock_path_is_a_directory),
    Case("preset_unrelated_folder", case_preset_is_an_unrelated_folder),
    Case("corpus_not_utf8", case_corpus_not_utf8, slow=True),
    Case("corpus_truncated_gz", case_corpus_truncated_gz, slow=True),
    Case("corpus_all_empty", case_corpus_all_empty, slow=True),
    Case("pipeline_sigterm", case_pipeline_sigterm_reaches_the_stage, slow=True),
    Case("pipeline_kill9", case_pipeline_kill9_stops_the_stage, slow=True),
    Case("launch_kill9_two_ranks", case_launch_kill9_leaves_no_rank, slow=True),
    Case("predict_bad_lines_on_stdin", case_predict_bad_lines_on_stdin, slow=True),
    Case("predict_non_utf8_argument", case_predict_non_utf8_argument, slow=True),
    Case("predict_nothing_answered", case_predict_nothing_answered, slow=True),
    Case("predict_hugging_face_folder", case_predict_on_a_hugging_face_folder),
    Case("predict_manifest_points_outside", case_predict_manifest_points_outside, slow=True),
]


def table(outcomes: list[Outcome]) -> str:
    rows = [("case", "exit", "verdict", "message")]
    for o in outcomes:
        verdict = f"skipped: {o.skipped}" if o.skipped else "ok" if o.ok else "FAIL: " + "; ".join(o.problems)
        rows.append((o.case, str(o.exit_code), verdict, o.message[:140]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", action="store_true", help="also the cases that run stages and processes")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--json", default=None, help="write the outcomes here (default: print only)")
    args = parser.parse_args(argv)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="polyteacher-faults-") as base:
        for case in CASES:
            if (case.slow and not args.slow) or args.k not in case.name:
                continue
            outcomes.append(run_case(case, Path(base)))
            print(table(outcomes[-1:]).splitlines()[1], flush=True)
    print(table(outcomes))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(o) for o in outcomes], indent=1) + "\n")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
