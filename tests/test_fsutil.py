"""Output-path guards: a command never replaces a directory it did not write (issue 14, cases 1-2)."""

from __future__ import annotations

import json
import os

import pytest

from core.fsutil import ARTIFACT_MARKER, OutputPathError, artifact_kind, atomic_dir, check_output
from launch.cli import main


def _user_dir(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def test_atomic_dir_marks_what_it_publishes_and_replaces_only_its_own_kind(tmp_path):
    with atomic_dir(tmp_path / "m", kind="model") as tmp:
        (tmp / "w").write_text("1")
    assert artifact_kind(tmp_path / "m") == "model"
    with atomic_dir(tmp_path / "m", kind="model") as tmp:  # a previous output of the same kind
        (tmp / "w").write_text("2")
    assert (tmp_path / "m" / "w").read_text() == "2"
    with pytest.raises(OutputPathError, match="not a previous onnx directory"):
        with atomic_dir(tmp_path / "m", kind="onnx") as tmp:
            pass
    assert (tmp_path / "m" / "w").read_text() == "2"
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", kind="onnx") as tmp:  # an empty directory is free
        (tmp / "g").write_text("x")
    assert json.loads((tmp_path / "empty" / ARTIFACT_MARKER).read_text()) == {"kind": "onnx"}


def test_atomic_dir_refuses_a_directory_it_did_not_write(tmp_path):
    user = _user_dir(tmp_path / "u")
    with pytest.raises(OutputPathError, match=str(user)):
        with atomic_dir(user, kind="onnx") as tmp:
            (tmp / "g").write_text("x")
    assert (user / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]  # no temporary left behind


def test_atomic_dir_checks_again_before_replacing(tmp_path):
    target = tmp_path / "m"
    with pytest.raises(OutputPathError):
        with atomic_dir(target, kind="model") as tmp:
            _user_dir(target)  # appeared while the work ran
            (tmp / "w").write_text("1")
    assert (target / "notes.txt").read_text() == "mine"


def test_check_output_refuses_the_run_directory_and_inputs(tmp_path):
    run = _user_dir(tmp_path / "run")
    (run / "data" / "train").mkdir(parents=True)
    with pytest.raises(OutputPathError, match="run directory itself"):
        check_output(run, "model", run)
    with pytest.raises(OutputPathError, match="input"):
        check_output(run / "data", "model", run, inputs=[run / "data"])
    with pytest.raises(OutputPathError, match="input"):
        check_output(run / "data" / "train" / "x", "model", run, inputs=[run / "data"])
    check_output(run / "teacher", "model", run, inputs=[run / "data"])  # new: fine


def _fake_run_dir(tmp_path):
    """Just enough of a prepared run directory for pretrain's and export's checks (they refuse
    before any real work)."""
    run = tmp_path / "R"
    for d in ("data/train", "data/heldout", "tokenizer", "checkpoints/teacher"):
        (run / d).mkdir(parents=True)
    (run / "teacher").mkdir()
    (run / "teacher" / "config.json").write_text("{}")
    (run / "teacher" / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    (run / "teacher" / "tokenizer.json").write_text("{}")
    (run / "metrics.jsonl").write_text("{}\n")
    return run


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("out", [".", "data", "data/train", "tokenizer", "checkpoints"])
def test_pretrain_out_never_replaces_the_run_directory_or_an_input(tmp_path, capsys, out):
    run = _fake_run_dir(tmp_path)
    before = _tree(run)
    assert main(["pretrain", "--run-dir", str(run), "--preset", "tiny", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polyteacher: OutputPathError:") and "\n" not in err
    assert _tree(run) == before


@pytest.mark.parametrize("out", [".", "teacher", "U"])
def test_export_out_never_replaces_what_it_did_not_write(tmp_path, capsys, out):
    run = _fake_run_dir(tmp_path)
    _user_dir(run / "U")
    before = _tree(run)
    assert main(["export", "--run-dir", str(run), "--model", "teacher", "--out", out, "--int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polyteacher: OutputPathError:") and "\n" not in err
    assert _tree(run) == before


def test_published_files_get_umask_modes_even_when_written_private(tmp_path):
    # Issue 14, case 11: model.safetensors came out 0600 beside 0644 files.
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "m") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "f").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m" / "sub").stat().st_mode & 0o777 == 0o755


def test_a_killed_writers_temporary_is_removed_by_the_next_one(tmp_path):
    # Issue 14, case 11: the .tmp left by a killed `data prepare` stayed forever.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import os, sys, time\nfrom core.fsutil import atomic_dir\n"
              "with atomic_dir(sys.argv[1], kind='packed-data') as tmp:\n"
              "    (tmp / 'half').write_text('x'); print(tmp, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data")], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    other = tmp_path / ".data.not-ours.tmp"  # not named by a process of this host: kept
    other.mkdir()
    with atomic_dir(tmp_path / "data", kind="packed-data") as tmp:  # the writer is alive: its temporary stays
        (tmp / "x").write_text("1")
    assert left.is_dir()
    proc.kill()
    proc.wait()
    with atomic_dir(tmp_path / "data", kind="packed-data") as tmp:
        (tmp / "x").write_text("2")
    assert not left.exists() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.not-ours.tmp", "data"]


def test_overwrite_replaces_an_earlier_export_but_never_foreign_files_or_the_run_directory(tmp_path, capsys):
    user = _user_dir(tmp_path / "u")
    with pytest.raises(OutputPathError, match="--overwrite replaces only an earlier export"):
        check_output(user, "onnx", replace_any=True)
    assert (user / "notes.txt").read_text() == "mine"
    old = tmp_path / "old-export"  # unmarked, every file one an export writes
    old.mkdir()
    for name in ("manifest.json", "encoder.onnx", "weights.bin", "tokenizer.json"):
        (old / name).write_text("{}")
    with pytest.raises(OutputPathError):
        check_output(old, "onnx")
    check_output(old, "onnx", replace_any=True)
    with atomic_dir(old, kind="onnx", user_overwrite=True) as tmp:
        (tmp / "g").write_text("x")
    assert sorted(p.name for p in old.iterdir()) == [ARTIFACT_MARKER, "g"]
    run = _fake_run_dir(tmp_path)
    before = _tree(run)
    for out in (".", "teacher"):
        assert main(["export", "--run-dir", str(run), "--model", "teacher", "--out", out, "--overwrite"]) == 2
        assert "polyteacher: OutputPathError:" in capsys.readouterr().err
    assert _tree(run) == before


def test_unmarked_tokenizer_and_data_of_an_older_run_are_still_replaced(tmp_path):
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    for name in ("tokenizer.json", "training.json", "spm.model"):
        (tok / name).write_text("{}")
    with atomic_dir(tok, kind="tokenizer") as tmp:
        (tmp / "tokenizer.json").write_text("new")
    assert (tok / "tokenizer.json").read_text() == "new"
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "stats.json").write_text("{}")
    check_output(data, "packed-data")
    with pytest.raises(OutputPathError, match="not a previous model directory"):
        check_output(data, "model")  # a fingerprint only speaks for its own kind
