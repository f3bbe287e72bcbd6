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
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from massive.format import (
    MASSIVE_LOCALES,
    OTHER,
    PARTITIONS,
    AnnotationError,
    MassiveError,
    MassiveExample,
    _same_text,
    parse_annot_utt,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)
REQUIRED_FIELDS: tuple[str, ...] = ("id", "locale", "partition", "scenario", "intent", "utt", "annot_utt")
HUB_DATASET = "AmazonScience/massive"
HUB_REVISION = "refs/convert/parquet"
"""The hub dataset is script-based; datasets >= 4 reads the hub's own parquet conversion of it."""
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
PARSER_VERSION = 1
"""Bump whenever parsing changes what a row turns into: it is part of every cache key."""
ON_BAD_ROW = ("error", "skip")

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


def massive_labels(data: MassiveData) -> list[str]:
    """`Other`, then the intents, then the slot types of `data` (sorted): the label vocabulary."""
    return [OTHER, *data.intents, *(s for s in data.slot_types if s != OTHER)]



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



def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def _locale_of(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    for suffix in (".jsonl.gz", ".jsonl"):
        if base.endswith(suffix):
            loc = base[: -len(suffix)]
            return loc if loc in MASSIVE_LOCALES else None
    return None


def _directory_files(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        loc = _locale_of(path.name)
        if loc is None or not path.is_file():
            continue
        if loc in files:
            raise MassiveSourceError(f"{root}: both {files[loc].name} and {path.name} hold locale {loc}")
        files[loc] = path
    if not files and (root / "data").is_dir():
        return _directory_files(root / "data")  # an extracted release: 1.1/data/<locale>.jsonl
    return files


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def _download(url: str, cache_dir: Path | None, progress: bool) -> tuple[Path, bool]:
    """(local path of the tarball at `url`, whether it is a temporary file to delete after use)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path)), False
    from tqdm.auto import tqdm

    from core.fsutil import atomic_dir

    name = Path(parsed.path).name or "massive.tar.gz"
    if cache_dir is not None:
        target_dir = cache_dir / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]
        if (target_dir / name).is_file():
            return target_dir / name, False
    else:
        target_dir = Path(tempfile.mkdtemp(prefix="massive-download-"))
    try:
        with contextlib.ExitStack() as stack:
            out_dir = stack.enter_context(atomic_dir(target_dir, kind="download", replace_any=True)) if cache_dir is not None else target_dir
            response = stack.enter_context(urllib.request.urlopen(url, timeout=60))
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = stack.enter_context(
                tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress)
            )
            with open(out_dir / name, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        if cache_dir is None:
            shutil.rmtree(target_dir, ignore_errors=True)
        raise MassiveSourceError(f"cannot download the MASSIVE tarball {url}: {e}") from e
    return target_dir / name, cache_dir is None


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


def _missing_locale(locale: str, source: str, available: Iterable[str]) -> MassiveSourceError:
    have = sorted(available)
    return MassiveSourceError(
        f"{source} has no file for MASSIVE locale {locale}; it has {len(have)} locale(s): {', '.join(have) or 'none'}"
    )


def _load_directory(root: Path, locales: list[str] | None, loader: _Loader) -> None:
    files = _directory_files(root)
    if not files:
        raise MassiveSourceError(
            f"{root} holds no <locale>.jsonl or <locale>.jsonl.gz files of MASSIVE locales"
        )
    wanted = locales if locales is not None else sorted(files)
    for loc in wanted:
        if loc not in files:
            raise _missing_locale(loc, str(root), files)
    for loc in wanted:
        path = files[loc]
        if loader.from_cache(path, loc):
            continue
        with _open_binary(path) as stream:
            loader.from_stream(stream, str(path), loc, path)


def _load_tarball(tar_path: Path, display: str, locales: list[str] | None, loader: _Loader) -> None:
    if not tar_path.is_file():
        raise MassiveSourceError(f"MASSIVE tarball {display} does not exist")
    if locales is not None and all(loader.from_cache(tar_path, loc) for loc in list(locales)):
        return
    done = {loc for loc, _ in loader.report.cached_splits}
    seen: dict[str, str] = {}
    try:
        # Stream mode: one pass through the compressed archive, members in archive order.
        with tarfile.open(tar_path, mode="r|*") as tar:
            for member in tar:
                loc = _locale_of(member.name)
                if loc is None or not member.isfile():
                    continue
                if loc in seen:
                    raise MassiveSourceError(
                        f"{display}: both {seen[loc]} and {member.name} hold locale {loc}"
                    )
                seen[loc] = member.name
                if (locales is not None and loc not in locales) or loc in done:
                    continue
                if locales is None and loader.from_cache(tar_path, loc):
                    continue
                stream = tar.extractfile(member)
                assert stream is not None
                if member.name.endswith(".gz"):
                    stream = gzip.GzipFile(fileobj=stream)  # type: ignore[assignment]
                with stream:
                    loader.from_stream(stream, f"{display}[{member.name}]", loc, tar_path)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as e:
        raise MassiveSourceError(f"{display} is not a readable MASSIVE tarball: {e}") from e
    if not seen:
        raise MassiveSourceError(f"{display} holds no <locale>.jsonl files of MASSIVE locales")
    for loc in locales or []:
        if loc not in seen:
            raise _missing_locale(loc, display, seen)


def _hub_unreachable(reason: str) -> MassiveSourceError:
    return MassiveSourceError(
        f"cannot reach the Hugging Face hub for {HUB_DATASET} ({reason}). Load MASSIVE from a directory "
        "of <locale>.jsonl[.gz] files instead (e.g. source='@data/massive/data', the copy under the data "
        "root), or from the official release tarball, as a path or a URL (e.g. source="
        "'https://amazon-massive-nlu-dataset.s3.amazonaws.com/amazon-massive-dataset-1.1.tar.gz')."
    )


def hub_rows(ds: datasets.Dataset) -> Iterator[dict[str, Any]]:
    """Rows of a hub MASSIVE split as official-format dicts: ClassLabel ints mapped back to names."""
    label_columns = {
        name: feature
        for name, feature in ds.features.items()
        if hasattr(feature, "int2str") and name in REQUIRED_FIELDS
    }
    for row in ds:
        row = dict(row)
        for name, feature in label_columns.items():
            if isinstance(row.get(name), int):
                row[name] = feature.int2str(row[name])
        yield row


def _load_hub(locales: list[str] | None, loader: _Loader) -> None:
    import datasets
    from huggingface_hub import constants
    from tqdm.auto import tqdm

    for loc in locales if locales is not None else list(MASSIVE_LOCALES):
        parser = _Parser(f"hub:{HUB_DATASET}/{loc}", loc, loader.partitions, loader.on_bad_row)
        for partition in loader.partitions:
            try:
                # Offline, this still works from the datasets cache of an earlier online load.
                ds = datasets.load_dataset(
                    HUB_DATASET, loc, split=HUB_SPLITS[partition], revision=HUB_REVISION
                )
            except (ConnectionError, TimeoutError, OSError) as e:
                offline = " with HF_HUB_OFFLINE set and no cached copy" if constants.HF_HUB_OFFLINE else ""
                raise _hub_unreachable(f"{type(e).__name__}{offline}: {e}") from e
            except ValueError as e:
                raise MassiveSourceError(
                    f"hub dataset {HUB_DATASET} has no {loc} {partition} split: {e}"
                ) from e
            parser.path = f"hub:{HUB_DATASET}/{loc}/{HUB_SPLITS[partition]}"
            rows = tqdm(
                hub_rows(ds), total=len(ds), desc=f"MASSIVE {loc} {partition}", disable=not loader.progress
            )
            for i, row in enumerate(rows, start=1):
                parser.add_row(i, row)
        splits = {p: (_to_dataset(parser.columns[p]), parser.split_bad[p]) for p in loader.partitions}
        loader._account(loc, dict(parser.partition_rows), parser.file_bad, splits)


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
