"""onnxruntime predictor: torch-free inference, tokenization parity, word splitting, edge inputs, CLI.

The exports come from the session cache of tests/fixtures_models.py (`session_export`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_data import squash_tables
from fixtures_models import session_export

from student.alignment import first_subword_indices, word_char_spans
from student.runtime import OnnxPredictor, read_manifest, slot_spans, split_words

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- pure functions


def test_split_words_whitespace_and_cjk_characters():
    assert split_words("wake me  up\tat 5am") == ["wake", "me", "up", "at", "5am"]
    assert split_words("  ") == [] and split_words("") == []
    assert split_words("明日 5pm の天気", "ja-JP") == ["明", "日", "5pm", "の", "天", "気"]
    assert split_words("明日の天気", "en-US") == ["明日の天気"]
    assert split_words("ตั้งปลุก ตีห้า", "th-TH") == ["ตั้งปลุก", "ตีห้า"]


def test_slot_spans_group_runs_of_labels():
    words = ["wake", "me", "at", "five", "am", "tomorrow"]
    labels = ["Other", "Other", "Other", "time", "time", "date"]
    assert slot_spans(words, labels) == [
        {"slot": "time", "value": "five am", "words": ["five", "am"], "start": 3, "end": 5},
        {"slot": "date", "value": "tomorrow", "words": ["tomorrow"], "start": 5, "end": 6},
    ]
    assert slot_spans(["明", "日"], ["date", "date"], "ja-JP")[0]["value"] == "明日"
    assert slot_spans([], []) == []


def test_first_subword_indices_match_student_nlu_encoding(tmp_path_factory, request, export_examples):
    """The torch-free word alignment equals student.nlu.encode_words on real utterances of two scripts."""
    from data_prep.tokenizer import load_tokenizer
    from student.nlu import encode_words

    nlu = session_export(tmp_path_factory, request, "nlu")
    predictor = OnnxPredictor(session_export(tmp_path_factory, request, "nlu-fp32"))
    batch = [list(e.words) for e in export_examples["test"]] + [["word"] * 40]  # the last one is truncated
    hf = load_tokenizer(nlu)
    enc = encode_words(hf, batch, predictor.max_source_length)
    texts = [" ".join(w) for w in batch]
    ids, offsets, tokens, truncated = predictor.encode_with_tokens(texts)
    assert truncated == [len(hf(t)["input_ids"]) > predictor.max_source_length for t in texts]
    assert truncated[-1] and not all(truncated)
    for b, words in enumerate(batch):
        n = int(enc["attention_mask"][b].sum())
        assert ids[b] == enc["input_ids"][b, :n].tolist()
        spans = word_char_spans(words)[1]
        assert first_subword_indices(offsets[b], spans, tokens[b]) == enc["word_starts"][b, : len(words)].tolist()


# ----------------------------------------------------------------------------- predictor


def test_runtime_never_imports_torch(trained_int8: Path, nlu_int8: Path):
    code = (
        "import sys, json\n"
        "from student.runtime import OnnxPredictor\n"
        f"a = OnnxPredictor({str(trained_int8)!r}).predict('wake me up at five am')\n"
        f"b = OnnxPredictor({str(nlu_int8)!r}).predict('wake me up at five am')\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'a': a['words'], 'b': len(b['labels'])}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "a": ["wake", "me", "up", "at", "five", "am"], "b": 6}


def test_tokenizer_matches_transformers(trained_fp32: Path, tmp_path_factory, request):
    from data_prep.tokenizer import load_tokenizer

    hf = load_tokenizer(session_export(tmp_path_factory, request, "trained"))
    predictor = OnnxPredictor(trained_fp32)
    texts = ["Annotate: wake me up at five am", "Annotate: 明 日 の 天 気", "Annotate: مرحبا بالعالم", "Annotate: 🙂 ok", ""]
    ids, _, _ = predictor.encode(texts)
    assert ids == [hf(t)["input_ids"] for t in texts]
    sample = hf("Other Other time time alarm_set")["input_ids"]
    assert predictor.tokenizer.decode(sample, skip_special_tokens=True) == hf.decode(sample, skip_special_tokens=True)


@pytest.mark.parametrize("which", ["seq2seq", "nlu"])
def test_predict_edge_inputs(which, trained_int8: Path, nlu_int8: Path):
    predictor = OnnxPredictor(trained_int8 if which == "seq2seq" else nlu_int8)
    empty = predictor.predict("")
    assert empty["words"] == [] and empty["labels"] == [] and empty["slots"] == [] and empty["truncated"] is False
    assert isinstance(empty["intent"], str)
    long = predictor.predict(" ".join(["alarm"] * 400), "en-US")
    assert long["truncated"] is True and len(long["labels"]) == 400
    if which == "nlu":  # words beyond max_source_length tokens have no first sub-word: Other
        assert long["labels"][-1] == "Other"
    for text, locale in (("ตั้งปลุกตีห้า", "th-TH"), ("明日の天気は", "zh-CN"), ("🙂🙃 ñandú", None), ("Привет мир", "ru-RU")):
        result = predictor.predict(text, locale)
        assert len(result["labels"]) == len(result["words"]) == len(split_words(text, locale))
        assert set(result) >= {"intent", "slots", "labels", "words", "truncated"}
    with pytest.raises(ValueError, match="without whitespace"):
        predictor.predict_words([["two words"]])


def test_predict_words_keeps_order_whatever_the_batch_size(trained_fp32: Path, export_examples):
    batch = [list(e.words) for e in export_examples["test"][:12]]
    one = OnnxPredictor(trained_fp32, batch_size=1).predict_words(batch)
    many = OnnxPredictor(trained_fp32, batch_size=5).predict_words(batch)
    assert one == many
    assert [len(p.slots) for p in one] == [len(w) for w in batch]


def test_nlu_onnx_predictions_equal_pytorch_predictor(tmp_path_factory, request, export_examples):
    from student.nlu import EncoderNLUModel

    nlu = session_export(tmp_path_factory, request, "nlu")
    fp32 = session_export(tmp_path_factory, request, "nlu-fp32")
    batch = [list(e.words) for e in export_examples["test"]]
    assert OnnxPredictor(fp32, batch_size=7).predict_words(batch) == EncoderNLUModel.from_pretrained(nlu).predict_words(batch)


def test_read_manifest_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="polyteacher export"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{\n "kind": "seq2seq",\n oops\n}')
    with pytest.raises(ValueError, match=r"manifest.json:3"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "lstm", "precision": "fp32", "graphs": {},
                                                        "size_bytes": 0, "special_ids": {}, "max_source_length": 8}))
    with pytest.raises(ValueError, match="'seq2seq', 'encoder_nlu'"):
        read_manifest(tmp_path)
    # An export of the earlier three-graph format: a clear request to export again.
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "kind": "seq2seq", "precision": "int8",
                                                        "graphs": {}, "size_bytes": 0, "special_ids": {},
                                                        "max_source_length": 8}))
    with pytest.raises(ValueError, match="format_version 1 is not supported.*polyteacher export"):
        read_manifest(tmp_path)


def test_cli_predict_prints_json(trained_int8: Path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "predict", "--model", str(trained_int8), "--locale", "ja-JP",
         "--threads", "1", "明日の天気", "wake me up"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["words"] for r in lines] == [["明", "日", "の", "天", "気"], ["wake", "me", "up"]]
    bad = subprocess.run([sys.executable, "-m", "launch.cli", "predict", "--model", str(trained_int8), "--locale", "xx-XX", "hi"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "allowed" in bad.stderr


# ----------------------------------------------------------------------------- latency evaluation


def test_percentile_interpolates():
    from evaluation.latency import percentile

    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_evaluate_latency_writes_p50_p95_and_sizes(trained_int8: Path, nlu_int8: Path, tmp_path: Path, capsys):
    from launch.cli import main

    code = main(["evaluate", "latency", "--models", f"student_int8={trained_int8}", f"nlu_int8={nlu_int8}",
                 "--max-examples", "3", "--warmup", "1", "--memory-repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "latency.json").read_text())
    assert list(data) == ["student_int8", "nlu_int8"]
    for name, export_dir in (("student_int8", trained_int8), ("nlu_int8", nlu_int8)):
        r = data[name]
        assert 0 < r["min"] <= r["p50"] <= r["p95"] and r["num_examples"] == 3 and r["num_threads"] == 1
        assert r["size_mb"] == read_manifest(export_dir)["size_bytes"] / 1e6
        assert r["backend"] == "onnxruntime" and r["precision"] == "int8"
    assert "| student_int8 | onnxruntime | int8 |" in squash_tables((tmp_path / "latency.md").read_text())
    for name in data:  # measured in fresh processes: the model adds memory; batches answer faster
        assert data[name]["added_rss_mb"] > 0 and data[name]["cold_start_s"] > 0 and data[name]["throughput_utt_s"] > 0
        # the split by mapping (/proc/self/smaps) adds up to the VmRSS difference, read a moment apart
        parts = [data[name][f"added_{part}_mb"] for part in ("anon", "library", "model_files", "other")]
        assert data[name]["added_anon_mb"] > 0 and abs(sum(parts) - data[name]["added_rss_mb"]) < 2.0
    assert main(["evaluate", "latency", "--models", "noequals", "--out", str(tmp_path)]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


# ----------------------------------------------------------------------------- predict on many utterances


def _predict(args: list, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "predict", *args], cwd=REPO, input=stdin,
                          capture_output=True)


@pytest.mark.slow
def test_predict_answers_every_good_line_and_reports_each_bad_one(trained_int8: Path, tmp_path: Path):
    """A JSONL/plain-text mix with a malformed line, an unknown locale, an empty utterance and bytes
    that are not UTF-8: each bad line gets an error record and a stderr message with its line
    number, every other line is answered (every MASSIVE locale accepted), in input order, the same
    from a file and from stdin, and the same at batch size 1 and 32."""
    from massive.format import MASSIVE_LOCALES

    good = [json.dumps({"utt": "wake me up at five am", "locale": loc, "id": i}).encode()
            for i, loc in enumerate(MASSIVE_LOCALES)]
    lines = [*good[:3], b'{"utt": "broken', json.dumps({"utt": "hi", "locale": "xx-XX"}).encode(),
             b'{"utt": "  "}', b"", b"play some jazz", b"caf\xe9 au lait", *good[3:]]
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    out = _predict(["--model", str(trained_int8), "--input", str(path)])
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {4, 5, 6, 7, 9}
    assert "malformed JSON" in errors[4] and "unknown locale 'xx-XX'" in errors[5]
    assert errors[6] == errors[7] == "empty utterance" and "not UTF-8 (byte 0xe9" in errors[9]
    stderr = out.stderr.decode()
    for n in errors:
        assert f"{path}:{n}: " in stderr
    answered = [r for r in records if "error" not in r]
    assert len(answered) == len(MASSIVE_LOCALES) + 1
    assert sorted(r["locale"] for r in answered if "id" in r) == sorted(MASSIVE_LOCALES)
    assert [r["id"] for r in answered if "id" in r] == list(range(len(MASSIVE_LOCALES)))
    assert next(r for r in records if r["line"] == 8)["words"] == ["play", "some", "jazz"]
    piped = _predict(["--model", str(trained_int8), "--batch-size", "1"], stdin=data)
    assert piped.returncode == 0 and piped.stdout == out.stdout
    assert "stdin:9: not UTF-8" in piped.stderr.decode()
    # --output: written whole under a temporary name, then renamed.
    assert _predict(["--model", str(trained_int8), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]).returncode == 0
    assert (tmp_path / "o.jsonl").read_bytes() == out.stdout and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "o.jsonl"]


def test_predict_exits_non_zero_only_when_nothing_was_answered(trained_int8: Path):
    bad = _predict(["--model", str(trained_int8)], stdin=b'{"utt": \n\n\xff\xfe\n{"utt": "\\ud83d"}\n')
    assert bad.returncode == 1 and "nothing answered: all 4 lines of stdin were bad" in bad.stderr.decode()
    assert "stdin:4: \"utt\" holds a lone surrogate" in bad.stderr.decode()
    assert b"Traceback" not in bad.stderr
    # An argument that is not UTF-8 is reported by its position; the good one is answered.
    mixed = _predict(["--model", str(trained_int8), b"\xff oops", "wake me up"])
    assert mixed.returncode == 0 and "argument:1: not UTF-8 (byte 0xff" in mixed.stderr.decode()
    records = [json.loads(line) for line in mixed.stdout.decode().splitlines()]
    assert "error" in records[0] and records[1]["words"] == ["wake", "me", "up"]
    assert _predict(["--model", str(trained_int8)], stdin=b"").returncode == 0  # nothing to answer


@pytest.mark.slow
def test_predict_model_errors_are_one_line(trained_dir: Path, trained_int8: Path, tmp_path: Path):
    """A Hugging Face folder is named with what to pass instead; a manifest whose graph or tokenizer
    path leaves the export directory (../, absolute, or a symbolic link out) is refused."""
    import shutil

    hf = _predict(["--model", str(trained_dir), "hi"])
    assert hf.returncode == 2 and b"Traceback" not in hf.stderr
    assert f"{trained_dir}: a Hugging Face model directory" in hf.stderr.decode()
    assert "polyteacher export --model" in hf.stderr.decode()
    copy = tmp_path / "export"
    shutil.copytree(trained_int8, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (tmp_path / "elsewhere.json").write_text("{}")
    os_link = copy / "link.json"
    os_link.symlink_to(tmp_path / "elsewhere.json")
    for key, value in (("tokenizer", "../elsewhere.json"), ("tokenizer", str(tmp_path / "elsewhere.json")),
                       ("tokenizer", "link.json"), ("graph", "../encoder.onnx")):
        changed = json.loads(json.dumps(manifest))
        if key == "graph":
            changed["graphs"]["encoder"]["file"] = value
        else:
            changed[key] = value
        (copy / "manifest.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="points outside the export directory"):
            OnnxPredictor(copy)
        out = _predict(["--model", str(copy), "hi"])
        assert out.returncode == 2 and "points outside the export directory" in out.stderr.decode()
