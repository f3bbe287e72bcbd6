from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.config import ConfigError, from_dict
from data_prep.objectives import (
    CLM,
    DENOISE,
    IGNORE_INDEX,
    ObjectiveConfig,
    PretrainCollator,
    expected_lengths,
    loss_by_objective,
    num_noise_tokens,
    poisson_span_mask,
    span_bounds,
    t5_span_mask,
)


@dataclasses.dataclass(frozen=True)
class Ids:
    pad: int = 0
    eos: int = 1
    unk: int = 2
    clm: int = 3
    sep: int = 4
    sentinels: tuple[int, ...] = tuple(range(5, 105))


IDS = Ids()
FIRST_TEXT_ID = 200  # rows below use ids >= 200, so special ids in an output came from the collator


def _rows(num_rows: int, length: int | tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = [length] * num_rows if isinstance(length, int) else rng.integers(*length, size=num_rows)
    return [rng.integers(FIRST_TEXT_ID, 2000, size=int(n)) for n in lengths]


def _is_subsequence(short: np.ndarray, long: np.ndarray) -> bool:
    it = iter(long.tolist())
    return all(any(x == y for y in it) for x in short.tolist())


def test_config_validation():
    with pytest.raises(ConfigError, match="p_clm"):
        ObjectiveConfig(p_clm=1.5).validate()
    with pytest.raises(ConfigError, match="noise_density"):
        ObjectiveConfig(noise_density=0.0).validate()
    with pytest.raises(ConfigError, match="clm_min_fraction"):
        ObjectiveConfig(clm_min_fraction=0.9, clm_max_fraction=0.5).validate()
    with pytest.raises(ConfigError, match="allowed values: 'drop', 't5_spans'"):
        from_dict(ObjectiveConfig, {"denoising": "mask"})
    with pytest.raises(ConfigError, match="sentinel"):
        PretrainCollator(ObjectiveConfig(denoising="t5_spans"), Ids(sentinels=()))


def test_poisson_mask_fraction_and_span_lengths():
    rng = np.random.default_rng(0)
    spans: list[int] = []
    for _ in range(1000):
        mask = poisson_span_mask(512, 0.15, 3.0, rng)
        assert mask.sum() == round(512 * 0.15)  # the noise budget is exact per row
        starts, ends = span_bounds(mask)
        spans += (ends - starts).tolist()
    spans_arr = np.array(spans)
    # Poisson(3) raised to >= 1 has mean 3 + e^-3 = 3.05; cutting the last span to fit the budget
    # lowers it a little (to about 2.99 at 512 tokens).
    assert spans_arr.mean() == pytest.approx(3.0, abs=0.1)
    # P(length 1) = P(0) + P(1) = 4 e^-3 = 0.199; P(length 3) = 4.5 e^-3 = 0.224.
    assert np.mean(spans_arr == 1) == pytest.approx(0.199, abs=0.03)
    assert np.mean(spans_arr == 3) == pytest.approx(0.224, abs=0.03)
    assert spans_arr.max() >= 8  # a Poisson tail, not a fixed length


def test_masked_fraction_over_varied_lengths():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 600, size=2000)
    fractions = [poisson_span_mask(int(n), 0.15, 3.0, rng).mean() for n in lengths]
    assert np.mean(fractions) == pytest.approx(0.15, abs=0.005)
    t5_fractions = [t5_span_mask(int(n), 0.15, 3.0, rng, max_spans=100).mean() for n in lengths]
    assert np.mean(t5_fractions) == pytest.approx(0.15, abs=0.005)
    assert num_noise_tokens(1, 0.15) == 0 and num_noise_tokens(2, 0.15) == 1 and num_noise_tokens(3, 0.9) == 2


def test_t5_mask_span_count_and_mean():
    rng = np.random.default_rng(2)
    spans = []
    for _ in range(500):
        starts, ends = span_bounds(t5_span_mask(512, 0.15, 3.0, rng, max_spans=100))
        assert len(starts) == round(77 / 3)
        assert starts[0] > 0  # T5 starts with a kept span
        spans += (ends - starts).tolist()
    assert np.mean(spans) == pytest.approx(77 / 26)
    assert len(span_bounds(t5_span_mask(512, 0.15, 3.0, rng, max_spans=4))[0]) == 4


def test_drop_examples_remove_spans_and_target_the_original():
    collator = PretrainCollator(ObjectiveConfig(p_clm=0.0), IDS, seed=0)
    for index, row in enumerate(_rows(200, (2, 300))):
        ex = collator.example(row, index)
        assert ex.objective == DENOISE
        assert ex.source[-1] == IDS.eos and ex.target[-1] == IDS.eos
        assert np.array_equal(ex.target[:-1], row)
        assert row.size - (ex.source.size - 1) == num_noise_tokens(row.size, 0.15)
        assert _is_subsequence(ex.source[:-1], row)


def test_t5_spans_reconstruct_the_original():
    collator = PretrainCollator(ObjectiveConfig(p_clm=0.0, denoising="t5_spans"), IDS, seed=0)
    sentinel_set = set(IDS.sentinels)
    for index, row in enumerate(_rows(200, (2, 300))):
        ex = collator.example(row, index)
        source, target = ex.source[:-1].tolist(), ex.target[:-1].tolist()
        used = [t for t in source if t in sentinel_set]
        assert used == list(IDS.sentinels[: len(used)])  # <extra_id_0>, <extra_id_1>, ... in order
        assert [t for t in target if t in sentinel_set] == used
        assert target[0] == IDS.sentinels[0]
        # Fill every sentinel in the source with what follows it in the target.
        fills: dict[int, list[int]] = {}
        current = None
        for t in target:
            if t in sentinel_set:
                current = t
                fills[t] = []
            else:
                fills[current].append(t)
        rebuilt = [x for t in source for x in (fills[t] if t in sentinel_set else [t])]
        assert rebuilt == row.tolist()


def test_clm_split_point_range_and_reassembly():
    collator = PretrainCollator(ObjectiveConfig(p_clm=1.0), IDS, seed=0)
    fractions = []
    for index, row in enumerate(_rows(3000, 100)):
        ex = collator.example(row, index)
        assert ex.objective == CLM
        assert ex.source[0] == IDS.clm and ex.source[-1] == IDS.eos and ex.target[-1] == IDS.eos
        prefix = ex.source[1:-1]
        assert np.array_equal(np.concatenate([prefix, ex.target[:-1]]), row)
        fractions.append(prefix.size / row.size)
    fractions = np.array(fractions)
    assert fractions.min() == pytest.approx(0.2) and fractions.max() == pytest.approx(0.8)  # both ends reached
    assert fractions.mean() == pytest.approx(0.5, abs=0.01)
    # Uniform over 61 split points: each sixth of the range gets about a sixth of the samples.
    counts, _ = np.histogram(fractions, bins=6, range=(0.2, 0.8 + 1e-9))
    assert counts.min() > 0.7 * len(fractions) / 6


def test_clm_document_unit_takes_one_document():
    collator = PretrainCollator(ObjectiveConfig(p_clm=1.0, clm_unit="document"), IDS, seed=0)
    docs = [np.arange(200, 210), np.arange(300, 340), np.arange(400, 405)]
    row = np.concatenate([docs[0], [IDS.sep], docs[1], [IDS.sep], docs[2]])
    seen = set()
    for index in range(200):
        ex = collator.example(row, index)
        text = np.concatenate([ex.source[1:-1], ex.target[:-1]])
        assert IDS.sep not in text.tolist()
        matches = [i for i, d in enumerate(docs) if np.array_equal(d, text)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2}


def test_realised_p_clm():
    collator = PretrainCollator(ObjectiveConfig(), IDS, seed=0)
    rows = _rows(4000, 32)
    objectives = [collator.example(row, i).objective for i, row in enumerate(rows)]
    # 4000 Bernoulli(0.2) draws: standard deviation 0.0063; the tolerance is 4 of them.
    assert np.mean(objectives) == pytest.approx(0.2, abs=0.025)


def test_batch_padding_and_masks():
    collator = PretrainCollator(ObjectiveConfig(p_clm=0.5), IDS, seed=0)
    rows = _rows(32, (3, 70))
    batch = collator([{"input_ids": row.tolist(), "index": i} for i, row in enumerate(rows)])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_attention_mask", "objective"}
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape[1] % 8 == 0
    for b in range(len(rows)):
        mask = batch["attention_mask"][b]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # padding only at the end
        assert (batch["input_ids"][b, length:] == IDS.pad).all()
        assert (batch["input_ids"][b, :length] != IDS.pad).all()
        assert batch["input_ids"][b, length - 1] == IDS.eos
        labels = batch["labels"][b]
        num_labels = int((labels != IGNORE_INDEX).sum())
        assert (labels[:num_labels] != IGNORE_INDEX).all() and (labels[num_labels:] == IGNORE_INDEX).all()
        assert labels[num_labels - 1] == IDS.eos
    assert torch.equal(batch["decoder_attention_mask"], (batch["labels"] != IGNORE_INDEX).long())
    assert batch["objective"].dtype == torch.long and set(batch["objective"].tolist()) == {DENOISE, CLM}
    with pytest.raises(KeyError, match="index"):
        collator([{"input_ids": rows[0].tolist()}])


def test_examples_depend_only_on_seed_and_index():
    rows = _rows(6, 50)
    collator = PretrainCollator(ObjectiveConfig(p_clm=0.5), IDS, seed=7)
    full = collator.collate(rows, range(100, 106))
    # The same example in a different batch (as after a resume with another batch size) is identical.
    alone = collator.collate(rows[3:4], [103])
    src_len = int(alone["attention_mask"].sum())
    assert torch.equal(full["input_ids"][3, :src_len], alone["input_ids"][0, :src_len])
    assert torch.equal(full["labels"][3, : alone["labels"].shape[1]], alone["labels"][0])
    again = PretrainCollator(ObjectiveConfig(p_clm=0.5), IDS, seed=7).collate(rows, range(100, 106))
    assert all(torch.equal(full[k], again[k]) for k in full)
    other_seed = PretrainCollator(ObjectiveConfig(p_clm=0.5), IDS, seed=8).collate(rows, range(100, 106))
    other_index = collator.collate(rows, range(200, 206))
    assert not torch.equal(full["input_ids"], other_seed["input_ids"][:, : full["input_ids"].shape[1]])
    assert not torch.equal(full["input_ids"], other_index["input_ids"][:, : full["input_ids"].shape[1]])


@pytest.mark.parametrize("denoising", ["drop", "t5_spans"])
def test_short_rows(denoising):
    collator = PretrainCollator(ObjectiveConfig(p_clm=0.5, denoising=denoising), IDS, seed=0)
    for length in (0, 1, 2, 3):
        for index in range(20):
            ex = collator.example(np.arange(FIRST_TEXT_ID, FIRST_TEXT_ID + length), index)
            assert ex.source[-1] == IDS.eos and ex.target[-1] == IDS.eos
            assert ex.target.size >= 1


def test_expected_lengths_match_sampled_batches():
    cfg = ObjectiveConfig()
    collator = PretrainCollator(cfg, IDS, seed=0)
    examples = [collator.example(row, i) for i, row in enumerate(_rows(3000, 128))]
    expected = expected_lengths(cfg, 128)
    for objective, name in ((DENOISE, "denoise"), (CLM, "clm")):
        chosen = [ex for ex in examples if ex.objective == objective]
        probability, src_len, tgt_len = expected[name]
        assert len(chosen) / len(examples) == pytest.approx(probability, abs=0.025)
        assert np.mean([ex.source.size for ex in chosen]) == pytest.approx(src_len, rel=0.02)
        assert np.mean([ex.target.size for ex in chosen]) == pytest.approx(tgt_len, rel=0.02)


def test_batch_trains_tiny_model_and_padding_does_not_leak(tiny_tokenizer_dir):
    from core.models import build_model
    from data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = build_model("tiny", tokenizer, seed=0).eval()
    texts = ["Wake me up at seven tomorrow", "Quel temps fera-t-il demain à Paris ?", "Включи свет на кухне"]
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    row = []
    for text in texts:
        row += tokenizer(text, add_special_tokens=False)["input_ids"] + [sep]
    rows = [row[:-1], row[: len(row) // 2], row[len(row) // 3 :]]
    cfg = ObjectiveConfig(p_clm=0.5, pad_to_multiple_of=1)
    collator = PretrainCollator.from_tokenizer(cfg, tokenizer, seed=0)
    batch = collator.collate(rows, [0, 1, 2])
    wide = PretrainCollator.from_tokenizer(dataclasses.replace(cfg, pad_to_multiple_of=64), tokenizer).collate(
        rows, [0, 1, 2]
    )
    inputs = {k: v for k, v in batch.items() if k != "objective"}
    with torch.no_grad():
        out = model(**inputs)
        out_wide = model(**{k: v for k, v in wide.items() if k != "objective"})
    valid = batch["labels"] != IGNORE_INDEX
    # Extra padding on either side changes nothing at real target positions.
    torch.testing.assert_close(out_wide.logits[:, : valid.shape[1]][valid], out.logits[valid])
    torch.testing.assert_close(out_wide.loss, out.loss)
    parts = loss_by_objective(out.logits, batch["labels"], batch["objective"])
    total = sum(s for s, _ in parts.values()) / sum(n for _, n in parts.values())
    torch.testing.assert_close(total, out.loss)
    for objective, name in ((DENOISE, "denoise"), (CLM, "clm")):
        assert parts[name][1] == valid[batch["objective"] == objective].sum()
