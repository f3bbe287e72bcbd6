"""Where MASSIVE comes from: a directory of official locale files, the release tarball (path or URL),
or the Hugging Face hub (see massive/loader.py)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from massive.format import (
    MASSIVE_LOCALES,
)

if TYPE_CHECKING:
    import datasets
from massive.rows import (
    REQUIRED_FIELDS,
    MassiveSourceError,
    _Loader,
    _Parser,
    _to_dataset,
)

HUB_DATASET = "AmazonScience/massive"


HUB_REVISION = "refs/convert/parquet"
"""The hub dataset is script-based; datasets >= 4 reads the hub's own parquet conversion of it."""


HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


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
