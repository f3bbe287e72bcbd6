"""Student initialisation (distill/student_init.py): sizes relative to the teacher, layer mapping, vocabulary check."""

from __future__ import annotations

import pytest
import torch

from core.config import ConfigError, load_config
from core.models import ModelConfig, build_model
from distill.student_init import (
    STUDENT_PRESETS,
    StudentConfig,
    build_student,
    check_vocabulary,
    layer_map,
    student_config,
)


@pytest.fixture(scope="module")
def teacher():
    # 4+4 layers at the tiny width, tied embeddings; vocabulary 300 (no tokenizer needed).
    return build_model(ModelConfig(preset="tiny", num_layers=4, num_decoder_layers=4), 300, seed=0)


@pytest.fixture(scope="module")
def untied_teacher():
    return build_model(
        ModelConfig(preset="tiny", num_layers=4, num_decoder_layers=2, tie_word_embeddings=False), 300, seed=1
    )


def test_layer_map_every_other_and_starts_at_zero():
    assert layer_map(6, 3) == [0, 2, 4]
    assert layer_map(8, 2) == [0, 4]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(5, 1) == [0]
    with pytest.raises(ConfigError, match="cannot be initialised"):
        layer_map(2, 3)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_half_depth_copies_mapped_layers(teacher):
    student, info = build_student(teacher, StudentConfig(preset="half_depth"), seed=0)
    assert student.config.num_layers == 2 and student.config.num_decoder_layers == 2
    assert info.from_teacher and info.encoder_layers == [0, 2] and info.decoder_layers == [0, 2]
    for j, i in enumerate(info.encoder_layers):
        assert _same(student.encoder.block[j], teacher.encoder.block[i])
    for j, i in enumerate(info.decoder_layers):
        assert _same(student.decoder.block[j], teacher.decoder.block[i])
    assert torch.equal(student.shared.weight, teacher.shared.weight)
    assert _same(student.encoder.final_layer_norm, teacher.encoder.final_layer_norm)
    assert _same(student.decoder.final_layer_norm, teacher.decoder.final_layer_norm)
    # Relative attention bias (block 0 only) is the teacher's.
    bias = student.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert torch.equal(bias, teacher.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight)
    assert info.num_parameters < info.teacher_parameters


def test_mapped_student_matches_teacher_when_same(teacher):
    student, info = build_student(teacher, StudentConfig(preset="same"))
    x = torch.randint(3, 300, (2, 9))
    y = torch.randint(3, 300, (2, 5))
    with torch.no_grad():
        assert torch.allclose(student(input_ids=x, labels=y).logits, teacher(input_ids=x, labels=y).logits)


def test_quarter_and_overrides(teacher):
    config = student_config(teacher.config, StudentConfig(preset="quarter"))
    assert (config.num_layers, config.num_decoder_layers, config.d_model) == (1, 1, teacher.config.d_model)
    config = student_config(teacher.config, StudentConfig(preset="half_depth", num_decoder_layers=1))
    assert (config.num_layers, config.num_decoder_layers) == (2, 1)
    assert config.vocab_size == teacher.config.vocab_size
    assert config.decoder_start_token_id == teacher.config.decoder_start_token_id


def test_narrow_is_from_scratch(teacher):
    student, info = build_student(teacher, StudentConfig(preset="narrow"), seed=0)
    assert not info.from_teacher and info.encoder_layers == []
    assert student.config.d_model == teacher.config.d_model // 2
    assert student.config.vocab_size == teacher.config.vocab_size
    with pytest.raises(ConfigError, match="init=teacher needs the teacher's width"):
        build_student(teacher, StudentConfig(preset="narrow", init="teacher"))


def test_scratch_init_differs_from_teacher(teacher):
    student, info = build_student(teacher, StudentConfig(preset="half_depth", init="scratch"), seed=3)
    assert not info.from_teacher
    assert not torch.equal(student.shared.weight, teacher.shared.weight)


def test_untied_teacher_gives_untied_student(untied_teacher):
    student, info = build_student(untied_teacher, StudentConfig(preset="half_depth"))
    assert student.lm_head.weight is not student.shared.weight
    assert torch.equal(student.lm_head.weight, untied_teacher.lm_head.weight)
    assert info.encoder_layers == [0, 2] and info.decoder_layers == [0]


def test_unknown_preset_names_allowed_values():
    with pytest.raises(ConfigError, match="allowed values: " + ", ".join(STUDENT_PRESETS)):
        load_config(StudentConfig, overrides=["preset=tiny"])


def test_vocabulary_mismatch_names_sizes_and_dirs():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def tok(words):
        vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")))

    check_vocabulary(tok(["a", "b"]), "/t", tok(["a", "b"]), "/d")
    with pytest.raises(ConfigError, match=r"teacher /runs/x/teacher has a vocabulary of 5 tokens.*data /runs/x/tok has 4"):
        check_vocabulary(tok(["a", "b"]), "/runs/x/teacher", tok(["a"]), "/runs/x/tok")
    with pytest.raises(ConfigError, match="same size, different tokens"):
        check_vocabulary(tok(["a", "b"]), "/t", tok(["a", "c"]), "/d")
