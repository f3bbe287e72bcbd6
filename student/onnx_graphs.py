"""ONNX graphs of a model: loading, the tracing wrappers (encoder -> cross-attention K/V, one decoder
step over the KV cache; the encoder NLU model in one graph) and parity against PyTorch at export time."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
from student.export_config import (
    SEQ2SEQ_GRAPHS,
    ExportConfig,
)

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
