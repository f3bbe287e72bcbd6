"""Student sizes as fractions of the teacher, and initialisation from the teacher's layers.

Presets (`STUDENT_PRESETS`; every field can be overridden in `StudentConfig`):

| preset       | encoder/decoder layers | width (d_model, d_ff, heads) | initialisation        |
| ------------ | ---------------------- | ---------------------------- | --------------------- |
| `same`       | all                    | teacher's                    | copy of the teacher   |
| `half_depth` | every other layer      | teacher's                    | mapped teacher layers |
| `quarter`    | every fourth layer     | teacher's                    | mapped teacher layers |
| `narrow`     | all                    | half                         | from scratch          |
| `half_narrow`| every other layer      | half                         | from scratch          |

Layer map (`layer_map`): student layer j of k is initialised from teacher layer floor(j * L / k) of L,
i.e. layers 0, 2, 4, ... for half depth and 0, 4, 8, ... for a quarter. Layer 0 is always in the
map: in T5 the relative attention bias table is a parameter of block 0 (shared by the whole
stack), so the student keeps the teacher's position bias. The shared embedding, the final
RMSNorms of both stacks and an untied `lm_head` are copied too. This applies when the widths match
(d_model, d_kv, num_heads, d_ff and the feed-forward type); otherwise the student starts from
scratch (`init="teacher"` then fails at start-up).

The student shares the teacher's tokenizer and padded vocabulary (its config is the teacher's with
the sizes changed); `check_vocabulary` verifies at start-up that the tokenizer the data was made
with is the teacher's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from core.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, T5Config


@dataclasses.dataclass(frozen=True)
class StudentShape:
    depth_fraction: float
    """Fraction of the teacher's layers (per stack), at least one layer."""
    width_fraction: float
    """Fraction of the teacher's d_model, d_ff and heads (d_kv is kept)."""


STUDENT_PRESETS: dict[str, StudentShape] = {
    "same": StudentShape(1.0, 1.0),
    "half_depth": StudentShape(0.5, 1.0),
    "quarter": StudentShape(0.25, 1.0),
    "narrow": StudentShape(1.0, 0.5),
    "half_narrow": StudentShape(0.5, 0.5),
}


@dataclasses.dataclass
class StudentConfig:
    """A student size relative to the teacher, plus optional explicit overrides."""

    preset: str = "half_depth"
    """Student preset: same, half_depth (every other layer), quarter (every fourth layer), narrow (half width, from scratch) or half_narrow."""
    num_layers: Optional[int] = None
    """Encoder layers (null = preset fraction of the teacher's)."""
    num_decoder_layers: Optional[int] = None
    """Decoder layers (null = preset fraction of the teacher's)."""
    d_model: Optional[int] = None
    """Hidden width (null = preset fraction of the teacher's)."""
    d_ff: Optional[int] = None
    """Feed-forward inner width (null = preset fraction of the teacher's)."""
    num_heads: Optional[int] = None
    """Attention heads (null = preset fraction of the teacher's; d_kv stays the teacher's)."""
    dropout: Optional[float] = None
    """Dropout rate (null = the teacher's)."""
    init: Literal["auto", "teacher", "scratch"] = "auto"
    """Initialisation: auto (mapped teacher layers when the widths match, else scratch), teacher (require the mapping) or scratch."""

    def validate(self) -> None:
        if self.preset not in STUDENT_PRESETS:
            raise ConfigError(
                f"distill.student.preset: {self.preset!r} is not a student preset; allowed values: "
                + ", ".join(STUDENT_PRESETS)
            )
        for name in ("num_layers", "num_decoder_layers", "d_model", "d_ff", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"distill.student.{name}: must be >= 1, got {value}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"distill.student.dropout: must be in [0, 1), got {self.dropout}")


def _scaled(value: int, fraction: float) -> int:
    return max(1, int(round(value * fraction)))


def student_config(teacher_config: T5Config, cfg: StudentConfig) -> T5Config:
    """The student's T5Config: the teacher's (vocabulary, special ids, position buckets, norms) with
    the preset's sizes and the explicit overrides."""
    cfg.validate()
    shape = STUDENT_PRESETS[cfg.preset]
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    config.num_layers = cfg.num_layers or _scaled(teacher_config.num_layers, shape.depth_fraction)
    config.num_decoder_layers = cfg.num_decoder_layers or _scaled(
        teacher_config.num_decoder_layers, shape.depth_fraction
    )
    config.d_model = cfg.d_model or _scaled(teacher_config.d_model, shape.width_fraction)
    config.d_ff = cfg.d_ff or _scaled(teacher_config.d_ff, shape.width_fraction)
    config.num_heads = cfg.num_heads or _scaled(teacher_config.num_heads, shape.width_fraction)
    if cfg.dropout is not None:
        config.dropout_rate = cfg.dropout
    return config


def widths_match(teacher_config: T5Config, config: T5Config) -> bool:
    """Whether teacher blocks can be copied into the student's blocks unchanged."""
    keys = ("d_model", "d_kv", "num_heads", "d_ff", "feed_forward_proj", "relative_attention_num_buckets")
    return all(getattr(teacher_config, k) == getattr(config, k) for k in keys)


def layer_map(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Teacher layer index for each student layer: floor(j * L / k); starts at 0 (see module doc)."""
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ConfigError(
            f"a student with {num_student_layers} layers cannot be initialised from a teacher with "
            f"{num_teacher_layers} layers (needs 1 <= student layers <= teacher layers)"
        )
    return [j * num_teacher_layers // num_student_layers for j in range(num_student_layers)]


@dataclasses.dataclass
class StudentInit:
    """How a student was initialised (written into the run's metrics and the student's directory)."""

    from_teacher: bool
    encoder_layers: list[int]
    """Teacher encoder layer copied into each student encoder layer (empty when from scratch)."""
    decoder_layers: list[int]
    num_parameters: int
    teacher_parameters: int


def build_student(teacher: PreTrainedModel, cfg: StudentConfig, seed: int | None = None) -> tuple[Any, StudentInit]:
    """A student T5 for `teacher`: mapped teacher layers when the widths match (unless
    init=scratch), else a random initialisation (seeded by `seed`)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from core.models import untie_lm_head

    config = student_config(teacher.config, cfg)
    mapped = widths_match(teacher.config, config)
    if cfg.init == "teacher" and not mapped:
        raise ConfigError(
            "distill.student.init=teacher needs the teacher's width (d_model, d_kv, num_heads, d_ff); "
            f"the student has d_model={config.d_model}, num_heads={config.num_heads}, d_ff={config.d_ff}, the "
            f"teacher d_model={teacher.config.d_model}, num_heads={teacher.config.num_heads}, "
            f"d_ff={teacher.config.d_ff}; use init=auto or scratch"
        )
    from_teacher = mapped and cfg.init != "scratch"
    if seed is not None:
        torch.manual_seed(seed)
    student = AutoModelForSeq2SeqLM.from_config(config)
    # core.models convention: an untied lm_head is marked by scale_decoder_outputs=False.
    untied = not getattr(config, "scale_decoder_outputs", True)
    if untied and student.lm_head.weight is student.shared.weight:
        untie_lm_head(student)
    enc_map: list[int] = []
    dec_map: list[int] = []
    if from_teacher:
        enc_map = layer_map(teacher.config.num_layers, config.num_layers)
        dec_map = layer_map(teacher.config.num_decoder_layers, config.num_decoder_layers)
        with torch.no_grad():
            student.shared.weight.copy_(teacher.shared.weight)
            _copy_stack(teacher.encoder, student.encoder, enc_map)
            _copy_stack(teacher.decoder, student.decoder, dec_map)
            if untied:
                student.lm_head.weight.copy_(teacher.lm_head.weight)
    info = StudentInit(
        from_teacher=from_teacher,
        encoder_layers=enc_map,
        decoder_layers=dec_map,
        num_parameters=sum(p.numel() for p in student.parameters()),
        teacher_parameters=sum(p.numel() for p in teacher.parameters()),
    )
    return student, info


def _copy_stack(teacher_stack: Any, student_stack: Any, mapping: list[int]) -> None:
    for j, i in enumerate(mapping):
        state = dict(teacher_stack.block[i].state_dict())
        bias_keys = [k for k in student_stack.block[j].state_dict() if "relative_attention_bias" in k]
        for key in bias_keys:  # T5 keeps the stack's position bias in block 0 (see module doc)
            state[key] = teacher_stack.block[0].state_dict()[key]
        state = {k: v for k, v in state.items() if "relative_attention_bias" not in k or k in bias_keys}
        student_stack.block[j].load_state_dict(state, strict=True)
    student_stack.final_layer_norm.load_state_dict(teacher_stack.final_layer_norm.state_dict())


def check_vocabulary(teacher_tokenizer: Any, teacher_dir: str | Path, data_tokenizer: Any, data_dir: str | Path,
                     embedding_rows: int | None = None) -> None:
    """Fail with both sizes and directories when the data's tokenizer is not the teacher's."""
    teacher_size, data_size = len(teacher_tokenizer), len(data_tokenizer)
    if teacher_size != data_size or teacher_tokenizer.get_vocab() != data_tokenizer.get_vocab():
        raise ConfigError(
            f"tokenizer mismatch: the teacher {teacher_dir} has a vocabulary of {teacher_size} tokens, the "
            f"tokenizer of the data {data_dir} has {data_size} tokens"
            + ("" if teacher_size != data_size else " (same size, different tokens)")
            + "; the student shares the teacher's tokenizer, so distil on data made with the teacher's tokenizer"
        )
    if embedding_rows is not None and embedding_rows < teacher_size:
        raise ConfigError(
            f"the teacher {teacher_dir} has {embedding_rows} embedding rows but its tokenizer {teacher_size} tokens"
        )


def describe_student(info: StudentInit, config: Any) -> str:
    how = (
        f"from teacher layers enc {info.encoder_layers} dec {info.decoder_layers}"
        if info.from_teacher
        else "from scratch"
    )
    return (
        f"student: {config.num_layers}+{config.num_decoder_layers} layers, d_model {config.d_model}, "
        f"{config.num_heads}x{config.d_kv} heads, d_ff {config.d_ff}; {info.num_parameters / 1e6:.2f} M params "
        f"({info.num_parameters / max(info.teacher_parameters, 1):.0%} of the teacher), {how}"
    )
