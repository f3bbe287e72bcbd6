"""MASSIVE rows: the checks every row goes through, the bad-row report, the parser of a locale file's
lines, and the Arrow cache of parsed splits (see massive/loader.py for the sources and the rules)."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from massive.format import (
    MASSIVE_LOCALES,
    PARTITIONS,
    AnnotationError,
    MassiveError,
    _same_text,
    parse_annot_utt,
)

if TYPE_CHECKING:
    import datasets


logger = logging.getLogger(__name__)


REQUIRED_FIELDS: tuple[str, ...] = ("id", "locale", "partition", "scenario", "intent", "utt", "annot_utt")


PARSER_VERSION = 1
"""Bump whenever parsing changes what a row turns into: it is part of every cache key."""


BAD_ROW_REASONS: dict[str, str] = {
    "malformed_json": "the line is not a JSON object",
    "missing_field": "a required field is missing or not a string",
    "unknown_partition": "partition is not one of train, dev, test",
    "locale_mismatch": "the row's locale is not the file's locale",
    "malformed_annotation": "annot_utt has unbalanced brackets or a malformed [slot : value] span",
    "utt_mismatch": "annot_utt without its slot markup differs from utt",
    "duplicate_id": "an id seen earlier in the same file",
}
"""Why a row is bad (the keys of MassiveReport.skipped)."""


FILE_REASONS: dict[str, str] = {"empty_file": "the locale file holds no rows"}
"""Why a whole file is skipped with on_bad_row="skip" (also keys of MassiveReport.skipped)."""


# At most this many bad-row messages are kept per reason in the report (all are counted).
_MAX_MESSAGES_PER_REASON = 20


class MassiveFormatError(MassiveError):
    """A bad row: `path:line: message`, with `.reason` one of BAD_ROW_REASONS."""

    def __init__(self, path: str, line: int, reason: str, message: str) -> None:
        self.path, self.line, self.reason, self.detail = str(path), int(line), reason, message
        super().__init__(f"{path}:{line}: {message}")


class MassiveSourceError(MassiveError):
    """A source that cannot be read (missing, unreachable, lacks a locale) or an unknown locale."""


@dataclass(frozen=True)
class BadRow:
    path: str
    line: int
    reason: str
    message: str

    def error(self) -> MassiveFormatError:
        return MassiveFormatError(self.path, self.line, self.reason, self.message)


@dataclass
class MassiveReport:
    """What a load read: rows_read == rows_loaded + num_skipped + rows_not_requested."""

    source: str
    rows_read: int = 0
    """Non-blank rows in the locale files (or hub splits) that were opened or are in the cache."""
    rows_loaded: int = 0
    rows_not_requested: int = 0
    """Rows of partitions that were not asked for (counted, not parsed)."""
    skipped: Counter = field(default_factory=Counter)
    """Bad rows skipped (on_bad_row="skip"), per reason (see BAD_ROW_REASONS)."""
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """locale -> partition -> examples loaded."""
    bad_rows: list[BadRow] = field(default_factory=list)
    """The first few bad rows per reason, with file and line."""
    cached_splits: list[tuple[str, str]] = field(default_factory=list)
    """(locale, partition) splits read from the Arrow cache instead of the source."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for run-directory reports)."""
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_loaded": self.rows_loaded,
            "rows_not_requested": self.rows_not_requested,
            "skipped": dict(self.skipped),
            "split_counts": {loc: dict(counts) for loc, counts in self.split_counts.items()},
            "bad_rows": _bad_to_json(self.bad_rows),
            "cached_splits": [list(split) for split in self.cached_splits],
        }

    def _add_bad(self, bad: Iterable[BadRow]) -> None:
        for row in bad:
            self.skipped[row.reason] += 1
            if sum(1 for b in self.bad_rows if b.reason == row.reason) < _MAX_MESSAGES_PER_REASON:
                self.bad_rows.append(row)


def _locale_error(locale: str) -> MassiveSourceError:
    lowered = {loc.lower(): loc for loc in MASSIVE_LOCALES}
    close = [lowered[m] for m in difflib.get_close_matches(locale.lower(), list(lowered), n=3, cutoff=0.6)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return MassiveSourceError(
        f"{locale!r} is not a MASSIVE locale{hint} (MASSIVE locales: {', '.join(MASSIVE_LOCALES)})"
    )


def check_locales(locales: Iterable[str]) -> list[str]:
    """The locales as a list; raises MassiveSourceError for a name that is not a MASSIVE locale."""
    if isinstance(locales, str):
        locales = [locales]
    out = []
    for loc in locales:
        if loc not in MASSIVE_LOCALES:
            raise _locale_error(str(loc))
        if loc not in out:
            out.append(loc)
    return out


# Reads a row's partition without decoding the JSON, to pass over rows of partitions not asked for.
# Inside a JSON string a quote is escaped, so this only matches a real "partition" key.
_PARTITION_RE = re.compile(rb'"partition"\s*:\s*"(train|dev|test)"')


class _Parser:
    """Checks and parses the rows of one locale file; collects bad rows (or raises on the first).

    Where a bad row is counted does not depend on which partitions were asked for, so the cached
    splits of different loads add up: a row whose raw line shows its partition belongs to that
    partition's split (also when it turns out to be malformed); a row without one is decoded in
    every load and, when its partition cannot be read, is a bad row of the file itself.
    """

    def __init__(self, path: str, locale: str, partitions: Sequence[str], on_bad_row: str) -> None:
        self.path, self.locale, self.partitions, self.on_bad_row = path, locale, tuple(partitions), on_bad_row
        self.columns: dict[str, dict[str, list[Any]]] = {p: _empty() for p in self.partitions}
        self.partition_rows: Counter = Counter()
        """Rows per partition, bad rows of that partition included."""
        self.file_bad: list[BadRow] = []
        """Rows without a readable partition."""
        self.split_bad: dict[str, list[BadRow]] = {p: [] for p in self.partitions}
        self.seen_ids: dict[str, set[str]] = {p: set() for p in self.partitions}

    def _bad(self, line: int, reason: str, message: str, partition: str | None) -> None:
        bad = BadRow(self.path, line, reason, message)
        if self.on_bad_row == "error":
            raise bad.error()
        (self.split_bad[partition] if partition else self.file_bad).append(bad)

    def add_line(self, line_no: int, raw: bytes, hint: str | None) -> None:
        """One raw line; `hint` is the (requested) partition read from the raw line, if any."""
        if hint is None and not raw.strip():
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(line_no, "malformed_json", f"not UTF-8 text at byte {e.start}", hint)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return self._bad(line_no, "malformed_json", f"malformed JSON: {e.msg} at column {e.colno}", hint)
        if not isinstance(row, dict):
            return self._bad(
                line_no, "malformed_json", f"expected a JSON object, got {type(row).__name__}", hint
            )
        self.add_row(line_no, row, hint)

    def add_row(self, line_no: int, row: dict[str, Any], hint: str | None = None) -> None:
        """One decoded row; counted in partition_rows here unless `hint` was counted already."""
        partition = row.get("partition")
        if not isinstance(partition, str):
            return self._bad(line_no, "missing_field", "missing or non-string field 'partition'", hint)
        if partition not in PARTITIONS:
            return self._bad(
                line_no,
                "unknown_partition",
                f"unknown partition {partition!r}; allowed values: {', '.join(PARTITIONS)}",
                hint,
            )
        if hint is None:
            self.partition_rows[partition] += 1
            if partition not in self.partitions:
                return
        elif partition != hint:
            return self._bad(
                line_no, "malformed_json", f"two partition values, {hint!r} and {partition!r}", hint
            )
        if isinstance(row.get("id"), int) and not isinstance(row.get("id"), bool):
            row["id"] = str(row["id"])
        missing = [k for k in REQUIRED_FIELDS if not isinstance(row.get(k), str) or not row[k]]
        if missing:
            return self._bad(
                line_no,
                "missing_field",
                f"missing, empty or non-string field(s) {', '.join(missing)}; required: {', '.join(REQUIRED_FIELDS)}",
                partition,
            )
        if row["locale"] != self.locale:
            return self._bad(
                line_no,
                "locale_mismatch",
                f"row locale {row['locale']!r} in the {self.locale} file",
                partition,
            )
        seen = self.seen_ids[partition]
        if row["id"] in seen:
            return self._bad(
                line_no,
                "duplicate_id",
                f"id {row['id']!r} appears earlier in the {partition} partition",
                partition,
            )
        try:
            words, slots = parse_annot_utt(row["annot_utt"], self.locale)
        except AnnotationError as e:
            return self._bad(line_no, "malformed_annotation", f"id {row['id']}: {e}", partition)
        if not _same_text(words, row["utt"], self.locale):
            return self._bad(
                line_no,
                "utt_mismatch",
                f"id {row['id']}: annot_utt without markup {' '.join(words)!r} differs from utt {row['utt']!r}",
                partition,
            )
        seen.add(row["id"])
        cols = self.columns[partition]
        for k in REQUIRED_FIELDS:
            cols[k].append(row[k])
        cols["words"].append(words)
        cols["slots"].append(slots)


def _features() -> datasets.Features:
    import datasets

    string = datasets.Value("string")
    return datasets.Features(
        {
            **{k: string for k in REQUIRED_FIELDS},
            "words": datasets.Sequence(string),
            "slots": datasets.Sequence(string),
        }
    )


def _empty() -> dict[str, list[Any]]:
    return {k: [] for k in (*REQUIRED_FIELDS, "words", "slots")}


def _to_dataset(columns: dict[str, list[Any]]) -> datasets.Dataset:
    import datasets
    import pyarrow as pa

    # Straight to Arrow: Dataset.from_dict(features=...) encodes every list element in Python (10x slower).
    features = _features()
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _file_key(path: Path, locale: str) -> tuple[str, str]:
    """(stable prefix for this file and locale, full key with the file's size, mtime and parser)."""
    st = path.stat()
    resolved = str(path.resolve())
    stem = hashlib.sha256(f"{resolved}\0{locale}".encode()).hexdigest()[:10]
    state = hashlib.sha256(f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}\0{locale}\0{PARSER_VERSION}".encode())
    return f"{locale}-{stem}", f"{locale}-{stem}-{state.hexdigest()[:16]}"


def _bad_to_json(rows: list[BadRow]) -> list[dict[str, Any]]:
    return [{"path": b.path, "line": b.line, "reason": b.reason, "message": b.message} for b in rows]


def _bad_from_json(rows: list[dict[str, Any]]) -> list[BadRow]:
    return [BadRow(r["path"], r["line"], r["reason"], r["message"]) for r in rows]


@contextlib.contextmanager
def _no_datasets_bars() -> Iterator[None]:
    """Silence datasets' own bars ("Saving the dataset"): the per-locale bar is the one that matters."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class _Cache:
    """`cache_dir/<locale>-<file>-<state>/`: `file.json` (rows per partition, rows without a partition)
    and one `<partition>/` per parsed split: `rows/` (save_to_disk) and `report.json` (its bad rows).
    Every piece is written atomically; a split counts as cached only when its directory and
    `file.json` both exist."""

    def __init__(self, cache_dir: str | os.PathLike | None) -> None:
        self.root = Path(cache_dir) if cache_dir is not None else None

    def entry(self, path: Path, locale: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / _file_key(path, locale)[1]

    def read(self, entry: Path | None, partitions: Sequence[str]) -> tuple[dict[str, Any], dict] | None:
        """(file meta, {partition: (dataset, bad rows)}) when every partition is cached, else None."""
        if entry is None or not (entry / "file.json").is_file():
            return None
        if not all((entry / p / "report.json").is_file() for p in partitions):
            return None
        import datasets

        meta = json.loads((entry / "file.json").read_text())
        splits = {}
        for p in partitions:
            report = json.loads((entry / p / "report.json").read_text())
            # save_to_disk of an empty dataset writes no shard that load_from_disk could read back.
            ds = (
                datasets.load_from_disk(str(entry / p / "rows"))
                if report["num_rows"]
                else _to_dataset(_empty())
            )
            splits[p] = (ds, _bad_from_json(report["bad_rows"]))
        return meta, splits

    def write(self, entry: Path | None, parser: _Parser, splits: dict[str, datasets.Dataset]) -> None:
        if entry is None:
            return
        from core.fsutil import atomic_dir, atomic_write_json

        try:
            # Older entries of the same file and locale (the file changed since) are stale.
            prefix = entry.name.rsplit("-", 1)[0]
            for old in entry.parent.glob(f"{prefix}-*"):
                if old != entry and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            for p, ds in splits.items():
                # The cache owns its entries (named by a digest of the source): an entry of an older
                # version without the artifact marker is replaced like any other.
                with atomic_dir(entry / p, kind="massive-cache", replace_any=True) as tmp, _no_datasets_bars():
                    if len(ds):
                        ds.save_to_disk(str(tmp / "rows"))
                    report = {"num_rows": len(ds), "bad_rows": _bad_to_json(parser.split_bad[p])}
                    atomic_write_json(tmp / "report.json", report)
            atomic_write_json(
                entry / "file.json",
                {
                    "source": parser.path,
                    "locale": parser.locale,
                    "parser_version": PARSER_VERSION,
                    "partition_rows": dict(parser.partition_rows),
                    "file_bad_rows": _bad_to_json(parser.file_bad),
                },
            )
        except OSError as e:
            # The cache only saves time; a concurrent writer or a full disk must not fail the load.
            logger.warning("could not write the MASSIVE cache %s: %s", entry, e)


def _parse_stream(
    stream: IO[bytes], path: str, locale: str, partitions: Sequence[str], on_bad_row: str, progress: bool
) -> _Parser:
    from tqdm.auto import tqdm

    parser = _Parser(path, locale, partitions, on_bad_row)
    line_no = 0
    with tqdm(desc=f"MASSIVE {locale}", unit=" rows", disable=not progress, mininterval=0.5) as bar:
        # Bytes, decoded per line: rows of other partitions are never decoded, and a line that is
        # not UTF-8 is one bad row rather than the end of the file. A locale file is a few MB:
        # reading it whole and splitting is 3x faster than readline on a gzip stream.
        names = {p.encode(): p for p in PARTITIONS}
        requested = set(parser.partitions)
        counts = parser.partition_rows
        search = _PARTITION_RE.search
        try:
            data = stream.read()
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise MassiveSourceError(
                f"{path}: cannot be read as {'gzip' if '.gz' in path else 'a file'} ({type(e).__name__}: {e}); "
                "the file is truncated or corrupt: copy or download it again"
            ) from None
        for line_no, raw in enumerate(data.split(b"\n"), start=1):
            m = search(raw)
            if m is None:
                parser.add_line(line_no, raw, None)
            else:
                hint = names[m.group(1)]
                counts[hint] += 1
                if hint in requested:
                    parser.add_line(line_no, raw, hint)
            if line_no % 1024 == 0:  # bar.update per row would cost as much as the parsing
                bar.update(1024)
        bar.update(line_no % 1024)
    if not parser.partition_rows and not parser.file_bad and not any(parser.split_bad.values()):
        message = "the file holds no rows (expected one JSON object per line)"
        if on_bad_row == "error":
            raise MassiveSourceError(f"{path}: {message}; remove it or replace it with the locale's real file")
        parser.file_bad.append(BadRow(path, 1, "empty_file", message))
    return parser


class _Loader:
    """Collects splits and the report while the sources are read."""

    def __init__(
        self, source: str, partitions: Sequence[str], on_bad_row: str, cache: _Cache, progress: bool
    ):
        self.partitions, self.on_bad_row, self.cache, self.progress = (
            tuple(partitions),
            on_bad_row,
            cache,
            progress,
        )
        self.report = MassiveReport(source=source)
        self.splits: dict[tuple[str, str], datasets.Dataset] = {}

    def _account(self, locale: str, partition_rows: dict[str, int], file_bad: list[BadRow],
                 splits: dict[str, tuple[datasets.Dataset, list[BadRow]]]) -> None:  # fmt: skip
        bad = list(file_bad) + [b for _, rows in splits.values() for b in rows]
        if bad and self.on_bad_row == "error":
            raise min(bad, key=lambda b: b.line).error()
        r = self.report
        r.rows_read += sum(partition_rows.values()) + len(file_bad)
        r.rows_not_requested += sum(n for p, n in partition_rows.items() if p not in self.partitions)
        r._add_bad(sorted(bad, key=lambda b: b.line))
        for p, (ds, _) in splits.items():
            self.splits[(locale, p)] = ds
            r.rows_loaded += len(ds)
            r.split_counts.setdefault(locale, {})[p] = len(ds)

    def from_cache(self, path: Path, locale: str) -> bool:
        cached = self.cache.read(self.cache.entry(path, locale), self.partitions)
        if cached is None:
            return False
        meta, splits = cached
        self._account(locale, meta["partition_rows"], _bad_from_json(meta["file_bad_rows"]), splits)
        self.report.cached_splits.extend((locale, p) for p in self.partitions)
        return True

    def from_stream(self, stream: IO[bytes], name: str, locale: str, cache_path: Path | None) -> None:
        parser = _parse_stream(stream, name, locale, self.partitions, self.on_bad_row, self.progress)
        datasets_by_part = {p: _to_dataset(parser.columns[p]) for p in self.partitions}
        if cache_path is not None:
            self.cache.write(self.cache.entry(cache_path, locale), parser, datasets_by_part)
        splits = {p: (ds, parser.split_bad[p]) for p, ds in datasets_by_part.items()}
        self._account(locale, dict(parser.partition_rows), parser.file_bad, splits)
