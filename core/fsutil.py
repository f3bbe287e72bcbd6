"""Crash-safe file writing and run-directory path checks.

Every artifact is written under a temporary name in the same directory and renamed into place, so a
crash never leaves a half-written file (or directory) under its final name.

A command never deletes what it did not write: every directory `atomic_dir` publishes holds a marker
file (`ARTIFACT_MARKER`, naming its kind: model, tokenizer, packed-data, onnx, ...), and `atomic_dir`
replaces an existing directory only when it is empty or carries the marker of the same kind.
`check_output_dir` makes the same check up front, before a stage spends minutes of work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_mode(is_dir: bool) -> int:
    """mkstemp/mkdtemp create private (0600/0700) entries; artifacts get the usual umask-based mode."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def _publish_modes(root: Path) -> None:
    """Give `root` and everything in it the umask-based modes: writers that go through a private
    temporary file (safetensors' model.safetensors: 0600) must not leave one file unreadable."""
    os.chmod(root, _public_mode(is_dir=True))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), _public_mode(is_dir=True))
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, _public_mode(is_dir=False))


class UnsafePathError(ValueError):
    """A path escapes the directory it must stay in."""


class OutputPathError(ValueError):
    """An output path would replace something this kind of command did not write."""


ARTIFACT_MARKER = ".polyteacher-artifact"
"""File in every directory `atomic_dir` publishes: JSON {"kind": KIND}."""


LEGACY_FINGERPRINTS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("tokenizer.json", "training.json", "spm.model"),
    "packed-data": ("stats.json", "train"),
}
"""Files that identify an unmarked directory as one polyteacher wrote before it marked its outputs
(kinds whose files no other tool writes together; a model directory is any Hugging Face model, so it
has none and an unmarked one is refused)."""


def artifact_kind(path: str | os.PathLike) -> str | None:
    """The kind recorded in `path`'s marker, or None when there is no readable marker."""
    try:
        return str(json.loads((Path(path) / ARTIFACT_MARKER).read_text(encoding="utf-8"))["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


OWNED_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnx": ("manifest.json", ("manifest.json", "*.onnx", "*.onnx.data", "weights.bin", "tokenizer.json",
                               "tokenizer_config.json", "special_tokens_map.json", ARTIFACT_MARKER)),
}
"""kind -> (the file that must be there, the names every entry must match): an unmarked directory
that --overwrite may still replace because polyteacher wrote every file in it (an earlier export)."""

LOCK_FILE = ".polyteacher.lock"
"""In the run directory while a writing command runs: JSON {pid, host, start, command, token}."""
RUN_SIGNS = (LOCK_FILE, "COMPLETE")
"""Files that only a run directory (its lock) or a checkpoint (its COMPLETE marker) holds."""
SCAN_LIMIT = 200_000
"""Entries looked at below an output path for a run before giving up (and refusing)."""


def _holds_run(path: Path) -> Path | None:
    """The first run directory (or checkpoint) at or below `path`, or None. A run directory is one
    with a lock, a checkpoint (COMPLETE), or the stage configs a run writes (config.yaml + configs/)."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(path):
        seen += len(dirnames) + len(filenames)
        names = set(filenames)
        if names & set(RUN_SIGNS) or ("config.yaml" in names and "configs" in dirnames) \
                or "checkpoints" in dirnames:
            return Path(dirpath)
        if seen > SCAN_LIMIT:
            return Path(dirpath)  # too large to vouch for: refused like a run
    return None


def _owned(path: Path, kind: str) -> bool:
    """Whether every entry of `path` is a file polyteacher writes into a `kind` output (OWNED_FILES)."""
    import fnmatch

    if kind not in OWNED_FILES:
        return False
    required, patterns = OWNED_FILES[kind]
    entries = list(path.iterdir())
    return (path / required).is_file() and all(
        e.is_file() and not e.is_symlink() and any(fnmatch.fnmatch(e.name, p) for p in patterns) for e in entries)


def check_not_dangerous(path: str | os.PathLike, flag: str = "the output path") -> None:
    """Refuse, whatever the user allows, an output path that is the current directory (or holds it),
    the home directory or the root, or that holds a run directory or checkpoint at or below it."""
    target = Path(path).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputPathError(f"{flag} {path} is the current directory or holds it; give the output a "
                              f"directory of its own, e.g. {flag} out/export")
    if target == Path.home().resolve() or target == Path(target.anchor):
        raise OutputPathError(f"{flag} {path} is the home or root directory; give the output a directory of its own")
    if target.is_dir() and not target.is_symlink():
        run = _holds_run(target)
        if run is not None:
            where = "is" if run == target else f"holds one at {run}, which is"
            raise OutputPathError(
                f"refusing to replace {path}: it {where} a run directory or checkpoint (lock, COMPLETE, "
                "config.yaml + configs/ or checkpoints/); polyteacher never replaces a run, not even with "
                "--overwrite or --force; choose another output path")


def check_output_dir(path: str | os.PathLike, kind: str, flag: str = "the output path",
                     overwrite: bool = False) -> None:
    """Refuse `path` as the output of a `kind` artifact unless it is absent, an empty directory, or a
    previous `kind` artifact (its marker says so); with `overwrite` (the user's --overwrite) also an
    unmarked directory every file of which polyteacher writes into a `kind` output (OWNED_FILES).
    Never the current directory or one that holds a run (`check_not_dangerous`). Raises
    OutputPathError naming the path."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file, not a directory; choose another output path")
    check_not_dangerous(path, flag)
    if not any(path.iterdir()):
        return
    found = artifact_kind(path)
    if found == kind:
        return
    if found is None and kind in LEGACY_FINGERPRINTS and all((path / f).exists() for f in LEGACY_FINGERPRINTS[kind]):
        return  # written by polyteacher before outputs carried the marker
    if overwrite and found is None and _owned(path, kind):
        return
    what = f"a polyteacher {found} directory" if found else f"not marked as a polyteacher output ({ARTIFACT_MARKER})"
    also = " (--overwrite replaces only an earlier export or an empty directory)" if overwrite else ""
    raise OutputPathError(
        f"refusing to replace {path}: it holds files and is {what}, not a previous {kind} directory{also}; "
        f"choose another output path, or move {path} away yourself if its contents can go"
    )


RUN_MARKER = ".polyteacher-run"
"""File in every run directory a stage has written its config into (`core.config.save_stage_config`)."""
RUN_OWN_NAMES = (RUN_MARKER, ".polyteacher.lock", "launch.jsonl", "logs", ".cache")
"""Entries a run directory may hold before its first stage wrote its config (the lock, the launcher's
layout record, the pipeline's logs, the MASSIVE cache)."""


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a run directory polyteacher wrote: its marker, or (older runs) the per-stage
    configs or the pipeline's config."""
    path = Path(path)
    return (path / RUN_MARKER).is_file() or (path / "configs").is_dir() or (path / "pipeline.yaml").is_file()


def check_run_dir(run_dir: str | os.PathLike, flag: str = "--run-dir") -> None:
    """Refuse `run_dir` as a run directory when it holds files polyteacher did not write: a stage
    writes config.yaml, reports and tables at its top, which would replace the user's own files.
    Absent, empty and earlier run directories pass."""
    run = Path(run_dir)
    if not run.exists() and not run.is_symlink():
        return
    if not run.is_dir():
        raise OutputPathError(f"{flag} {run} is a file, not a directory; give a new or empty directory")
    resolved, cwd = run.resolve(), Path.cwd().resolve()
    if is_run_dir(run):
        return
    def ours(entry: Path) -> bool:
        return entry.name in RUN_OWN_NAMES or artifact_kind(entry) is not None or any(
            all((entry / f).exists() for f in files) for files in LEGACY_FINGERPRINTS.values())

    foreign = sorted(e.name for e in run.iterdir() if not ours(e))
    if resolved == cwd or resolved in cwd.parents:
        raise OutputPathError(f"{flag} {run_dir} is the current directory or holds it; give the run a directory "
                              f"of its own, e.g. {flag} runs/demo")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputPathError(
            f"{flag} {run} holds files polyteacher did not write ({shown}) and is not a run directory; "
            f"give a new or empty directory (neither --force nor --overwrite replaces them)")


def mark_run_dir(run_dir: str | os.PathLike) -> None:
    """Record that `run_dir` is a polyteacher run directory (`is_run_dir`)."""
    path = Path(run_dir) / RUN_MARKER
    if not path.exists():
        atomic_write_json(path, {"kind": "run"})


def check_output(out: str | os.PathLike, kind: str, run_dir: str | os.PathLike | None = None,
                 inputs: Iterable[str | os.PathLike | None] = (), flag: str = "--out",
                 replace_any: bool = False) -> None:
    """Refuse `out` as a stage's output when it is the run directory itself, an input of the stage (or
    holds one, or lies inside one), the current directory, a directory holding a run, or an existing
    directory that is not a previous `kind` output (with `replace_any`, the user's --overwrite, also an
    unmarked one holding only files of a `kind` output). Call before any work; raises
    OutputPathError naming the path."""
    target = Path(out).resolve()
    if target.exists():
        check_not_dangerous(out, flag)
    if run_dir is not None and target == Path(run_dir).resolve():
        raise OutputPathError(f"{flag} {out} is the run directory itself; give the output its own name, e.g. "
                              f"{flag} {kind}")
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise OutputPathError(f"{flag} {out} would replace this stage's input {source}; choose another output path")
    check_output_dir(target, kind, flag=flag, overwrite=replace_any)


def safe_path(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """`root / relative`, refusing anything that resolves outside `root` (.., absolute, symlinks)."""
    root_path = Path(root).resolve()
    candidate = (root_path / relative).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise UnsafePathError(f"path {relative!s} escapes the run directory {root_path}")
    return candidate


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _public_mode(is_dir=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def _owner() -> str:
    """`host-pid` of this process: temporaries carry it, so a later run can tell an abandoned one."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove the temporaries `atomic_dir(final)` left when its process was killed (`.NAME.HOST-PID.*.tmp`
    and `.NAME.HOST-PID.old`, this host, PID no longer running); returns what was removed."""
    import re
    import socket

    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?P<host>.+)-(?P<pid>\d+)\.(?:.*\.tmp|old)$")
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or match["host"] != socket.gethostname() or _pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str = "model", overwrite: bool = True,
               replace_any: bool = False, user_overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed.

    Use for model directories, tokenizers and Arrow datasets: readers only ever see a complete one.
    The published directory holds the `kind` marker; an existing `path` is replaced only when it is
    empty or a previous `kind` artifact (checked before and after the work; see `check_output_dir`),
    and never when `overwrite` is false. `replace_any` (a cache the program owns) replaces any
    directory but the current one or one holding a run; `user_overwrite` (the user's --overwrite) is
    `check_output_dir`'s `overwrite`.
    """
    final = Path(path).absolute()

    def check() -> None:
        check_not_dangerous(final) if replace_any else check_output_dir(final, kind, overwrite=user_overwrite)

    check()
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner()}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        atomic_write_json(tmp / ARTIFACT_MARKER, {"kind": kind})
        _publish_modes(tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            check()
            old = final.with_name(f".{final.name}.{_owner()}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it (metrics survive a crash up to the last full line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file, ignoring a trailing partial line left by a crash."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


# ----------------------------------------------------------------------------- the run-directory lock

LOCK_ENV = "POLYTEACHER_RUN_LOCK"
"""The holders' tokens (space-separated), inherited by the processes it starts (pipeline stages, launched ranks), which
then run under their parent's lock instead of waiting for it."""


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory."""


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot; tells a reused pid apart), if known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder, or a process it started, still runs (unknowable for another host:
    assumed alive)."""
    import socket

    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0))
    start = holder.get("start")
    if pid > 0 and _pid_alive(pid) and (start is None or process_start(pid) in (None, start)):
        return True
    # The holder is gone, but a stage or rank it started may still be writing (an orphan): every one
    # of them inherited the lock's token in its environment.
    return bool(holder.get("token")) and bool(lock_sharers(str(holder["token"])))


def lock_sharers(token: str) -> list[int]:
    """Pids of this host's processes started under the lock `token` (LOCK_ENV in their environment)."""
    needle = token.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(LOCK_ENV.encode() + b"=") and needle in var.split(b"=", 1)[1].split():
                try:
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    break
                if state != "Z":
                    found.append(int(entry.name))
                break
    return found


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: treated as a holder that is gone once it is old


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold `run_dir` for one writing command: a second one fails at once with RunDirLockedError
    naming the holder. A lock whose process is gone (same host), and none of whose children runs,
    is stale and taken over. Only rank 0 of a launched run takes it; processes started under a
    holder (LOCK_ENV) share it."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise OutputPathError(f"run directory {run} is a file, not a directory; give --run-dir a directory")
    with _hold_lock(run / LOCK_FILE, f"run directory {run}", command, run):
        yield


def output_lock_path(out: str | os.PathLike) -> Path:
    """The lock of an output directory: a sibling, since the directory itself is replaced whole."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}{LOCK_FILE}")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the output directory `out` (an export) for one writer, as `run_dir_lock` holds a run."""
    out = Path(out).absolute()
    with _hold_lock(output_lock_path(out), f"output {out}", command, out.parent):
        yield


@contextlib.contextmanager
def _hold_lock(path: Path, what: str, command: str, parent: Path) -> Iterator[None]:
    import socket
    import time

    if path.is_dir() and not path.is_symlink():
        raise OutputPathError(f"lock file {path} is a directory; polyteacher did not create it: move it away "
                              "and run the command again")
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    inherited = os.environ.get(LOCK_ENV, "").split()
    holder = _read_lock(path)
    if inherited and holder and holder.get("token") in inherited:
        yield
        return
    created = not parent.exists()  # removed again on release if the command left it empty
    parent.mkdir(parents=True, exist_ok=True)
    token = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    record = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
              "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile
            if holder == {} and time.time() - path.stat().st_mtime < 5:
                time.sleep(0.2)  # being written right now
                continue
            if holder and _alive(holder):
                sharers = lock_sharers(str(holder.get("token", ""))) if not _pid_alive(int(holder.get("pid", 0))) else []
                also = (f"; its process is gone but pid(s) {', '.join(map(str, sharers))} it started still run: "
                        "stop them first" if sharers else "")
                raise RunDirLockedError(
                    f"{what} is in use by `{holder.get('command')}` (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}){also}; wait for it to finish, or remove "
                    f"{path} if that process is gone"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        break
    else:
        raise RunDirLockedError(f"could not take the lock {path}; another command is starting in {parent}")
    previous = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = " ".join([*inherited, token])
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous
        if (_read_lock(path) or {}).get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if created:
            with contextlib.suppress(OSError):
                parent.rmdir()
