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
from pathlib import Path
from typing import Any

from core.config import load_config, to_dict
from student.export_config import (
    QUANTIZED_OP_TYPES,
    TOKENIZER_FILES,
    ExportConfig,
)
from student.kinds import ModelKind, kind_of
from student.onnx_graphs import describe_graph
from student.quantize import (
    calibrate,
    compact_graph,
    preprocess_graph,
    quantize_dynamic_graph,
    quantize_weight_only,
    quantize_weights_stored,
    smooth_activations,
    store_weights_once,
    tie_transposed_copies,
)
from student.runtime import FORMAT_VERSION, MANIFEST, read_manifest

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
    kind = kind_of(model_dir, "--model")
    if kind.is_export:  # an fp32 ONNX export is the other input --int8 takes
        if not cfg.int8:
            raise OutputPathError(f"--model {model_dir} is already an ONNX export (it has {MANIFEST}); give it "
                                  "--int8 to quantize it, or point --model at a model directory")
        manifest = read_manifest(model_dir)
        if manifest.get("precision") != "fp32":
            raise OutputPathError(f"{model_dir / MANIFEST}: precision is {manifest.get('precision')}; --int8 "
                                  "needs an fp32 export: point --model at one, or at the model directory")
    else:
        kind.check(model_dir, "--model")
        check_has_tokenizer(model_dir)
    check_output(out_dir, "onnx", run_dir, inputs=[model_dir], flag="--out", replace_any=overwrite)
    with output_lock(out_dir, f"polyteacher export --out {out_dir}"):
        return _export_locked(model_dir, kind, out_dir, cfg, overwrite)


def _export_locked(model_dir: Path, kind: ModelKind, out_dir: Path, cfg: ExportConfig, overwrite: bool) -> Path:
    from core.fsutil import atomic_dir

    started = time.time()
    with atomic_dir(out_dir, kind="onnx", user_overwrite=overwrite) as tmp:
        if kind.is_export:
            quantize_export(model_dir, tmp, cfg)
        elif cfg.int8:
            with tempfile.TemporaryDirectory(prefix=".fp32-", dir=out_dir.parent) as fp32_dir:
                export_fp32(model_dir, Path(fp32_dir), cfg, kind)
                quantize_export(Path(fp32_dir), tmp, cfg)
        else:
            export_fp32(model_dir, tmp, cfg, kind)
    manifest = read_manifest(out_dir)
    print(
        f"exported {manifest['kind']} {manifest['precision']} to {out_dir}: "
        f"{manifest['size_bytes'] / 1e6:.2f} MB in {time.time() - started:.1f}s",
        file=sys.stderr,
    )
    return out_dir


def export_fp32(model_dir: Path, out: Path, cfg: ExportConfig, kind: ModelKind | None = None) -> dict[str, Any]:
    """Write fp32 graphs, tokenizer and manifest of `model_dir` (of `kind`, else detected) into the
    (empty) directory `out`."""
    import torch

    kind = kind or kind_of(model_dir, "--model")
    torch.manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        traced = kind.export(model_dir, out, cfg)
    cfg, graphs = traced.cfg, traced.graphs
    weights = store_weights_once(out, [g["file"] for g in graphs.values()])
    graphs = {name: describe_graph(out / g["file"]) for name, g in graphs.items()}
    copy_tokenizer(model_dir, out)
    manifest = build_manifest(
        out, kind=kind.recorded_as, precision="fp32", graphs=graphs, cfg=cfg, source_dir=model_dir,
        parity=traced.parity, weights=weights, **traced.manifest
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
                    moments = calibration.moments[fname]
                    if cfg.smooth_alpha:
                        moments, smoothed = smooth_activations(proto, moments, cfg.smooth_alpha)
                        _add_counts(stats, {"smoothed_activations": smoothed})
                    _add_counts(stats, quantize_weight_only(
                        proto, cfg, moments=moments, fp16_rows=calibration.candidate_rows(cfg.fp16_candidate_rows)))
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
        if cfg.smooth_alpha:
            method["smooth_alpha"] = cfg.smooth_alpha
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


# ----------------------------------------------------------------------------- manifest




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
                   weights: dict[str, Any] | None = None, max_target_length: int | None = None,
                   num_decoder_layers: int | None = None) -> dict[str, Any]:
    """manifest.json of an export; `labels`, `max_target_length` and `num_decoder_layers` are the
    entries of the kinds that have them (student.kinds.TracedExport.manifest)."""
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
        "max_target_length": max_target_length,
        "model_config": model_config,
        "source_model": {"path": str(source_dir.resolve()), **weights_sha256(source_dir)},
        "parity_max_abs_diff": parity,
        "created": _created(),
    }
    if num_decoder_layers is not None:
        manifest["num_decoder_layers"] = num_decoder_layers
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
