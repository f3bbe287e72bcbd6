"""One loading rule for model directories (issue 14, case 6; case 10's missing and weightless
directories): every command refuses the same directories with the same one-line message."""

from __future__ import annotations

import re

import pytest

from core.modeldir import ModelDirError, check_model_dir
from launch.cli import main


def _model_dir(path, weights):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "t5"}')
    if weights == "model.safetensors":
        (path / weights).write_bytes((2).to_bytes(8, "little") + b"{}")  # a whole (empty) safetensors file
    elif weights:
        (path / weights).write_bytes(b"\x80\x04N.")  # never opened: the rule looks at names only
    return path


def _run_dir(tmp_path):
    run = tmp_path / "R"
    for d in ("data/train", "data/heldout", "data-indomain/train", "data-indomain/heldout", "tokenizer"):
        (run / d).mkdir(parents=True)
    return run


def test_check_model_dir(tmp_path):
    assert check_model_dir(_model_dir(tmp_path / "ok", "model.safetensors")) == tmp_path / "ok"
    assert check_model_dir(_model_dir(tmp_path / "sharded", "model.safetensors.index.json"))
    with pytest.raises(ModelDirError, match="pickle .pytorch_model.bin.*convert it to safetensors"):
        check_model_dir(_model_dir(tmp_path / "pickle", "pytorch_model.bin"))
    with pytest.raises(ModelDirError, match="no weights"):
        check_model_dir(_model_dir(tmp_path / "bare", None))
    with pytest.raises(ModelDirError, match="no such directory"):
        check_model_dir(tmp_path / "missing")
    with pytest.raises(ModelDirError, match="no config.json"):
        check_model_dir(tmp_path)
    cut = _model_dir(tmp_path / "cut", "model.safetensors")
    (cut / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b'{"w": {"data_offsets": [0, 64]}}')
    with pytest.raises(ModelDirError, match="not a readable safetensors file|truncated"):
        check_model_dir(cut)
    (cut / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    (cut / "config.json").write_text('{"d_model": ,}')
    with pytest.raises(ModelDirError, match=r"config.json:1: not valid JSON"):
        check_model_dir(cut)


# Each command with `{model}` where it takes a model directory; every one refuses the same way.
COMMANDS = {
    "export": ["export", "--model", "{model}", "--out", "{tmp}/onnx"],
    "finetune": ["finetune", "--run-dir", "{run}", "--model", "{model}", "--out", "ft"],
    "distill": ["distill", "--run-dir", "{run}", "--teacher", "{model}", "--out", "st"],
    "pretrain": ["pretrain", "--run-dir", "{run}", "--section", "indomain", "--init-from", "{model}",
                 "--out", "teacher-indomain"],
    "evaluate": ["evaluate", "massive", "--model", "{model}", "--locales", "en-US", "--out", "{tmp}/eval"],
}


@pytest.mark.parametrize("weights,message", [("pytorch_model.bin", "convert it to safetensors"),
                                             (None, "no weights"),
                                             ("missing", "no such directory|is not a directory|not found")])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_the_same_model_directories_in_one_line(tmp_path, capsys, command, weights, message):
    run = _run_dir(tmp_path)
    model = tmp_path / "M" if weights == "missing" else _model_dir(tmp_path / "M", weights)
    argv = [a.format(model=model, run=run, tmp=tmp_path) for a in COMMANDS[command]]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in err and err.startswith("polyteacher") and str(model) in err, err
    assert re.search(message, err), err


def test_export_refuses_a_model_directory_without_its_tokenizer(tmp_path, capsys):
    # Issue 14, case 9: export used to make up a default T5 tokenizer and exit 0.
    model = _model_dir(tmp_path / "M", "model.safetensors")
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no tokenizer" in err and str(model) in err
    assert not (tmp_path / "onnx").exists()
