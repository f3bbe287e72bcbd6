"""ONNX export of students (and teachers), int8 dynamic quantization, and `polyteacher export`.

Two kinds of model directory are exported:

- text-to-text (`seq2seq`): a Hugging Face T5-family directory. Three graphs, so that greedy
  decoding in onnxruntime runs the encoder once and then one decoder step per token over a
  key/value cache:
    encoder.onnx            input_ids, attention_mask [B, S] -> encoder_hidden_states [B, S, D]
    decoder_init.onnx       decoder_input_ids [B, 1], encoder_hidden_states, encoder_attention_mask
                            -> logits [B, 1, V], present.{i}.self.{key,value} [B, H, 1, Dk],
                               present.{i}.cross.{key,value} [B, H, S, Dk]
    decoder_with_past.onnx  decoder_input_ids [B, 1], encoder_attention_mask, past.{i}.self.* [B, H, P, Dk],
                            past.{i}.cross.* [B, H, S, Dk] -> logits [B, 1, V], present.{i}.self.* [B, H, P+1, Dk]
  The cross-attention keys/values are computed once by decoder_init and fed back unchanged.
- encoder-only NLU (`encoder_nlu`, a directory with nlu_labels.json, see student/nlu.py): one graph
    model.onnx              input_ids, attention_mask [B, T] -> intent_logits [B, I], slot_logits [B, T, S]

Every export directory holds the graphs, the tokenizer (tokenizer.json, read at run time by the
`tokenizers` library alone) and manifest.json (see `build_manifest`). student/runtime.py serves it.

Exporter: torch.onnx.export with the TorchScript tracer (dynamo=False). The dynamo exporter of
torch 2.13 fails on T5 attention with symbolic batch/length ("Cannot view a tensor with shape
[s0, s1, H, Dk] ... as [s0, s1, -1]" during decomposition); `exporter=dynamo` is kept for newer
versions. Tracing records one path through data-dependent Python branches, so the example inputs are
chosen to take the general path: a batch of 2 with a padded row (the attention-mask branch of
transformers' mask builders) and one decoder token per step.

transformers 5 seq2seq models keep their key/value cache in `EncoderDecoderCache` objects; the
wrapper modules below build one from flat tensors and return flat tensors, so the graphs' inputs and
outputs are plain tensors with stable names.

int8: `onnxruntime.quantization.quantize_dynamic` (weights int8, activations quantized per call).
Two passes run before it (see `prepare_for_quantization`): a Transpose of an initializer feeding a
MatMul (how a tied lm_head can appear) is folded into a new, already transposed initializer, because
the quantizer only quantizes MatMul weights that are initializers; otherwise that weight stays fp32
and the Transpose runs on every decoding step. And value_info entries that name initializers (stale
after folding) are dropped: they break ONNX shape inference, which the quantizer relies on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from launch.config import ConfigError, load_config, to_dict
from student.runtime import MANIFEST, read_manifest

if TYPE_CHECKING:
    import onnx
    import torch

FORMAT_VERSION = 1
# Files of a tokenizer directory the export copies (tokenizer.json is the one the runtime reads).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
SEQ2SEQ_GRAPHS = ("encoder", "decoder_init", "decoder_with_past")
NLU_GRAPHS = ("model",)
# Ops whose weights quantize_dynamic quantizes (MatMul -> MatMulInteger, Gather on an int8 table).
QUANTIZED_OP_TYPES = ("MatMul", "Gather")


@dataclass
class ExportConfig:
    """The `export` section of a preset: how a model directory becomes an ONNX export directory."""

    opset: int = 17
    """ONNX opset of the exported graphs (the TorchScript exporter supports 7..20)."""
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    """torch.onnx.export path: torchscript (dynamo=False, works with transformers 5 T5 on torch 2.13) or
    dynamo (torch.export based; fails on T5 attention with dynamic shapes as of torch 2.13)."""
    int8: bool = False
    """Quantize the exported graphs' weights to int8 (dynamic quantization); `--int8` sets it."""
    weight_type: Literal["qint8", "quint8"] = "qint8"
    """int8 weight type: qint8 (signed, symmetric; fast on x86 with VNNI and on ARM) or quint8."""
    per_channel: bool = False
    """Quantize weights per output channel instead of per tensor (a bit more accurate, a bit larger)."""
    reduce_range: bool = False
    """Quantize weights to 7 bits (avoids saturation on x86 CPUs without VNNI)."""
    max_source_length: int = 128
    """Maximum encoder input length in tokens (eos included); longer utterances are truncated at run time."""
    max_target_length: int = 128
    """Maximum number of tokens the runtime generates per utterance (seq2seq)."""
    check_parity: bool = True
    """After exporting, run the fp32 graphs and PyTorch on a sample batch and fail if logits differ by
    more than parity_tolerance."""
    parity_tolerance: float = 1e-4
    """Largest allowed absolute difference between fp32 ONNX and PyTorch outputs (logits, states)."""

    def validate(self) -> None:
        if not 13 <= self.opset <= 20:
            raise ConfigError(f"export.opset: {self.opset} is not supported; allowed values: 13..20")
        for key in ("max_source_length", "max_target_length"):
            if getattr(self, key) < 2:
                raise ConfigError(f"export.{key}: must be >= 2, got {getattr(self, key)}")
        if self.parity_tolerance <= 0:
            raise ConfigError(f"export.parity_tolerance: must be > 0, got {self.parity_tolerance}")


# ----------------------------------------------------------------------------- the stage


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: ExportConfig,
           run_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Export `model_dir` (a HF seq2seq directory, an encoder NLU directory, or an fp32 ONNX export
    when cfg.int8) to `out_dir`, atomically. Returns out_dir. `out_dir` must be new, empty or a
    previous export (any directory with `overwrite`; never `run_dir` itself or the model): see
    launch.fsutil.check_output."""
    from launch.fsutil import atomic_dir, check_output
    from launch.modeldir import check_model_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / MANIFEST).is_file():  # an fp32 ONNX export is the other input --int8 takes
        check_model_dir(model_dir, "--model")
        check_has_tokenizer(model_dir)
    check_output(out_dir, "onnx", run_dir, inputs=[model_dir], flag="--out", replace_any=overwrite)
    started = time.time()
    with atomic_dir(out_dir, kind="onnx", replace_any=overwrite) as tmp:
        if (model_dir / MANIFEST).exists():
            if not cfg.int8:
                raise ValueError(f"{model_dir} is already an ONNX export; only --int8 can be applied to it")
            manifest = read_manifest(model_dir)
            if manifest["precision"] != "fp32":
                raise ValueError(f"{model_dir / MANIFEST}: precision is {manifest['precision']}, int8 needs fp32 graphs")
            quantize_export(model_dir, tmp, cfg)
        elif cfg.int8:
            with tempfile.TemporaryDirectory(prefix=".fp32-", dir=out_dir.parent) as fp32_dir:
                export_fp32(model_dir, Path(fp32_dir), cfg)
                quantize_export(Path(fp32_dir), tmp, cfg)
        else:
            export_fp32(model_dir, tmp, cfg)
    manifest = read_manifest(out_dir)
    print(
        f"exported {manifest['kind']} {manifest['precision']} to {out_dir}: "
        f"{manifest['size_bytes'] / 1e6:.2f} MB in {time.time() - started:.1f}s",
        file=sys.stderr,
    )
    return out_dir


def detect_kind(model_dir: Path) -> Literal["seq2seq", "encoder_nlu"]:
    return "encoder_nlu" if (model_dir / "nlu_labels.json").exists() else "seq2seq"


def export_fp32(model_dir: Path, out: Path, cfg: ExportConfig) -> dict[str, Any]:
    """Write fp32 graphs, tokenizer and manifest of `model_dir` into the (empty) directory `out`."""
    import torch

    kind = detect_kind(model_dir)
    torch.manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        if kind == "seq2seq":
            model = load_seq2seq(model_dir)
            graphs = export_seq2seq_graphs(model, out, cfg)
            parity = check_seq2seq_parity(model, out, cfg) if cfg.check_parity else None
            extra = {"model_config": _model_config_summary(model.config), "special_ids": _seq2seq_special_ids(model)}
        else:
            from student.nlu import EncoderNLUModel

            model = EncoderNLUModel.from_pretrained(model_dir).float().eval()
            labels = model.labels
            graphs = export_nlu_graph(model, out, cfg)
            parity = check_nlu_parity(model, out, cfg) if cfg.check_parity else None
            extra = {
                "model_config": _model_config_summary(model.config),
                "special_ids": _nlu_special_ids(model.config),
                "labels": {"intents": labels.intents, "slot_labels": labels.slot_labels},
            }
            # The NLU model was trained with its own maximum input length; keep it.
            cfg = _replace(cfg, max_source_length=labels.max_length)
    copy_tokenizer(model_dir, out)
    manifest = build_manifest(
        out, kind=kind, precision="fp32", graphs=graphs, cfg=cfg, source_dir=model_dir, parity=parity, **extra
    )
    write_manifest(out, manifest)
    return manifest


def quantize_export(fp32_dir: Path, out: Path, cfg: ExportConfig) -> dict[str, Any]:
    """int8 copy of an fp32 export directory: quantized graphs, same tokenizer, updated manifest."""
    import onnx

    source = read_manifest(fp32_dir)
    stats = {"folded_transposes": 0, "dropped_value_info": 0}
    for info in source["graphs"].values():
        proto = onnx.load(str(fp32_dir / info["file"]))
        folded, dropped = prepare_for_quantization(proto)
        stats["folded_transposes"] += folded
        stats["dropped_value_info"] += dropped
        with tempfile.TemporaryDirectory(dir=out) as work:
            prepared = Path(work) / info["file"]
            onnx.save(proto, str(prepared))
            quantize_graph(prepared, out / info["file"], cfg)
        onnx.checker.check_model(str(out / info["file"]))
    for fname in TOKENIZER_FILES:
        if (fp32_dir / fname).exists():
            shutil.copy2(fp32_dir / fname, out / fname)
    graphs = {name: describe_graph(out / info["file"]) for name, info in source["graphs"].items()}
    manifest = dict(source)
    manifest.update(
        precision="int8",
        graphs=graphs,
        size_bytes=sum(g["size_bytes"] for g in graphs.values()),
        fp32_size_bytes=source["size_bytes"],
        quantization={
            "method": "onnxruntime.quantization.quantize_dynamic",
            "weight_type": cfg.weight_type,
            "per_channel": cfg.per_channel,
            "reduce_range": cfg.reduce_range,
            "op_types": list(QUANTIZED_OP_TYPES),
            **stats,
        },
        created=_created(),
    )
    write_manifest(out, manifest)
    return manifest


# ----------------------------------------------------------------------------- loading


def load_seq2seq(model_dir: Path) -> Any:
    """The HF seq2seq model in fp32 eval mode (safetensors; never remote code)."""
    from launch.modeldir import load_seq2seq_model

    model = load_seq2seq_model(model_dir, "--model", dtype="float32")
    model.eval()
    for attr in ("encoder", "decoder"):
        if not hasattr(model, attr):
            raise ValueError(f"{model_dir}: {type(model).__name__} is not an encoder-decoder model")
    if not hasattr(model.config, "num_decoder_layers"):
        raise ValueError(
            f"{model_dir}: {model.config.model_type} models are not supported for export; supported: T5-family (t5, mt5, umt5)"
        )
    return model


def _seq2seq_special_ids(model: Any) -> dict[str, int]:
    c = model.config
    start = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.pad_token_id
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    if c.pad_token_id is None or eos is None or start is None:
        raise ValueError("model config lacks pad_token_id, eos_token_id or decoder_start_token_id")
    return {"pad": int(c.pad_token_id), "eos": int(eos), "decoder_start": int(start)}


def _nlu_special_ids(config: Any) -> dict[str, int]:
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return {"pad": int(config.pad_token_id if config.pad_token_id is not None else 0), "eos": int(eos if eos is not None else 1)}


def _model_config_summary(config: Any) -> dict[str, Any]:
    from data_prep.massive import INTENT_FIRST_KEY, SENTINELS_KEY

    keys = ("model_type", "vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
            INTENT_FIRST_KEY, SENTINELS_KEY)
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


# ----------------------------------------------------------------------------- wrappers


def _wrappers() -> tuple[type, type, type]:
    """The wrapper module classes (built lazily: torch is imported only when exporting)."""
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    def decoder_step(model: Any, decoder_input_ids: Any, encoder_states: Any, encoder_attention_mask: Any,
                     cache: Any) -> Any:
        """One decoder pass of the seq2seq `model` over the key/value `cache` (returns the HF output)."""
        return model(
            decoder_input_ids=decoder_input_ids,
            encoder_outputs=(encoder_states,),
            attention_mask=encoder_attention_mask,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )

    def flat_cache(cache: Any, num_layers: int, cross: bool) -> list[Any]:
        """The cache's tensors in graph order (`past_names`): per layer self key, value[, cross key, value]."""
        flat = []
        for i in range(num_layers):
            self_layer = cache.self_attention_cache.layers[i]
            flat += [self_layer.keys, self_layer.values]
            if cross:
                cross_layer = cache.cross_attention_cache.layers[i]
                flat += [cross_layer.keys, cross_layer.values]
        return flat

    class EncoderGraph(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class DecoderInitGraph(torch.nn.Module):
        """First decoder step: self-attention cache starts empty, cross-attention K/V are computed."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            self.num_layers = model.config.num_decoder_layers

        def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):  # noqa: ANN001
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = decoder_step(self.model, decoder_input_ids, encoder_hidden_states, encoder_attention_mask, cache)
            return (out.logits, *flat_cache(out.past_key_values, self.num_layers, cross=True))

    class DecoderWithPastGraph(torch.nn.Module):
        """One decoder step over the cache: past.{i}.self.key, .value, past.{i}.cross.key, .value per layer."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            self.num_layers = model.config.num_decoder_layers
            self.d_model = model.config.d_model

        def forward(self, decoder_input_ids, encoder_attention_mask, *past):  # noqa: ANN001
            layers = [past[4 * i : 4 * i + 4] for i in range(self.num_layers)]
            cache = EncoderDecoderCache(
                DynamicCache([layer[:2] for layer in layers]), DynamicCache([layer[2:] for layer in layers])
            )
            # The cross-attention K/V are final: every layer reads them from the cache.
            for i in range(self.num_layers):
                cache.is_updated[i] = True
            # The decoder only reads the encoder states' shape (for the cross-attention mask); the
            # cached cross K/V replace the projections of the states themselves.
            batch, src_len = encoder_attention_mask.shape
            encoder_states = past[2].new_zeros((batch, src_len, self.d_model))
            out = decoder_step(self.model, decoder_input_ids, encoder_states, encoder_attention_mask, cache)
            return (out.logits, *flat_cache(out.past_key_values, self.num_layers, cross=False))

    return EncoderGraph, DecoderInitGraph, DecoderWithPastGraph


def past_names(num_layers: int, prefix: str, cross: bool = True) -> list[str]:
    """Flat cache tensor names in graph order: {prefix}.{i}.self.key, .self.value[, .cross.key, .cross.value]."""
    kinds = ("self.key", "self.value", "cross.key", "cross.value") if cross else ("self.key", "self.value")
    return [f"{prefix}.{i}.{k}" for i in range(num_layers) for k in kinds]


def example_seq2seq_inputs(model: Any, batch: int = 2, src_len: int = 7) -> dict[str, Any]:
    """Tracing inputs: a padded batch (row 1 has 2 padding tokens) so the traced masks handle padding."""
    import torch

    c = model.config
    generator = torch.Generator().manual_seed(0)
    low = 3 if c.vocab_size > 4 else 0
    input_ids = torch.randint(low, c.vocab_size, (batch, src_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, src_len - 2 :] = 0
    input_ids[1, src_len - 2 :] = c.pad_token_id
    start = _seq2seq_special_ids(model)["decoder_start"]
    decoder_input_ids = torch.full((batch, 1), start, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


def export_seq2seq_graphs(model: Any, out: Path, cfg: ExportConfig) -> dict[str, dict[str, Any]]:
    """Export encoder, decoder_init and decoder_with_past of a T5-family model into `out`."""
    EncoderGraph, DecoderInitGraph, DecoderWithPastGraph = _wrappers()
    num_layers = model.config.num_decoder_layers
    ex = example_seq2seq_inputs(model)
    encoder, decoder_init, decoder_past = EncoderGraph(model), DecoderInitGraph(model), DecoderWithPastGraph(model)
    encoder_states = encoder(ex["input_ids"], ex["attention_mask"])
    init_out = decoder_init(ex["decoder_input_ids"], encoder_states, ex["attention_mask"])
    next_ids = init_out[0][:, -1].argmax(-1, keepdim=True)

    batch_src = {0: "batch", 1: "src_len"}
    present_init = past_names(num_layers, "present")
    _onnx_export(
        encoder, (ex["input_ids"], ex["attention_mask"]), out / "encoder.onnx", cfg,
        input_names=["input_ids", "attention_mask"], output_names=["encoder_hidden_states"],
        dynamic_axes={"input_ids": batch_src, "attention_mask": batch_src, "encoder_hidden_states": batch_src},
    )
    kv_axes_init = {n: {0: "batch", 2: "src_len" if ".cross." in n else "one"} for n in present_init}
    _onnx_export(
        decoder_init, (ex["decoder_input_ids"], encoder_states, ex["attention_mask"]), out / "decoder_init.onnx", cfg,
        input_names=["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"],
        output_names=["logits", *present_init],
        dynamic_axes={"decoder_input_ids": {0: "batch"}, "encoder_hidden_states": batch_src,
                      "encoder_attention_mask": batch_src, "logits": {0: "batch"}, **kv_axes_init},
    )
    past_in = past_names(num_layers, "past")
    present_out = past_names(num_layers, "present", cross=False)
    kv_axes_in = {n: {0: "batch", 2: "src_len" if ".cross." in n else "past_len"} for n in past_in}
    kv_axes_out = {n: {0: "batch", 2: "past_len_plus_1"} for n in present_out}
    _onnx_export(
        decoder_past, (next_ids, ex["attention_mask"], *init_out[1:]), out / "decoder_with_past.onnx", cfg,
        input_names=["decoder_input_ids", "encoder_attention_mask", *past_in],
        output_names=["logits", *present_out],
        dynamic_axes={"decoder_input_ids": {0: "batch"}, "encoder_attention_mask": batch_src, "logits": {0: "batch"},
                      **kv_axes_in, **kv_axes_out},
    )
    return {name: describe_graph(out / f"{name}.onnx") for name in SEQ2SEQ_GRAPHS}


def export_nlu_graph(model: Any, out: Path, cfg: ExportConfig) -> dict[str, dict[str, Any]]:
    """Export EncoderNLUModel.forward as model.onnx."""
    import torch

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3 if vocab > 4 else 0, vocab, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    batch_len = {0: "batch", 1: "seq_len"}
    _onnx_export(
        model, (input_ids, attention_mask), out / "model.onnx", cfg,
        input_names=["input_ids", "attention_mask"], output_names=["intent_logits", "slot_logits"],
        dynamic_axes={"input_ids": batch_len, "attention_mask": batch_len, "intent_logits": {0: "batch"},
                      "slot_logits": batch_len},
    )
    return {"model": describe_graph(out / "model.onnx")}


def _onnx_export(module: Any, args: tuple, path: Path, cfg: ExportConfig, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    import torch

    module.eval()
    with warnings.catch_warnings():
        # The tracer warns about every Python branch on tensor values; the example inputs above are
        # chosen so the general branch is the one recorded (parity is checked after export).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if cfg.exporter == "torchscript":
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=cfg.opset, dynamo=False, do_constant_folding=True,
            )
        else:
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=max(cfg.opset, 18), dynamo=True, external_data=False,
            )
    import onnx

    onnx.checker.check_model(str(path))


# ----------------------------------------------------------------------------- parity at export time


def check_seq2seq_parity(model: Any, out: Path, cfg: ExportConfig) -> dict[str, float]:
    """Max |ONNX - PyTorch| for encoder states and the logits of two greedy steps on a fresh input
    shape (batch 3, length 11, one padded row); raises if above cfg.parity_tolerance."""
    import numpy as np
    import torch

    sessions = {name: _session(out / f"{name}.onnx") for name in SEQ2SEQ_GRAPHS}
    num_layers = model.config.num_decoder_layers
    ex = example_seq2seq_inputs(model, batch=3, src_len=11)
    ids, mask = ex["input_ids"].numpy(), ex["attention_mask"].numpy()
    states = sessions["encoder"].run(None, {"input_ids": ids, "attention_mask": mask})[0]
    start = ex["decoder_input_ids"].numpy()
    init = sessions["decoder_init"].run(
        None, {"decoder_input_ids": start, "encoder_hidden_states": states, "encoder_attention_mask": mask}
    )
    step1 = init[0][:, -1].argmax(-1)[:, None].astype(np.int64)
    feed = {"decoder_input_ids": step1, "encoder_attention_mask": mask}
    feed.update(dict(zip(past_names(num_layers, "past"), init[1:])))
    step2 = sessions["decoder_with_past"].run(None, feed)[0]
    with torch.no_grad():
        ref = model(
            input_ids=ex["input_ids"], attention_mask=ex["attention_mask"],
            decoder_input_ids=torch.cat([ex["decoder_input_ids"], torch.from_numpy(step1)], dim=1),
        )
        ref_states = model.encoder(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"]).last_hidden_state
    diffs = {
        "encoder_hidden_states": float(np.abs(states - ref_states.numpy()).max()),
        "decoder_init_logits": float(np.abs(init[0][:, 0] - ref.logits[:, 0].numpy()).max()),
        "decoder_with_past_logits": float(np.abs(step2[:, 0] - ref.logits[:, 1].numpy()).max()),
    }
    _raise_if_above(diffs, cfg.parity_tolerance, out)
    return diffs


def check_nlu_parity(model: Any, out: Path, cfg: ExportConfig) -> dict[str, float]:
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    intent, slots = _session(out / "model.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref_intent, ref_slots = model(ids, mask)
    diffs = {
        "intent_logits": float(np.abs(intent - ref_intent.numpy()).max()),
        "slot_logits": float(np.abs(slots - ref_slots.numpy()).max()),
    }
    _raise_if_above(diffs, cfg.parity_tolerance, out)
    return diffs


def _raise_if_above(diffs: dict[str, float], tolerance: float, out: Path) -> None:
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        raise RuntimeError(
            f"ONNX export in {out} differs from PyTorch by more than export.parity_tolerance={tolerance}: {bad}"
        )


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- int8


def fold_transposed_weights(model: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) feeding MatMul/Gemm by a transposed initializer; return the count.

    A tied lm_head can be exported as MatMul(x, Transpose(shared_embedding)); quantize_dynamic only
    quantizes a MatMul whose weight is an initializer, so without folding that (largest) weight stays
    fp32 and is transposed again on every decoding step.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        out_name = node.output[0]
        users = consumers.get(out_name, [])
        if not users or out_name in graph_outputs or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[node.input[0]])
        folded_name = _unique_name(f"{node.input[0]}_transposed", inits)
        new_init = numpy_helper.from_array(np.ascontiguousarray(np.transpose(weight, perm)), folded_name)
        graph.initializer.append(new_init)
        inits[folded_name] = new_init
        for user in users:
            for i, name in enumerate(user.input):
                if name == out_name:
                    user.input[i] = folded_name
        graph.node.remove(node)
        consumers[node.input[0]].remove(node)
        folded += 1
    # An initializer nothing reads any more (the original of a folded weight) is dead weight on disk.
    used = {name for node in graph.node for name in node.input} | graph_outputs
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)
    return folded


def _unique_name(base: str, taken: dict[str, Any]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def drop_initializer_value_info(model: onnx.ModelProto) -> int:
    """Remove value_info entries for initializers or for names no node produces; return the count.

    After folding, value_info can describe a tensor with its old (untransposed) shape; ONNX shape
    inference then fails on the conflict, and the quantizer runs shape inference.
    """
    graph = model.graph
    produced = {name for node in graph.node for name in node.output}
    inits = {t.name for t in graph.initializer}
    stale = [vi for vi in graph.value_info if vi.name in inits or vi.name not in produced]
    for vi in stale:
        graph.value_info.remove(vi)
    return len(stale)


def prepare_for_quantization(model: onnx.ModelProto) -> tuple[int, int]:
    """Fold transposed weights, drop stale value_info, check that shape inference succeeds."""
    import onnx

    folded = fold_transposed_weights(model)
    dropped = drop_initializer_value_info(model)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return folded, dropped


def quantize_graph(src: Path, dst: Path, cfg: ExportConfig) -> None:
    """Dynamic int8 quantization of MatMul and Gather weights (activation-activation MatMuls stay fp32)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8
    # The quantizer warns that pre-processing (symbolic shape inference) was not run; our graphs
    # already carry what it needs (prepare_for_quantization checked shape inference).
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src), str(dst), weight_type=weight_type, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES), extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)


# ----------------------------------------------------------------------------- manifest


def describe_graph(path: Path) -> dict[str, Any]:
    """File name, size and the inputs/outputs (name, dtype, shape with symbolic axes as strings)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def io(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    return {
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "inputs": io(proto.graph.input),
        "outputs": io(proto.graph.output),
    }


def weights_sha256(model_dir: Path) -> dict[str, Any]:
    """sha256 over the model directory's weight files (name and bytes, in name order)."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {"sha256": digest.hexdigest(), "files": [p.name for p in files]}


# A model directory's own tokenizer: one of these must exist, else transformers would make one up
# from the model type (a default T5 tokenizer with nothing in common with the model's vocabulary).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def check_has_tokenizer(model_dir: Path) -> None:
    """Refuse a model directory without its tokenizer (ModelDirError, one line) before any export work."""
    from launch.modeldir import ModelDirError

    if not any((model_dir / name).is_file() for name in TOKENIZER_MARKERS):
        raise ModelDirError(
            f"--model {model_dir}: no tokenizer (none of {', '.join(TOKENIZER_MARKERS)}); an export serves the "
            "model's own tokenizer: save it into the directory first (tokenizer.save_pretrained)"
        )


def copy_tokenizer(model_dir: Path, out: Path) -> None:
    """Copy tokenizer.json (+ config); a directory with only a slow tokenizer is converted once."""
    if (model_dir / "tokenizer.json").exists():
        for fname in TOKENIZER_FILES:
            if (model_dir / fname).exists():
                shutil.copy2(model_dir / fname, out / fname)
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{model_dir}: no tokenizer.json and the tokenizer cannot be converted to a fast one")
    tokenizer.save_pretrained(out)
    for extra in out.iterdir():
        if extra.name not in TOKENIZER_FILES and extra.suffix != ".onnx":
            extra.unlink()


def build_manifest(out: Path, kind: str, precision: str, graphs: dict[str, dict[str, Any]], cfg: ExportConfig,
                   source_dir: Path, parity: dict[str, float] | None, special_ids: dict[str, int],
                   model_config: dict[str, Any], labels: dict[str, list[str]] | None = None) -> dict[str, Any]:
    tokenizer_config = out / "tokenizer_config.json"
    unk = None
    if tokenizer_config.exists():
        tok_cfg = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        unk = tok_cfg.get("unk_token")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "precision": precision,
        "opset": cfg.opset,
        "exporter": cfg.exporter,
        "graphs": graphs,
        "size_bytes": sum(g["size_bytes"] for g in graphs.values()),
        "tokenizer": "tokenizer.json",
        "special_ids": special_ids,
        "unk_token": unk,
        "max_source_length": cfg.max_source_length,
        "max_target_length": cfg.max_target_length if kind == "seq2seq" else None,
        "model_config": model_config,
        "source_model": {"path": str(source_dir.resolve()), **weights_sha256(source_dir)},
        "parity_max_abs_diff": parity,
        "created": _created(),
    }
    if kind == "seq2seq":
        manifest["num_decoder_layers"] = model_config["num_decoder_layers"]
    if labels is not None:
        manifest["labels"] = labels
    return manifest


def _created() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    from launch.fsutil import atomic_write_json

    atomic_write_json(out / MANIFEST, manifest)


def _replace(cfg: ExportConfig, **changes: Any) -> ExportConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


# ----------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    from launch.config import config_help

    p = sub.add_parser(
        "export",
        help="export a model directory to ONNX (fp32, or int8 with --int8) with its tokenizer and a manifest",
        description=(
            "Export a text-to-text model directory (encoder, first decoder step, decoder step with KV cache) "
            "or an encoder NLU directory (one graph: intent and slot logits) to ONNX, optionally quantized to "
            "int8 (dynamic quantization of weights). --model may also be an fp32 export directory, which "
            "--int8 quantizes. The output directory is written atomically and holds the graphs, "
            "tokenizer.json and manifest.json; serve it with `polyteacher predict`.\n\nconfig keys (export):\n"
            + config_help(ExportConfig)
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory (HF seq2seq, encoder NLU, or an fp32 ONNX export)")
    p.add_argument("--out", required=True, help="output directory: new, empty, or a previous export (replaced atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is not a previous export (never the run directory or --model)")
    p.add_argument("--int8", action="store_true", help="quantize weights to int8 (sets int8=true)")
    p.add_argument("--run-dir", default=None, help="run directory: relative --model/--out are resolved inside it")
    p.add_argument("--preset", default=None, help="preset name (launch/presets) or YAML path; section 'export'")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the export config, e.g. opset=17 per_channel=true")
    p.set_defaults(func=run_cli, lock_run_dir="run_dir")


def run_cli(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["int8=true"] if args.int8 else [])
    cfg = load_config(ExportConfig, section="export", preset=args.preset, overrides=overrides)
    model, out = Path(args.model), Path(args.out)
    if args.run_dir:
        from launch.fsutil import safe_path

        model = model if model.is_absolute() else safe_path(args.run_dir, model)
        out = out if out.is_absolute() else safe_path(args.run_dir, out)
    export(model, out, cfg, run_dir=args.run_dir, overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "config": to_dict(cfg)}))
    return 0
