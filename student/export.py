"""ONNX export of students (and teachers), int8 quantization, and `polyteacher export`.

Two kinds of model directory are exported:

- text-to-text (`seq2seq`): a Hugging Face T5-family directory. Two graphs, so that greedy decoding
  in onnxruntime runs the encoder once and then one decoder step per token over a key/value cache:
    encoder.onnx   input_ids, attention_mask [B, S] -> cross.{i}.key, cross.{i}.value [B, H, S, Dk]
                   (every decoder layer's cross-attention keys/values, projected from the encoder states)
    decoder.onnx   decoder_input_ids [B, 1], encoder_attention_mask [B, S], per layer
                   past.{i}.self.key, .value [B, H, P, Dk] and cross.{i}.key, .value [B, H, S, Dk]
                   -> logits [B, 1, V], present.{i}.self.key, .value [B, H, P+1, Dk]
  The first step feeds an empty self-attention cache (P = 0), so one decoder graph serves every step.
- encoder-only NLU (`encoder_nlu`, a directory with nlu_labels.json, see student/nlu.py): one graph
    model.onnx     input_ids, attention_mask [B, T] -> intent_logits [B, I], slot_logits [B, T, S]

Every export directory holds the graphs, their weights (weights.bin: one external data file that
all graphs read, each distinct tensor stored once, see `store_weights_once`), the tokenizer
(tokenizer.json, read at run time by the `tokenizers` library alone) and manifest.json (see
`build_manifest`). student/runtime.py serves it.

Exporter: torch.onnx.export with the TorchScript tracer (dynamo=False). The dynamo exporter of
torch 2.13 fails on T5 attention with symbolic batch/length ("Cannot view a tensor with shape
[s0, s1, H, Dk] ... as [s0, s1, -1]" during decomposition); `exporter=dynamo` is kept for newer
versions. Tracing records one path through data-dependent Python branches, so the example inputs are
chosen to take the general path: a batch of 2 with a padded row (the attention-mask branch of
transformers' mask builders) and one decoder token over a one-token cache.

transformers 5 seq2seq models keep their key/value cache in `EncoderDecoderCache` objects; the
wrapper modules below build one from flat tensors and return flat tensors, so the graphs' inputs and
outputs are plain tensors with stable names.

int8 (`quantize_export`): onnxruntime's `quant_pre_process` prepares each fp32 graph, then
- weight_only + weight_compute=float (the default): each 2-D weight becomes int8 codes and fp32
  block scales plus a constant Cast/Mul/Reshape subgraph that onnxruntime folds when the session
  loads: 8-bit weights on disk, fp32 activations and compute (`quantize_weights_stored`). The codes
  are each weight's nearest (rounding=nearest) or chosen by GPTQ (rounding=gptq, `gptq_round`) from
  the MatMul inputs' second moments on MASSIVE train utterances (`calibrate`); with
  fp16_candidate_rows, the rows of the tied embedding that compete for the top logit in calibration
  are stored in fp16 too (the presets' choice: >= 99% identical predictions to fp32, nearest ~97.6%);
- weight_only + weight_compute=int8: MatMulNBits (onnxruntime's MatMulNBitsQuantizer, 8 bits) and
  GatherBlockQuantized, the tied lm_head sharing the embedding's codes (`quantize_weight_only`);
- dynamic: onnxruntime's quantize_dynamic (MatMulInteger, per tensor or per channel).
benchmarks/export.py measures all of them against fp32 (size, latency, identical predictions).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.config import ConfigError, load_config, to_dict
from core.modeldir import model_kind
from student.runtime import FORMAT_VERSION, MANIFEST, OnnxPredictor, read_manifest

if TYPE_CHECKING:
    import onnx
    import torch

# Files of a tokenizer directory the export copies (tokenizer.json is the one the runtime reads).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SEQ2SEQ_GRAPHS = ("encoder", "decoder")
# The external data file every graph of an export reads its weights from (each content stored once).
WEIGHTS_FILE = "weights.bin"
# Initializers smaller than this stay inside their graph; offsets in WEIGHTS_FILE are aligned to WEIGHTS_ALIGNMENT.
MIN_SHARED_BYTES = 1024
WEIGHTS_ALIGNMENT = 64
# Embedding tables with fewer elements stay fp32 in weight-only int8 (e.g. T5's relative position bias).
MIN_QUANTIZED_ELEMENTS = 4096
# MatMulNBits compute type for weight_compute=int8: 4 = int8 dot products (accuracy levels 0/1, fp32
# compute, dequantize the whole weight on every call: ~7x slower than fp32 on the tiny student).
INT8_ACCURACY_LEVEL = 4
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
    """Quantize the exported graphs' weights to int8; `--int8` sets it."""
    quantization: Literal["weight_only", "dynamic"] = "weight_only"
    """int8 method. weight_only: weights stored as 8-bit codes in blocks of block_size with one fp32
    scale per block; how they are computed with is weight_compute. dynamic: onnxruntime
    quantize_dynamic (MatMulInteger; activations quantized per tensor on every call; per_channel,
    weight_type and reduce_range apply). benchmarks/export.py compares them on predictions."""
    block_size: int = 128
    """weight_only: weights per quantization block (a power of 2 >= 16), each with one fp32 scale (128:
    +3% over the codes, 32: +12.5%). A weight whose blocked dimension is not a multiple of it gets
    one block per row. benchmarks/export.py measured 128 at least as close to fp32 as 32."""
    weight_compute: Literal["float", "int8"] = "float"
    """weight_only: float: the codes are dequantized by constant subgraphs (Cast, Mul, Reshape) that
    onnxruntime folds when the session loads, so activations stay fp32 and only weight rounding
    differs from fp32 (int8 on disk, fp32 in memory). int8: MatMulNBits (onnxruntime's
    MatMulNBitsQuantizer, bits 8, accuracy_level 4: activations quantized per block inside the
    kernel, int8 in memory) and GatherBlockQuantized for embeddings, sharing the tied lm_head's codes."""
    rounding: Literal["nearest", "gptq"] = "nearest"
    """weight_only (either weight_compute): how weights become codes. nearest: each weight to its
    nearest code. gptq: error-feedback rounding (GPTQ, Frantar et al. 2022): a MatMul weight [K, N] is
    rounded one input row at a time, and each row's rounding error is compensated on the rows not yet
    rounded, weighted by the second moments of the MatMul's input measured on calibration utterances
    (calibration_*), so that the layer's outputs rather than its weights stay close to fp32. Embedding
    tables (read by Gather, and the tied lm_head) are rounded to nearest: a lookup row sees no input
    to compensate with (see fp16_candidate_rows). Same size and speed as nearest. With
    weight_compute=int8 the blocks run along each output column's inputs (MatMulNBits' layout,
    `gptq_round_columns`), with weight_compute=float along each input row's outputs (`gptq_round`)."""
    calibration_data: str = "@data/massive/data"
    """rounding=gptq: the MASSIVE data (a directory, or @data/...) whose train utterances calibrate."""
    calibration_locales: list[str] = field(default_factory=lambda: ["en-US", "de-DE", "ja-JP"])
    """rounding=gptq: locales of the calibration utterances (train partition)."""
    calibration_examples: int = 1024
    """rounding=gptq: calibration utterances, drawn at random (seed 0) from the train partition of
    calibration_locales. The seq2seq student decodes them greedily in fp32, so the decoder's MatMuls
    are calibrated on the steps of its own outputs."""
    gptq_damp: float = 0.01
    """rounding=gptq: added to the diagonal of each input second-moment matrix, as a fraction of its
    mean diagonal (GPTQ's dampening; larger is closer to nearest rounding)."""
    fp16_candidate_rows: int = 0
    """seq2seq, rounding=gptq: up to this many rows of the tied embedding (which is also the lm_head)
    stored in fp16 instead of int8 (weight_compute=int8: their logits are recomputed by an fp32 MatMul
    over the fp16 rows and written over the int8 kernel's, `add_fp16_logit_rows`): the tokens most often among the two highest logits at the
    calibration decoding steps (MASSIVE students generate ~100 distinct tokens: intents, slot labels,
    separators). Their logits decide the near ties where 8-bit rounding of the lm_head flips a
    prediction; a row costs 2 bytes per dimension instead of 1. 0: every row int8."""
    weight_type: Literal["qint8", "quint8"] = "qint8"
    """dynamic: int8 weight type, qint8 (signed, symmetric; fast on x86 with VNNI and on ARM) or quint8."""
    per_channel: bool = False
    """dynamic: quantize weights per output channel instead of per tensor."""
    reduce_range: bool = False
    """dynamic: quantize weights to 7 bits (avoids saturation on x86 CPUs without VNNI)."""
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
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"export.block_size: must be a power of 2 >= 16, got {self.block_size}")
        if self.rounding == "gptq" and self.quantization != "weight_only":
            raise ConfigError(f"export.rounding: gptq needs quantization=weight_only, got quantization={self.quantization}")
        if self.calibration_examples < 1:
            raise ConfigError(f"export.calibration_examples: must be >= 1, got {self.calibration_examples}")
        if not self.calibration_locales:
            raise ConfigError("export.calibration_locales: give at least one locale")
        if self.gptq_damp <= 0:
            raise ConfigError(f"export.gptq_damp: must be > 0, got {self.gptq_damp}")
        if self.fp16_candidate_rows < 0:
            raise ConfigError(f"export.fp16_candidate_rows: must be >= 0, got {self.fp16_candidate_rows}")
        if self.fp16_candidate_rows and self.rounding != "gptq":
            raise ConfigError("export.fp16_candidate_rows: the candidates come from the calibration pass of "
                              f"rounding=gptq, got rounding={self.rounding}")
        if self.parity_tolerance <= 0:
            raise ConfigError(f"export.parity_tolerance: must be > 0, got {self.parity_tolerance}")


# ----------------------------------------------------------------------------- the stage


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: ExportConfig,
           run_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Export `model_dir` (a HF seq2seq directory, an encoder NLU directory, or an fp32 ONNX export
    when cfg.int8) to `out_dir`, atomically. Returns out_dir. `out_dir` must be new, empty or a
    previous export (with `overwrite` also an unmarked earlier export; never `run_dir`, the model, the
    current directory or a directory holding a run): see core.fsutil.check_output. One export writes
    `out_dir` at a time (core.fsutil.output_lock)."""
    from core.fsutil import OutputPathError, check_output, output_lock

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if (model_dir / MANIFEST).is_file():  # an fp32 ONNX export is the other input --int8 takes
        if not cfg.int8:
            raise OutputPathError(f"--model {model_dir} is already an ONNX export (it has {MANIFEST}); give it "
                                  "--int8 to quantize it, or point --model at a model directory")
        manifest = read_manifest(model_dir)
        if manifest.get("precision") != "fp32":
            raise OutputPathError(f"{model_dir / MANIFEST}: precision is {manifest.get('precision')}; --int8 "
                                  "needs an fp32 export: point --model at one, or at the model directory")
    else:
        from core.modeldir import check_model_dir

        check_model_dir(model_dir, "--model")
        check_has_tokenizer(model_dir)
    check_output(out_dir, "onnx", run_dir, inputs=[model_dir], flag="--out", replace_any=overwrite)
    with output_lock(out_dir, f"polyteacher export --out {out_dir}"):
        return _export_locked(model_dir, out_dir, cfg, overwrite)


def _export_locked(model_dir: Path, out_dir: Path, cfg: ExportConfig, overwrite: bool) -> Path:
    from core.fsutil import atomic_dir

    started = time.time()
    with atomic_dir(out_dir, kind="onnx", user_overwrite=overwrite) as tmp:
        if (model_dir / MANIFEST).exists():
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


def export_fp32(model_dir: Path, out: Path, cfg: ExportConfig) -> dict[str, Any]:
    """Write fp32 graphs, tokenizer and manifest of `model_dir` into the (empty) directory `out`."""
    import torch

    kind = model_kind(model_dir)  # "seq2seq" or "encoder_nlu": export() checked it is a model directory
    torch.manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        if kind == "seq2seq":
            model = load_seq2seq(model_dir)
            graphs = export_seq2seq_graphs(model, out, cfg)
            parity = check_seq2seq_parity(model, out, cfg) if cfg.check_parity else None
            extra = {"model_config": _model_config_summary(model.config), "special_ids": _seq2seq_special_ids(model)}
        else:
            from student.nlu import load_nlu_model

            model = load_nlu_model(model_dir).float().eval()
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
    weights = store_weights_once(out, [g["file"] for g in graphs.values()])
    graphs = {name: describe_graph(out / g["file"]) for name, g in graphs.items()}
    copy_tokenizer(model_dir, out)
    manifest = build_manifest(
        out, kind=kind, precision="fp32", graphs=graphs, cfg=cfg, source_dir=model_dir, parity=parity,
        weights=weights, **extra
    )
    write_manifest(out, manifest)
    return manifest


def quantize_export(fp32_dir: Path, out: Path, cfg: ExportConfig) -> dict[str, Any]:
    """int8 copy of an fp32 export directory: quantized graphs (weights stored once), same tokenizer,
    updated manifest."""
    import onnx

    source = read_manifest(fp32_dir)
    stats: dict[str, int] = {}
    files = [info["file"] for info in source["graphs"].values()]
    with tempfile.TemporaryDirectory(dir=out) as work:
        prepared = {fname: Path(work) / fname for fname in files}
        for fname, path in prepared.items():
            preprocess_graph(fp32_dir / fname, path)
        calibration = calibrate(fp32_dir, prepared, cfg) if cfg.rounding == "gptq" else None
        for fname, path in prepared.items():
            if cfg.quantization == "weight_only":
                proto = onnx.load(str(path))
                if cfg.weight_compute == "float":
                    # The pre-processing folded the tied lm_head into a transposed copy: tie it again
                    # first, so that the embedding is quantized (and stored) once.
                    _add_counts(stats, {"tied_transposes": tie_transposed_copies(proto)})
                    if calibration is None:
                        _add_counts(stats, quantize_weights_stored(proto, cfg.block_size))
                    else:
                        _add_counts(stats, quantize_weights_stored(
                            proto, cfg.block_size, moments=calibration.moments[fname], damp=cfg.gptq_damp,
                            fp16_rows=calibration.candidate_rows(cfg.fp16_candidate_rows)))
                elif calibration is None:
                    _add_counts(stats, quantize_weight_only(proto, cfg))
                else:
                    _add_counts(stats, quantize_weight_only(
                        proto, cfg, moments=calibration.moments[fname],
                        fp16_rows=calibration.candidate_rows(cfg.fp16_candidate_rows)))
            else:
                quantize_dynamic_graph(path, Path(work) / "quantized.onnx", cfg)
                proto = onnx.load(str(Path(work) / "quantized.onnx"))
            compact_graph(proto)
            onnx.save(proto, str(out / fname))
    weights = store_weights_once(out, files)
    for fname in files:
        onnx.checker.check_model(str(out / fname))
    for fname in TOKENIZER_FILES:
        if (fp32_dir / fname).exists():
            shutil.copy2(fp32_dir / fname, out / fname)
    graphs = {name: describe_graph(out / info["file"]) for name, info in source["graphs"].items()}
    manifest = dict(source)
    if cfg.quantization == "weight_only":
        method = {"method": "weight_only", "bits": 8, "block_size": cfg.block_size, "symmetric": True,
                  "weight_compute": cfg.weight_compute, **stats}
        method["rounding"] = cfg.rounding
        if calibration is not None:
            rows = calibration.candidate_rows(cfg.fp16_candidate_rows)
            method.update(calibration=calibration.describe(), gptq_damp=cfg.gptq_damp)
            if cfg.weight_compute == "float":
                method["fp16_rows"] = 0 if rows is None else len(rows)
            # weight_compute=int8: the rows actually kept (stats), 0 when no tied lm_head was quantized.
    else:
        method = {"method": "dynamic", "weight_type": cfg.weight_type, "per_channel": cfg.per_channel,
                  "reduce_range": cfg.reduce_range, "op_types": list(QUANTIZED_OP_TYPES)}
    manifest.update(
        precision="int8",
        graphs=graphs,
        weights=weights,
        size_bytes=export_size_bytes(graphs, weights),
        fp32_size_bytes=source["size_bytes"],
        quantization={"preprocess": "onnxruntime.quantization.shape_inference.quant_pre_process", **method},
        created=_created(),
    )
    write_manifest(out, manifest)
    return manifest


def _add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def export_size_bytes(graphs: dict[str, dict[str, Any]], weights: dict[str, Any] | None) -> int:
    """Bytes on disk of an export's model: its graph files plus the shared weights file."""
    return sum(g["size_bytes"] for g in graphs.values()) + (weights["size_bytes"] if weights else 0)


# ----------------------------------------------------------------------------- loading


def load_seq2seq(model_dir: Path) -> Any:
    """The HF seq2seq model in fp32 eval mode (safetensors; never remote code)."""
    from core.modeldir import load_seq2seq_model

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
    from massive.format import FORMAT_KEYS

    keys = ("model_type", "vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
            *FORMAT_KEYS)
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


# ----------------------------------------------------------------------------- wrappers


def _wrappers() -> tuple[type, type]:
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
        """The encoder, and from its states every decoder layer's cross-attention keys and values."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            states = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            cross = []
            for block in self.model.decoder.block:
                attention = block.layer[1].EncDecAttention
                kv_shape = (*states.shape[:-1], -1, attention.key_value_proj_dim)
                cross += [attention.k(states).view(kv_shape).transpose(1, 2),
                          attention.v(states).view(kv_shape).transpose(1, 2)]
            return tuple(cross)

    class DecoderGraph(torch.nn.Module):
        """One decoder step over the self-attention cache (empty on the first step) and the encoder's
        cross-attention K/V: per layer past.{i}.self.key, .value, cross.{i}.key, .value."""

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

    return EncoderGraph, DecoderGraph


def past_names(num_layers: int, prefix: str, cross: bool = True) -> list[str]:
    """Flat cache tensor names in the decoder's input order: {prefix}.{i}.self.key, .self.value[,
    cross.{i}.key, cross.{i}.value] (the cross-attention K/V the encoder graph outputs)."""
    names = []
    for i in range(num_layers):
        names += [f"{prefix}.{i}.self.key", f"{prefix}.{i}.self.value"]
        if cross:
            names += [f"cross.{i}.key", f"cross.{i}.value"]
    return names


def cross_names(num_layers: int) -> list[str]:
    """The encoder graph's outputs: cross.{i}.key, cross.{i}.value per decoder layer."""
    return [f"cross.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]


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
    """Export the encoder (-> cross-attention K/V) and the decoder step of a T5-family model into `out`.

    The decoder is traced with a one-token self-attention cache and runs with an empty one (length
    0) on the first step, so one graph serves every step."""
    EncoderGraph, DecoderGraph = _wrappers()
    num_layers = model.config.num_decoder_layers
    ex = example_seq2seq_inputs(model)
    encoder, decoder = EncoderGraph(model), DecoderGraph(model)
    cross = encoder(ex["input_ids"], ex["attention_mask"])
    heads, d_kv = cross[0].shape[1], cross[0].shape[3]
    batch = ex["input_ids"].shape[0]
    generator = torch_generator(1)
    past = []
    for i in range(num_layers):
        past += [_randn((batch, heads, 1, d_kv), generator), _randn((batch, heads, 1, d_kv), generator),
                 cross[2 * i], cross[2 * i + 1]]
    next_ids = ex["decoder_input_ids"]

    batch_src = {0: "batch", 1: "src_len"}
    _onnx_export(
        encoder, (ex["input_ids"], ex["attention_mask"]), out / "encoder.onnx", cfg,
        input_names=["input_ids", "attention_mask"], output_names=cross_names(num_layers),
        dynamic_axes={"input_ids": batch_src, "attention_mask": batch_src,
                      **{n: {0: "batch", 2: "src_len"} for n in cross_names(num_layers)}},
    )
    past_in = past_names(num_layers, "past")
    present_out = past_names(num_layers, "present", cross=False)
    kv_axes_in = {n: {0: "batch", 2: "src_len" if n.startswith("cross.") else "past_len"} for n in past_in}
    kv_axes_out = {n: {0: "batch", 2: "past_len_plus_1"} for n in present_out}
    _onnx_export(
        decoder, (next_ids, ex["attention_mask"], *past), out / "decoder.onnx", cfg,
        input_names=["decoder_input_ids", "encoder_attention_mask", *past_in],
        output_names=["logits", *present_out],
        dynamic_axes={"decoder_input_ids": {0: "batch"}, "encoder_attention_mask": batch_src, "logits": {0: "batch"},
                      **kv_axes_in, **kv_axes_out},
    )
    return {name: describe_graph(out / f"{name}.onnx") for name in SEQ2SEQ_GRAPHS}


def torch_generator(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)


def _randn(shape: tuple[int, ...], generator: Any) -> Any:
    import torch

    return torch.randn(shape, generator=generator)


def export_nlu_graph(model: Any, out: Path, cfg: ExportConfig) -> dict[str, dict[str, Any]]:
    """Export the NLU model's forward (EncoderNLUModel, or NLUEnsemble: every member in one graph) as model.onnx."""
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
    """Max |ONNX - PyTorch| of the logits of three greedy steps (the first over an empty cache) on a
    fresh input shape (batch 3, length 11, one padded row); raises if above cfg.parity_tolerance."""
    import numpy as np
    import torch

    sessions = {name: _session(out / f"{name}.onnx") for name in SEQ2SEQ_GRAPHS}
    ex = example_seq2seq_inputs(model, batch=3, src_len=11)
    ids, mask = ex["input_ids"].numpy(), ex["attention_mask"].numpy()
    tokens = [ex["decoder_input_ids"].numpy()]
    logits = seq2seq_steps(sessions, model.config.num_decoder_layers, ids, mask, tokens, steps=3)
    with torch.no_grad():
        ref = model(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"],
                    decoder_input_ids=torch.from_numpy(np.concatenate(tokens, axis=1))).logits.numpy()
    diffs = {f"decoder_step{step}_logits": float(np.abs(step_logits - ref[:, step]).max())
             for step, step_logits in enumerate(logits)}
    _raise_if_above(diffs, cfg.parity_tolerance, out)
    return diffs


def seq2seq_steps(sessions: dict[str, Any], num_layers: int, input_ids: Any, attention_mask: Any,
                  tokens: list[Any], steps: int) -> list[Any]:
    """Greedy steps with the exported graphs: `tokens` holds the start tokens [B, 1] and is extended
    with each step's argmax; returns each step's logits [B, V]."""
    import numpy as np

    cross = sessions["encoder"].run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
    batch = input_ids.shape[0]
    heads, d_kv = cross[0].shape[1], cross[0].shape[3]
    empty = np.zeros((batch, heads, 0, d_kv), dtype=np.float32)
    cache = {}
    for i in range(num_layers):
        cache.update({f"past.{i}.self.key": empty, f"past.{i}.self.value": empty,
                      f"cross.{i}.key": cross[2 * i], f"cross.{i}.value": cross[2 * i + 1]})
    logits = []
    for step in range(steps):
        if step:
            tokens.append(logits[-1].argmax(-1)[:, None].astype(np.int64))
        out = sessions["decoder"].run(None, {"decoder_input_ids": tokens[-1], "encoder_attention_mask": attention_mask,
                                             **cache})
        logits.append(out[0][:, 0])
        cache.update(dict(zip(past_names(num_layers, "past", cross=False), out[1:])))
    return logits


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


def preprocess_graph(src: Path, dst: Path) -> None:
    """onnxruntime's quantization pre-processing (quant_pre_process): symbolic shape inference, the
    basic graph optimizations (constant folding turns Transpose(tied embedding) into the lm_head's
    own initializer, which the quantizers need) and ONNX shape inference. Inline weights in `dst`."""
    import logging

    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet(logging.WARNING):
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False, auto_merge=True)


class _quiet:
    """Raise the root log level while onnxruntime's quantizers run (they log every node at INFO)."""

    def __init__(self, level: int) -> None:
        self.level = level

    def __enter__(self) -> None:
        import logging

        self.saved = logging.getLogger().level
        self.saved_ort = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").level
        logging.getLogger().setLevel(max(self.level, logging.ERROR))
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.getLogger().setLevel(self.saved)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(self.saved_ort)


def quantize_blocks(table: Any, block_size: int) -> tuple[Any, Any]:
    """Symmetric 8-bit blockwise quantization of a 2-D table [N, K] along K: uint8 codes [N, K] with
    the implicit zero point 128 (MatMulNBits and GatherBlockQuantized read uint8 without zero
    points as code - 128) and float scales [N, K / block_size] (absmax / 127 per block)."""
    import numpy as np

    n, k = table.shape
    codes, scales = symmetric_codes(table.reshape(n, k // block_size, block_size).astype(np.float32))
    return (codes.astype(np.int16) + 128).astype(np.uint8).reshape(n, k), scales[..., 0]


def quantize_weights_stored(model: onnx.ModelProto, block_size: int, moments: dict[str, Any] | None = None,
                            damp: float = 0.01, fp16_rows: Any = None) -> dict[str, int]:
    """weight_compute=float, in place: every fp32 initializer with at least MIN_QUANTIZED_ELEMENTS
    elements and 2 dimensions [R, C] becomes int8 codes [R, C / b, b] and fp32 scales [R, C / b, 1]
    (symmetric, absmax / 127 per block of b = block_size consecutive weights of a row, or of the
    whole row when C is not a multiple of it) and the subgraph Reshape(Mul(Cast(codes), scales)),
    which recomputes the weight under its old name. Every input of that subgraph is constant, so
    onnxruntime's constant folding materializes the fp32 weight once when the session loads: the
    graph computes in fp32 with weights rounded to 8 bits.

    moments: {activation name: E[x x^T]} of MatMul inputs (`calibrate`); a weight that only MatMuls
    with such an input read (as their B) is rounded by `gptq_round` instead of to nearest.
    fp16_rows: row indices of the embedding tables (weights read by Gather, with more rows than the
    largest index) stored as fp16 [r, C] too and written over the dequantized table by ScatterND,
    also folded at load time.
    Returns {"dequantized_weights": n} and, with moments or fp16_rows, {"gptq_weights": n}."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    targets = [t for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
               and t.dims[0] * t.dims[1] >= MIN_QUANTIZED_ELEMENTS]
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    nodes, inits = [], []
    stats = {"dequantized_weights": len(targets), "gptq_weights": 0}
    for tensor in targets:
        weight = numpy_helper.to_array(tensor)
        rows, cols = weight.shape
        b = block_size if cols % block_size == 0 else cols
        name = tensor.name
        inputs = {n.input[0] if n.op_type == "MatMul" and n.input[1] == name else None for n in readers.get(name, [])}
        if moments is not None and len(inputs) == 1 and next(iter(inputs)) in moments:
            codes, scales = gptq_round(weight, moments[next(iter(inputs))], b, damp)
            stats["gptq_weights"] += 1
        else:
            codes, scales = round_to_nearest(weight, b)
        inits += [numpy_helper.from_array(codes, f"{name}_q8"), numpy_helper.from_array(scales, f"{name}_q8_scales"),
                  numpy_helper.from_array(np.array([rows, cols], dtype=np.int64), f"{name}_q8_shape")]
        keep = None
        if fp16_rows is not None and len(fp16_rows) and name in gathered and rows > int(np.max(fp16_rows)):
            keep = np.asarray(fp16_rows, dtype=np.int64)
        dequantized = f"{name}_q8_table" if keep is not None else name
        nodes += [
            helper.make_node("Cast", [f"{name}_q8"], [f"{name}_q8_float"], name=f"{name}_q8_cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{name}_q8_float", f"{name}_q8_scales"], [f"{name}_q8_blocks"], name=f"{name}_q8_mul"),
            helper.make_node("Reshape", [f"{name}_q8_blocks", f"{name}_q8_shape"], [dequantized],
                             name=f"{name}_q8_reshape"),
        ]
        if keep is not None:
            inits += [numpy_helper.from_array(weight[keep].astype(np.float16), f"{name}_f16_rows"),
                      numpy_helper.from_array(keep[:, None], f"{name}_f16_index")]
            nodes += [
                helper.make_node("Cast", [f"{name}_f16_rows"], [f"{name}_f16_float"], name=f"{name}_f16_cast",
                                 to=TensorProto.FLOAT),
                helper.make_node("ScatterND", [dequantized, f"{name}_f16_index", f"{name}_f16_float"], [name],
                                 name=f"{name}_f16_scatter"),
            ]
    for tensor in targets:
        graph.initializer.remove(tensor)
    graph.initializer.extend(inits)
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    if moments is None and fp16_rows is None:
        return {"dequantized_weights": len(targets)}
    return stats


@dataclass
class Calibration:
    """What `calibrate` measured: per graph file, E[x x^T] of the input x of each MatMul with a
    constant 2-D weight (by activation name), and per vocabulary token how often it was among the
    two highest logits of a decoding step (seq2seq)."""

    moments: dict[str, dict[str, Any]]
    top2_counts: Any
    utterances: int
    locales: list[str]
    decoding_steps: int

    def candidate_rows(self, limit: int) -> Any:
        """Up to `limit` tokens most often among the top 2 (ties: lower id first), sorted; None when
        limit is 0 or nothing was decoded."""
        import numpy as np

        if not limit or self.top2_counts is None:
            return None
        order = np.argsort(-self.top2_counts, kind="stable")[:limit]
        return np.sort(order[self.top2_counts[order] > 0])

    def describe(self) -> dict[str, Any]:
        return {"utterances": self.utterances, "locales": self.locales, "partition": "train",
                "decoding_steps": self.decoding_steps}


def calibrate(fp32_dir: Path, prepared: dict[str, Path], cfg: ExportConfig, batch_size: int = 32,
              max_steps: int = 64) -> Calibration:
    """Run the prepared fp32 graphs (`preprocess_graph` outputs, by file name) on cfg.calibration_examples
    MASSIVE train utterances of cfg.calibration_locales (seed 0), encoded as the runtime encodes them
    (student.runtime.OnnxPredictor over `fp32_dir`), and accumulate the second moments of every
    MatMul input whose weight is a constant: over the non-padding tokens of the encoder (or NLU)
    graph, and over the greedy decoding steps of the decoder graph (up to eos or max_steps)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from core.config import resolve_data_path
    from massive.format import t2t_source
    from massive.loader import load_massive

    predictor = OnnxPredictor(fp32_dir, num_threads=1)
    sessions, taps = {}, {}
    for fname, path in prepared.items():
        proto = onnx.load(str(path))
        consts = {t.name for t in proto.graph.initializer if len(t.dims) == 2}
        transposed = {n.output[0] for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in consts}
        names = sorted({n.input[0] for n in proto.graph.node
                        if n.op_type == "MatMul" and (n.input[1] in consts or n.input[1] in transposed)})
        outputs = {o.name for o in proto.graph.output}
        for name in names:
            if name not in outputs:
                proto.graph.output.append(helper.make_empty_tensor_value_info(name))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[fname] = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        taps[fname] = names
    data = load_massive(str(resolve_data_path(cfg.calibration_data)), locales=list(cfg.calibration_locales),
                        partitions=("train",), progress=False)
    examples = data.examples(partition="train")
    if not examples:
        raise ValueError(f"export.calibration_data: no train utterances of {cfg.calibration_locales} in "
                         f"{cfg.calibration_data}")
    rng = np.random.default_rng(0)
    picked = rng.choice(len(examples), min(cfg.calibration_examples, len(examples)), replace=False)
    sums: dict[str, dict[str, Any]] = {fname: {} for fname in prepared}
    counts: dict[str, dict[str, int]] = {fname: {} for fname in prepared}

    def add(fname: str, values: dict[str, Any], keep: Any) -> None:
        for name in taps[fname]:
            x = values[name].reshape(*keep.shape, -1)[keep].astype(np.float64)
            sums[fname][name] = sums[fname].get(name, 0.0) + x.T @ x
            counts[fname][name] = counts[fname].get(name, 0) + len(x)

    def run(fname: str, feed: dict[str, Any]) -> dict[str, Any]:
        session = sessions[fname]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))

    graphs = {name: info["file"] for name, info in predictor.manifest["graphs"].items()}
    top2 = None
    steps = 0
    for start in range(0, len(picked), batch_size):
        words = [list(examples[i].words) for i in picked[start:start + batch_size]]
        if predictor.kind == "seq2seq":
            ids, _, _ = predictor.encode([t2t_source(w, predictor.sentinels) for w in words])
        else:
            ids, _, _ = predictor.encode([" ".join(w) for w in words])
        input_ids, mask = predictor.pad(ids)
        if predictor.kind != "seq2seq":
            add(graphs["model"], run(graphs["model"], {"input_ids": input_ids, "attention_mask": mask}), mask > 0)
            continue
        enc = run(graphs["encoder"], {"input_ids": input_ids, "attention_mask": mask})
        add(graphs["encoder"], enc, mask > 0)
        cross = {name: enc[name] for name in predictor._cross}
        first = next(iter(cross.values()))
        batch = input_ids.shape[0]
        past = dict.fromkeys(predictor._past, np.zeros((batch, first.shape[1], 0, first.shape[3]), dtype=first.dtype))
        next_ids = np.full(batch, predictor.decoder_start_id, dtype=np.int64)
        alive = np.ones(batch, dtype=bool)
        for _ in range(max_steps):
            out = run(graphs["decoder"], {"decoder_input_ids": next_ids[:, None], "encoder_attention_mask": mask,
                                          **past, **cross})
            add(graphs["decoder"], out, alive[:, None])
            logits = out["logits"][:, -1]
            if top2 is None:
                top2 = np.zeros(logits.shape[-1], dtype=np.int64)
            np.add.at(top2, np.argsort(-logits[alive], axis=-1)[:, :2].ravel(), 1)
            steps += int(alive.sum())
            next_ids = logits.argmax(-1).astype(np.int64)
            alive &= next_ids != predictor.eos_id
            if not alive.any():
                break
            past = {name: out[name.replace("past.", "present.", 1)] for name in predictor._past}
    moments = {fname: {name: total / max(counts[fname][name], 1) for name, total in per.items()}
               for fname, per in sums.items()}
    return Calibration(moments=moments, top2_counts=top2, utterances=len(picked),
                       locales=list(cfg.calibration_locales), decoding_steps=steps)


def symmetric_codes(blocks: Any) -> tuple[Any, Any]:
    """Blocks [..., b] -> symmetric 8-bit codes [..., b] (int8 in [-127, 127]) and fp32 scales
    [..., 1] (absmax / 127 per block; 1 for an all-zero block), each value rounded to its nearest code.
    The one rounding rule of every weight-only path (nearest, GPTQ's rows, the int8 kernels' tables)."""
    import numpy as np

    absmax = np.abs(blocks).max(-1, keepdims=True)
    scales = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(blocks / scales), -127, 127).astype(np.int8), scales


def round_to_nearest(weight: Any, block: int) -> tuple[Any, Any]:
    """Symmetric 8-bit codes [R, C / block, block] (int8) and scales [R, C / block, 1] (fp32, absmax /
    127 per block) of a 2-D weight [R, C], each weight rounded to its nearest code."""
    rows, cols = weight.shape
    return symmetric_codes(weight.reshape(rows, cols // block, block))


def gptq_round(weight: Any, moment: Any, block: int, damp: float = 0.01) -> tuple[Any, Any]:
    """GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained
    Transformers") for y = x @ W, W [K, N], with H = E[x x^T] [K, K] from calibration inputs: the rows
    of W (one per input channel) are rounded one at a time, most active input first (largest
    H[k, k]); the rounding error of row k, divided by the Cholesky factor of H^-1, is subtracted from
    the rows not yet rounded, which minimizes E||x @ (W - Q)||^2 greedily. Each row's block scales
    (absmax / 127, as `round_to_nearest`) are taken when the row is rounded, from its compensated
    values. damp * mean(diag H) is added to the diagonal. Returns (codes, scales) in
    `round_to_nearest`'s layout."""
    import numpy as np

    k_dim, n_dim = weight.shape
    w = weight.astype(np.float64).copy()
    h = np.array(moment, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[order][:, order]
    h += damp * np.mean(np.diag(h)) * np.eye(k_dim)
    # Upper Cholesky factor of H^-1: row k holds how the error of row k spreads over rows > k.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((k_dim, n_dim // block, block), dtype=np.int8)
    scales = np.zeros((k_dim, n_dim // block, 1), dtype=np.float32)
    for k in range(k_dim):
        code, scale = symmetric_codes(w[k].reshape(n_dim // block, block))
        error = (w[k] - (code.astype(np.float64) * scale).reshape(-1)) / u[k, k]
        w[k + 1:] -= np.outer(u[k, k + 1:], error)
        codes[k], scales[k] = code, scale
    inverse = np.empty_like(order)
    inverse[order] = np.arange(k_dim)
    return codes[inverse], scales[inverse]


def gptq_round_columns(weight: Any, moment: Any, block: int, damp: float = 0.01,
                       act_order: bool = False) -> tuple[Any, Any]:
    """GPTQ for y = x @ W, W [K, N], in MatMulNBits' layout: the blocks are `block` consecutive
    inputs k of one output column n, each with its own scale (the GPTQ paper's groups). The
    rounding error of each input, divided by the Cholesky factor of H^-1, is subtracted from the
    inputs not yet rounded. Order and scales: by default inputs are rounded in their natural order
    and a block's scales are taken when its first input is rounded (absmax / 127 of the block's
    compensated weights); with `act_order`, the most active inputs (largest H[k, k]) go first and
    every block's scales are taken from the weights before compensation ("static groups"; a
    compensated weight beyond them is clipped to +-127). K is padded to whole blocks with zero
    weights (code 0). damp * mean(diag H) is added to the diagonal.

    Returns codes int8 [N, ceil(K / block), block] in [-127, 127] and scales fp32 [N, ceil(K / block)]."""
    import numpy as np

    k_dim, n_dim = weight.shape
    blocks = -(-k_dim // block)
    w = weight.astype(np.float64).T.copy()  # [N, K]: one column of the loop below is one input k
    h = np.array(moment, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scales = np.zeros((n_dim, blocks), dtype=np.float32)
    order = np.arange(k_dim)
    if act_order:
        padded = np.zeros((n_dim, blocks * block))
        padded[:, :k_dim] = w
        absmax = np.abs(padded.reshape(n_dim, blocks, block)).max(-1)
        scales[:] = np.where(absmax > 0, absmax / 127.0, 1.0)
        order = np.argsort(-np.diag(h), kind="stable")
        w, h = w[:, order], h[order][:, order]
    h += damp * np.mean(np.diag(h)) * np.eye(k_dim)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((n_dim, blocks * block), dtype=np.int8)
    for j, k in enumerate(order):
        if not act_order and k % block == 0:
            absmax = np.abs(w[:, j:j + block]).max(-1)
            scales[:, k // block] = np.where(absmax > 0, absmax / 127.0, 1.0)
        scale = scales[:, k // block].astype(np.float64)
        code = np.clip(np.rint(w[:, j] / scale), -127, 127)
        codes[:, k] = code
        error = (w[:, j] - code * scale) / u[j, j]
        w[:, j + 1:] -= np.outer(error, u[j, j + 1:])
    return codes.reshape(n_dim, blocks, block), scales


def dequantize_columns(codes: Any, scales: Any, k_dim: int) -> Any:
    """The fp32 weight [K, N] that `gptq_round_columns`' codes and scales stand for."""
    import numpy as np

    n_dim = codes.shape[0]
    return (codes.astype(np.float32) * scales[..., None]).reshape(n_dim, -1)[:, :k_dim].T.copy()


def _matmul_nbits(x: str, output: str, codes: Any, scales: Any, k_dim: int, name: str, block: int,
                  inits: dict[str, Any]) -> Any:
    """A MatMulNBits node (8 bits, no zero points: uint8 code - 128) over int8 codes [N, blocks, block]."""
    import numpy as np
    from onnx import helper, numpy_helper

    n_dim = codes.shape[0]
    inits[f"{name}_q8"] = numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8), f"{name}_q8")
    inits[f"{name}_q8_scales"] = numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{name}_q8_scales")
    return helper.make_node("MatMulNBits", [x, f"{name}_q8", f"{name}_q8_scales"], [output], name=f"{name}_q8mm",
                            domain="com.microsoft", K=k_dim, N=n_dim, bits=8, block_size=block,
                            accuracy_level=INT8_ACCURACY_LEVEL)


def add_fp16_logit_rows(x: str, logits_q: str, logits: str, table: Any, rows: Any, name: str,
                        inits: dict[str, Any]) -> list[Any]:
    """Nodes that recompute the logits of the vocabulary `rows` of a tied lm_head (logits = x @ table^T,
    table [V, D]) from the rows stored in fp16, and write them over the int8 kernel's `logits_q`
    (last axis) as `logits`. The fp16 rows [D, r] are cast to fp32 once (constant folding when the
    session loads): 4 * D * r bytes of memory, 2 * D * r on disk."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rows = np.asarray(rows, dtype=np.int64)
    inits[f"{name}_f16_rows"] = numpy_helper.from_array(table[rows].T.astype(np.float16), f"{name}_f16_rows")
    inits[f"{name}_f16_index"] = numpy_helper.from_array(rows, f"{name}_f16_index")
    return [
        helper.make_node("Cast", [f"{name}_f16_rows"], [f"{name}_f16_float"], name=f"{name}_f16_cast",
                         to=TensorProto.FLOAT),
        helper.make_node("MatMul", [x, f"{name}_f16_float"], [f"{name}_f16_logits"], name=f"{name}_f16_matmul"),
        helper.make_node("Shape", [f"{name}_f16_logits"], [f"{name}_f16_shape"], name=f"{name}_f16_shape"),
        helper.make_node("Expand", [f"{name}_f16_index", f"{name}_f16_shape"], [f"{name}_f16_where"],
                         name=f"{name}_f16_expand"),
        helper.make_node("ScatterElements", [logits_q, f"{name}_f16_where", f"{name}_f16_logits"], [logits],
                         name=f"{name}_f16_scatter", axis=-1),
    ]


def quantize_weight_only(model: onnx.ModelProto, cfg: ExportConfig, moments: dict[str, Any] | None = None,
                         fp16_rows: Any = None) -> dict[str, int]:
    """8-bit weight-only quantization in place, weights in blocks of cfg.block_size:

    - an embedding table read by Gather becomes GatherBlockQuantized over uint8 codes (nearest);
    - a MatMul whose weight is the transpose of such a table (the tied lm_head) becomes MatMulNBits
      over the *same* codes and scales (MatMulNBits stores B as [N, K] blocks, i.e. the table's
      own layout), so the tied embedding is stored once; with `fp16_rows`, those rows' logits are
      recomputed from fp16 copies (`add_fp16_logit_rows`);
    - a MatMul with a constant weight whose input has second moments in `moments` (`calibrate`):
      MatMulNBits over GPTQ codes (`gptq_round_columns` with act_order, cfg.gptq_damp);
    - every other MatMul with a constant weight: onnxruntime's MatMulNBitsQuantizer (bits 8,
      symmetric, nearest).
    All MatMulNBits use accuracy_level INT8_ACCURACY_LEVEL (int8 dot products). Small tables (fewer
    than MIN_QUANTIZED_ELEMENTS) and tables whose width is not a multiple of the block size stay fp32.
    Returns counts per kind (gptq_weights, fp16_rows and fp16_rows_bytes with moments / fp16_rows)."""
    import numpy as np
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    bs = cfg.block_size
    tables: dict[str, tuple[Any, Any, Any]] = {}  # name -> (array, codes, scales)
    for node in graph.node:
        name = node.input[0] if node.op_type == "Gather" else None
        if name in inits and name not in tables:
            array = numpy_helper.to_array(inits[name])
            if array.ndim == 2 and array.size >= MIN_QUANTIZED_ELEMENTS and array.shape[1] % bs == 0 and \
                    _gather_axis(node) == 0:
                tables[name] = (array, *quantize_blocks(array, bs))
    stats = {"gather_block_quantized": 0, "tied_lm_head": 0, "matmul_nbits": 0}
    if moments is not None or fp16_rows is not None:
        stats.update(gptq_weights=0, fp16_rows=0, fp16_rows_bytes=0)
    new_inits: dict[str, Any] = {}

    def codes_and_scales(name: str) -> tuple[str, str]:
        _, codes, scales = tables[name]
        if f"{name}_q8" not in new_inits:
            new_inits[f"{name}_q8"] = numpy_helper.from_array(codes, f"{name}_q8")
            new_inits[f"{name}_q8_scales"] = numpy_helper.from_array(scales, f"{name}_q8_scales")
        return f"{name}_q8", f"{name}_q8_scales"

    nodes = []
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in tables:
            codes, scales = codes_and_scales(node.input[0])
            nodes.append(helper.make_node(
                "GatherBlockQuantized", [codes, node.input[1], scales], list(node.output), name=f"{node.name}_q8",
                domain="com.microsoft", bits=8, block_size=bs, gather_axis=0, quantize_axis=1))
            stats["gather_block_quantized"] += 1
            continue
        if node.op_type == "MatMul" and node.input[1] in inits:
            weight = numpy_helper.to_array(inits[node.input[1]])
            tied = next((t for t, (array, _, _) in tables.items()
                         if weight.shape == array.shape[::-1] and np.array_equal(weight, array.T)), None)
            if tied is not None:
                v, d = tables[tied][0].shape
                blob, flat_scales = f"{tied}_q8_blob", f"{tied}_q8_scales_flat"
                if blob not in new_inits:  # the same bytes as codes/scales: stored once (store_weights_once)
                    new_inits[blob] = numpy_helper.from_array(tables[tied][1].reshape(v, d // bs, bs), blob)
                    new_inits[flat_scales] = numpy_helper.from_array(tables[tied][2].reshape(-1), flat_scales)
                keep = None
                if fp16_rows is not None and len(fp16_rows) and v > int(np.max(fp16_rows)):
                    keep = np.asarray(fp16_rows, dtype=np.int64)
                output = f"{node.output[0]}_q8" if keep is not None else node.output[0]
                nodes.append(helper.make_node(
                    "MatMulNBits", [node.input[0], blob, flat_scales], [output], name=f"{node.name}_q8",
                    domain="com.microsoft", K=d, N=v, bits=8, block_size=bs, accuracy_level=INT8_ACCURACY_LEVEL))
                if keep is not None:
                    nodes += add_fp16_logit_rows(node.input[0], output, node.output[0], tables[tied][0], keep,
                                                 f"{tied}_lm_head", new_inits)
                    stats["fp16_rows"] += len(keep)
                    stats["fp16_rows_bytes"] += 2 * d * len(keep)
                stats["tied_lm_head"] += 1
                continue
            if moments is not None and weight.ndim == 2 and node.input[0] in moments:
                k_dim = weight.shape[0]
                # act_order: 96.8% identical to fp32 on 900 dev ids of a quick tiny student, natural order 96.2%.
                codes, scales = gptq_round_columns(weight, moments[node.input[0]], bs, cfg.gptq_damp, act_order=True)
                nodes.append(_matmul_nbits(node.input[0], node.output[0], codes, scales, k_dim,
                                           f"{node.input[1]}_{len(nodes)}", bs, new_inits))
                stats["gptq_weights"] += 1
                continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits.values())
    used = {name for node in graph.node for name in node.input}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    config = DefaultWeightOnlyQuantConfig(block_size=bs, is_symmetric=True, accuracy_level=INT8_ACCURACY_LEVEL, bits=8,
                                          op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    with _quiet(0):
        quantizer.process()
    model.CopyFrom(quantizer.model.model)
    stats["matmul_nbits"] = sum(n.op_type == "MatMulNBits" for n in model.graph.node) - stats["tied_lm_head"]
    return stats


def dequantize_int8_kernels(model: onnx.ModelProto, which: Any = None) -> int:
    """In place: every MatMulNBits (8 bits, no zero points) becomes a MatMul over its weight in fp32 and
    every GatherBlockQuantized (8 bits, gather axis 0, quantize axis 1) a Gather over its table in
    fp32. The graph then computes in fp32 with exactly the weights the int8 kernels hold: comparing
    the two isolates what int8 arithmetic (activations quantized per block) changes. `which`: a
    predicate on nodes to replace only some (e.g. the lm_head), to see what each layer costs.
    Returns the number of nodes replaced."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    attrs = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    nodes, added, replaced = [], [], 0
    for node in graph.node:
        if which is not None and not which(node):
            nodes.append(node)
            continue
        if node.op_type == "MatMulNBits" and len(node.input) == 3 and node.input[1] in inits:
            a = attrs(node)
            codes = numpy_helper.to_array(inits[node.input[1]]).astype(np.int16) - 128  # [N, blocks, block]
            scales = numpy_helper.to_array(inits[node.input[2]]).reshape(codes.shape[0], codes.shape[1])
            weight = dequantize_columns(codes, scales, int(a["K"]))
            added.append(numpy_helper.from_array(weight, f"{node.input[1]}_fp32_{replaced}"))
            nodes.append(helper.make_node("MatMul", [node.input[0], added[-1].name], list(node.output)))
        elif node.op_type == "GatherBlockQuantized" and node.input[0] in inits:
            a = attrs(node)
            codes = numpy_helper.to_array(inits[node.input[0]]).astype(np.int16) - 128  # [V, D]
            scales = numpy_helper.to_array(inits[node.input[2]])  # [V, D / block]
            table = (codes.reshape(*scales.shape, int(a["block_size"])) * scales[..., None]).reshape(codes.shape)
            added.append(numpy_helper.from_array(table.astype(np.float32), f"{node.input[0]}_fp32_{replaced}"))
            nodes.append(helper.make_node("Gather", [added[-1].name, node.input[1]], list(node.output), axis=0))
        else:
            nodes.append(node)
            continue
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    used = {name for node in graph.node for name in node.input}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)
    return replaced


def _gather_axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def quantize_dynamic_graph(src: Path, dst: Path, cfg: ExportConfig) -> None:
    """quantize_dynamic: int8 MatMul and Gather weights (per tensor or per channel), activations
    quantized per call (MatMulInteger); activation-activation MatMuls stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8
    with _quiet(0):
        quantize_dynamic(
            str(src), str(dst), weight_type=weight_type, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES), extra_options={"MatMulConstBOnly": True},
        )


# ----------------------------------------------------------------------------- one copy of each weight


def compact_graph(model: onnx.ModelProto) -> None:
    """Shrink a graph's own file (what is not weights): drop value_info (onnxruntime infers shapes
    when it loads the graph) and doc strings, clear node names and give intermediate tensors and
    initializers short names (t0, t1, ..., w0, w1, ...). Graph inputs and outputs keep their names.
    A graph with subgraphs (If, Loop) is left as it is."""
    graph = model.graph
    if any(a.type in (5, 10) for node in graph.node for a in node.attribute):  # GRAPH, GRAPHS
        return
    del graph.value_info[:]
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    rename = {t.name: f"w{i}" for i, t in enumerate(graph.initializer) if t.name not in keep}
    for tensor in graph.initializer:
        tensor.name = rename.get(tensor.name, tensor.name)
        tensor.doc_string = ""
    for node in graph.node:
        node.name, node.doc_string = "", ""
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in keep:
                rename[name] = node.output[i] = f"t{len(rename)}"
    graph.doc_string = ""



def tie_transposed_copies(model: onnx.ModelProto, min_elements: int = MIN_SHARED_BYTES // 4) -> int:
    """Replace each 2-D initializer that is the transpose of another one of the same graph (the
    exporter's constant folding stores a tied lm_head as a transposed copy of the embedding) by a
    Transpose node of the original; onnxruntime folds it again in memory when the session loads.
    Returns the number of copies removed."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) == 2}
    arrays = {n: a for n, a in arrays.items() if a.size >= min_elements}
    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    removed = []
    for name, array in arrays.items():
        if name in removed or name in gathered:  # an embedding table stays: the encoder graph stores it too
            continue
        source = next((other for other, a in arrays.items() if other != name and other not in removed
                       and a.shape == array.shape[::-1] and np.array_equal(a.T, array)), None)
        if source is None:
            continue
        graph.node.insert(0, helper.make_node("Transpose", [source], [name], name=f"{name}_tied", perm=[1, 0]))
        removed.append(name)
    for init in [t for t in graph.initializer if t.name in removed]:
        graph.initializer.remove(init)
    return len(removed)


def store_weights_once(out: Path, files: list[str], weights_file: str = WEIGHTS_FILE) -> dict[str, Any]:
    """Move the initializers of the graphs `files` (in `out`) into one external data file, each
    distinct content once: a tensor whose bytes another tensor (of any graph) already stored points
    at those bytes. A transposed copy of a weight becomes a Transpose node first
    (`tie_transposed_copies`) and the graphs are compacted (`compact_graph`). Returns {"file",
    "size_bytes", "tensors", "stored", "deduplicated_bytes", "tied_transposes"}."""
    import onnx
    from onnx import TensorProto, numpy_helper

    stored: dict[bytes, tuple[int, int]] = {}
    count = dedup = tied = 0
    with open(out / weights_file, "wb") as f:
        for fname in files:
            model = onnx.load(str(out / fname))
            tied += tie_transposed_copies(model)
            for tensor in model.graph.initializer:
                data = numpy_helper.to_array(tensor).tobytes()
                if len(data) < MIN_SHARED_BYTES:
                    continue
                key = hashlib.sha256(data).digest()
                if key in stored:
                    offset, length = stored[key]
                    dedup += length
                else:
                    pad = -f.tell() % WEIGHTS_ALIGNMENT
                    f.write(b"\0" * pad)
                    offset, length = f.tell(), len(data)
                    f.write(data)
                    stored[key] = (offset, length)
                count += 1
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                              "string_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                for key_name, value in (("location", weights_file), ("offset", offset), ("length", length)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key_name, str(value)
                tensor.data_location = TensorProto.EXTERNAL
            compact_graph(model)
            onnx.save(model, str(out / fname))
    return {"file": weights_file, "size_bytes": (out / weights_file).stat().st_size, "tensors": count,
            "stored": len(stored), "deduplicated_bytes": dedup, "tied_transposes": tied}


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
    from core.modeldir import weight_files

    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files (*.safetensors)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {"sha256": digest.hexdigest(), "files": [p.relative_to(model_dir).as_posix() for p in files]}


# A model directory's own tokenizer: one of these must exist, else transformers would make one up
# from the model type (a default T5 tokenizer with nothing in common with the model's vocabulary).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def check_has_tokenizer(model_dir: Path) -> None:
    """Refuse a model directory without its tokenizer (ModelDirError, one line) before any export work."""
    from core.modeldir import ModelDirError

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
                   model_config: dict[str, Any], labels: dict[str, list[str]] | None = None,
                   weights: dict[str, Any] | None = None) -> dict[str, Any]:
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
        "weights": weights,
        "size_bytes": export_size_bytes(graphs, weights),
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
    from core.fsutil import atomic_write_json

    atomic_write_json(out / MANIFEST, manifest)


def _replace(cfg: ExportConfig, **changes: Any) -> ExportConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


# ----------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    from core.config import config_help

    p = sub.add_parser(
        "export",
        help="export a model directory to ONNX (fp32, or int8 with --int8) with its tokenizer and a manifest",
        description=(
            "Export a text-to-text model directory (encoder -> cross-attention keys/values, and one decoder "
            "step over the KV cache) or an encoder NLU directory (one graph: intent and slot logits) to ONNX, "
            "optionally with int8 weights (default: weight-only, 8-bit codes in blocks with fp32 scales). "
            "--model may also be an fp32 export directory, which --int8 quantizes. The output directory is "
            "written atomically and holds the graphs, weights.bin (every weight once), tokenizer.json and "
            "manifest.json; serve it with `polyteacher predict`.\n\nconfig keys (export):\n"
            + config_help(ExportConfig)
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory (HF seq2seq, encoder NLU, or an fp32 ONNX export)")
    p.add_argument("--out", required=True, help="output directory: new, empty, or a previous export (replaced atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is not a previous export (never the run directory or --model)")
    p.add_argument("--int8", action="store_true",
                   help="store weights as int8 (sets int8=true; see quantization, block_size, weight_compute)")
    p.add_argument("--run-dir", default=None, help="run directory: relative --model/--out are resolved inside it")
    p.add_argument("--preset", default=None, help="preset name (launch/presets) or YAML path; section 'export'")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the export config, e.g. opset=17 per_channel=true")
    p.set_defaults(func=run_cli, lock_run_dir="run_dir")


def run_cli(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["int8=true"] if args.int8 else [])
    cfg = load_config(ExportConfig, section="export", preset=args.preset, overrides=overrides)
    model, out = Path(args.model), Path(args.out)
    if args.run_dir:
        from core.fsutil import safe_path

        model = model if model.is_absolute() else safe_path(args.run_dir, model)
        out = out if out.is_absolute() else safe_path(args.run_dir, out)
    export(model, out, cfg, run_dir=args.run_dir, overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "config": to_dict(cfg)}))
    return 0
