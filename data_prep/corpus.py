"""Monolingual corpora: read sources per locale, deduplicate, refuse evaluation text, sample languages.

Sources (`SourceConfig.kind`): text files (one sentence per line, .txt or .txt.gz), JSONL files with a
configurable text field, and Hugging Face datasets by name (streamed). MASSIVE train utterances are
unlabelled in-domain text (`massive_pools`).

Every sentence is whitespace-normalised (stripped, runs of whitespace -> one space); duplicates are
dropped exactly on that form. Evaluation text -- FLORES-200 dev of every language and MASSIVE dev/test
utterances of every loaded locale -- is refused wherever it appears (any locale, any source); the
match key is the case-folded sentence without punctuation (`exclusion_key`), so case and
punctuation variants are refused too.
Refusals are counted per locale and reason.

Language sampling: p_l = n_l^alpha / sum_k n_k^alpha. A sample of M sentences gives locale l the
quota m_l = round(p_l * M) (largest remainder, so the quotas sum to M). A locale with m_l <= n_l
gets a seeded random subset; an up-sampled locale (m_l > n_l) gets floor(m_l / n_l) full epochs of
its sentences plus a seeded random subset for the rest: epochs, not draws with replacement, so no
sentence is repeated k+1 times before every sentence is repeated k times. The sample is then
shuffled with the seed.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import data_root, resolve_data_path
from data_prep.config import DataConfig, SourceConfig


class CorpusSourceError(RuntimeError):
    """A corpus source cannot be read (unreachable dataset, malformed file)."""


# ----------------------------------------------------------------------------- text keys

# Text that the tokenizer would turn into a reserved token (the document separator, sentinels, eos)
# or into a byte piece; such sentences are dropped so packed data stays lossless.
_RESERVED_TEXT = re.compile(r"<pad>|</s>|<unk>|\[CLM\]|<sep>|<extra_id_\d+>|<0x[0-9A-F]{2}>")


def has_reserved_text(text: str) -> bool:
    return _RESERVED_TEXT.search(text) is not None


def normalize_whitespace(text: str) -> str:
    """Strip and collapse every run of whitespace to one space (the dedup form)."""
    return " ".join(text.split())


def exclusion_key(text: str) -> str:
    """The key evaluation text is matched on: case-folded, punctuation removed, whitespace normalised.

    Looser than the dedup form on purpose: "What time is it?" in a corpus is refused when MASSIVE
    test has "what time is it".
    """
    folded = text.casefold()
    if any(unicodedata.category(ch).startswith("P") for ch in folded):
        folded = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in folded)
    return normalize_whitespace(folded)


# ----------------------------------------------------------------------------- languages table


def languages_table(root: str | os.PathLike | None = None) -> dict[str, str]:
    """{MASSIVE locale: FLORES-200 code} from corpora/languages.tsv under the data root ({} if absent)."""
    path = data_root(root) / "corpora" / "languages.tsv"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 2 and cols[0]:
            out[cols[0]] = cols[1]
    return out


def _fill(pattern: str, locale: str, flores_codes: dict[str, str] | None) -> str:
    values = {"locale": locale, "lang": locale.split("-")[0]}
    if "{flores}" in pattern:
        codes = flores_codes if flores_codes is not None else languages_table()
        if locale not in codes:
            raise CorpusSourceError(
                f"no FLORES-200 code for {locale} in corpora/languages.tsv (pattern {pattern!r})"
            )
        values["flores"] = codes[locale]
    return pattern.format(**values)


# ----------------------------------------------------------------------------- reading sources


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 .txt/.jsonl file, gzipped when it ends in .gz. Bytes that are
    not UTF-8 and a truncated or damaged gzip stream are CorpusSourceErrors naming the file, the
    line and the byte; an empty file is reported on stderr (it adds nothing to its locale)."""
    import zlib

    try:
        if path.stat().st_size == 0:
            print(f"warning: corpus file {path} is empty (0 bytes); it adds no sentences", file=sys.stderr, flush=True)
            return
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise CorpusSourceError(f"{path}: cannot be read ({e.strerror or e}); check corpus.sources") from e
    offset, lineno = 0, 0
    with f:
        while True:
            try:
                raw = f.readline()
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
                raise CorpusSourceError(
                    f"{path}: the gzip stream is truncated or damaged after line {lineno} ({e}); "
                    "download or compress the file again") from e
            if not raw:
                return
            lineno += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusSourceError(
                    f"{path}:{lineno}: byte {offset + e.start} (0x{raw[e.start]:02x}) is not UTF-8; convert the "
                    "file to UTF-8 (e.g. iconv -t UTF-8) or remove the line") from e
            offset += len(raw)
            yield lineno, text


def read_text_file(path: str | os.PathLike, limit: int | None = None) -> Iterator[str]:
    """Lines of a .txt(.gz) file without the newline (at most `limit`)."""
    for i, line in _read_lines(Path(path)):
        if limit is not None and i > limit:
            return
        yield line.rstrip("\r\n")


def read_jsonl_file(path: str | os.PathLike, text_field: str, limit: int | None = None) -> Iterator[str]:
    """The `text_field` value of each line of a .jsonl(.gz) file; errors name file and line."""
    path = Path(path)
    for lineno, line in _read_lines(path):
        if limit is not None and lineno > limit:
            return
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusSourceError(f"{path}:{lineno}: not a JSON object ({e.msg})") from e
        if not isinstance(row, dict) or text_field not in row:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise CorpusSourceError(
                f"{path}:{lineno}: no field {text_field!r} (fields: {keys}); set the source's text_field"
            )
        value = row[text_field]
        if not isinstance(value, str):
            raise CorpusSourceError(
                f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not text"
            )
        yield value


def read_hf_dataset(source: SourceConfig, locale: str, limit: int | None = None) -> Iterator[str]:
    """Stream `source.text_field` of a Hugging Face dataset; a clear error when it cannot be reached."""
    import datasets

    name = source.path
    config = _fill(source.hf_config, locale, None) if source.hf_config else None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", "", "false", "False")
    what = f"Hugging Face dataset {name!r}" + (
        f" (config {config!r}, split {source.split!r})" if config else ""
    )
    try:
        # Offline, only a local datasets cache can serve it, and streaming never reads that cache.
        ds = datasets.load_dataset(name, config, split=source.split, streaming=not offline)
    except Exception as e:  # datasets raises many types here (ConnectionError, DatasetNotFoundError, ...)
        hint = (
            "the hub is disabled (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and the dataset is not in the "
            "local datasets cache"
            if offline
            else "it could not be reached or does not exist"
        )
        raise CorpusSourceError(
            f"corpus source {source.name!r}: cannot read {what}: {hint}. Fix: run once with network access "
            f"(unset HF_HUB_OFFLINE) to cache it, or export it to files and use kind: jsonl (text_field) or "
            f"kind: text. ({type(e).__name__}: {e})"
        ) from e
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        if source.text_field not in row:
            raise CorpusSourceError(
                f"corpus source {source.name!r}: {what} has no column {source.text_field!r} "
                f"(columns: {', '.join(row)}); set text_field"
            )
        yield row[source.text_field]


def read_source(
    source: SourceConfig, locale: str, limit: int | None = None, flores_codes: dict[str, str] | None = None
) -> Iterator[str] | None:
    """Raw sentences of one source for one locale; None when the source has no file for the locale."""
    if source.kind == "hf":
        return read_hf_dataset(source, locale, limit)
    path = resolve_data_path(_fill(source.path, locale, flores_codes))
    if not path.exists():
        return None
    if source.kind == "text":
        return read_text_file(path, limit)
    return read_jsonl_file(path, source.text_field, limit)


# ----------------------------------------------------------------------------- evaluation text


@dataclass
class EvaluationText:
    """Keys (exclusion_key) of text that must never be trained on, by origin."""

    keys: dict[str, set[str]] = field(default_factory=dict)

    def add(self, origin: str, texts: Iterable[str]) -> None:
        self.keys.setdefault(origin, set()).update(exclusion_key(t) for t in texts)

    def origin_of(self, key: str) -> str | None:
        for origin, keys in self.keys.items():
            if key in keys:
                return origin
        return None

    def sizes(self) -> dict[str, int]:
        return {origin: len(keys) for origin, keys in self.keys.items()}


def read_evaluation_files(paths: Iterable[str]) -> list[str]:
    """Sentences of every *.txt / *.txt.gz file under each path (directory or file), sorted by name."""
    texts: list[str] = []
    for value in paths:
        path = resolve_data_path(value)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.endswith((".txt", ".txt.gz")))
        elif path.is_file():
            files = [path]
        else:
            raise CorpusSourceError(
                f"corpus.evaluation_text: {path} does not exist (refusing to run without it)"
            )
        for f in files:
            texts.extend(read_text_file(f))
    return texts


def evaluation_text(cfg: DataConfig, massive_eval_utterances: Iterable[str] = ()) -> EvaluationText:
    """FLORES (corpus.evaluation_text) and MASSIVE dev/test utterances as exclusion keys."""
    ev = EvaluationText()
    ev.add("flores", read_evaluation_files(cfg.corpus.evaluation_text))
    ev.add("massive_eval", massive_eval_utterances)
    return ev


# ----------------------------------------------------------------------------- corpus


@dataclass
class LocaleReport:
    """What happened to one locale's text."""

    read: dict[str, int] = field(default_factory=dict)
    """Raw lines per source ('missing' sources are absent)."""
    missing_sources: list[str] = field(default_factory=list)
    empty_or_length: int = 0
    """Dropped: empty, too short or long, or containing reserved-token text such as <sep>."""
    duplicates: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    """Evaluation text refused, per origin (flores, massive_eval)."""
    capped: int = 0
    """Dropped by max_sentences_per_language."""
    kept: int = 0
    aligned: int = 0
    """Lines of the aligned sources kept (corpus.aligned_sources), not counted in `kept`."""


@dataclass
class Corpus:
    """Deduplicated, filtered sentences per locale, with the report of how they were obtained."""

    sentences: dict[str, list[str]]
    report: dict[str, LocaleReport]
    aligned: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """Per locale, the kept lines of the aligned sources as (key, text); the key (`source:line`) is
    the same for the translations of one line (`aligned_groups`)."""

    def tokenizer_pools(self) -> dict[str, list[str]]:
        """Monolingual sentences plus the aligned lines, per locale: the tokenizer's text."""
        return {loc: sents + [text for _, text in self.aligned.get(loc, [])] for loc, sents in self.sentences.items()}

    def sizes(self) -> dict[str, int]:
        return {loc: len(s) for loc, s in self.sentences.items()}

    def table(self) -> str:
        """Plain-text table: lines read, duplicates, refused evaluation text and kept, per locale."""
        sources = sorted(
            {s for r in self.report.values() for s in r.read}
            | {s for r in self.report.values() for s in r.missing_sources}
        )
        header = f"{'locale':<8}" + "".join(f"{s[:10]:>11}" for s in sources)
        header += f"{'dups':>8}{'filtered':>9}{'flores':>8}{'massive':>8}{'capped':>8}{'kept':>9}"
        lines = [header, "-" * len(header)]
        for loc, r in self.report.items():
            cells = "".join(f"{r.read[s]:>11}" if s in r.read else f"{'-':>11}" for s in sources)
            lines.append(
                f"{loc:<8}{cells}{r.duplicates:>8}{r.empty_or_length:>9}{r.refused.get('flores', 0):>8}"
                f"{r.refused.get('massive_eval', 0):>8}{r.capped:>8}{r.kept:>9}"
            )
        return "\n".join(lines)


def clean_sentences(
    raw: Iterable[str],
    excluded: EvaluationText,
    report: LocaleReport,
    seen: set[str],
    min_chars: int = 1,
    max_chars: int = 1_000_000,
) -> list[str]:
    """Normalise whitespace, drop empty/over-long lines, duplicates (against `seen`, updated) and
    evaluation text; counts go to `report`."""
    out = []
    for text in raw:
        text = normalize_whitespace(text)
        if not min_chars <= len(text) <= max_chars or has_reserved_text(text):
            report.empty_or_length += 1
            continue
        if text in seen:
            report.duplicates += 1
            continue
        seen.add(text)
        origin = excluded.origin_of(exclusion_key(text))
        if origin is not None:
            report.refused[origin] = report.refused.get(origin, 0) + 1
            continue
        out.append(text)
    return out


def build_corpus(cfg: DataConfig, excluded: EvaluationText, progress: bool = True) -> Corpus:
    """Read every source for every configured locale; dedup, filter, refuse evaluation text, cap."""
    from tqdm.auto import tqdm

    c = cfg.corpus
    codes = languages_table()
    sentences: dict[str, list[str]] = {}
    aligned: dict[str, list[tuple[str, str]]] = {}
    reports: dict[str, LocaleReport] = {}
    for loc in tqdm(cfg.locales, desc="corpus", unit="locale", disable=not progress):
        report = LocaleReport()
        seen: set[str] = set()
        kept: list[str] = []
        for source in c.sources:
            raw = read_source(source, loc, c.max_sentences_per_source, codes)
            if raw is None:
                report.missing_sources.append(source.name)
                continue
            counted = _Counted(raw)
            if source.name in c.aligned_sources:
                # One line at a time, so each kept line keeps its number (its key across locales).
                lines = [(f"{source.name}:{n}", clean_sentences([text], excluded, report, seen, c.min_chars,
                                                                c.max_chars)) for n, text in enumerate(counted)]
                aligned.setdefault(loc, []).extend((key, kept_line[0]) for key, kept_line in lines if kept_line)
                report.aligned = len(aligned[loc])
            else:
                kept += clean_sentences(counted, excluded, report, seen, c.min_chars, c.max_chars)
            report.read[source.name] = counted.count
        if c.max_sentences_per_language is not None and len(kept) > c.max_sentences_per_language:
            rng = random.Random(f"{cfg.seed}:cap:{loc}")
            chosen = sorted(rng.sample(range(len(kept)), c.max_sentences_per_language))
            report.capped = len(kept) - len(chosen)
            kept = [kept[i] for i in chosen]
        report.kept = len(kept)
        sentences[loc] = kept
        reports[loc] = report
    if not any(sentences.values()) and not any(aligned.values()):
        sources = ", ".join(f"{s.name} ({s.path})" if s.kind != "hf" else s.name for s in c.sources)
        raise CorpusSourceError(
            f"the corpus has no sentences for any of the locales {', '.join(cfg.locales)}: every source ({sources}) "
            "is missing, empty or filtered out; point corpus.sources at text files with one sentence per line")
    return Corpus(sentences, reports, aligned)


def aligned_groups(aligned: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    """{line key: [(locale, text), ...]} for the lines kept in at least two locales (a line left in
    one locale has no translation to align with and is dropped), the shape `draw_parallel` takes."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for loc, lines in aligned.items():
        for key, text in lines:
            groups.setdefault(key, []).append((loc, text))
    return {key: group for key, group in groups.items() if len(group) >= 2}


class _Counted:
    """Iterate an iterable and count the items that went by."""

    def __init__(self, items: Iterable[str]) -> None:
        self._items = items
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for item in self._items:
            self.count += 1
            yield item


def massive_pools(
    utterances: dict[str, list[str]], excluded: EvaluationText, locales: Iterable[str]
) -> tuple[dict[str, list[str]], dict[str, LocaleReport]]:
    """MASSIVE train utterances per locale, deduplicated and without any evaluation text."""
    pools, reports = {}, {}
    for loc in locales:
        report = LocaleReport(read={"massive_train": len(utterances.get(loc, []))})
        pools[loc] = clean_sentences(utterances.get(loc, []), excluded, report, set())
        report.kept = len(pools[loc])
        reports[loc] = report
    return pools, reports


def merge_pools(*pools: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per-locale union of sentence pools, order kept, duplicates dropped."""
    out: dict[str, list[str]] = {}
    for pool in pools:
        for loc, sents in pool.items():
            have = out.setdefault(loc, [])
            seen = set(have)
            for s in sents:
                if s not in seen:
                    seen.add(s)
                    have.append(s)
    return out


def num_heldout(n: int, fraction: float, min_documents: int = 1) -> int:
    """round(fraction * n) held-out items, at least `min_documents` when there are 2 * min_documents
    or more, none when fraction is 0."""
    k = round(fraction * n)
    if fraction > 0 and k < min_documents and n >= 2 * min_documents:
        k = min_documents
    return k


def split_heldout(
    pools: dict[str, list[str]], fraction: float, seed: int, min_documents: int = 1
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split each locale's (deduplicated) sentences into disjoint train and heldout pools.

    Splitting happens before up-sampling, so a repeated sentence never lands in both. A locale gets
    round(fraction * n) heldout sentences, at least `min_documents` when it has 2 * min_documents or
    more, none when fraction is 0.
    """
    train, heldout = {}, {}
    for loc, sents in pools.items():
        n = len(sents)
        k = num_heldout(n, fraction, min_documents)
        rng = random.Random(f"{seed}:heldout:{loc}")
        held = set(rng.sample(range(n), k)) if k else set()
        heldout[loc] = [s for i, s in enumerate(sents) if i in held]
        train[loc] = [s for i, s in enumerate(sents) if i not in held]
    return train, heldout


# ----------------------------------------------------------------------------- sampling


def sampling_probabilities(sizes: dict[str, int], alpha: float) -> dict[str, float]:
    """p_l = n_l^alpha / sum_k n_k^alpha (0 for empty locales)."""
    weights = {loc: (n**alpha if n > 0 else 0.0) for loc, n in sizes.items()}
    total = sum(weights.values())
    if total == 0:
        raise ValueError("language sampling: every locale has 0 sentences")
    return {loc: w / total for loc, w in weights.items()}


def language_quotas(probs: dict[str, float], total: int) -> dict[str, int]:
    """Integer quotas m_l summing to `total`, |m_l - p_l * total| < 1 (largest remainder)."""
    exact = {loc: p * total for loc, p in probs.items()}
    quotas = {loc: math.floor(x) for loc, x in exact.items()}
    left = total - sum(quotas.values())
    # Ties broken by locale name, so the result does not depend on dict order.
    by_remainder = sorted(exact, key=lambda loc: (-(exact[loc] - quotas[loc]), loc))
    for loc in by_remainder[:left]:
        quotas[loc] += 1
    return quotas


@dataclass
class Mixture:
    """A language-sampled list of documents and how it was drawn."""

    documents: list[str]
    locales: list[str]
    """The locale of each document (parallel to documents)."""
    sizes: dict[str, int]
    """n_l: sentences available per locale."""
    probabilities: dict[str, float]
    """p_l: the target share."""
    quotas: dict[str, int]
    """m_l: documents drawn per locale."""
    alpha: float

    def realised_shares(self) -> dict[str, float]:
        counts = Counter(self.locales)
        total = max(len(self.locales), 1)
        return {loc: counts.get(loc, 0) / total for loc in self.sizes}

    def rows(self) -> list[dict[str, Any]]:
        realised = self.realised_shares()
        return [
            {
                "locale": loc,
                "n_sentences": n,
                "p_target": self.probabilities[loc],
                "drawn": self.quotas[loc],
                "epochs": self.quotas[loc] / n if n else 0.0,
                "realised_share": realised[loc],
            }
            for loc, n in self.sizes.items()
        ]

    def table(self, title: str = "mixture") -> str:
        header = f"{'locale':<8}{'n_l':>10}{'p_l target':>12}{'drawn':>10}{'epochs':>8}{'realised':>10}"
        lines = [f"{title}: alpha={self.alpha}, {len(self.documents)} documents", header, "-" * len(header)]
        for r in self.rows():
            lines.append(
                f"{r['locale']:<8}{r['n_sentences']:>10}{r['p_target']:>12.4f}{r['drawn']:>10}"
                f"{r['epochs']:>8.2f}{r['realised_share']:>10.4f}"
            )
        return "\n".join(lines)


def parallel_groups(
    ids: dict[str, list[str]], utterances: dict[str, list[str]], pools: dict[str, list[str]]
) -> dict[str, list[tuple[str, str]]]:
    """{MASSIVE id: [(locale, utterance), ...]}: every utterance a locale's pool kept, once, under the
    id of its first occurrence. `ids[loc]` is parallel to `utterances[loc]` (MASSIVE ids are shared
    by the translations of one utterance)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for loc, pool in pools.items():
        if len(ids.get(loc, ())) != len(utterances.get(loc, ())):
            raise ValueError(f"{loc}: {len(ids.get(loc, ()))} ids for {len(utterances.get(loc, ()))} utterances")
        unplaced = set(pool)
        for id_, utt in zip(ids[loc], utterances[loc]):
            if utt in unplaced:
                unplaced.discard(utt)
                groups.setdefault(id_, []).append((loc, utt))
    return groups


def draw_parallel(
    groups: dict[str, list[tuple[str, str]]], heldout_fraction: float, seed: int, min_heldout: int = 1
) -> tuple[Mixture, Mixture]:
    """Train and heldout documents ordered by MASSIVE id: the translations of one utterance follow
    each other (seeded random locale order), so a packed row holds the same utterances in several
    languages (translation language modelling, as in XLM). Ids come in seeded random order; the
    heldout ids (`heldout_fraction` of them, at least `min_heldout`) are disjoint from train, so no
    translation of a heldout utterance is trained on."""
    ids = sorted(groups)
    random.Random(f"{seed}:parallel:ids").shuffle(ids)
    k = num_heldout(len(ids), heldout_fraction, min_heldout)
    rng = random.Random(f"{seed}:parallel:order")

    def mixture(part: list[str]) -> Mixture:
        docs: list[tuple[str, str]] = []
        for id_ in part:
            group = list(groups[id_])
            rng.shuffle(group)
            docs.extend(group)
        sizes = dict(sorted(Counter(loc for loc, _ in docs).items()))
        return Mixture(
            documents=[d for _, d in docs],
            locales=[loc for loc, _ in docs],
            sizes=sizes,
            probabilities=sampling_probabilities(sizes, 1.0),
            quotas=dict(sizes),
            alpha=1.0,
        )

    return mixture(ids[k:]), mixture(ids[:k])


def join_mixtures(first: Mixture, second: Mixture) -> Mixture:
    """`first`'s documents followed by `second`'s (rows are shuffled at training time, not here); sizes
    and drawn counts add up per locale, and p_l becomes each locale's share of the joined list.
    `alpha` is the first mixture's."""
    sizes = {loc: first.sizes.get(loc, 0) + second.sizes.get(loc, 0) for loc in {**first.sizes, **second.sizes}}
    quotas = {loc: first.quotas.get(loc, 0) + second.quotas.get(loc, 0) for loc in sizes}
    total = max(sum(quotas.values()), 1)
    return Mixture(
        documents=first.documents + second.documents,
        locales=first.locales + second.locales,
        sizes=sizes,
        probabilities={loc: quotas[loc] / total for loc in sizes},
        quotas=quotas,
        alpha=first.alpha,
    )


def draw_mixture(pools: dict[str, list[str]], alpha: float, total: int, seed: int) -> Mixture:
    """Draw `total` documents from per-locale pools with p_l ~ n_l^alpha (epochs for up-sampling)."""
    sizes = {loc: len(s) for loc, s in pools.items()}
    probs = sampling_probabilities(sizes, alpha)
    quotas = language_quotas(probs, total)
    docs: list[tuple[str, str]] = []
    for loc, sents in pools.items():
        m, n = quotas[loc], len(sents)
        if m == 0:
            continue
        rng = random.Random(f"{seed}:mix:{loc}")
        full_epochs, rest = divmod(m, n)
        chosen = list(range(n)) * full_epochs + sorted(rng.sample(range(n), rest))
        docs.extend((loc, sents[i]) for i in chosen)
    random.Random(f"{seed}:shuffle").shuffle(docs)
    return Mixture(
        documents=[d for _, d in docs],
        locales=[loc for loc, _ in docs],
        sizes=sizes,
        probabilities=probs,
        quotas=quotas,
        alpha=alpha,
    )
