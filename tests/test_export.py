"""ONNX export: parity with PyTorch, int8 quantization, manifest, CLI.

Models: a tiny T5 (d_model 64) trained for a few dozen steps on MASSIVE en-US text-to-text pairs
(confident logits, so int8 agreement is meaningful), and an untrained d_model-64 T5 (seed 1)
(greedy outputs differ from utterance to utterance, which exercises the KV cache path on varied
tokens and lengths). They and their exports are built once per session by
tests/fixtures_models.py (`session_export`), shared with tests/test_runtime.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_models import session_export

from launch.config import ConfigError, load_config
from student.export import (
    ExportConfig,
    drop_initializer_value_info,
    export,
    fold_transposed_weights,
    past_names,
    prepare_for_quantization,
    quantize_graph,
    weights_sha256,
)
from student.runtime import OnnxPredictor, read_manifest

PARITY_TOL = 1e-4


def hf_greedy(model_dir: Path, sources: list[str], max_new_tokens: int) -> list[list[int]]:
    """PyTorch `generate` (greedy) token ids per source, up to and including eos, without the start token."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    enc = tokenizer(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    rows = []
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    for row in out[:, 1:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        rows.append([t for t in row[:cut] if t != pad])
    return rows


def onnx_greedy(export_dir: Path, sources: list[str], max_new_tokens: int, batch_size: int = 8) -> list[list[int]]:
    predictor = OnnxPredictor(export_dir, batch_size=batch_size)
    out: list[list[int]] = []
    for i in range(0, len(sources), batch_size):
        ids, _, _ = predictor.encode(sources[i : i + batch_size])
        out += predictor.generate(*predictor.pad(ids), max_new_tokens=max_new_tokens)
    return out


def sources_of(examples: list) -> list[str]:
    from data_prep.massive import to_text_to_text

    return [to_text_to_text(e.words, e.slots, e.intent)[0] for e in examples]


# ----------------------------------------------------------------------------- config


def test_config_validation_names_key_and_allowed_values():
    with pytest.raises(ConfigError, match="export.opset.*allowed values"):
        load_config(ExportConfig, section="export", overrides=["opset=9"])
    with pytest.raises(ConfigError, match="exporter.*'torchscript', 'dynamo'"):
        load_config(ExportConfig, section="export", overrides=["exporter=tflite"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(ExportConfig, section="export", overrides=["int4=true"])
    for preset in ("tiny", "small"):
        cfg = load_config(ExportConfig, section="export", preset=preset)
        assert cfg.exporter == "torchscript" and cfg.max_source_length >= 16


# ----------------------------------------------------------------------------- seq2seq parity


def test_fp32_logits_match_pytorch_on_massive(trained_dir: Path, trained_fp32: Path, export_examples):
    """Encoder states, the first decoder step and three with-past steps within 1e-4 of PyTorch on a
    padded batch of real utterances (en-US and ja-JP)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    predictor = OnnxPredictor(trained_fp32)
    model = AutoModelForSeq2SeqLM.from_pretrained(trained_dir).eval()
    sources = sources_of(export_examples["test"][20:28])  # mixed lengths, both scripts
    ids, _, _ = predictor.encode(sources)
    input_ids, mask = predictor.pad(ids)
    assert (mask == 0).any(), "the batch must contain padding"
    s = predictor.sessions
    states = s["encoder"].run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
    start = np.zeros((len(sources), 1), dtype=np.int64)
    init = s["decoder_init"].run(None, {"decoder_input_ids": start, "encoder_hidden_states": states,
                                        "encoder_attention_mask": mask})
    logits, cache = [init[0][:, 0]], dict(zip(past_names(predictor.num_layers, "past"), init[1:]))
    tokens = [start]
    for _ in range(3):
        tokens.append(logits[-1].argmax(-1)[:, None].astype(np.int64))
        out = s["decoder_with_past"].run(None, {"decoder_input_ids": tokens[-1], "encoder_attention_mask": mask, **cache})
        logits.append(out[0][:, 0])
        cache.update(dict(zip(past_names(predictor.num_layers, "past", cross=False), out[1:])))
    with torch.no_grad():
        ref_states = model.encoder(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask))[0]
        ref = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(np.concatenate(tokens, axis=1))).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(states - ref_states.numpy())[real].max() < PARITY_TOL
    for step, step_logits in enumerate(logits):
        assert np.abs(step_logits - ref[:, step]).max() < PARITY_TOL, f"decoder step {step}"
    manifest = read_manifest(trained_fp32)
    assert all(v < PARITY_TOL for v in manifest["parity_max_abs_diff"].values())


@pytest.mark.parametrize("which", ["trained", "random"])
def test_greedy_outputs_identical_to_pytorch_generate(which, trained_dir, trained_fp32, random_fp32, export_examples,
                                                      tmp_path_factory, request):
    if which == "trained":
        model_dir, export_dir = trained_dir, trained_fp32
    else:
        model_dir, export_dir = session_export(tmp_path_factory, request, "random"), random_fp32
    sources = sources_of(export_examples["test"])
    ref = hf_greedy(model_dir, sources, max_new_tokens=24)
    got = onnx_greedy(export_dir, sources, max_new_tokens=24)
    assert got == ref
    if which == "random":
        # The outputs depend on the input (the trained tiny model's mostly do not, see the report).
        assert len({tuple(r) for r in ref}) >= 4


# ----------------------------------------------------------------------------- int8


def test_int8_agrees_with_fp32(trained_fp32: Path, trained_int8: Path, export_examples):
    """Greedy outputs of the int8 export equal the fp32 export's on >= 98% of MASSIVE test utterances,
    and the next-token argmax agrees on >= 98% of teacher-forced steps."""
    sources = sources_of(export_examples["test"])
    fp32 = onnx_greedy(trained_fp32, sources, max_new_tokens=32)
    int8 = onnx_greedy(trained_int8, sources, max_new_tokens=32)
    same = sum(a == b for a, b in zip(fp32, int8)) / len(sources)
    assert same >= 0.98, f"int8 greedy outputs agree with fp32 on {same:.1%} of utterances"
    # Per step along the fp32 path: an argmax flip anywhere would show here even if sequences re-converged.
    agree, total = 0, 0
    p32, p8 = OnnxPredictor(trained_fp32), OnnxPredictor(trained_int8)
    for src, seq in zip(sources[:8], fp32[:8]):
        ids, _, _ = p32.encode([src])
        x, m = p32.pad(ids)
        for p, store in ((p32, "a"), (p8, "b")):
            states = p.sessions["encoder"].run(None, {"input_ids": x, "attention_mask": m})[0]
            init = p.sessions["decoder_init"].run(None, {"decoder_input_ids": np.zeros((1, 1), np.int64),
                                                          "encoder_hidden_states": states, "encoder_attention_mask": m})
            cache = dict(zip(past_names(p.num_layers, "past"), init[1:]))
            argmaxes = [int(init[0][0, -1].argmax())]
            for tok in seq[:-1]:
                out = p.sessions["decoder_with_past"].run(None, {"decoder_input_ids": np.array([[tok]], np.int64),
                                                                  "encoder_attention_mask": m, **cache})
                argmaxes.append(int(out[0][0, -1].argmax()))
                cache.update(dict(zip(past_names(p.num_layers, "past", cross=False), out[1:])))
            if store == "a":
                ref_steps = argmaxes
        agree += sum(a == b for a, b in zip(ref_steps, argmaxes))
        total += len(argmaxes)
    assert agree / total >= 0.98


def _initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def test_int8_graphs_quantize_every_weight_matmul_and_the_lm_head(trained_int8: Path):
    import onnx

    manifest = read_manifest(trained_int8)
    assert manifest["precision"] == "int8"
    for name, info in manifest["graphs"].items():
        model = onnx.load(str(trained_int8 / info["file"]))
        inits = _initializers(model)
        ops = [n.op_type for n in model.graph.node]
        # No fp32 MatMul with a weight (initializer) input is left: only activation x activation ones.
        fp32_weight_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)]
        assert fp32_weight_matmuls == [], f"{name}: {fp32_weight_matmuls}"
        assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") > 0
        # No Transpose of an initializer feeds a MatMul (the folded tied lm_head).
        producers = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            if node.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul"):
                for inp in node.input:
                    p = producers.get(inp)
                    assert not (p is not None and p.op_type == "Transpose" and p.input[0] in inits), node.name
        if name != "encoder":
            lm_head = [n for n in model.graph.node if "lm_head" in n.name]
            assert lm_head, f"{name}: no lm_head node"
            assert all(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in lm_head if "MatMul" in n.op_type)
            weights = [inits[i] for n in lm_head for i in n.input if i in inits and len(inits[i].dims) == 2]
            assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def test_int8_size_is_at_most_fp32_over_3_5_for_a_matmul_dominated_model(tmp_path: Path, tiny_tokenizer_dir: Path):
    from data_prep.tokenizer import load_tokenizer
    from teacher.presets import ModelConfig, build_model

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="tiny", d_model=256, d_ff=1024, num_heads=4, d_kv=64), tokenizer, seed=0)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    fp32 = export(tmp_path / "hf", tmp_path / "fp32", ExportConfig())
    int8 = export(fp32, tmp_path / "int8", ExportConfig(int8=True))
    m32, m8 = read_manifest(fp32), read_manifest(int8)
    assert m8["size_bytes"] * 3.5 <= m32["size_bytes"], (m32["size_bytes"], m8["size_bytes"])
    assert m8["fp32_size_bytes"] == m32["size_bytes"]
    for info in m8["graphs"].values():
        assert (int8 / info["file"]).stat().st_size == info["size_bytes"]


def _tied_head_graph(vocab: int = 64, dim: int = 16, stale_value_info: bool = True):
    """Gather(E) -> MatMul(h, Transpose(E)): a tied lm_head as some exporters write it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "shared.weight")
    w = numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32), "dense.weight")
    nodes = [
        helper.make_node("Gather", ["shared.weight", "ids"], ["h0"], name="embed"),
        helper.make_node("MatMul", ["h0", "dense.weight"], ["h1"], name="dense/MatMul"),
        helper.make_node("Transpose", ["shared.weight"], ["shared_t"], perm=[1, 0], name="lm_head/Transpose"),
        helper.make_node("MatMul", ["h1", "shared_t"], ["logits"], name="lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "len"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "len", vocab])], [emb, w],
    )
    if stale_value_info:
        # What a graph carries after an earlier pass: a shape for the (now folded) transposed weight.
        graph.value_info.append(helper.make_tensor_value_info("shared_t", TensorProto.FLOAT, [dim, vocab]))
        graph.value_info.append(helper.make_tensor_value_info("shared.weight", TensorProto.FLOAT, [dim, vocab]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_fold_transposed_weights_makes_the_tied_lm_head_quantizable(tmp_path: Path):
    import onnx

    ids = np.array([[1, 5, 9], [3, 0, 63]], dtype=np.int64)
    model = _tied_head_graph(stale_value_info=False)
    before = _run(model, ids)
    assert fold_transposed_weights(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMul", "MatMul"]
    head = model.graph.node[-1]
    inits = _initializers(model)
    assert head.input[1] in inits and list(inits[head.input[1]].dims) == [16, 64]
    assert "shared.weight" in inits  # still read by the Gather
    np.testing.assert_allclose(_run(model, ids), before, rtol=0, atol=0)

    onnx.save(model, str(tmp_path / "folded.onnx"))
    quantize_graph(tmp_path / "folded.onnx", tmp_path / "int8.onnx", ExportConfig(int8=True))
    q = onnx.load(str(tmp_path / "int8.onnx"))
    qinits = _initializers(q)
    heads = [n for n in q.graph.node if n.name.startswith("lm_head")]
    assert [n.op_type for n in heads if "MatMul" in n.op_type] in (["MatMulInteger"], ["DynamicQuantizeMatMul"])
    assert any(qinits[i].data_type == onnx.TensorProto.INT8 for n in heads for i in n.input if i in qinits)
    assert np.abs(_run(q, ids) - before).max() < 0.1 * np.abs(before).max()


def test_unfolded_tied_lm_head_stays_fp32_after_quantization(tmp_path: Path):
    """The pitfall the folding pass exists for: without it the lm_head MatMul is not quantized."""
    import onnx

    onnx.save(_tied_head_graph(stale_value_info=False), str(tmp_path / "raw.onnx"))
    quantize_graph(tmp_path / "raw.onnx", tmp_path / "int8.onnx", ExportConfig(int8=True))
    q = onnx.load(str(tmp_path / "int8.onnx"))
    head_ops = [n.op_type for n in q.graph.node if n.name.startswith("lm_head")]
    assert "MatMul" in head_ops and "Transpose" in head_ops


def test_stale_value_info_breaks_shape_inference_until_dropped():
    import onnx

    model = _tied_head_graph(stale_value_info=True)
    fold_transposed_weights(model)
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert drop_initializer_value_info(model) == 2
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert any(vi.name == "h1" for vi in inferred.graph.value_info)
    # The combined pass does both and reports the counts.
    assert prepare_for_quantization(_tied_head_graph(stale_value_info=True)) == (1, 2)


# ----------------------------------------------------------------------------- manifest, atomicity, CLI


def test_manifest_describes_the_export(trained_dir: Path, trained_fp32: Path):
    m = read_manifest(trained_fp32)
    assert m["kind"] == "seq2seq" and m["precision"] == "fp32" and m["opset"] == 17
    assert set(m["graphs"]) == {"encoder", "decoder_init", "decoder_with_past"}
    assert m["size_bytes"] == sum((trained_fp32 / g["file"]).stat().st_size for g in m["graphs"].values())
    past = m["graphs"]["decoder_with_past"]
    assert [i["name"] for i in past["inputs"]][:4] == ["decoder_input_ids", "encoder_attention_mask",
                                                      "past.0.self.key", "past.0.self.value"]
    assert past["inputs"][2]["shape"][0] == "batch" and past["inputs"][2]["shape"][2] == "past_len"
    assert m["graphs"]["encoder"]["inputs"][0]["shape"] == ["batch", "src_len"]
    assert m["special_ids"] == {"pad": 0, "eos": 1, "decoder_start": 0}
    assert m["source_model"]["sha256"] == weights_sha256(trained_dir)["sha256"]
    assert (trained_fp32 / "tokenizer.json").exists()
    assert not [p for p in trained_fp32.parent.iterdir() if p.name.startswith(f".{trained_fp32.name}.")]


def test_failed_export_leaves_the_previous_export_untouched(trained_dir: Path, tmp_path: Path):
    out = tmp_path / "onnx"
    export(trained_dir, out, ExportConfig(check_parity=False))
    before = (out / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="parity_tolerance"):
        export(trained_dir, out, ExportConfig(parity_tolerance=1e-12))
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_cli_export_int8_and_errors(trained_fp32: Path, tmp_path: Path, capsys):
    from launch.cli import main

    assert main(["export", "--model", str(trained_fp32), "--out", str(tmp_path / "q"), "--int8", "per_channel=true"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["config"]["int8"] is True and printed["config"]["per_channel"] is True
    m = read_manifest(tmp_path / "q")
    assert m["precision"] == "int8" and m["quantization"]["per_channel"] is True
    assert main(["export", "--model", str(trained_fp32), "--out", str(tmp_path / "x"), "opset=99"]) == 2
    assert "export.opset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already an ONNX export"):
        export(trained_fp32, tmp_path / "y", ExportConfig())


# ----------------------------------------------------------------------------- encoder NLU


def test_encoder_nlu_export_matches_pytorch(tmp_path_factory, request, export_examples):
    import torch

    from data_prep.tokenizer import load_tokenizer
    from student.nlu import EncoderNLUModel, encode_words

    nlu_dir = session_export(tmp_path_factory, request, "nlu")
    fp32 = session_export(tmp_path_factory, request, "nlu-fp32")
    m = read_manifest(fp32)
    assert m["kind"] == "encoder_nlu" and m["labels"]["slot_labels"][0] == "Other" and m["max_source_length"] == 32
    model = EncoderNLUModel.from_pretrained(nlu_dir)
    labels = model.labels
    batch = [list(e.words) for e in export_examples["test"][:16]]
    enc = encode_words(load_tokenizer(nlu_dir), batch, labels.max_length)
    session = OnnxPredictor(fp32).sessions["model"]
    intent, slots = session.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})
    with torch.no_grad():
        ref_intent, ref_slots = model(enc["input_ids"], enc["attention_mask"])
    assert np.abs(intent - ref_intent.numpy()).max() < PARITY_TOL
    assert np.abs(slots - ref_slots.numpy()).max() < PARITY_TOL


def test_manifest_model_config_carries_the_target_order():
    from types import SimpleNamespace

    from data_prep.massive import INTENT_FIRST_KEY, model_intent_first
    from student.export import _model_config_summary

    first = _model_config_summary(SimpleNamespace(model_type="t5", d_model=8, **{INTENT_FIRST_KEY: True}))
    assert first == {"model_type": "t5", "d_model": 8, INTENT_FIRST_KEY: True} and model_intent_first(first)
    # Models fine-tuned before the option existed (or encoder exports) read as the official order.
    assert not model_intent_first(_model_config_summary(SimpleNamespace(model_type="t5")))
