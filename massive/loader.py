"""MASSIVE 1.1: load and validate the official files, the release tarball or the hub.

Sources (`load_massive(source, ...)`):
- a directory of official `<locale>.jsonl` / `<locale>.jsonl.gz` files (or an extracted release
  directory that holds them under `data/`);
- the official release tarball (`amazon-massive-dataset-1.1.tar.gz`, members `1.1/data/<locale>.jsonl`),
  as a path or an http(s)/file URL (any tar compression Python's tarfile reads);
- the string `"hub"`: the Hugging Face dataset `AmazonScience/massive` through `datasets.load_dataset`
  (needs the network or a datasets cache); its integer `scenario`/`intent` columns are mapped back to
  names with the dataset's ClassLabel features.

Every row goes through the same checks. A bad row (malformed JSON, a missing or non-string field, a
partition other than train/dev/test, a `locale` that is not the file's, a malformed annotation, a
slot-free `annot_utt` that differs from `utt`, an id repeated within a partition) raises
`MassiveFormatError` naming the file and line; with `on_bad_row="skip"` it is skipped, counted per
reason in `MassiveData.report` and a summary is logged. Rows of partitions that were not asked for are counted but not parsed (their
`"partition"` value is read from the raw line; a line without a readable one is fully checked).
A file that cannot be decompressed is a `MassiveSourceError` naming it, in both modes; a locale file
without any row is one too, and with "skip" a counted `empty_file` skip (FILE_REASONS) instead.

Words and slots are parsed by massive/format.py (`parse_annot_utt`).

Parsed splits are cached as `datasets` Arrow directories under `cache_dir` keyed by the source file
(path, size, mtime), the locale and `PARSER_VERSION`; a changed file gets a new key.

Heavy imports (datasets, pyarrow, tqdm) live inside functions: `evaluation.config` imports this module
for `MASSIVE_LOCALES` at start-up.

This module holds the public API; massive/rows.py the row checks, the parser and the cache;
massive/sources.py the three sources.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from massive.format import (
    MASSIVE_LOCALES,
    OTHER,
    PARTITIONS,
    MassiveExample,
)

if TYPE_CHECKING:
    import datasets
from massive.rows import (
    BAD_ROW_REASONS,
    FILE_REASONS,
    PARSER_VERSION,
    BadRow,
    MassiveFormatError,
    MassiveReport,
    MassiveSourceError,
    _Cache,
    _empty,
    _Loader,
    _locale_error,
    _to_dataset,
    check_locales,
    logger,
)
from massive.sources import (
    HUB_DATASET,
    _download,
    _is_url,
    _load_directory,
    _load_hub,
    _load_tarball,
    hub_rows,
)

__all__ = [
    "BAD_ROW_REASONS",
    "BadRow",
    "FILE_REASONS",
    "HUB_DATASET",
    "MassiveData",
    "MassiveFormatError",
    "MassiveReport",
    "MassiveSourceError",
    "ON_BAD_ROW",
    "PARSER_VERSION",
    "check_locales",
    "evaluation_utterances",
    "hub_rows",
    "load_massive",
    "logger",
    "massive_ids",
    "massive_labels",
    "massive_utterances",
]


ON_BAD_ROW = ("error", "skip")


def massive_labels(data: MassiveData) -> list[str]:
    """`Other`, then the intents, then the slot types of `data` (sorted): the label vocabulary."""
    return [OTHER, *data.intents, *(s for s in data.slot_types if s != OTHER)]


class MassiveData:
    """Loaded MASSIVE splits (one Arrow table per locale and partition) and the load's report."""

    def __init__(self, splits: dict[tuple[str, str], datasets.Dataset], report: MassiveReport) -> None:
        self._splits = dict(sorted(splits.items(), key=lambda kv: (kv[0][0], PARTITIONS.index(kv[0][1]))))
        self.report = report

    @property
    def locales(self) -> list[str]:
        """Loaded locales, sorted."""
        return sorted({loc for loc, _ in self._splits})

    @property
    def partitions(self) -> list[str]:
        """Loaded partitions, in train, dev, test order."""
        return [p for p in PARTITIONS if any(part == p for _, part in self._splits)]

    def _select(self, locale: str | None, partition: str | None) -> list[datasets.Dataset]:
        if locale is not None and locale not in self.locales:
            if locale not in MASSIVE_LOCALES:
                raise _locale_error(locale)
            raise MassiveSourceError(f"locale {locale} was not loaded; loaded: {', '.join(self.locales)}")
        if partition is not None and partition not in self.partitions:
            raise MassiveSourceError(
                f"partition {partition!r} was not loaded; loaded: {', '.join(self.partitions)} "
                f"(allowed values: {', '.join(PARTITIONS)})"
            )
        return [
            ds
            for (loc, part), ds in self._splits.items()
            if (locale is None or loc == locale) and (partition is None or part == partition)
        ]

    def dataset(self, locale: str | None = None, partition: str | None = None) -> datasets.Dataset:
        """The selected splits as one `datasets.Dataset` (columns of MassiveExample)."""
        import datasets

        parts = self._select(locale, partition)
        if not parts:
            return _to_dataset(_empty())
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def examples(self, locale: str | None = None, partition: str | None = None) -> list[MassiveExample]:
        """Examples of one locale and/or partition (None = all), in file order, locales sorted.

        Built from Arrow on each call: keep the list rather than calling it in a loop.
        """
        out: list[MassiveExample] = []
        for ds in self._select(locale, partition):
            cols = ds.data.table.to_pydict()
            intern = sys.intern
            for i in range(len(ds)):
                out.append(
                    MassiveExample(
                        id=cols["id"][i],
                        locale=intern(cols["locale"][i]),
                        partition=intern(cols["partition"][i]),
                        scenario=intern(cols["scenario"][i]),
                        intent=intern(cols["intent"][i]),
                        utt=cols["utt"][i],
                        annot_utt=cols["annot_utt"][i],
                        words=tuple(cols["words"][i]),
                        slots=tuple(intern(s) for s in cols["slots"][i]),
                    )
                )
        return out

    def __len__(self) -> int:
        return sum(len(ds) for ds in self._splits.values())

    def _unique(self, column: str) -> set[str]:
        import pyarrow.compute as pc

        out: set[str] = set()
        for ds in self._splits.values():
            col = ds.data.table.column(column)
            if column == "slots":
                col = pc.list_flatten(col)
            out.update(pc.unique(col).to_pylist())
        return out

    @property
    def intents(self) -> list[str]:
        """Intent names in the loaded splits, sorted."""
        return sorted(self._unique("intent"))

    @property
    def scenarios(self) -> list[str]:
        return sorted(self._unique("scenario"))

    @property
    def slot_types(self) -> list[str]:
        """Slot types in the loaded splits, sorted, without OTHER."""
        return sorted(self._unique("slots") - {OTHER})

    def summary_table(self) -> str:
        """A plain-text table: examples per locale and partition, then rows read and skipped."""
        r = self.report
        parts = list(PARTITIONS)
        header = f"{'locale':<8}" + "".join(f"{p:>9}" for p in parts) + f"{'total':>9}"
        lines = [f"MASSIVE from {r.source}", header, "-" * len(header)]
        totals = Counter()
        for loc in sorted(r.split_counts):
            counts = r.split_counts[loc]
            totals.update(counts)
            cells = "".join(f"{counts[p]:>9}" if p in counts else f"{'-':>9}" for p in parts)
            lines.append(f"{loc:<8}{cells}{sum(counts.values()):>9}")
        lines.append("-" * len(header))
        lines.append(f"{'all':<8}" + "".join(f"{totals[p]:>9}" for p in parts) + f"{sum(totals.values()):>9}")
        lines.append(
            f"rows read {r.rows_read}, loaded {r.rows_loaded}, skipped {r.num_skipped}, "
            f"other partitions {r.rows_not_requested}, splits from cache {len(r.cached_splits)}"
        )
        for reason, n in sorted(r.skipped.items()):
            example = next((b for b in r.bad_rows if b.reason == reason), None)
            where = f" (first: {example.path}:{example.line}: {example.message})" if example else ""
            what = BAD_ROW_REASONS.get(reason) or FILE_REASONS.get(reason, reason)
            lines.append(f"  skipped {n} {reason}: {what}{where}")
        return "\n".join(lines)


def load_massive(
    source: str | os.PathLike,
    locales: Iterable[str] | str | None = None,
    partitions: Iterable[str] | str = PARTITIONS,
    on_bad_row: str = "error",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> MassiveData:
    """Load MASSIVE from a directory, a release tarball (path or http(s)/file URL) or "hub".

    A path may start with `@data/` (under the data root, core.config.data_root()).

    locales: MASSIVE locale names (None = every locale the source has). partitions: any of train,
    dev, test. on_bad_row: "error" raises MassiveFormatError at the first bad row; "skip" skips and
    counts bad rows in `.report` (and logs the summary). cache_dir: where parsed splits are kept as
    Arrow (None = no cache), e.g. `runs/NAME/.cache/massive`. progress: a tqdm bar per locale file.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r}; allowed values: {', '.join(ON_BAD_ROW)}")
    parts = [partitions] if isinstance(partitions, str) else list(partitions)
    for p in parts:
        if p not in PARTITIONS:
            raise ValueError(f"unknown MASSIVE partition {p!r}; allowed values: {', '.join(PARTITIONS)}")
    if not parts:
        raise ValueError(f"no partitions asked for; allowed values: {', '.join(PARTITIONS)}")
    parts = [p for p in PARTITIONS if p in parts]
    wanted = check_locales(locales) if locales is not None else None
    if wanted == []:
        raise ValueError("locales is empty; pass None for every locale the source has")
    cache = _Cache(cache_dir)
    source_str = os.fspath(source)
    loader = _Loader(source_str, parts, on_bad_row, cache, progress)

    if source_str == "hub":
        _load_hub(wanted, loader)
    elif _is_url(source_str):
        local, temporary = _download(source_str, cache.root, progress)
        try:
            _load_tarball(local, source_str, wanted, loader)
        finally:
            if temporary:
                shutil.rmtree(local.parent, ignore_errors=True)
    else:
        from core.config import describe_data_root, resolve_data_path

        path = resolve_data_path(source_str)  # `@data/...` is under the data root
        loader.report.source = str(path)
        if path.is_dir():
            _load_directory(path, wanted, loader)
        elif path.is_file():
            _load_tarball(path, str(path), wanted, loader)
        else:
            where = f" = {path}, under the data root {describe_data_root()}" if source_str.startswith("@data/") else ""
            missing = "" if path.exists() else " (it does not exist)"
            raise MassiveSourceError(f"MASSIVE source {source_str!r}{where} is neither a directory, a tarball, an "
                                     f"http(s)/file URL nor 'hub'{missing}")

    data = MassiveData(loader.splits, loader.report)
    if data.report.num_skipped:
        logger.warning("MASSIVE: skipped %d bad row(s)\n%s", data.report.num_skipped, data.summary_table())
    return data


def _column_by_locale(data: MassiveData, column: str, partitions: Sequence[str]) -> dict[str, list[Any]]:
    return {
        loc: [v for p in partitions for v in data.dataset(loc, p).data.table.column(column).to_pylist()]
        for loc in data.locales
    }


def massive_utterances(data: MassiveData, partitions: Sequence[str] = ("train",)) -> dict[str, list[str]]:
    """{locale: utterances of the given partitions}: in-domain text (train only, by default)."""
    return _column_by_locale(data, "utt", partitions)


def massive_ids(data: MassiveData, partitions: Sequence[str] = ("train",)) -> dict[str, list[str]]:
    """{locale: ids of the given partitions}, parallel to `massive_utterances` (an id is shared by the
    translations of one utterance across locales)."""
    return {loc: [str(i) for i in ids] for loc, ids in _column_by_locale(data, "id", partitions).items()}


def evaluation_utterances(data: MassiveData) -> set[str]:
    """All dev and test utterances: text that must never reach pretraining or the tokenizer."""
    missing = [p for p in ("dev", "test") if p not in data.partitions]
    if missing:
        raise MassiveSourceError(
            f"evaluation_utterances needs the dev and test partitions, but {', '.join(missing)} "
            "was not loaded: load_massive(..., partitions=('train', 'dev', 'test'))"
        )
    out: set[str] = set()
    for p in ("dev", "test"):
        out.update(data.dataset(partition=p).data.table.column("utt").to_pylist())
    return out
