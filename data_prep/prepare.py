"""The data_prep stage: corpus -> tokenizer -> packed data -> in-domain data.

`prepare(cfg, run_dir)` writes into the run directory:
    config.yaml                 the resolved DataConfig (also configs/data.yaml, which later stages keep)
    tokenizer/                  HF fast tokenizer (+ spm.model, training.json)
    tokenizer_eval.json / .md   per-locale fertility, unknown rate, round trip on MASSIVE test
    data/train/ data/heldout/ data/stats.json            general-domain pretraining data
    data-indomain/train/ data-indomain/heldout/ data-indomain/stats.json   MASSIVE train utterances

Each output is published atomically and carries a fingerprint of the settings it was built from;
an output that exists with the same fingerprint is reused (the pipeline relies on this), one with
a different fingerprint stops the stage with an error unless `force` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import ConfigError, save_stage_config, to_dict
from core.fsutil import atomic_write_json, atomic_write_text
from data_prep.config import DataConfig

TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
INDOMAIN_DIR = "data-indomain"
TOKENIZER_EVAL = "tokenizer_eval"


@dataclass
class Inputs:
    """Text the stage works from, with the reports of how it was obtained."""

    corpus: Any  # data_prep.corpus.Corpus
    indomain: dict[str, list[str]]
    """MASSIVE train utterances per locale (deduplicated, evaluation text refused)."""
    indomain_report: dict[str, Any]
    massive_test: dict[str, list[str]]
    """MASSIVE test utterances per configured locale (tokenizer evaluation only)."""
    evaluation_sizes: dict[str, int]
    massive_summary: str
    indomain_groups: dict[str, list[tuple[str, str]]] | None = None
    """{MASSIVE id: [(locale, utterance)]} of the in-domain utterances, when massive.indomain_order
    is parallel (data_prep.corpus.parallel_groups)."""
    labels: list[str] = dataclasses.field(default_factory=list)
    """MASSIVE labels of the train partitions (`Other`, intents, slot types): whole tokens of the
    tokenizer when tokenizer.label_tokens is set."""


# ----------------------------------------------------------------------------- the stage


def prepare(
    cfg: DataConfig, run_dir: str | os.PathLike, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run the whole data_prep stage in `run_dir`; returns a summary (also printed)."""
    run_dir = Path(run_dir)
    save_stage_config(cfg, run_dir, "data")
    if not force and is_complete(run_dir, cfg):
        say(f"data_prep: {run_dir} already holds tokenizer/, {DATA_DIR}/ and {INDOMAIN_DIR}/ for this config")
        return summary(run_dir)

    inputs = load_inputs(cfg, run_dir, progress)
    say(inputs.corpus.table())

    tokenizer = ensure_tokenizer(cfg, inputs, run_dir, force)
    say(evaluate_and_report_tokenizer(tokenizer, inputs.massive_test, run_dir))

    ensure_all_packed(cfg, tokenizer, inputs, run_dir, force=force, progress=progress)
    return summary(run_dir)


def is_complete(run_dir: str | os.PathLike, cfg: DataConfig) -> bool:
    """True when every output of the stage exists and was built from `cfg`'s settings."""
    from data_prep import packing, tokenizer

    run_dir = Path(run_dir)
    tok_dir, data_dir, ind_dir = run_dir / TOKENIZER_DIR, run_dir / DATA_DIR, run_dir / INDOMAIN_DIR
    if not (tokenizer.is_complete(tok_dir) and packing.is_complete(data_dir)):
        return False
    if _stored_fingerprint(tok_dir / "training.json") != fingerprint(cfg, "tokenizer"):
        return False
    if _stored_fingerprint(data_dir / packing.STATS_FILE) != fingerprint(cfg, "data"):
        return False
    if cfg.massive.indomain:
        return packing.is_complete(ind_dir) and _stored_fingerprint(
            ind_dir / packing.STATS_FILE
        ) == fingerprint(cfg, "indomain")
    return True


# ----------------------------------------------------------------------------- steps


def load_inputs(cfg: DataConfig, run_dir: Path, progress: bool = True) -> Inputs:
    """Load MASSIVE, the evaluation text to refuse, the monolingual corpus and the in-domain pools."""
    from data_prep.corpus import build_corpus, evaluation_text, massive_pools, parallel_groups
    from massive.loader import (
        evaluation_utterances,
        load_massive,
        massive_ids,
        massive_labels,
        massive_utterances,
    )

    source = cfg.massive.source  # load_massive resolves `@data/` and `~` itself (and leaves URLs whole)
    cache_dir = massive_cache_dir(cfg, run_dir)
    # dev/test of every locale (or of the configured ones) to refuse; train only where it is used.
    massive_eval = load_massive(
        source,
        locales=None if cfg.massive.exclude_all_locales else cfg.locales,
        partitions=("dev", "test"),
        on_bad_row=cfg.massive.on_bad_row,
        cache_dir=cache_dir,
        progress=progress,
    )
    missing = [loc for loc in cfg.locales if loc not in massive_eval.locales]
    if missing:
        raise ConfigError(
            f"locales: {', '.join(missing)} not in the MASSIVE source {cfg.massive.source}; "
            f"available: {', '.join(massive_eval.locales)}"
        )
    massive_train = load_massive(
        source,
        locales=cfg.locales,
        partitions=("train",),
        on_bad_row=cfg.massive.on_bad_row,
        cache_dir=cache_dir,
        progress=progress,
    )
    excluded = evaluation_text(cfg, evaluation_utterances(massive_eval))
    corpus = build_corpus(cfg, excluded, progress)
    train_utts = massive_utterances(massive_train, ("train",))
    # Under zero-shot the targets' MASSIVE utterances are neither in-domain data nor tokenizer text.
    indomain, indomain_report = massive_pools(train_utts, excluded, cfg.massive_text_locales())
    groups = None
    if cfg.massive.indomain_order == "parallel":
        groups = parallel_groups(massive_ids(massive_train, ("train",)), train_utts, indomain)
    test = massive_utterances(massive_eval, ("test",))
    return Inputs(
        corpus=corpus,
        indomain=indomain,
        indomain_report=indomain_report,
        indomain_groups=groups,
        massive_test={loc: test[loc] for loc in cfg.locales},
        evaluation_sizes=excluded.sizes(),
        massive_summary=massive_train.summary_table(),
        labels=massive_labels(massive_train),
    )


def ensure_tokenizer(cfg: DataConfig, inputs: Inputs, run_dir: Path, force: bool = False) -> Any:
    """Train the tokenizer on a language-sampled mixture unless an up-to-date one exists; load it."""
    from data_prep import tokenizer as tk
    from data_prep.corpus import draw_mixture, merge_pools
    from massive.format import label_token

    out_dir = run_dir / TOKENIZER_DIR
    fp = fingerprint(cfg, "tokenizer")
    if _reuse(out_dir, tk.is_complete(out_dir), out_dir / "training.json", fp, force):
        return tk.load_tokenizer(out_dir)
    pools = inputs.corpus.tokenizer_pools()
    if cfg.sampling.massive_train_in_tokenizer:
        # Never a target locale's MASSIVE text, in any setting: the zero-shot and the teacher-labelled
        # arms then share one tokenizer (and one stage-1 teacher), and a target reads like a new locale.
        keep = set(cfg.tokenizer_massive_locales())
        pools = merge_pools(pools, {loc: sents for loc, sents in inputs.indomain.items() if loc in keep})
    mixture = draw_mixture(pools, cfg.sampling.alpha, cfg.sampling.tokenizer_sentences, cfg.seed)
    say(mixture.table("tokenizer training text"))
    say(
        f"training a {cfg.tokenizer.vocab_size}-piece SentencePiece unigram model on {len(mixture.documents)} sentences"
    )
    tk.train_tokenizer(
        mixture.documents,
        out_dir,
        cfg.tokenizer,
        label_tokens=[label_token(x) for x in inputs.labels] if cfg.tokenizer.label_tokens else (),
        seed=cfg.seed,
        info={"fingerprint": fp, "mixture": mixture.rows()},
    )
    return tk.load_tokenizer(out_dir)


def evaluate_and_report_tokenizer(
    tokenizer: Any, texts_by_locale: dict[str, list[str]], run_dir: Path
) -> str:
    """Evaluate on MASSIVE test utterances; write tokenizer_eval.json/.md; return the text table."""
    from data_prep.tokenizer import evaluate_tokenizer, tokenizer_table

    rows = evaluate_tokenizer(tokenizer, texts_by_locale)
    atomic_write_json(run_dir / f"{TOKENIZER_EVAL}.json", {"rows": rows, "vocab_size": len(tokenizer)})
    md = (
        f"# Tokenizer evaluation\n\nMASSIVE test utterances; vocabulary {len(tokenizer)}; fertility is tokens "
        "per word (per character for locales written without spaces); round trip is "
        "`decode(encode(s)) == s`.\n\n" + tokenizer_table(rows, markdown=True) + "\n"
    )
    atomic_write_text(run_dir / f"{TOKENIZER_EVAL}.md", md)
    return f"tokenizer on MASSIVE test utterances (vocab {len(tokenizer)}):\n" + tokenizer_table(rows)


def ensure_all_packed(
    cfg: DataConfig, tokenizer: Any, inputs: Inputs, run_dir: Path, force: bool = False, progress: bool = True
) -> None:
    """Pack data/ and, when massive.indomain is set, data-indomain/ (each unless up to date)."""
    ensure_packed(cfg, tokenizer, inputs, run_dir / DATA_DIR, indomain=False, force=force, progress=progress)
    if cfg.massive.indomain:
        ensure_packed(
            cfg, tokenizer, inputs, run_dir / INDOMAIN_DIR, indomain=True, force=force, progress=progress
        )


def ensure_packed(
    cfg: DataConfig,
    tokenizer: Any,
    inputs: Inputs,
    out_dir: Path,
    indomain: bool,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Split, sample and pack general-domain (or in-domain) documents unless up to date."""
    from data_prep import packing
    from data_prep.corpus import aligned_groups, draw_mixture, draw_parallel, join_mixtures, split_heldout

    kind = "indomain" if indomain else "data"
    fp = fingerprint(cfg, kind)
    if _reuse(out_dir, packing.is_complete(out_dir), out_dir / packing.STATS_FILE, fp, force):
        return packing.load_stats(out_dir)
    if indomain and cfg.massive.indomain_order == "parallel":
        if inputs.indomain_groups is None:
            raise ValueError("massive.indomain_order=parallel needs Inputs.indomain_groups (load_inputs fills it)")
        train, heldout = draw_parallel(
            inputs.indomain_groups, cfg.packing.heldout_fraction, cfg.seed, cfg.packing.min_heldout_documents
        )
    else:
        pools = inputs.indomain if indomain else inputs.corpus.sentences
        train_pools, heldout_pools = split_heldout(
            pools, cfg.packing.heldout_fraction, cfg.seed, cfg.packing.min_heldout_documents
        )
        num_train = sum(map(len, train_pools.values()))
        if indomain:
            # MASSIVE locales are the same size: every utterance once, in natural proportions.
            train = draw_mixture(train_pools, 1.0, num_train, cfg.seed)
        else:
            train = draw_mixture(
                train_pools, cfg.sampling.alpha, cfg.sampling.pretrain_sentences or num_train, cfg.seed
            )
        heldout = draw_mixture(heldout_pools, 1.0, sum(map(len, heldout_pools.values())), cfg.seed + 1)
        groups = {} if indomain else aligned_groups(inputs.corpus.aligned)
        if groups:
            aligned_train, aligned_heldout = draw_parallel(
                groups, cfg.packing.heldout_fraction, cfg.seed, cfg.packing.min_heldout_documents
            )
            say(aligned_train.table(f"aligned lines ({', '.join(cfg.corpus.aligned_sources)}), translations adjacent"))
            train, heldout = join_mixtures(train, aligned_train), join_mixtures(heldout, aligned_heldout)
    say(train.table(f"{kind} train mixture"))
    report = inputs.indomain_report if indomain else inputs.corpus.report
    if indomain:
        refused = {loc: sum(r.refused.values()) for loc, r in report.items()}
        say(
            f"in-domain: refused {sum(refused.values())} MASSIVE train utterances that equal dev/test or "
            "FLORES text: " + ", ".join(f"{loc} {n}" for loc, n in refused.items())
        )
    info = {
        "fingerprint": fp,
        "kind": kind,
        "mixture": train.rows(),
        "sources": {loc: vars(r) for loc, r in report.items()},
        "evaluation_text_keys": inputs.evaluation_sizes,
    }
    stats = packing.write_packed(
        out_dir,
        tokenizer,
        {"train": (train.documents, train.locales), "heldout": (heldout.documents, heldout.locales)},
        cfg.packing,
        info=info,
        progress=progress,
    )
    say(packed_table(stats, title=f"{out_dir.name}: tokens per locale"))
    return stats


# ----------------------------------------------------------------------------- reports


def packed_table(stats: dict[str, Any], title: str = "packed") -> str:
    """Per locale: documents and tokens in train and heldout, the token share of train."""
    train = stats["splits"]["train"]
    held = stats["splits"]["heldout"]
    header = f"{'locale':<8}{'docs':>10}{'tokens':>12}{'share':>8}{'held docs':>10}{'held tok':>10}"
    lines = [
        f"{title}: seq_len {stats['seq_len']}, train rows {train['num_rows']}, heldout rows {held['num_rows']}",
        header,
        "-" * len(header),
    ]
    for loc in sorted(set(train["per_locale"]) | set(held["per_locale"])):
        t = train["per_locale"].get(loc, {"documents": 0, "tokens": 0, "token_share": 0.0})
        h = held["per_locale"].get(loc, {"documents": 0, "tokens": 0})
        lines.append(
            f"{loc:<8}{t['documents']:>10}{t['tokens']:>12}{t['token_share']:>8.4f}{h['documents']:>10}{h['tokens']:>10}"
        )
    lines.append(
        f"{'all':<8}{train['num_documents']:>10}{train['num_tokens']:>12}{1:>8.4f}{held['num_documents']:>10}{held['num_tokens']:>10}"
    )
    return "\n".join(lines)


def summary(run_dir: Path) -> dict[str, Any]:
    """Paths and headline numbers of a prepared run directory."""
    from data_prep import packing

    out: dict[str, Any] = {"run_dir": str(run_dir), "tokenizer": str(run_dir / TOKENIZER_DIR)}
    for name in (DATA_DIR, INDOMAIN_DIR):
        if packing.is_complete(run_dir / name):
            stats = packing.load_stats(run_dir / name)
            out[name] = {
                split: {k: s[k] for k in ("num_documents", "num_tokens", "num_rows")}
                for split, s in stats["splits"].items()
            }
    return out


# ----------------------------------------------------------------------------- helpers


def fingerprint(cfg: DataConfig, output: str) -> str:
    """A hash of the settings an output depends on ('tokenizer', 'data' or 'indomain')."""
    d = to_dict(cfg)
    if not d["corpus"]["aligned_sources"]:  # outputs built before the option keep their hash
        del d["corpus"]["aligned_sources"]
    common = {"locales": d["locales"], "seed": d["seed"], "massive": {"source": d["massive"]["source"]}}
    # Outputs built before the cross-lingual settings existed keep their hash.
    text_locales = cfg.massive_text_locales() if output == "indomain" else cfg.tokenizer_massive_locales()
    if text_locales != list(cfg.locales):
        common["massive_text_locales"] = text_locales
    if output == "tokenizer":
        parts = {**common, "corpus": d["corpus"], "sampling": d["sampling"], "tokenizer": d["tokenizer"]}
        parts["sampling"] = {k: v for k, v in d["sampling"].items() if k != "pretrain_sentences"}
    elif output == "data":
        parts = {
            **common,
            "corpus": d["corpus"],
            "sampling": d["sampling"],
            "tokenizer": d["tokenizer"],
            "packing": d["packing"],
        }
    elif output == "indomain":
        parts = {
            **common,
            "corpus": {"evaluation_text": d["corpus"]["evaluation_text"]},
            "tokenizer": d["tokenizer"],
            "packing": d["packing"],
            "sampling": d["sampling"],
        }
        if d["massive"]["indomain_order"] != "shuffled":  # outputs built before the option keep their hash
            parts["indomain_order"] = d["massive"]["indomain_order"]
    else:
        raise ValueError(f"unknown output {output!r}; allowed values: tokenizer, data, indomain")
    parts["exclude_all_locales"] = d["massive"]["exclude_all_locales"]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _stored_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def _reuse(out_dir: Path, complete: bool, meta_file: Path, fp: str, force: bool) -> bool:
    """True to reuse a complete, matching output; raise for one built from other settings."""
    if force or not complete:
        return False
    stored = _stored_fingerprint(meta_file)
    if stored == fp:
        say(f"reusing {out_dir} (built from the same settings)")
        return True
    raise ConfigError(
        f"{out_dir} exists but was built from different settings (fingerprint {stored} != {fp}); "
        "use a new --run-dir, or --force to rebuild it (and everything built from it)"
    )


def massive_cache_dir(cfg: DataConfig, run_dir: Path) -> Path:
    return (
        Path(cfg.massive.cache_dir).expanduser() if cfg.massive.cache_dir else run_dir / ".cache" / "massive"
    )


def say(msg: str) -> None:
    print(msg, flush=True)
