"""Distillation data: task-agnostic rows of the pretraining mixture (`AgnosticData`) and MASSIVE
items (`MassiveDistillData`: gold source items, CDA and the matched-exposure arm, teacher-labelled
target utterances), each with its counterfactual partner (`Pair`). distill/distill.py trains on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import ConfigError, resolve_data_path
from core.fsutil import safe_path
from data_prep.counterfactual import (
    available_languages,
    cda_items,
    guess_language,
    lexicon_language,
    load_lexicon,
    swap_utterance,
)
from data_prep.objectives import DENOISE, Example, ObjectiveConfig, PretrainCollator
from data_prep.tokenizer import special_ids
from distill.config import DistillConfig
from massive.format import (
    TargetFormat,
    has_label_tokens,
)
from massive.loader import load_massive

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from data_prep.objectives import Example


def resolve_dir(run_dir: Path, value: str, key: str) -> Path:
    """A directory given absolute, or relative to the run directory (never escaping it)."""
    path = Path(value).expanduser()
    candidate = path if path.is_absolute() else safe_path(run_dir, value)
    if not candidate.is_dir():
        raise ConfigError(f"distill.{key}: {value!r} is not a directory (looked at {candidate})")
    return candidate


@dataclass
class Pair:
    """A training item and its counterfactual partner (what the teacher also sees for p^)."""

    train: Example
    partner: Example
    swapped: bool
    """The training item is a counterfactual."""
    changed: bool
    """sigma changed the original (it has gendered words)."""
    lang: str | None = None
    """Lexicon language of the row: only its token-level sigma perturbs the teacher here."""
    conflict: bool = False
    """sigma left an agreement conflict in the counterfactual (data_prep.counterfactual, rule 5)."""


class Swapper:
    """sigma restricted to the configured lexicon languages."""

    def __init__(self, languages: list[str]) -> None:
        self.languages = set(languages or available_languages())

    def text(self, text: str, lang: str = "auto") -> str:
        code = guess_language(text) if lang == "auto" else lexicon_language(lang)
        if code is None or code not in self.languages:
            return text
        return load_lexicon(code).swap(text)

    def utterance(self, example: Any) -> tuple[list[str], list[str], int]:
        """(sigma of a MASSIVE example's words, their slot labels, agreement conflicts left):
        `swap_utterance`, name slots kept."""
        code = lexicon_language(example.locale)
        if code is None or code not in self.languages:
            return list(example.words), list(example.slots), 0
        words, slots, result = swap_utterance(example.words, example.slots, code)
        return words, slots, result.conflicts


def counterfactual_row(row: np.ndarray, tokenizer: Any, sep_id: int, swapper: Swapper,
                       languages: list[tuple[str | None, int, bool]] | None = None) -> np.ndarray:
    """sigma of a packed row: each document between <sep> markers decoded, swapped (language guessed),
    and re-encoded only when it changed (unchanged documents keep their exact ids). `languages`, when
    given, receives (guessed language, tokens, changed) per document."""
    import numpy as np

    bounds = np.flatnonzero(row == sep_id)
    pieces: list[np.ndarray] = []
    start = 0
    for end in [*bounds.tolist(), row.size]:
        segment = row[start:end]
        if segment.size:
            text = tokenizer.decode(segment.tolist(), skip_special_tokens=False)
            swapped = swapper.text(text)
            if languages is not None:
                languages.append((guess_language(text), int(segment.size), swapped != text))
            if swapped != text:
                segment = np.asarray(tokenizer(swapped, add_special_tokens=False)["input_ids"], dtype=np.int64)
        pieces.append(segment)
        if end < row.size:
            pieces.append(row[end : end + 1])
        start = end + 1
    return np.concatenate(pieces) if pieces else row


def row_language(docs: list[tuple[str | None, int, bool]]) -> str | None:
    """The language whose token-level sigma a packed row uses: that of its swapped documents (most
    tokens first), else that of its longest document with a guessed language."""
    for changed_only in (True, False):
        known = [(size, lang) for lang, size, changed in docs if lang and (changed or not changed_only)]
        if known:
            return max(known)[1]
    return None


class AgnosticData:
    """Packed pretraining rows (datasets Arrow, column input_ids) with the pretraining collator."""

    copy_min_run = 0
    """Targets are masked spans or continuations, never visible in the source: nothing is copied."""

    def __init__(self, cfg: DistillConfig, run_dir: Path, tokenizer: Any) -> None:
        import datasets

        root = resolve_dir(run_dir, cfg.data, "data")
        for split in ("train", "heldout"):
            if not (root / split).is_dir():
                raise ConfigError(f"distill.data: {root} has no {split}/ (packed data from `polyteacher data pack`)")
        self.train = datasets.load_from_disk(str(root / "train")).with_format("numpy")
        self.heldout = datasets.load_from_disk(str(root / "heldout")).with_format("numpy")
        self.tokenizer = tokenizer
        self.collator = PretrainCollator.from_tokenizer(cfg.objective, tokenizer, seed=cfg.train.seed)
        self.sep = special_ids(tokenizer).sep
        self.swapper = Swapper(cfg.lexicon_languages)
        self.cfg = cfg
        self.description = f"{len(self.train)} packed rows, {len(self.heldout)} held-out"

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_eval(self) -> int:
        return len(self.heldout)

    def pairs(self, indices: list[int], epoch: int) -> list[Pair]:
        import numpy as np

        rows = [np.asarray(self.train[i]["input_ids"], dtype=np.int64) for i in indices]
        stream = [epoch * self.num_train + i for i in indices]
        docs: list[list[tuple[str | None, int, bool]]] = [[] for _ in rows]
        swapped_rows = [counterfactual_row(r, self.tokenizer, self.sep, self.swapper, d) for r, d in zip(rows, docs)]
        rng = np.random.default_rng([self.cfg.train.seed, 0xCDA, *stream])
        out = []
        for item in cda_items(rows, swapped_rows, self.cfg.cda, self.cfg.cda_prob, rng):
            index = stream[item.source_index]
            changed = not np.array_equal(rows[item.source_index], swapped_rows[item.source_index])
            out.append(Pair(self.collator.example(item.text, index), self.collator.example(item.counterfactual, index),
                            item.swapped, changed, row_language(docs[item.source_index])))
        return out

    def eval_examples(self, indices: list[int]) -> list[Example]:
        # Fixed stream positions past any training index: the same noise at every evaluation.
        return [self.collator.example(self.heldout[i]["input_ids"], 10**9 + i) for i in indices]

    def pad(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return self.collator.pad_examples(examples)


class MassiveDistillData:
    """MASSIVE text-to-text examples for task-specific distillation (teacher fine-tuned on MASSIVE)."""

    copy_min_run = 1
    """Targets hold labels, word sentinels and, in span targets, slot values: a target token that the
    source shows (a sentinel, a copied word) is copied, not predicted, and keeps the teacher's
    distribution."""

    def __init__(self, cfg: DistillConfig, tokenizer: Any, target_format: TargetFormat | None = None,
                 teacher: Any = None) -> None:
        """`teacher`: the fine-tuned teacher, which labels the target locales' utterances
        (`cfg.unlabelled_locales()`, teacher-labelled setting); unused otherwise."""
        data = load_massive(str(resolve_data_path(cfg.massive_data)), locales=cfg.locales,
                            partitions=("train", "dev"))
        self.train, self.dev = [], []
        for locale in cfg.locales:
            train = data.examples(locale=locale, partition="train")
            self.train += train[: cfg.num_train_examples] if cfg.num_train_examples else train
            self.dev += data.examples(locale=locale, partition="dev")[: cfg.num_eval_examples]
        if not self.train:
            raise ConfigError(f"distill.locales: no MASSIVE train examples for {', '.join(cfg.locales)}")
        self.tokenizer = tokenizer
        # Only the padding of the collator is used here.
        self.collator = PretrainCollator(ObjectiveConfig(), special_ids(tokenizer))
        self.swapper = Swapper(cfg.lexicon_languages)
        summary = f"{len(self.train)} train"
        if cfg.cda != "none":
            # The utterances sigma changes (pairs() swaps each batch again; this pass only counts and repeats).
            gendered = [ex for ex in self.train if self.swapper.utterance(ex)[0] != list(ex.words)]
            repeat = f", repeated x{cfg.cda_repeat}" if cfg.cda_repeat > 1 else ""
            summary += f" ({len(gendered)} changed by sigma{repeat})"
            self.train += gendered * (cfg.cda_repeat - 1)
        self.cfg = cfg
        # The fine-tuned teacher's text-to-text format (its config records it).
        self.target_format = target_format or TargetFormat()
        self.label_tokens = has_label_tokens(tokenizer)
        self.description = f"MASSIVE {', '.join(cfg.locales)}: {summary}, {len(self.dev)} dev"
        # Teacher-labelled target utterances: index num_gold + k is self.unlabelled[k].
        self.unlabelled: list[Example] = []
        self.unlabelled_words: list[list[str]] = []
        self.unlabelled_locale: list[str] = []
        targets = cfg.unlabelled_locales()
        if targets:
            if teacher is None:
                raise ValueError("MassiveDistillData: the teacher-labelled setting needs the teacher to label "
                                 f"{', '.join(targets)}")
            for locale, words in unlabelled_utterances(cfg.massive_data, targets, cfg.num_unlabelled_examples).items():
                self.unlabelled_words += words
                self.unlabelled_locale += [locale] * len(words)
            sources = [self._source_ids(words) for words in self.unlabelled_words]
            targets_ids = teacher_targets(teacher, tokenizer, sources, cfg.max_target_len)
            self.unlabelled = [Example(src, tgt, DENOISE) for src, tgt in zip(sources, targets_ids)]
            self.description += (f"; teacher-labelled, without their labels: {len(self.unlabelled)} train "
                                 f"utterances of {', '.join(targets)}")

    @property
    def num_gold(self) -> int:
        """Training items with gold labels (source locales); the teacher-labelled ones follow them."""
        return len(self.train)

    @property
    def num_train(self) -> int:
        return len(self.train) + len(self.unlabelled)

    def _source_ids(self, words: list[str]) -> Any:
        import numpy as np

        from massive.format import t2t_source

        source = t2t_source(words, self.target_format.sentinels)
        return np.asarray(self.tokenizer(source, truncation=True, max_length=self.cfg.max_source_len)["input_ids"],
                          dtype=np.int64)

    @property
    def num_eval(self) -> int:
        return len(self.dev)

    @property
    def train_lengths(self) -> list[int]:
        """Words per training utterance: source and target lengths both follow it."""
        return [len(ex.words) for ex in self.train] + [len(words) for words in self.unlabelled_words]

    def _example(self, words: list[str], slots: list[str], intent: str) -> Example:
        import numpy as np

        source, target = self.target_format.pair(words, slots, intent, self.label_tokens)
        src = self.tokenizer(source, truncation=True, max_length=self.cfg.max_source_len)["input_ids"]
        tgt = self.tokenizer(target, truncation=True, max_length=self.cfg.max_target_len)["input_ids"]
        return Example(np.asarray(src, dtype=np.int64), np.asarray(tgt, dtype=np.int64), DENOISE)

    def pairs(self, indices: list[int], epoch: int) -> list[Pair]:
        import numpy as np

        if any(i >= self.num_gold for i in indices):
            # The gold items' pairs (CDA may add a counterfactual after each), then the teacher-labelled ones.
            gold = [i for i in indices if i < self.num_gold]
            return [*(self.pairs(gold, epoch) if gold else []),
                    *(self._unlabelled_pair(i - self.num_gold) for i in indices if i >= self.num_gold)]
        examples = [self.train[i] for i in indices]
        words = [list(ex.words) for ex in examples]
        results = [self.swapper.utterance(ex) for ex in examples]
        swapped = [r[0] for r in results]
        rng = np.random.default_rng([self.cfg.train.seed, 0xCDA, *[epoch * self.num_train + i for i in indices]])
        out = []
        for item in cda_items(words, swapped, self.cfg.cda, self.cfg.cda_prob, rng):
            ex, k = examples[item.source_index], item.source_index
            # The slot labels follow the swapped words (a gendered word inside a slot value keeps its label).
            slots = (list(ex.slots), results[k][1])
            text_slots, partner_slots = slots[::-1] if item.swapped else slots
            out.append(Pair(self._example(item.text, text_slots, ex.intent),
                            self._example(item.counterfactual, partner_slots, ex.intent),
                            item.swapped, words[k] != swapped[k], lexicon_language(ex.locale), results[k][2] > 0))
        return out

    def _unlabelled_pair(self, k: int) -> Pair:
        """A teacher-labelled item: its target is the teacher's greedy output, and it is its own partner
        (counterfactuals need the slot labels carried word by word, which a target locale lacks)."""
        ex = self.unlabelled[k]
        return Pair(ex, ex, False, False, lexicon_language(self.unlabelled_locale[k]), False)

    def eval_examples(self, indices: list[int]) -> list[Example]:
        return [self._example(list(self.dev[i].words), self.dev[i].slots, self.dev[i].intent) for i in indices]

    def pad(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return self.collator.pad_examples(examples)


def unlabelled_utterances(source: str, locales: list[str], limit: int = 0) -> dict[str, list[list[str]]]:
    """{locale: the words of its first `limit` (0 = all) train utterances}. Only the words column of
    the loaded splits is read: no intent and no slot label of these locales leaves the loader."""
    data = load_massive(str(resolve_data_path(source)), locales=locales, partitions=("train",))
    out = {}
    for locale in locales:
        split = data.dataset(locale=locale, partition="train")
        if limit:
            split = split.select(range(min(limit, len(split))))
        out[locale] = [list(words) for words in split.select_columns(["words"])["words"]]
        if not out[locale]:
            raise ConfigError(f"crosslingual.target_locales: {locale} has no MASSIVE train utterances in {source}")
    return out


def teacher_targets(teacher: Any, tokenizer: Any, sources: list[Any], max_len: int, batch_size: int = 64) -> list[Any]:
    """The teacher's greedy outputs on `sources` (token id arrays), each cut after its eos: the
    targets of the teacher-labelled items (sequence-level KD; the KD term then matches the teacher's
    distribution along them). Batches of similar length, results in the order given."""
    import numpy as np
    import torch

    from core.bigmodel import input_device

    device = input_device(teacher)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[Any] = [None] * len(sources)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(sources[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(sources[i])] = torch.as_tensor(sources[i])
            mask[row, : len(sources[i])] = 1
        with torch.inference_mode():
            generated = teacher.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=max_len, num_beams=1, do_sample=False).cpu()
        for row, i in enumerate(idx):
            tokens = generated[row, 1:].tolist()  # after the decoder start token
            end = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            out[i] = np.asarray(tokens[:end][:max_len], dtype=np.int64)
    return out


def load_distill_data(
    cfg: DistillConfig, run_dir: Path, tokenizer: Any, target_format: TargetFormat | None = None, teacher: Any = None,
) -> AgnosticData | MassiveDistillData:
    if cfg.task == "massive":
        return MassiveDistillData(cfg, tokenizer, target_format, teacher)
    return AgnosticData(cfg, run_dir, tokenizer)
