"""The export stage's config (`ExportConfig`, the `export` preset section) and its constants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from core.config import ConfigError
from core.locales import DEFAULT_LOCALES

if TYPE_CHECKING:
    pass


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
    calibration_locales: list[str] = field(default_factory=lambda: list(DEFAULT_LOCALES))
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
    smooth_alpha: float = 0.0
    """weight_compute=int8, rounding=gptq: SmoothQuant migration strength in [0, 1] (0: off). Each
    activation that feeds MatMuls and comes out of an RMSNorm gain or the gated feed-forward's product
    is divided per channel by s = rms(x)^alpha / max|W|^(1 - alpha), folded into that gain or the
    linear branch's weight, and the MatMuls' weight rows are multiplied by s (`smooth_activations`):
    the same function in exact arithmetic, flatter activations for the int8 kernel's per-block
    quantization. Chosen on dev ids with benchmarks/export.py."""
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
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"export.smooth_alpha: must be in [0, 1], got {self.smooth_alpha}")
        if self.smooth_alpha and (self.weight_compute != "int8" or self.rounding != "gptq"):
            raise ConfigError("export.smooth_alpha: smoothing needs the calibration moments and the int8 kernels "
                              f"(weight_compute=int8, rounding=gptq), got weight_compute={self.weight_compute}, "
                              f"rounding={self.rounding}")
        if self.parity_tolerance <= 0:
            raise ConfigError(f"export.parity_tolerance: must be > 0, got {self.parity_tolerance}")
