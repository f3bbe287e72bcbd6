"""Throughput of the data_prep stage: loading (MASSIVE, corpora), tokenizing and packing.

    .venv/bin/python -m benchmarks.data_prep [--locales en-US de-DE ...] [--vocab-size 4000]

Prints a table of sentences per second for each step and writes benchmarks/results/data_prep.json.
Loading MASSIVE is measured without the Arrow cache (parsing the official files), and again from
the cache. Uses the data root (POLYTEACHER_DATA or ../shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from core.config import resolve_data_path
from core.fsutil import atomic_write_json
from data_prep.config import DataConfig, TokenizerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "data_prep.json"
DEFAULT_LOCALES = ["en-US", "de-DE", "fr-FR", "es-ES", "ja-JP", "th-TH", "hi-IN", "ar-SA"]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--locales", nargs="+", default=DEFAULT_LOCALES, help="MASSIVE locales to use")
    parser.add_argument("--vocab-size", type=int, default=4000, help="tokenizer size")
    parser.add_argument("--tokenizer-sentences", type=int, default=20000, help="tokenizer training sample")
    parser.add_argument("--seq-len", type=int, default=128, help="packed row length")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args()

    from data_prep.corpus import build_corpus, draw_mixture, evaluation_text
    from data_prep.packing import pack_token_lists, to_dataset, tokenize_documents
    from data_prep.tokenizer import load_tokenizer, train_tokenizer
    from massive.loader import evaluation_utterances, load_massive, massive_utterances

    cfg = DataConfig(locales=args.locales)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = resolve_data_path(cfg.massive.source)
        massive, secs = timed(
            lambda: load_massive(source, locales=args.locales, cache_dir=tmp / "cache", progress=False)
        )
        rows.append(("load MASSIVE (parse, all partitions)", len(massive), secs))
        _, secs = timed(
            lambda: load_massive(source, locales=args.locales, cache_dir=tmp / "cache", progress=False)
        )
        rows.append(("load MASSIVE (Arrow cache)", len(massive), secs))

        excluded = evaluation_text(cfg, evaluation_utterances(massive))
        corpus, secs = timed(lambda: build_corpus(cfg, excluded, progress=False))
        num_read = sum(sum(r.read.values()) for r in corpus.report.values())
        rows.append(("load corpora (read, dedup, exclude)", num_read, secs))

        mixture = draw_mixture(corpus.sentences, cfg.sampling.alpha, args.tokenizer_sentences, cfg.seed)
        tok_cfg = TokenizerConfig(vocab_size=args.vocab_size, character_coverage=0.995)
        _, secs = timed(lambda: train_tokenizer(mixture.documents, tmp / "tok", tok_cfg))
        rows.append((f"train tokenizer (vocab {args.vocab_size})", len(mixture.documents), secs))
        tok = load_tokenizer(tmp / "tok")

        documents = [s for sents in corpus.sentences.values() for s in sents]
        token_lists, secs = timed(lambda: tokenize_documents(tok, documents, 1000, progress=False))
        num_tokens = sum(map(len, token_lists))
        rows.append(("tokenize (fast tokenizer, batched)", len(documents), secs))

        utts = [u for us in massive_utterances(massive, ("train",)).values() for u in us]
        _, secs = timed(lambda: tokenize_documents(tok, utts, 1000, progress=False))
        rows.append(("tokenize MASSIVE train utterances", len(utts), secs))

        def pack():
            values, offsets = pack_token_lists(token_lists, args.seq_len, 4)
            to_dataset(values, offsets).save_to_disk(str(tmp / "packed"))

        _, secs = timed(pack)
        rows.append((f"pack + save Arrow (seq_len {args.seq_len})", len(documents), secs))

    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'sentences':>10}  {'seconds':>8}  {'sent/s':>10}")
    print("-" * (width + 34))
    for name, n, secs in rows:
        print(f"{name:<{width}}  {n:>10}  {secs:>8.2f}  {n / secs:>10.0f}")
    print(f"tokens tokenized: {num_tokens} ({num_tokens / rows[4][2]:.0f} tokens/s)")
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "locales": args.locales,
        "vocab_size": args.vocab_size,
        "num_tokens": num_tokens,
        "steps": [
            {
                "step": name,
                "sentences": n,
                "seconds": round(secs, 3),
                "sentences_per_second": round(n / secs, 1),
            }
            for name, n, secs in rows
        ],
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
