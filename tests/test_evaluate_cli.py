"""The `evaluate` command group: registration, option resolution, and `evaluate massive` end to end
on the tiny teacher (seq2seq predictor) and an encoder NLU model built from it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from fixtures_data import squash_tables

from core.config import ConfigError
from core.fsutil import UnsafePathError
from evaluation import cli as eval_cli
from launch.cli import build_parser, main


def test_help_lists_every_evaluation_and_option():
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "evaluate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("massive", "icl", "translation", "baseline", "compare"):
        assert name in out
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["evaluate"]._subparsers._group_actions[0].choices
    for name, options in {
        "massive": ["--model", "--out", "--run-dir", "--preset", "--name", "--locales", "--split", "--max-examples", "--seed", "--batch-size"],
        "baseline": ["--out", "--preset", "--name", "--locales", "--split", "--max-examples", "--seed", "--max-train"],
        "compare": ["--out", "--name", "--samples", "--seed", "--confidence"],
        "icl": ["--shots", "--demo-source", "--no-clm", "--max-examples"],
        "translation": ["--directions", "--no-clm", "--max-examples"],
    }.items():
        text = sub[name].format_help()
        for option in options:
            assert option in text, (name, option)
    # Without a subcommand: the group's help and exit code 2.
    assert main(["evaluate"]) == 2


def test_cli_import_stays_light():
    code = "import sys, launch.cli; launch.cli.build_parser(); print(sorted(m for m in ('torch', 'transformers', 'datasets', 'seqeval', 'sacrebleu', 'matplotlib', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_missing_evaluation_module_is_skipped_but_broken_imports_raise(monkeypatch, tmp_path):
    monkeypatch.setattr(eval_cli, "EVALUATE_MODULES", ("evaluation.massive", "evaluation.not_installed_here"))
    sub = argparse.ArgumentParser().add_subparsers()
    eval_cli.register(sub)
    assert set(sub.choices["evaluate"]._subparsers._group_actions[0].choices) == {"massive"}

    (tmp_path / "broken_evaluation_mod.py").write_text("import a_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(eval_cli, "EVALUATE_MODULES", ("broken_evaluation_mod",))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"):
        eval_cli.register(argparse.ArgumentParser().add_subparsers())


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_flags_override_preset_and_dotted_overrides(tmp_path):
    model = tmp_path / "run" / "teacher"
    model.mkdir(parents=True)
    args = parse(["evaluate", "massive", "--model", str(model), "--out", str(tmp_path / "o"), "--preset", "tiny", "--max-examples", "7"])
    cfg, model_dir, out_dir = eval_cli.resolve_common(args, "massive", {"max_examples": 7, "locales": None})
    assert cfg.massive.max_examples == 7  # flag beats the preset's 100
    assert cfg.massive.locales == ["en-US", "de-DE", "ja-JP"]  # from the tiny preset
    assert (model_dir, out_dir) == (model, tmp_path / "o")
    args = parse(["evaluate", "massive", "--model", str(model), "--out", str(tmp_path), "--max-examples", "7", "massive.max_examples=9"])
    cfg, _, _ = eval_cli.resolve_common(args, "massive", {"max_examples": 7})
    assert cfg.massive.max_examples == 7  # one rule everywhere (core.config): the explicit flag wins
    args = parse(["evaluate", "massive", "--model", str(model), "--out", str(tmp_path), "massive.max_examples=9"])
    cfg, _, _ = eval_cli.resolve_common(args, "massive", {"max_examples": None})
    assert cfg.massive.max_examples == 9  # a flag not given changes nothing
    args = parse(["evaluate", "icl", "--model", str(model), "--out", str(tmp_path), "icl.normalize=max"])
    with pytest.raises(ConfigError, match="allowed values: 'mean', 'sum'"):
        eval_cli.resolve_common(args, "icl", {})
    args = parse(["evaluate", "icl", "--model", str(model), "--out", str(tmp_path), 'icl.prompt_template="Q: {utt}"'])
    with pytest.raises(ConfigError, match=r"icl.prompt_template.*lacks \{demos\}"):
        eval_cli.resolve_common(args, "icl", {})
    args = parse(["evaluate", "massive", "--model", str(model), "--out", str(tmp_path), "massive.locales=[xx-XX]"])
    with pytest.raises(ConfigError, match="unknown locale"):
        eval_cli.resolve_common(args, "massive", {})


def test_run_dir_paths_are_confined_and_out_defaults_to_eval(tmp_path):
    run = tmp_path / "run"
    (run / "teacher").mkdir(parents=True)
    cfg, model_dir, out_dir = eval_cli.resolve_common(parse(["evaluate", "massive", "--run-dir", str(run), "--model", "teacher"]), "massive", {})
    assert model_dir == (run / "teacher").resolve() and out_dir == (run / "eval").resolve()
    with pytest.raises(UnsafePathError):
        eval_cli.resolve_common(parse(["evaluate", "massive", "--run-dir", str(run), "--model", "../../etc"]), "massive", {})
    with pytest.raises(ConfigError, match="--out is required"):
        eval_cli.resolve_common(parse(["evaluate", "massive", "--model", str(run / "teacher")]), "massive", {})
    with pytest.raises(ConfigError, match="is not a directory"):
        eval_cli.resolve_common(parse(["evaluate", "massive", "--model", str(run / "nope"), "--out", str(tmp_path)]), "massive", {})
    with pytest.raises(ConfigError, match="--name"):
        eval_cli.resolve_common(parse(["evaluate", "massive", "--model", str(run / "teacher"), "--out", str(tmp_path), "--name", "a/b"]), "massive", {})


def test_load_predictor_refuses_a_missing_directory(tmp_path):
    from evaluation.massive import load_predictor

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_predictor(tmp_path / "missing")
    from core.modeldir import ModelDirError

    with pytest.raises(ModelDirError, match="no config.json"):
        load_predictor(tmp_path)


# ----------------------------------------------------------------------------- end to end


def check_massive_json(path, locales, n):
    result = json.loads(path.read_text())
    assert result["kind"] == "massive" and result["split"] == "test"
    assert set(result["per_locale"]) == set(locales)
    for s in result["per_locale"].values():
        assert s["n"] == n
        for metric in ("em", "intent_acc", "slot_f1"):
            assert 0.0 <= s[f"{metric}_ci"][0] <= s[metric] <= s[f"{metric}_ci"][1] <= 1.0
    for metric in ("em", "intent_acc", "slot_f1"):
        assert result[metric] == pytest.approx(sum(s[metric] for s in result["per_locale"].values()) / len(locales))
    assert result["num_examples"] == n * len(locales) and result["num_ids"] == n
    # Per-utterance records (what a paired comparison needs): the same ids in every locale.
    ids = result["records"][locales[0]]["id"]
    assert len(ids) == n and all(result["records"][loc]["id"] == ids for loc in locales)
    return result


@pytest.mark.slow
def test_evaluate_massive_seq2seq_end_to_end(tiny_teacher_dir, massive_dir, tmp_path, capsys):
    from evaluation.massive import load_split
    from massive.scoring import score, utterance_records
    from student import Seq2SeqPredictor

    out = tmp_path / "eval"
    argv = ["evaluate", "massive", "--model", str(tiny_teacher_dir), "--out", str(out), "--name", "massive-teacher",
            "--locales", "en-US", "ja-JP", "--max-examples", "4", "--batch-size", "3", f"massive.data={massive_dir}", "device=cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "EM" in capsys.readouterr().out
    result = check_massive_json(out / "massive-teacher.json", ["en-US", "ja-JP"], 4)
    assert result["predictor"] == "Seq2SeqPredictor" and result["config"]["massive"]["batch_size"] == 3
    table = squash_tables((out / "massive-teacher.md").read_text())
    assert "| en-US | 4 |" in table and "| ja-JP | 4 |" in table and "**mean**" in table
    assert (out / "massive-teacher_em.png").read_bytes()[:4] == b"\x89PNG"
    # The command's numbers are the scorer's on the same greedy predictions, one utterance at a time.
    data, per_locale = load_split(str(massive_dir), ["en-US", "ja-JP"], "test", 4, seed=0)
    golds = per_locale["en-US"] + per_locale["ja-JP"]
    predictor = Seq2SeqPredictor(tiny_teacher_dir, device="cpu", slot_labels=data.slot_types, intents=data.intents)
    preds = [predictor.predict_words([list(g.words)])[0] for g in golds]
    assert all(len(p.slots) == len(g.words) for p, g in zip(preds, golds))
    expected = score(golds, preds)
    for metric in ("em", "intent_acc", "slot_f1"):
        assert result[metric] == pytest.approx(expected[metric])
    assert result["records"] == utterance_records(golds, preds)


@pytest.fixture(scope="module")
def tiny_nlu_dir(tiny_teacher_dir, massive_dir, tmp_path_factory):
    """An encoder NLU model (random heads) on the tiny teacher's encoder."""
    from transformers import AutoModelForSeq2SeqLM

    from data_prep.tokenizer import load_tokenizer
    from massive.loader import load_massive

    nlu = pytest.importorskip("student.nlu", reason="student/nlu.py (encoder NLU model) is not installed")
    data = load_massive(str(massive_dir), locales=["de-DE"], partitions=("test",))
    labels = nlu.NLULabels(intents=list(data.intents), slot_labels=["Other", *data.slot_types], max_length=64)
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir)
    model_dir = tmp_path_factory.mktemp("nlu") / "student-nlu"
    nlu.EncoderNLUModel.from_seq2seq(seq2seq, labels, load_tokenizer(tiny_teacher_dir)).save_pretrained(model_dir)
    return model_dir


def test_evaluate_massive_encoder_nlu_model_and_its_onnx_export(tiny_nlu_dir, massive_dir, tmp_path):
    from evaluation.massive import load_predictor

    model_dir = tiny_nlu_dir
    assert type(load_predictor(model_dir)).__name__ == "EncoderNLUModel"
    argv = ["evaluate", "massive", "--model", str(model_dir), "--out", str(tmp_path / "eval"), "--locales", "de-DE",
            "--max-examples", "5", f"massive.data={massive_dir}", "device=cpu"]  # fmt: skip
    assert main(argv) == 0
    result = check_massive_json(tmp_path / "eval" / "massive.json", ["de-DE"], 5)
    assert result["predictor"] == "EncoderNLUModel"

    # Its fp32 ONNX export (manifest.json) goes through student.runtime.OnnxPredictor and scores the same.
    export = pytest.importorskip("student.export", reason="student/export.py (ONNX export) is not installed")
    onnx_dir = export.export(model_dir, tmp_path / "onnx-fp32", export.ExportConfig(max_source_length=64))
    assert type(load_predictor(onnx_dir)).__name__ == "OnnxPredictor"
    argv = ["evaluate", "massive", "--model", str(onnx_dir), "--out", str(tmp_path / "eval"), "--name", "massive-onnx",
            "--locales", "de-DE", "--max-examples", "5", f"massive.data={massive_dir}"]  # fmt: skip
    assert main(argv) == 0
    onnx_result = check_massive_json(tmp_path / "eval" / "massive-onnx.json", ["de-DE"], 5)
    assert onnx_result["predictor"] == "OnnxPredictor"
    for metric in ("em", "intent_acc", "slot_f1"):
        assert onnx_result[metric] == pytest.approx(result[metric])


def test_plot_helpers_write_png_atomically_and_tables_format_values(tmp_path):
    from matplotlib.image import imread

    from core.tables import markdown_table
    from evaluation.plots import bar_chart, grouped_bar_chart

    path = bar_chart({"de-DE": 0.2, "en-US": 0.6}, tmp_path / "p" / "em.png", title="EM", ylabel="EM",
                     errors={"de-DE": (0.1, 0.3), "en-US": (0.5, 0.7)}, mean=0.4)  # fmt: skip
    assert imread(path).ndim == 3 and [p.name for p in path.parent.iterdir()] == ["em.png"]  # no temp files left
    grouped_bar_chart({"de-DE": {"k=0": 0.0, "k=5": 0.1}}, tmp_path / "g.png", title="t", ylabel="acc", hlines={"chance": 1 / 60})
    assert imread(tmp_path / "g.png").shape[0] > 100
    table = markdown_table(["a", "b", "c"], [["x", 0.123456, None], ["y", 2, 1.0]], floatfmt=".2f")
    assert table.splitlines() == ["| a   | b    | c    |", "|-----|------|------|", "| x   | 0.12 | n/a  |", "| y   | 2    | 1.00 |"]
