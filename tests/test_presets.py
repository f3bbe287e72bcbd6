from __future__ import annotations

import dataclasses

import pytest
import torch

from core.config import ConfigError, field_docs, from_dict, load_config, to_dict
from core.models import (
    PRESETS,
    ModelConfig,
    ModelSpec,
    build_model,
    count_parameters,
    interpolate_with_fresh_init,
    model_flops_per_example,
    model_flops_per_token,
    t5_config,
)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_count_parameters_equals_built_model(preset):
    model = build_model(ModelConfig(preset=preset), 1000, seed=0)
    count = count_parameters(preset, 1000)
    assert count.total == _numel(model)
    assert count.vocab_size == model.config.vocab_size == 1024
    assert count.embeddings == _numel(model.shared)
    assert count.encoder == _numel(model.encoder) - _numel(model.shared)  # the stack holds the shared table
    assert count.decoder == _numel(model.decoder) - _numel(model.shared)


@pytest.mark.parametrize("ffn", ["gelu", "gated-gelu", "relu"])
@pytest.mark.parametrize("tied", [True, False])
def test_count_parameters_overrides_tied_and_untied(ffn, tied):
    cfg = ModelConfig(
        preset="alexatm-20b", num_layers=2, num_decoder_layers=3, d_model=64, num_heads=4, d_kv=24,
        d_ff=96, feed_forward_proj=ffn, tie_word_embeddings=tied, pad_vocab_to_multiple_of=1,
    )
    model = build_model(cfg, 301, seed=0)
    count = count_parameters(cfg, 301)
    assert count.total == _numel(model)
    assert count.lm_head == (0 if tied else 301 * 64)
    assert (model.lm_head.weight is model.shared.weight) == tied


def test_alexatm_20b_size():
    spec = ModelConfig(preset="alexatm-20b").resolve()
    assert (spec.num_layers, spec.num_decoder_layers, spec.d_model, spec.num_heads, spec.d_ff) == (46, 32, 4096, 32, 16384)
    count = count_parameters("alexatm-20b")  # reference vocab 150000, padded to 150016
    assert count.vocab_size == 150016
    # 46 x 201.3 M + 32 x 268.5 M blocks + 2 x 614.5 M (untied) embedding/output
    assert count.encoder == 46 * (4 * 4096 * 4096 + 2 * 4096 * 16384 + 2 * 4096) + 32 * 32 + 4096
    assert count.decoder == 32 * (8 * 4096 * 4096 + 2 * 4096 * 16384 + 3 * 4096) + 32 * 32 + 4096
    assert 19.0e9 < count.total < 19.2e9
    assert count.largest_layer == count.embeddings == 150016 * 4096


def test_preset_sizes_are_ordered_and_tiny_is_small():
    totals = [count_parameters(name).total for name in PRESETS]
    assert totals == sorted(totals)
    assert 1e6 < count_parameters("tiny", 2000).total < 5e6
    assert 10e6 < count_parameters("small").total < 100e6


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="allowed values: tiny, small, base, large, xl, alexatm-20b"):
        ModelConfig(preset="huge").validate()
    with pytest.raises(ConfigError, match="model.preset"):
        from_dict(ModelConfig, {"preset": "huge"})


def test_heads_must_divide_width_unless_d_kv_given():
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(preset="tiny", d_model=100, num_heads=3).validate()
    spec = ModelConfig(preset="tiny", d_model=100, num_heads=3, d_kv=40).resolve()
    assert (spec.d_model, spec.num_heads, spec.d_kv, spec.inner_dim) == (100, 3, 40, 120)
    # Changing the width without d_kv recomputes the head width from the new shape.
    assert ModelConfig(preset="tiny", d_model=256).resolve().d_kv == 64
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(dropout=1.5).validate()
    with pytest.raises(ConfigError, match="num_layers"):
        ModelConfig(num_layers=0).validate()


def test_model_config_is_a_documented_config_section():
    docs = field_docs(ModelConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = from_dict(ModelConfig, {"preset": "small", "num_layers": 3, "feed_forward_proj": "gelu"})
    assert cfg.resolve().num_layers == 3 and cfg.resolve().num_decoder_layers == 6
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        from_dict(ModelConfig, {"feed_forward_proj": "swish"})
    assert to_dict(cfg)["preset"] == "small"
    assert load_config(ModelConfig, overrides=["d_ff=512"]).resolve().d_ff == 512


def test_t5_config_special_ids_and_padding():
    config = t5_config("tiny", 2000)
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 0)
    assert config.vocab_size == 2048 and config.vocab_size % 128 == 0
    assert t5_config(ModelConfig(pad_vocab_to_multiple_of=1), 2001).vocab_size == 2001
    assert t5_config(ModelConfig(vocab_size=4096), None).vocab_size == 4096
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        t5_config(ModelConfig(vocab_size=1000), 2000)


def test_build_model_is_seeded_and_trains_one_step():
    a = build_model("tiny", 500, seed=3)
    b = build_model("tiny", 500, seed=3)
    c = build_model("tiny", 500, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.shared.weight, c.shared.weight)
    x = torch.randint(3, 500, (2, 11))
    y = torch.randint(3, 500, (2, 7))
    out = a(input_ids=x, attention_mask=torch.ones_like(x), labels=y)
    assert out.logits.shape == (2, 7, 512)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert a.shared.weight.grad is not None and a.shared.weight.grad.abs().sum() > 0


def test_untied_model_round_trips(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    cfg = ModelConfig(preset="tiny", tie_word_embeddings=False)
    model = build_model(cfg, 300, seed=0).eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() != loaded.shared.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert _numel(loaded) == count_parameters(cfg, 300).total
    spec = ModelSpec.from_t5_config(loaded.config)
    assert not spec.tie_word_embeddings and count_parameters(spec).total == _numel(loaded)
    assert ModelSpec.from_t5_config(build_model("tiny", 300).config).tie_word_embeddings
    x = torch.randint(3, 300, (1, 9))
    y = torch.randint(3, 300, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x, labels=y).logits, model(input_ids=x, labels=y).logits)


@pytest.mark.parametrize("tied", [True, False])
def test_interpolate_with_fresh_init_reaches_the_from_scratch_start(tied):
    cfg = ModelConfig(preset="tiny", tie_word_embeddings=tied)
    pretrained = build_model(cfg, 300, seed=11)
    fresh = build_model(cfg, 300, seed=5)  # what a from-scratch reference with train.seed=5 starts from
    start = {n: p.clone() for n, p in pretrained.named_parameters()}

    interpolate_with_fresh_init(pretrained, 1.0, seed=5)
    assert all(torch.equal(p, start[n]) for n, p in pretrained.named_parameters())

    interpolate_with_fresh_init(pretrained, 0.25, seed=5)
    for name, param in pretrained.named_parameters():
        torch.testing.assert_close(param, 0.25 * start[name] + 0.75 * dict(fresh.named_parameters())[name])
    assert (pretrained.lm_head.weight.data_ptr() == pretrained.shared.weight.data_ptr()) is tied

    zero = build_model(cfg, 300, seed=11)
    interpolate_with_fresh_init(zero, 0.0, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(zero.parameters(), fresh.parameters()))
    with pytest.raises(ValueError, match="must be in"):
        interpolate_with_fresh_init(zero, 1.5, seed=5)


@pytest.mark.parametrize("ffn", ["gelu", "gated-gelu"])
def test_flops_match_torch_flop_counter(ffn):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(preset="tiny", num_decoder_layers=3, feed_forward_proj=ffn)
    model = build_model(cfg, 1000, seed=0)
    model.set_attn_implementation("eager")  # the counter misses some fused SDPA kernels on CPU
    src_len, tgt_len, batch = 37, 23, 2
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(
            input_ids=torch.randint(3, 1000, (batch, src_len)), labels=torch.randint(3, 1000, (batch, tgt_len))
        ).loss
        loss.backward()
    assert counter.get_total_flops() == batch * model_flops_per_example(cfg, 1000, src_len, tgt_len)
    per_token = model_flops_per_token(cfg, 1000, src_len, tgt_len)
    assert per_token == pytest.approx(model_flops_per_example(cfg, 1000, src_len, tgt_len) / 60)


def test_flops_close_to_6n_for_large_models():
    # Attention and the output layer are a small share at 20B and short sequences: the count sits
    # just above 6 N per token-through-its-stack.
    count = count_parameters("alexatm-20b")
    flops = model_flops_per_example("alexatm-20b", None, 512, 512)
    six_n = 6 * (count.encoder * 512 + count.decoder * 512 + count.lm_head * 512)
    assert 1.0 < flops / six_n < 1.1


def test_tiny_teacher_dir_loads(tiny_teacher_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir).eval()
    assert (tiny_teacher_dir / "model.safetensors").is_file()
    assert len(tokenizer) <= model.config.vocab_size
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id == 0
    assert model.config.eos_token_id == tokenizer.eos_token_id == 1
    assert _numel(model) == count_parameters("tiny", len(tokenizer)).total
    reference = build_model("tiny", tokenizer, seed=0)
    assert torch.equal(reference.shared.weight, model.shared.weight)  # seeded: the fixture is reproducible
    batch = tokenizer(["Wake me up at seven", "Réveille-moi à sept heures"], return_tensors="pt", padding=True)
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] <= 6
    assert all(isinstance(t, str) for t in tokenizer.batch_decode(generated, skip_special_tokens=True))
