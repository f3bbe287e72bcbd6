"""int8 weights of an exported graph: calibration on train utterances, GPTQ or nearest rounding in
blocks, the int8 kernels (MatMulNBits, GatherBlockQuantized) or dequantized constants, dynamic
quantization, and storing each weight once (`weights.bin`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from student.runtime import OnnxPredictor

if TYPE_CHECKING:
    import onnx
from student.export_config import (
    INT8_ACCURACY_LEVEL,
    MIN_QUANTIZED_ELEMENTS,
    MIN_SHARED_BYTES,
    QUANTIZED_OP_TYPES,
    WEIGHTS_ALIGNMENT,
    WEIGHTS_FILE,
    ExportConfig,
)

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
        ids, _, _ = predictor.encode([predictor.source_text(w) for w in words])
        input_ids, mask = predictor.pad(ids)
        if not predictor.graph_kind.decodes:
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


def smooth_activations(model: onnx.ModelProto, moments: dict[str, Any], alpha: float) -> tuple[dict[str, Any], int]:
    """SmoothQuant (Xiao et al., 2022) folded into the graph, in place, for int8 compute: an activation x
    whose consumers are MatMuls with constant weights W is divided per channel by
    s_j = rms(x_j)^alpha / max_n |W_jn|^(1 - alpha) (over all its consumers, normalised to geometric mean 1)
    and W's rows are multiplied by s, so x @ W is unchanged in exact arithmetic while the int8 kernel
    quantizes a flatter x per block. The division is folded into the producer of x, so no op is added:
    - x = Mul(v, g) with a constant 1-D g (the RMSNorm weight): g / s;
    - x = Mul(a, b) with b = MatMul(y, W1) over a constant W1 read only there (the gated feed-forward's
      linear branch): W1's columns / s.
    Other activations are left alone. rms(x_j) is sqrt(E[x_j^2]) from `calibrate`'s second moments.
    Returns the moments of the smoothed activations (E[x x^T] / s s^T, the others as given) and the
    number of activations smoothed."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            consumers.setdefault(name, []).append(node)
    for out in graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    producer = {out: node for node in graph.node for out in node.output}

    def constant(name: str) -> Any:
        """The initializer `name` as an array when this graph reads it once (safe to rewrite), else None."""
        return numpy_helper.to_array(inits[name]) if name in inits and uses.get(name) == 1 else None

    def set_constant(name: str, array: Any) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    def fold_target(x: str, width: int) -> tuple[str, Any] | None:
        """Where 1/s goes: (gain name, 1-D gain) or (W1 name, W1 [K, width]) of x's producer, else None."""
        fold = producer.get(x)
        if fold is None or fold.op_type != "Mul":
            return None
        for name, other in (fold.input, fold.input[::-1]):
            gain = constant(name)
            if gain is not None and gain.shape == (width,):
                return name, gain
            linear = producer.get(other)
            if linear is not None and linear.op_type == "MatMul" and uses.get(other) == 1:
                w1 = constant(linear.input[1])
                if w1 is not None and w1.ndim == 2 and w1.shape[1] == width:
                    return linear.input[1], w1
        return None

    smoothed = dict(moments)
    count = 0
    for x, moment in moments.items():
        width = moment.shape[0]
        readers = consumers.get(x, [])
        weights = {n.input[1]: constant(n.input[1]) for n in readers if n.op_type == "MatMul" and n.input[0] == x}
        # Shape reads only the shape of x; anything else would see the scaled values.
        if (not weights or any(w is None or w.ndim != 2 or w.shape[0] != width for w in weights.values())
                or any(n.op_type != "Shape" and not (n.op_type == "MatMul" and n.input[0] == x) for n in readers)):
            continue
        target = fold_target(x, width)
        if target is None:
            continue
        rms = np.sqrt(np.maximum(np.diag(moment), 0.0))
        wmax = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        live = (rms > 0) & (wmax > 0)
        s = np.ones_like(rms)
        s[live] = rms[live] ** alpha / wmax[live] ** (1.0 - alpha)
        s[live] /= np.exp(np.mean(np.log(s[live])))
        name, array = target
        set_constant(name, array / s)  # a gain [width] or W1's columns [K, width]: broadcasting divides the last axis
        for weight_name, w in weights.items():
            set_constant(weight_name, w * s[:, None])
        smoothed[x] = moment / np.outer(s, s)
        count += 1
    return smoothed, count


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
