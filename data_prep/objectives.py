"""Pretraining objectives: denoising mixed with causal LM (AlexaTM 20B), and the collator.

Every packed row (token ids of several documents joined by `<sep>`, from `data_prep.packing`)
becomes one seq2seq example:

- with probability `p_clm` a causal-LM example: source `[CLM]` + the first 20-80% of the row
  (split point uniform over that range), target the rest;
- otherwise a denoising example:
  - `denoising="drop"` (AlexaTM): about `noise_density` (15%) of the tokens are removed in spans
    whose lengths follow Poisson(`mean_span_length`) (at least 1); nothing marks the gaps; the
    target is the whole original row;
  - `denoising="t5_spans"` (T5): the same fraction in `round(num_noise / mean_span_length)`
    spans, each replaced by a sentinel `<extra_id_i>` in the source; the target is each sentinel
    followed by the tokens it replaced.

Sources and targets end with eos. The CLM unit is the packed row by default (`clm_unit="row"`):
rows of short sentences (Tatoeba) would otherwise give examples of a dozen tokens and mostly
padding; `clm_unit="document"` takes one document between `<sep>` markers instead.

Determinism: an example's randomness comes only from `numpy.random.default_rng([seed, index])`,
where `index` is the example's position in the training stream (the loop passes
`epoch * len(dataset) + row` so that later epochs see new noise). Restoring the stream position
on resume reproduces every batch exactly, whatever the batch size or number of workers.

This module imports torch only inside functions and never DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from core.config import ConfigError

if TYPE_CHECKING:
    import torch

DENOISE = 0
CLM = 1
ICL = 2
OBJECTIVE_NAMES = ("denoise", "clm", "icl")
"""Index = the objective id in a batch's `objective` tensor."""
IGNORE_INDEX = -100


@dataclasses.dataclass
class ObjectiveConfig:
    """The mixture of pretraining objectives."""

    p_clm: float = 0.2
    """Probability that an example is causal LM ([CLM] + prefix -> continuation); AlexaTM used 0.2."""
    denoising: Literal["drop", "t5_spans"] = "drop"
    """Denoising variant: drop (remove spans, target = the original, AlexaTM) or t5_spans (sentinel span corruption, T5)."""
    noise_density: float = 0.15
    """Fraction of a row's tokens corrupted by denoising."""
    mean_span_length: float = 3.0
    """Mean corrupted span length: the Poisson mean for drop, tokens per sentinel span for t5_spans."""
    clm_min_fraction: float = 0.2
    """Shortest CLM prefix, as a fraction of the unit (row or document)."""
    clm_max_fraction: float = 0.8
    """Longest CLM prefix, as a fraction of the unit (row or document)."""
    clm_unit: Literal["row", "document"] = "row"
    """What a CLM example splits: the whole packed row, or one document between <sep> markers."""
    pad_to_multiple_of: int = 8
    """Pad batch lengths up to a multiple of this (1 = longest in the batch)."""

    def validate(self) -> None:
        if not 0.0 <= self.p_clm <= 1.0:
            raise ConfigError(f"objective.p_clm: must be in [0, 1], got {self.p_clm}")
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"objective.noise_density: must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise ConfigError(f"objective.mean_span_length: must be >= 1, got {self.mean_span_length}")
        if not 0.0 < self.clm_min_fraction <= self.clm_max_fraction < 1.0:
            raise ConfigError(
                "objective.clm_min_fraction and clm_max_fraction: need 0 < min <= max < 1, got "
                f"{self.clm_min_fraction} and {self.clm_max_fraction}"
            )
        if self.pad_to_multiple_of < 1:
            raise ConfigError(f"objective.pad_to_multiple_of: must be >= 1, got {self.pad_to_multiple_of}")


class Example(NamedTuple):
    """One seq2seq example before padding."""

    source: np.ndarray
    """Encoder input ids, ending with eos."""
    target: np.ndarray
    """Decoder target ids (labels), ending with eos."""
    objective: int
    """DENOISE (0) or CLM (1)."""


# ----------------------------------------------------------------------------- noise masks


def num_noise_tokens(length: int, noise_density: float) -> int:
    """round(length * density), at least 1 and leaving at least 1 token (0 for length < 2)."""
    if length < 2:
        return 0
    return int(min(max(round(length * noise_density), 1), length - 1))


def poisson_span_mask(length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask [length]: `num_noise_tokens` True tokens in separate spans of Poisson lengths.

    Span lengths are drawn from Poisson(mean) raised to at least 1 until they cover the noise
    budget (the last one cut to fit), shuffled, and placed with at least one kept token between
    neighbours (so each span stays one run of the mask) and the kept tokens spread uniformly
    over the gaps (stars and bars).
    """
    mask = np.zeros(length, dtype=bool)
    num_noise = num_noise_tokens(length, noise_density)
    if num_noise == 0:
        return mask
    lengths: list[int] = []
    covered = 0
    while covered < num_noise:
        span = min(max(int(rng.poisson(mean_span_length)), 1), num_noise - covered)
        lengths.append(span)
        covered += span
    num_keep = length - num_noise
    while len(lengths) - 1 > num_keep:  # not enough kept tokens to separate every span
        lengths[-2] += lengths.pop()
    rng.shuffle(lengths)
    num_spans = len(lengths)
    # Kept tokens beyond the mandatory separators go into num_spans + 1 gaps uniformly.
    free = num_keep - (num_spans - 1)
    bars = np.sort(rng.choice(free + num_spans, size=num_spans, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars, [free + num_spans]])) - 1
    gaps[1:-1] += 1
    position = 0
    for gap, span in zip(gaps[:-1], lengths):
        position += int(gap)
        mask[position : position + span] = True
        position += span
    return mask


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split num_items into num_segments positive parts, uniformly over such partitions."""
    cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def t5_span_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator, max_spans: int
) -> np.ndarray:
    """T5's `random_spans_noise_mask`: round(num_noise / mean) noise spans interleaved with kept
    spans, starting with a kept span; at most `max_spans` spans (one sentinel each)."""
    mask = np.zeros(length, dtype=bool)
    num_noise = num_noise_tokens(length, noise_density)
    if num_noise == 0:
        return mask
    num_keep = length - num_noise
    num_spans = int(min(max(round(num_noise / mean_span_length), 1), num_noise, num_keep, max_spans))
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(num_keep, num_spans, rng)
    position = 0
    for keep, noise in zip(keep_lengths, noise_lengths):
        position += int(keep)
        mask[position : position + noise] = True
        position += int(noise)
    return mask


def span_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of True in a boolean mask; ends are exclusive."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.diff(padded)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


# ----------------------------------------------------------------------------- collator


class PretrainCollator:
    """Turns packed rows into padded seq2seq batches of the objective mixture.

    `special_ids`: anything with `pad`, `eos`, `clm`, `sep` and `sentinels` (see
    `data_prep.tokenizer.special_ids`). Call it with a list of mappings holding `input_ids` (a
    packed row) and `index` (the example's position in the training stream, see the module doc),
    or use `collate(rows, indices)`. The batch (torch tensors):

    - `input_ids` [B, S], `attention_mask` [B, S] (1 on tokens, 0 on padding);
    - `labels` [B, T] with -100 on padding; `decoder_attention_mask` [B, T] (1 where a label is);
    - `objective` [B]: 0 = denoise, 1 = causal LM, 2 = in-context prompt (`OBJECTIVE_NAMES`,
      `IclCollator`).
    S and T are the longest source and target in the batch rounded up to `pad_to_multiple_of`.
    """

    def __init__(self, cfg: ObjectiveConfig, special_ids: Any, seed: int = 0) -> None:
        cfg.validate()
        self.cfg = cfg
        self.seed = int(seed)
        self.pad = int(special_ids.pad)
        self.eos = int(special_ids.eos)
        self.clm = int(special_ids.clm)
        self.sep = int(special_ids.sep)
        self.sentinels = np.asarray(list(special_ids.sentinels), dtype=np.int64)
        if cfg.denoising == "t5_spans" and self.sentinels.size == 0:
            raise ConfigError("objective.denoising=t5_spans needs sentinel tokens; the tokenizer has none")

    @classmethod
    def from_tokenizer(cls, cfg: ObjectiveConfig, tokenizer: Any, seed: int = 0) -> PretrainCollator:
        from data_prep.tokenizer import special_ids

        return cls(cfg, special_ids(tokenizer), seed=seed)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    # -- one example

    def example(self, input_ids: Sequence[int] | np.ndarray, index: int) -> Example:
        """The example for one packed row at stream position `index` (deterministic)."""
        row = np.asarray(input_ids, dtype=np.int64)
        rng = self.rng(index)
        wants_clm = rng.random() < self.cfg.p_clm
        if wants_clm and row.size >= 2:
            return self._clm(row, rng)
        if self.cfg.denoising == "t5_spans":
            return self._t5_spans(row, rng)
        return self._drop(row, rng)

    def _with_eos(self, *parts: np.ndarray | list[int]) -> np.ndarray:
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] + [np.array([self.eos])])

    def _drop(self, row: np.ndarray, rng: np.random.Generator) -> Example:
        mask = poisson_span_mask(row.size, self.cfg.noise_density, self.cfg.mean_span_length, rng)
        return Example(self._with_eos(row[~mask]), self._with_eos(row), DENOISE)

    def _t5_spans(self, row: np.ndarray, rng: np.random.Generator) -> Example:
        mask = t5_span_mask(
            row.size, self.cfg.noise_density, self.cfg.mean_span_length, rng, max_spans=self.sentinels.size
        )
        starts, ends = span_bounds(mask)
        # Source: kept tokens, each noise span's first token replaced by its sentinel, the rest removed.
        source = row.copy()
        source[starts] = self.sentinels[: starts.size]
        source_keep = ~mask
        source_keep[starts] = True
        # Target: each noise span preceded by its sentinel.
        pieces: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        for i, (start, end) in enumerate(zip(starts, ends)):
            pieces += [self.sentinels[i : i + 1], row[start:end]]
        target = np.concatenate(pieces)
        return Example(self._with_eos(source[source_keep]), self._with_eos(target), DENOISE)

    def _clm(self, row: np.ndarray, rng: np.random.Generator) -> Example:
        unit = row
        if self.cfg.clm_unit == "document":
            documents = [d for d in np.split(row, np.flatnonzero(row == self.sep)) if d.size]
            documents = [d[1:] if d[0] == self.sep else d for d in documents]
            documents = [d for d in documents if d.size >= 2]
            if documents:
                unit = documents[int(rng.integers(len(documents)))]
        split = clm_split_point(unit.size, self.cfg.clm_min_fraction, self.cfg.clm_max_fraction, rng)
        return Example(self._with_eos([self.clm], unit[:split]), self._with_eos(unit[split:]), CLM)

    # -- batches

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows, indices = [], []
        for i, ex in enumerate(examples):
            if "index" not in ex:
                raise KeyError(
                    f"example {i} has no 'index' (its position in the training stream, which seeds its "
                    "noise); add it, e.g. dataset.map(lambda ex, i: {'index': i}, with_indices=True)"
                )
            rows.append(ex["input_ids"])
            indices.append(int(ex["index"]))
        return self.collate(rows, indices)

    def collate(self, rows: Sequence[Sequence[int]], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        if len(rows) != len(indices):
            raise ValueError(f"{len(rows)} rows but {len(indices)} indices")
        return self.pad_examples([self.example(row, index) for row, index in zip(rows, indices)])

    def pad_examples(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        import torch

        multiple = self.cfg.pad_to_multiple_of
        src_len = _round_up(max(ex.source.size for ex in examples), multiple)
        tgt_len = _round_up(max(ex.target.size for ex in examples), multiple)
        batch = len(examples)
        input_ids = np.full((batch, src_len), self.pad, dtype=np.int64)
        attention_mask = np.zeros((batch, src_len), dtype=np.int64)
        labels = np.full((batch, tgt_len), IGNORE_INDEX, dtype=np.int64)
        for b, ex in enumerate(examples):
            input_ids[b, : ex.source.size] = ex.source
            attention_mask[b, : ex.source.size] = 1
            labels[b, : ex.target.size] = ex.target
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "decoder_attention_mask": torch.from_numpy((labels != IGNORE_INDEX).astype(np.int64)),
            "objective": torch.tensor([ex.objective for ex in examples], dtype=torch.long),
        }


class IclRows:
    """The in-context training "dataset" of `pretrain --section icl`: `rows[indices]["input_ids"]` gives
    one `IclRow` per index, which `IclCollator` turns into the prompt drawn at that stream position (so
    every epoch sees new prompts, and a resumed run the same ones)."""

    def __init__(self, sampler: Any, size: int) -> None:
        self.sampler, self.size = sampler, int(size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, indices: Sequence[int]) -> dict[str, list[IclRow]]:
        return {"input_ids": [IclRow(self.sampler) for _ in indices]}


class IclRow(NamedTuple):
    """A row of `IclRows`: the prompt sampler it draws from (`data_prep.icl.IclPromptSampler`)."""

    sampler: Any


class IclCollator(PretrainCollator):
    """`PretrainCollator` whose rows are `IclRow`s: the example at stream position i is prompt i of the
    row's sampler, source = the prompt ([CLM]-prefixed when `clm_prompt`, truncated from the left to
    `max_prompt_tokens` as in evaluation) + eos, target = the query's label text + eos (objective ICL)."""

    def __init__(self, cfg: ObjectiveConfig, tokenizer: Any, clm_prompt: bool, max_prompt_tokens: int, seed: int = 0) -> None:
        from data_prep.tokenizer import special_ids

        super().__init__(cfg, special_ids(tokenizer), seed=seed)
        self.tokenizer = tokenizer
        self.clm_prompt = clm_prompt
        self.max_prompt_tokens = max_prompt_tokens

    def example(self, input_ids: Any, index: int) -> Example:
        prompt = input_ids.sampler.prompt(int(index))
        ids = list(self.tokenizer(prompt.text)["input_ids"])  # ends with eos
        budget = self.max_prompt_tokens - (1 if self.clm_prompt else 0)
        ids = ids[max(0, len(ids) - budget):]
        source = ([self.clm] if self.clm_prompt else []) + ids
        target = list(self.tokenizer(prompt.target, add_special_tokens=False)["input_ids"]) + [self.eos]
        return Example(np.asarray(source, dtype=np.int64), np.asarray(target, dtype=np.int64), ICL)


def clm_split_point(length: int, min_fraction: float, max_fraction: float, rng: np.random.Generator) -> int:
    """Prefix length, uniform over [ceil(min * length), floor(max * length)], kept in [1, length - 1]."""
    low = max(1, math.ceil(min_fraction * length))
    high = min(length - 1, math.floor(max_fraction * length))
    if low > high:  # rows too short for the range: split near the middle
        low = high = max(1, min(length - 1, round(length / 2)))
    return int(rng.integers(low, high + 1))


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


# ----------------------------------------------------------------------------- sizes and losses


def expected_lengths(cfg: ObjectiveConfig, seq_len: int) -> dict[str, tuple[float, float, float]]:
    """{objective: (probability, mean source length, mean target length)} for rows of `seq_len`
    tokens (clm_unit="row"); used to cost the mixture in FLOPs (`polyteacher plan`)."""
    noise = num_noise_tokens(seq_len, cfg.noise_density)
    if cfg.denoising == "t5_spans":
        spans = max(1, round(noise / cfg.mean_span_length))
        denoise = (seq_len - noise + spans + 1.0, noise + spans + 1.0)
    else:
        denoise = (seq_len - noise + 1.0, seq_len + 1.0)
    prefix = (cfg.clm_min_fraction + cfg.clm_max_fraction) / 2 * seq_len
    clm = (prefix + 2.0, seq_len - prefix + 1.0)
    return {"denoise": (1.0 - cfg.p_clm, *denoise), "clm": (cfg.p_clm, *clm)}


def loss_by_objective(
    logits: torch.Tensor, labels: torch.Tensor, objective: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{objective name: (summed token cross-entropy, number of target tokens)} over the batch.

    logits [B, T, V], labels [B, T] with -100 on padding, objective [B]. Sums (not means) so
    that the loop can add them across micro-batches and ranks before dividing. Detached: for
    logging, not for the backward pass.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        token_loss = F.cross_entropy(
            logits.detach().float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )  # [B, T], 0 on padding
        valid = labels != IGNORE_INDEX
        out = {}
        for objective_id, name in enumerate(OBJECTIVE_NAMES):
            rows = objective == objective_id
            out[name] = (token_loss[rows].sum(), valid[rows].sum())
        return out

