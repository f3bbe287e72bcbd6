"""Tokenize documents and pack them into fixed-length sequences stored as Arrow (datasets) shards.

Documents are tokenized without eos (special-token strings inside the text are tokenized as plain
text, so a document never contains <sep>), concatenated in order with one `<sep>` between
consecutive documents, and cut into rows of `seq_len` tokens (the last row may be shorter). Rows
cross document boundaries. Removing `<sep>` from the concatenated rows gives back the documents'
token streams exactly (`unpack_documents`).

Layout written by `write_packed(out_dir, ...)` (atomically: readers never see a partial one):
    out_dir/train/    datasets.save_to_disk, column input_ids (list<int32>)
    out_dir/heldout/
    out_dir/stats.json  per-locale documents and tokens per split, the mixture, settings
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.fsutil import atomic_dir
from data_prep.config import PackingConfig

if TYPE_CHECKING:
    import datasets
    import numpy as np

STATS_FILE = "stats.json"
SPLITS = ("train", "heldout")


def tokenize_documents(
    tokenizer: Any,
    documents: Sequence[str],
    batch_size: int = 1000,
    progress: bool = True,
    desc: str = "tokenize",
) -> list[list[int]]:
    """Token ids of each document, without eos.

    A document must not contain reserved-token text such as "<sep>" (data_prep.corpus drops such
    sentences): it would become the separator and packing would no longer be lossless.
    """
    from tqdm.auto import tqdm

    from data_prep.tokenizer import special_ids

    reserved = set(special_ids(tokenizer).all_ids())
    backend = tokenizer.backend_tokenizer
    out: list[list[int]] = []
    for start in tqdm(range(0, len(documents), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = list(documents[start : start + batch_size])
        # The Rust tokenizer directly: the transformers wrapper adds ~40% for masks and conversions.
        ids = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
        for i, doc in enumerate(ids):
            if reserved.intersection(doc):
                raise ValueError(
                    f"document {start + i} contains reserved-token text ({batch[i][:80]!r}); "
                    "drop it (data_prep.corpus.has_reserved_text) before packing"
                )
        out.extend(ids)
    return out


def pack_token_lists(
    token_lists: Sequence[Sequence[int]], seq_len: int, sep_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Join documents with `sep_id` and cut into rows of `seq_len`.

    Returns (values, offsets) as int32/int64 numpy arrays: row i is values[offsets[i]:offsets[i+1]].
    """
    import numpy as np

    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    num_docs = len(token_lists)
    total = int(lengths.sum()) + max(num_docs - 1, 0)
    values = np.empty(total, dtype=np.int32)
    pos = 0
    for i, tokens in enumerate(token_lists):
        if i:
            values[pos] = sep_id
            pos += 1
        n = len(tokens)
        values[pos : pos + n] = tokens
        pos += n
    offsets = np.arange(0, total, seq_len, dtype=np.int64)
    offsets = np.append(offsets, total) if total else np.zeros(1, dtype=np.int64)
    return values, offsets


def unpack_documents(rows: Sequence[Sequence[int]], sep_id: int) -> list[list[int]]:
    """The inverse of packing: concatenate rows and split at `sep_id`."""
    docs: list[list[int]] = [[]]
    for row in rows:
        for t in row:
            if t == sep_id:
                docs.append([])
            else:
                docs[-1].append(int(t))
    return docs if any(docs) or len(docs) > 1 else []


def to_dataset(values: np.ndarray, offsets: np.ndarray) -> datasets.Dataset:
    """An Arrow-backed dataset with one list<int32> column `input_ids`."""
    import datasets
    import pyarrow as pa

    array = pa.ListArray.from_arrays(pa.array(offsets.astype("int32")), pa.array(values, type=pa.int32()))
    table = pa.table({"input_ids": array})
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    return datasets.Dataset(table.cast(features.arrow_schema))


def write_packed(
    out_dir: str | os.PathLike,
    tokenizer: Any,
    splits: dict[str, tuple[Sequence[str], Sequence[str]]],
    cfg: PackingConfig,
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize and pack each split's (documents, locales) into out_dir/<split>/; write stats.json.

    Returns the stats (also in out_dir/stats.json): per split and locale documents and tokens (without
    separators), the token share per locale, rows, and `info` (e.g. the mixture table rows).
    """
    from data_prep.tokenizer import special_ids

    sep_id = special_ids(tokenizer).sep
    stats: dict[str, Any] = {"seq_len": cfg.seq_len, "sep_id": sep_id, "splits": {}, **(info or {})}
    with atomic_dir(out_dir, kind="packed-data") as tmp:
        for split, (documents, locales) in splits.items():
            if len(documents) != len(locales):
                raise ValueError(f"{split}: {len(documents)} documents but {len(locales)} locales")
            token_lists = tokenize_documents(
                tokenizer, documents, cfg.tokenize_batch_size, progress, desc=f"tokenize {split}"
            )
            values, offsets = pack_token_lists(token_lists, cfg.seq_len, sep_id)
            dataset = to_dataset(values, offsets)
            # An empty split still needs one (empty) shard, or it cannot be loaded back.
            shards = {"num_shards": 1} if len(dataset) == 0 else {"max_shard_size": cfg.max_shard_size}
            dataset.save_to_disk(str(tmp / split), **shards)
            tokens = Counter()
            docs = Counter(locales)
            for loc, t in zip(locales, token_lists):
                tokens[loc] += len(t)
            num_tokens = sum(tokens.values())
            stats["splits"][split] = {
                "num_documents": len(documents),
                "num_tokens": num_tokens,
                "num_rows": len(offsets) - 1,
                "per_locale": {
                    loc: {
                        "documents": docs[loc],
                        "tokens": tokens[loc],
                        "token_share": tokens[loc] / num_tokens if num_tokens else 0.0,
                    }
                    for loc in sorted(docs)
                },
            }
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def load_packed(path: str | os.PathLike, split: str | None = None) -> datasets.Dataset:
    """A packed split as a `datasets.Dataset` (column input_ids).

    `path` is either a split directory (data/train) or the packed directory with `split` given
    (default train).
    """
    import datasets

    path = Path(path)
    if split is not None or (path / "train").is_dir() and not (path / "dataset_info.json").exists():
        path = path / (split or "train")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no packed data (run `polyteacher data pack` or `data prepare`)")
    return datasets.load_from_disk(str(path))


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / STATS_FILE).read_text(encoding="utf-8"))


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when out_dir holds a finished packed directory (published atomically, stats last)."""
    out_dir = Path(out_dir)
    return (out_dir / STATS_FILE).is_file() and all((out_dir / s).is_dir() for s in SPLITS)


def unigram_cross_entropy(train: datasets.Dataset, heldout: datasets.Dataset, vocab_size: int,
                          ignore_ids: Sequence[int] = ()) -> float:
    """Cross-entropy in nats per token of `heldout` under a unigram model of `train` (add-one
    smoothing over `vocab_size`; `ignore_ids`, such as the document separator, counted in neither).

    The reference a pretrained model must beat by far: a model that only learnt token frequencies
    scores this, one that copies its visible source scores far below it.
    """
    import numpy as np

    def counts(ds: datasets.Dataset) -> np.ndarray:
        column = ds.data.column("input_ids").combine_chunks()  # Arrow list<int>: flat values, no copy per row
        values = np.asarray(column.flatten())
        out = np.bincount(values, minlength=vocab_size)[:vocab_size].astype(np.float64)
        out[list(ignore_ids)] = 0.0
        return out

    train_counts, heldout_counts = counts(train), counts(heldout)
    log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
    return float(-(heldout_counts * log_p).sum() / max(heldout_counts.sum(), 1.0))
