"""Teacher model sizes, from a 2 M-parameter test model to AlexaTM 20B, built as T5 models.

Why `transformers.T5ForConditionalGeneration` (T5 / mT5 style):

- pre-LN with RMSNorm (T5LayerNorm, no mean subtraction, no bias), the normalisation placement
  that AlexaTM 20B chose for stable large-scale training;
- relative position bias (bucketed, shared per stack) instead of learned absolute positions, so
  there is no hard length limit from a position table and no embedding to resize for longer data;
- gated-GELU feed-forward as mT5 (`feed_forward_proj="gated-gelu"`); AlexaTM's plain GELU FFN is
  available as `"gelu"` and used by the `alexatm-20b` preset so its size matches the paper;
- native sentinel span corruption (`<extra_id_N>` tokens, decoder start = pad) for the T5
  denoising variant in `data_prep.objectives`;
- a well-trodden ONNX export path with a KV cache (encoder, decoder-with-past), which
  `student/export.py` relies on.

Sizes: `tiny` (tests), `small` (CPU runs), `base`/`large`/`xl` (the mT5 shapes) and
`alexatm-20b` (46 encoder / 32 decoder layers, d_model 4096, 32 heads, d_ff 16384, 150k vocab).
A `ModelConfig` names a preset and may override any size field; `resolve()` gives the concrete
`ModelSpec`.

Vocabulary: the embedding size is the tokenizer's size rounded up to a multiple of
`pad_vocab_to_multiple_of` (128 by default, as T5's 32100 -> 32128) so the embedding and output
matmuls get tensor-core friendly shapes. The extra rows are never produced by the tokenizer; a
fast tokenizer's `decode` skips them if an untrained model emits them.

Word embeddings and output layer:

- tied (`tiny`, `small`): `lm_head.weight` is `shared.weight`, and T5 rescales the decoder output
  by d_model**-0.5 before the tied projection (`config.scale_decoder_outputs = True`). This
  saves V x d parameters, a large share of a small model. An ONNX export must fold that scale
  (or keep the multiply) in front of the tied `lm_head`.
- untied (`base` .. `alexatm-20b`, as mT5): a separate `lm_head` without the rescale.
  transformers 5 always ties T5's embeddings when it builds a model from a config, so
  `build_model` gives `lm_head` its own parameter (initialised N(0, d_model**-0.5) so the initial
  logits are O(1)) and drops it from the tie map. `save_pretrained` then writes both tensors and
  `from_pretrained` keeps them apart (it logs a warning that the two differ: expected). Do not
  call `model.tie_weights()` on such a model: it would re-tie them.

Parameter counts are analytic (`count_parameters`, no allocation, works for 20B) and equal to the
built model's `numel` (tested); `model_flops_per_token` counts training FLOPs for MFU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal, Optional

from core.config import ConfigError

if TYPE_CHECKING:  # heavy imports stay inside functions: the CLI imports this module at start-up
    from transformers import T5Config, T5ForConditionalGeneration

FeedForward = Literal["relu", "gelu", "gated-gelu", "gated-silu"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Concrete sizes of a teacher (a preset with its overrides applied)."""

    name: str
    num_layers: int
    num_decoder_layers: int
    d_model: int
    num_heads: int
    d_kv: int
    d_ff: int
    feed_forward_proj: str
    tie_word_embeddings: bool
    dropout: float
    reference_vocab_size: int
    """Vocabulary the preset is sized for; used only when no tokenizer is at hand (plan)."""
    vocab_size: Optional[int] = None
    """An explicit vocabulary size (ModelConfig.vocab_size), else None: from the tokenizer."""
    pad_vocab_to_multiple_of: int = 128
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections: num_heads * d_kv."""
        return self.num_heads * self.d_kv

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_t5_config(cls, config: Any, name: str = "model") -> ModelSpec:
        """The spec of an existing T5 (e.g. loaded from a directory), for parameter and FLOP counts.

        Tying is read from `scale_decoder_outputs`: transformers 5 reports
        `tie_word_embeddings=True` for every T5 config, untied ones included.
        """
        return cls(
            name=name, num_layers=config.num_layers, num_decoder_layers=config.num_decoder_layers,
            d_model=config.d_model, num_heads=config.num_heads, d_kv=config.d_kv, d_ff=config.d_ff,
            feed_forward_proj=config.feed_forward_proj,
            tie_word_embeddings=bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)),
            dropout=config.dropout_rate, reference_vocab_size=config.vocab_size, vocab_size=config.vocab_size,
            pad_vocab_to_multiple_of=1,
            relative_attention_num_buckets=config.relative_attention_num_buckets,
            relative_attention_max_distance=config.relative_attention_max_distance,
            layer_norm_epsilon=config.layer_norm_epsilon,
        )

    def padded_vocab_size(self, vocab_size: Optional[int] = None) -> int:
        """Embedding rows: the tokenizer's size (or the explicit/reference one) rounded up."""
        size = vocab_size if vocab_size is not None else (self.vocab_size or self.reference_vocab_size)
        multiple = max(1, self.pad_vocab_to_multiple_of)
        return int(math.ceil(size / multiple) * multiple)


# Dropout 0 in pretraining, as T5 v1.1 / mT5 (it was a quality win there); fine-tuning stages set
# their own.
def _gated_gelu(
    name: str, layers: int, d_model: int, num_heads: int, d_kv: int, d_ff: int, tied: bool, vocab: int
) -> ModelSpec:
    """A T5 v1.1 / mT5-style preset: gated-GELU FFN, as many decoder as encoder layers, dropout 0."""
    return ModelSpec(
        name=name, num_layers=layers, num_decoder_layers=layers, d_model=d_model, num_heads=num_heads,
        d_kv=d_kv, d_ff=d_ff, feed_forward_proj="gated-gelu", tie_word_embeddings=tied, dropout=0.0,
        reference_vocab_size=vocab,
    )


# mT5 shapes from the mT5 paper (Xue et al., 2021), vocab 250112.
PRESETS: dict[str, ModelSpec] = {
    #                             layers d_model heads d_kv  d_ff   tied   vocab
    "tiny": _gated_gelu("tiny",       2,   128,   4,   32,   384,  True,    8000),
    "small": _gated_gelu("small",     6,   256,   4,   64,   768,  True,   32000),
    "base": _gated_gelu("base",      12,   768,  12,   64,  2048, False, 250112),
    "large": _gated_gelu("large",    24,  1024,  16,   64,  2816, False, 250112),
    "xl": _gated_gelu("xl",          24,  2048,  32,   64,  5120, False, 250112),
    # AlexaTM 20B (Soltan et al., 2022): 46 encoder / 32 decoder layers, d_model 4096, 32 heads,
    # d_ff 16384, 150k vocabulary, pre-LN. Plain GELU FFN and untied output layer give 19.1 B
    # parameters; a gated FFN would give 23 B.
    "alexatm-20b": ModelSpec(
        name="alexatm-20b", num_layers=46, num_decoder_layers=32, d_model=4096, num_heads=32, d_kv=128,
        d_ff=16384, feed_forward_proj="gelu", tie_word_embeddings=False, dropout=0.0,
        reference_vocab_size=150000,
    ),
}


@dataclasses.dataclass
class ModelConfig:
    """A named teacher size plus optional per-field overrides (null = the preset's value)."""

    preset: str = "tiny"
    """Model size preset: tiny (tests, ~2 M params), small (CPU runs, ~20 M), base, large, xl (mT5 shapes) or alexatm-20b."""
    num_layers: Optional[int] = None
    """Encoder layers (null = preset)."""
    num_decoder_layers: Optional[int] = None
    """Decoder layers (null = preset)."""
    d_model: Optional[int] = None
    """Hidden width (null = preset)."""
    num_heads: Optional[int] = None
    """Attention heads (null = preset)."""
    d_kv: Optional[int] = None
    """Width of one attention head (null = preset when d_model and num_heads are not overridden, else d_model / num_heads)."""
    d_ff: Optional[int] = None
    """Feed-forward inner width (null = preset)."""
    dropout: Optional[float] = None
    """Dropout rate in every block (null = preset: 0.0, as T5 v1.1 pretraining)."""
    feed_forward_proj: Optional[FeedForward] = None
    """Feed-forward type: gated-gelu (mT5), gelu (AlexaTM), relu (T5 v1.0), gated-silu (null = preset)."""
    tie_word_embeddings: Optional[bool] = None
    """Share the input embedding with the output layer (null = preset: tied for tiny/small, untied for base and up)."""
    vocab_size: Optional[int] = None
    """Vocabulary size; null = from the tokenizer (len(tokenizer)), which is the normal case."""
    pad_vocab_to_multiple_of: int = 128
    """Round the embedding rows up to a multiple of this (1 = no padding) for efficient matmuls."""

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(
                f"model.preset: {self.preset!r} is not a model preset; allowed values: {', '.join(PRESETS)}"
            )
        for name in ("num_layers", "num_decoder_layers", "d_model", "num_heads", "d_kv", "d_ff", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name}: must be a positive integer, got {value}")
        if self.pad_vocab_to_multiple_of <= 0:
            raise ConfigError(f"model.pad_vocab_to_multiple_of: must be >= 1, got {self.pad_vocab_to_multiple_of}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.d_kv is None and (self.d_model is not None or self.num_heads is not None):
            spec = PRESETS[self.preset]
            d_model = self.d_model or spec.d_model
            num_heads = self.num_heads or spec.num_heads
            if d_model % num_heads:
                raise ConfigError(
                    f"model.d_model ({d_model}) is not divisible by model.num_heads ({num_heads}); "
                    "change one of them or set model.d_kv explicitly"
                )

    def resolve(self) -> ModelSpec:
        """The preset with the non-null overrides applied."""
        self.validate()
        spec = PRESETS[self.preset]
        changes: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "num_layers", "num_decoder_layers", "d_model", "num_heads", "d_ff", "dropout",
                "feed_forward_proj", "tie_word_embeddings", "vocab_size",
            )
            if getattr(self, name) is not None
        }
        if self.d_kv is not None:
            changes["d_kv"] = self.d_kv
        elif self.d_model is not None or self.num_heads is not None:
            changes["d_kv"] = (self.d_model or spec.d_model) // (self.num_heads or spec.num_heads)
        changes["pad_vocab_to_multiple_of"] = self.pad_vocab_to_multiple_of
        return dataclasses.replace(spec, **changes)


def _spec(model_cfg: ModelConfig | ModelSpec | str) -> ModelSpec:
    if isinstance(model_cfg, ModelSpec):
        return model_cfg
    if isinstance(model_cfg, str):
        model_cfg = ModelConfig(preset=model_cfg)
    return model_cfg.resolve()


# ----------------------------------------------------------------------------- parameter count


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Parameters of a built model, by part (a tied output layer counts once, in `embeddings`)."""

    vocab_size: int
    """Embedding rows (the padded vocabulary)."""
    embeddings: int
    """Shared input embedding (encoder and decoder)."""
    lm_head: int
    """Separate output layer; 0 when tied to the embedding."""
    encoder: int
    """Encoder blocks, relative position bias and final norm."""
    decoder: int
    """Decoder blocks, relative position bias and final norm."""
    largest_layer: int
    """Largest single module's parameters (what ZeRO-3 gathers at once): a block or the embedding."""

    @property
    def total(self) -> int:
        return self.embeddings + self.lm_head + self.encoder + self.decoder


def _ffn_params(spec: ModelSpec) -> int:
    # wi (or wi_0 and wi_1 when gated): d_model x d_ff each; wo: d_ff x d_model; no biases in T5.
    return (3 if spec.is_gated else 2) * spec.d_model * spec.d_ff


def _attention_params(spec: ModelSpec) -> int:
    # q, k, v: d_model -> inner; o: inner -> d_model; no biases.
    return 4 * spec.d_model * spec.inner_dim


def count_parameters(model_cfg: ModelConfig | ModelSpec | str, vocab_size: Optional[int] = None) -> ParameterCount:
    """Exact parameter count of `build_model(model_cfg, vocab_size)` without building it.

    `vocab_size` is the tokenizer's size before padding (None = ModelConfig.vocab_size, else the
    preset's reference vocabulary). Matches `sum(p.numel() for p in model.parameters())`.
    """
    spec = _spec(model_cfg)
    vocab = spec.padded_vocab_size(vocab_size)
    d = spec.d_model
    bias = spec.relative_attention_num_buckets * spec.num_heads  # one table per stack, in block 0
    encoder_block = _attention_params(spec) + _ffn_params(spec) + 2 * d  # 2 RMSNorm weights
    decoder_block = 2 * _attention_params(spec) + _ffn_params(spec) + 3 * d
    encoder = spec.num_layers * encoder_block + bias + d  # + final RMSNorm
    decoder = spec.num_decoder_layers * decoder_block + bias + d
    embeddings = vocab * d
    return ParameterCount(
        vocab_size=vocab,
        embeddings=embeddings,
        lm_head=0 if spec.tie_word_embeddings else vocab * d,
        encoder=encoder,
        decoder=decoder,
        largest_layer=max(embeddings, encoder_block + bias, decoder_block + bias),
    )


# ----------------------------------------------------------------------------- FLOPs


def model_flops_per_example(
    model_cfg: ModelConfig | ModelSpec | str, vocab_size: Optional[int], src_len: int, tgt_len: int
) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one example, `src_len` encoder tokens
    and `tgt_len` decoder tokens.

    Counted exactly for every matmul (2 FLOPs per multiply-add), the way MFU is defined (model
    FLOPs: activation recomputation is not counted; norms, softmax and the embedding lookup are
    negligible and left out):
      encoder layer:  2 src (4 d i + f d d_ff)            projections and FFN
                      + 4 src^2 i                         QK^T and AV
      decoder layer:  2 tgt (4 d i) + 4 tgt^2 i           self-attention (full square, as PaLM's MFU)
                      + 2 tgt (2 d i) + 2 src (2 d i)     cross-attention q, o on targets; k, v on the
                      + 4 tgt src i                       encoder output; QK^T and AV
                      + 2 tgt f d d_ff                    FFN
      output layer:   2 tgt d V
    with i = num_heads * d_kv, f = 3 for a gated FFN else 2, V the padded vocabulary.
    """
    spec = _spec(model_cfg)
    d, i, vocab = spec.d_model, spec.inner_dim, spec.padded_vocab_size(vocab_size)
    ffn = (3 if spec.is_gated else 2) * d * spec.d_ff
    encoder_layer = 2 * src_len * (4 * d * i + ffn) + 4 * src_len**2 * i
    decoder_layer = (
        2 * tgt_len * 4 * d * i + 4 * tgt_len**2 * i
        + 2 * tgt_len * 2 * d * i + 2 * src_len * 2 * d * i + 4 * tgt_len * src_len * i
        + 2 * tgt_len * ffn
    )
    forward = spec.num_layers * encoder_layer + spec.num_decoder_layers * decoder_layer + 2 * tgt_len * d * vocab
    return 3.0 * float(forward)


def model_flops_per_token(
    model_cfg: ModelConfig | ModelSpec | str, vocab_size: Optional[int], src_len: int, tgt_len: int
) -> float:
    """Training FLOPs per processed token, where an example of `src_len` encoder tokens and
    `tgt_len` decoder tokens counts `src_len + tgt_len` tokens.

    MFU = (encoder + decoder tokens per second) * this / peak FLOPs per second. For a quick
    check: this is close to 6 * N_non_embedding / 2 + 6 d V tgt / (src + tgt) when src = tgt,
    because each token passes through only one of the two stacks.
    """
    if src_len + tgt_len <= 0:
        raise ValueError("src_len + tgt_len must be positive")
    return model_flops_per_example(model_cfg, vocab_size, src_len, tgt_len) / (src_len + tgt_len)


# ----------------------------------------------------------------------------- build


def _vocab_and_ids(tokenizer_or_vocab: Any, special_ids: Any) -> tuple[Optional[int], int, int]:
    """(tokenizer size or None, pad id, eos id)."""
    if isinstance(tokenizer_or_vocab, int):
        size = tokenizer_or_vocab
        pad, eos = 0, 1
    elif tokenizer_or_vocab is None:
        size, pad, eos = None, 0, 1
    else:
        size = len(tokenizer_or_vocab)
        # polyteacher tokenizers are checked when loaded (data_prep.tokenizer.load_tokenizer: <pad>=0,
        # </s>=1); a foreign T5 tokenizer names its own.
        pad = tokenizer_or_vocab.pad_token_id
        eos = tokenizer_or_vocab.eos_token_id
    if special_ids is not None:
        pad, eos = special_ids.pad, special_ids.eos
    if pad is None or eos is None:
        raise ValueError("the tokenizer defines no pad or eos token; polyteacher tokenizers use <pad>=0, </s>=1")
    return size, int(pad), int(eos)


def t5_config(
    model_cfg: ModelConfig | ModelSpec | str,
    tokenizer_or_vocab: Any = None,
    special_ids: Any = None,
) -> T5Config:
    """The `transformers.T5Config` for a teacher: padded vocabulary, pad/eos from the tokenizer,
    decoder start = pad (T5 convention)."""
    from transformers import T5Config

    spec = _spec(model_cfg)
    size, pad, eos = _vocab_and_ids(tokenizer_or_vocab, special_ids)
    vocab = spec.padded_vocab_size(size)
    if size is not None and size > vocab:
        raise ValueError(f"tokenizer has {size} tokens but the model only {vocab} embedding rows")
    if spec.vocab_size is not None and size is not None and spec.vocab_size < size:
        raise ConfigError(f"model.vocab_size={spec.vocab_size} is smaller than the tokenizer ({size} tokens)")
    if max(pad, eos) >= vocab:
        raise ValueError(f"special ids pad={pad}, eos={eos} do not fit a vocabulary of {vocab}")
    return T5Config(
        vocab_size=vocab,
        d_model=spec.d_model,
        d_kv=spec.d_kv,
        d_ff=spec.d_ff,
        num_layers=spec.num_layers,
        num_decoder_layers=spec.num_decoder_layers,
        num_heads=spec.num_heads,
        relative_attention_num_buckets=spec.relative_attention_num_buckets,
        relative_attention_max_distance=spec.relative_attention_max_distance,
        dropout_rate=spec.dropout,
        layer_norm_epsilon=spec.layer_norm_epsilon,
        feed_forward_proj=spec.feed_forward_proj,
        # False switches off T5's d_model**-0.5 output rescale; the untying itself is build_model's.
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
        is_encoder_decoder=True,
    )


def build_model(
    model_cfg: ModelConfig | ModelSpec | str,
    tokenizer_or_vocab: Any = None,
    special_ids: Any = None,
    seed: Optional[int] = None,
) -> T5ForConditionalGeneration:
    """A randomly initialised teacher.

    `tokenizer_or_vocab`: a tokenizer (its `len()` sets the vocabulary; pad/eos from
    `data_prep.tokenizer.special_ids` or the tokenizer) or an int vocabulary size (pad=0, eos=1)
    or None (ModelConfig.vocab_size, else the preset's reference vocabulary). `special_ids`
    (anything with `.pad` and `.eos`) overrides the ids. `seed` seeds torch's RNG first, so the
    same seed gives the same weights.
    """
    return init_t5(t5_config(model_cfg, tokenizer_or_vocab, special_ids), seed)


def init_t5(config: Any, seed: Optional[int] = None) -> T5ForConditionalGeneration:
    """Random weights for a T5 config (ours, or one read back from a model directory); `seed` seeds
    torch's RNG first. An untied model's lm_head gets its own weights (see module doc)."""
    import torch
    from transformers import T5ForConditionalGeneration

    if seed is not None:
        torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    if not getattr(config, "scale_decoder_outputs", config.tie_word_embeddings):
        untie_lm_head(model)
    return model


def interpolate_with_fresh_init(model: Any, weight: float, seed: int) -> None:
    """Pull a pretrained T5 part of the way back to a fresh start, in place: every parameter becomes
    `weight * pretrained + (1 - weight) * fresh`, where `fresh` is the same architecture randomly
    initialised as `build_model` does (seeded by `seed`, so with the seed of a from-scratch reference
    it is that reference's start). weight 1 leaves the model as it is, 0 is the fresh start.

    Why: a network warm-started from weights trained on another objective can generalise worse
    than one from random weights, and shrinking toward a fresh initialisation restores it (Ash &
    Adams 2020, "On warm-starting neural network training"). On `small` the denoising teacher's
    encoder holds less linearly readable intent than random features (benchmarks/transfer.py)."""
    import torch

    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolation weight {weight} must be in [0, 1]")
    if weight == 1.0:
        return
    fresh_params = dict(init_t5(model.config, seed).named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.mul_(weight).add_(fresh_params[name].to(param.dtype), alpha=1.0 - weight)


def untie_lm_head(model: Any) -> None:
    """Give a T5 model's `lm_head` its own parameter, N(0, d_model**-0.5), out of the tie map."""
    import torch

    shared = model.shared.weight
    weight = torch.empty_like(shared).normal_(mean=0.0, std=model.config.d_model**-0.5)
    model.lm_head.weight = torch.nn.Parameter(weight)
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)
