"""Corpus reading, dedup, evaluation-text exclusion and language sampling."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from core.config import ConfigError, merge, validate
from data_prep.config import DataConfig, SourceConfig
from data_prep.corpus import (
    CorpusSourceError,
    EvaluationText,
    build_corpus,
    draw_mixture,
    draw_parallel,
    evaluation_text,
    exclusion_key,
    language_quotas,
    massive_pools,
    parallel_groups,
    read_source,
    sampling_probabilities,
    split_heldout,
)


def _write_gz(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _cfg(tmp_path: Path, locales: list[str], **corpus) -> DataConfig:
    cfg = DataConfig(locales=locales)
    sources = corpus.pop(
        "sources", [{"name": "local", "kind": "text", "path": str(tmp_path / "{locale}.txt.gz")}]
    )
    return validate(merge(cfg, {"corpus": {"sources": sources, **corpus}}))


# ----------------------------------------------------------------------------- sampling


def test_probabilities_follow_the_formula():
    sizes = {"a": 100, "b": 10_000, "c": 0}
    p = sampling_probabilities(sizes, alpha=0.5)
    assert p["a"] == pytest.approx(10 / 110, abs=1e-12)
    assert p["b"] == pytest.approx(100 / 110, abs=1e-12)
    assert p["c"] == 0.0
    assert sampling_probabilities(sizes, alpha=1.0)["a"] == pytest.approx(100 / 10_100)
    p0 = sampling_probabilities({"a": 5, "b": 500}, alpha=0.0)
    assert p0 == {"a": 0.5, "b": 0.5}
    p3 = sampling_probabilities({"x": 298_826, "y": 213}, alpha=0.3)
    wx, wy = 298_826**0.3, 213**0.3
    assert p3["x"] == pytest.approx(wx / (wx + wy), rel=1e-12)


def test_quotas_sum_to_total_and_stay_within_one():
    probs = sampling_probabilities({f"l{i}": (i + 1) ** 3 for i in range(17)}, alpha=0.3)
    for total in (1, 17, 999, 123_457):
        quotas = language_quotas(probs, total)
        assert sum(quotas.values()) == total
        assert all(abs(quotas[k] - probs[k] * total) < 1 for k in probs)


def test_mixture_realised_shares_and_epochs():
    """Realised shares equal p_l within 1/M (exact quotas); up-sampled languages repeat in epochs."""
    pools = {
        "big": [f"big {i}" for i in range(5000)],
        "mid": [f"mid {i}" for i in range(400)],
        "small": [f"small {i}" for i in range(7)],
    }
    total = 3000
    mix = draw_mixture(pools, alpha=0.3, total=total, seed=1)
    assert len(mix.documents) == total
    p = sampling_probabilities({k: len(v) for k, v in pools.items()}, 0.3)
    realised = mix.realised_shares()
    for loc in pools:
        assert abs(realised[loc] - p[loc]) <= 1 / total
    # The small language is up-sampled: every sentence k or k+1 times.
    counts = Counter(d for d, loc in zip(mix.documents, mix.locales) if loc == "small")
    m_small = mix.quotas["small"]
    assert m_small > 7
    assert set(counts.values()) <= {m_small // 7, m_small // 7 + 1} and len(counts) == 7
    # The big language is down-sampled without repeats.
    big = [d for d, loc in zip(mix.documents, mix.locales) if loc == "big"]
    assert len(big) == len(set(big)) == mix.quotas["big"] < 5000
    # Documents keep their locale.
    assert all(d.split()[0] == loc for d, loc in zip(mix.documents, mix.locales))


def test_mixture_is_deterministic_for_a_seed():
    pools = {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(5)]}
    one = draw_mixture(pools, 0.3, 200, seed=7)
    two = draw_mixture(pools, 0.3, 200, seed=7)
    other = draw_mixture(pools, 0.3, 200, seed=8)
    assert one.documents == two.documents
    assert one.documents != other.documents
    assert Counter(one.locales) == Counter(other.locales)


def test_many_draws_of_locale_frequencies_match_p():
    """Locale frequencies at a random position, over many seeded mixtures, match p_l (tolerance 0.01)."""
    pools = {"a": [f"a{i}" for i in range(900)], "b": [f"b{i}" for i in range(100)], "c": ["c0", "c1"]}
    p = sampling_probabilities({k: len(v) for k, v in pools.items()}, 0.3)
    seen = Counter()
    for seed in range(400):
        mix = draw_mixture(pools, 0.3, 100, seed=seed)
        seen.update(mix.locales[:10])
    total = sum(seen.values())
    for loc in pools:
        assert abs(seen[loc] / total - p[loc]) < 0.01


def test_heldout_split_is_disjoint_and_complete():
    pools = {"a": [f"a{i}" for i in range(1000)], "b": [f"b{i}" for i in range(3)]}
    train, held = split_heldout(pools, 0.05, seed=0, min_documents=1)
    for loc in pools:
        assert not set(train[loc]) & set(held[loc])
        assert sorted(train[loc] + held[loc]) == sorted(pools[loc])
    assert len(held["a"]) == 50
    assert len(held["b"]) == 1
    assert split_heldout(pools, 0.05, seed=0)[1] == held


def test_parallel_order_keeps_translations_together_and_holds_out_whole_ids():
    # Three locales of 200 parallel utterances; "de" lost id 7 to the evaluation-text filter, and
    # repeats id 3's text under id 9 (kept once, under its first id).
    ids = [str(i) for i in range(200)]
    utts = {loc: [f"{loc}{i}" for i in range(200)] for loc in ("en", "de", "ja")}
    utts["de"][9] = "de3"
    pools = {loc: list(dict.fromkeys(u)) for loc, u in utts.items()}
    pools["de"].remove("de7")
    groups = parallel_groups({loc: ids for loc in utts}, utts, pools)
    assert [loc for loc, _ in groups["7"]] == ["en", "ja"] and ("de", "de3") in groups["3"]
    assert sorted(u for g in groups.values() for _, u in g) == sorted(u for p in pools.values() for u in p)

    train, held = draw_parallel(groups, 0.05, seed=0)
    doc_id = {u: i for i, g in groups.items() for _, u in g}
    # Every document once; the documents of one id are consecutive; no id on both sides.
    assert sorted(train.documents + held.documents) == sorted(doc_id)
    train_ids = [doc_id[d] for d in train.documents]
    runs = [i for k, i in enumerate(train_ids) if k == 0 or train_ids[k - 1] != i]
    assert len(runs) == len(set(runs)) == 190
    assert len({doc_id[d] for d in held.documents}) == 10
    assert not set(train_ids) & {doc_id[d] for d in held.documents}
    assert train.quotas == train.sizes and train.locales.count("de") == train.sizes["de"]
    # Locale order within an id is shuffled, and everything is seeded.
    orders = {tuple(loc for loc, i in zip(train.locales, train_ids) if i == id_) for id_ in runs[:40]}
    assert len({o for o in orders if len(o) == 3}) > 1
    assert draw_parallel(groups, 0.05, seed=0)[0].documents == train.documents
    assert draw_parallel(groups, 0.05, seed=1)[0].documents != train.documents


# ----------------------------------------------------------------------------- reading and exclusion


def test_flores_sentence_planted_in_corpus_is_refused(tmp_path, flores_dir):
    flores_de = gzip.open(flores_dir / "de-DE.txt.gz", "rt", encoding="utf-8").read().splitlines()
    flores_en = gzip.open(flores_dir / "en-US.txt.gz", "rt", encoding="utf-8").read().splitlines()
    planted_de = flores_de[10]
    # A different language's FLORES line, with changed case and spacing, is refused too.
    planted_en = "  " + flores_en[20].upper().replace(" ", "   ") + " "
    lines = ["Das ist ein Satz.", planted_de, "Noch ein  Satz.", planted_en, "Noch ein Satz."]
    _write_gz(tmp_path / "de-DE.txt.gz", lines)
    cfg = _cfg(tmp_path, ["de-DE"])
    corpus = build_corpus(cfg, evaluation_text(cfg), progress=False)
    assert corpus.sentences["de-DE"] == ["Das ist ein Satz.", "Noch ein Satz."]
    report = corpus.report["de-DE"]
    assert report.refused == {"flores": 2}
    assert report.duplicates == 1
    assert report.read == {"local": 5}


def test_massive_dev_and_test_utterances_are_refused(tmp_path, massive_dir):
    from massive.loader import evaluation_utterances, load_massive, massive_utterances

    data = load_massive(massive_dir, locales=["en-US"], progress=False)
    dev = data.examples("en-US", "dev")[0].utt
    test = data.examples("en-US", "test")[5].utt
    train_utts = massive_utterances(data, ("train",))
    eval_keys = {exclusion_key(u) for u in evaluation_utterances(data)}
    _write_gz(tmp_path / "en-US.txt.gz", ["A general sentence.", dev.capitalize() + "?", test])
    cfg = _cfg(tmp_path, ["en-US"])
    excluded = evaluation_text(cfg, evaluation_utterances(data))
    corpus = build_corpus(cfg, excluded, progress=False)
    assert corpus.sentences["en-US"] == ["A general sentence."]
    assert corpus.report["en-US"].refused == {"massive_eval": 2}
    # In-domain text: MASSIVE train utterances that also occur in dev/test are refused as well.
    pools, reports = massive_pools(train_utts, excluded, ["en-US"])
    overlap = sum(1 for u in set(train_utts["en-US"]) if exclusion_key(u) in eval_keys)
    assert overlap > 0
    assert reports["en-US"].refused.get("massive_eval", 0) == overlap
    assert not any(exclusion_key(u) in eval_keys for u in pools["en-US"])


def test_dedup_after_whitespace_normalisation_and_length_filter(tmp_path):
    _write_gz(
        tmp_path / "fr-FR.txt.gz",
        ["Bonjour  le monde", "Bonjour le monde ", "\tBonjour le\tmonde", "", "x" * 50, "<sep> ici"],
    )
    cfg = _cfg(tmp_path, ["fr-FR"], max_chars=40, evaluation_text=[])
    corpus = build_corpus(cfg, EvaluationText(), progress=False)
    assert corpus.sentences["fr-FR"] == ["Bonjour le monde"]
    assert corpus.report["fr-FR"].duplicates == 2
    assert corpus.report["fr-FR"].empty_or_length == 3


def test_missing_locale_file_is_reported_not_fatal(tmp_path):
    _write_gz(tmp_path / "en-US.txt.gz", ["one", "two"])
    cfg = _cfg(tmp_path, ["en-US", "kn-IN"], evaluation_text=[])
    corpus = build_corpus(cfg, EvaluationText(), progress=False)
    assert corpus.sizes() == {"en-US": 2, "kn-IN": 0}
    assert corpus.report["kn-IN"].missing_sources == ["local"]
    mix = draw_mixture(corpus.sentences, 0.3, 10, seed=0)
    assert mix.quotas == {"en-US": 10, "kn-IN": 0}


def test_cap_per_language_is_a_seeded_subset(tmp_path):
    _write_gz(tmp_path / "en-US.txt.gz", [f"sentence {i}" for i in range(100)])
    cfg = _cfg(tmp_path, ["en-US"], max_sentences_per_language=10, evaluation_text=[])
    a = build_corpus(cfg, EvaluationText(), progress=False)
    b = build_corpus(cfg, EvaluationText(), progress=False)
    assert a.sentences == b.sentences and len(a.sentences["en-US"]) == 10
    assert a.sentences["en-US"] != [f"sentence {i}" for i in range(10)]
    assert a.report["en-US"].capped == 90


def test_jsonl_source_with_text_field(tmp_path):
    path = tmp_path / "de.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"Satz {i}", "id": i}) for i in range(3)) + "\n")
    sources = [{"name": "j", "kind": "jsonl", "path": str(tmp_path / "{lang}.jsonl"), "text_field": "body"}]
    cfg = _cfg(tmp_path, ["de-DE"], sources=sources, evaluation_text=[])
    corpus = build_corpus(cfg, EvaluationText(), progress=False)
    assert corpus.sentences["de-DE"] == ["Satz 0", "Satz 1", "Satz 2"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "de-DE.jsonl"
    path.write_text('{"text": "gut"}\n{"text": oops}\n')
    source = SourceConfig(name="j", kind="jsonl", path=str(tmp_path / "{locale}.jsonl"))
    with pytest.raises(CorpusSourceError, match=r"de-DE.jsonl:2: not a JSON object"):
        list(read_source(source, "de-DE"))
    path.write_text('{"content": "gut"}\n')
    with pytest.raises(CorpusSourceError, match=r"de-DE.jsonl:1: no field 'text' \(fields: content\)"):
        list(read_source(source, "de-DE"))


def test_hf_source_offline_gives_an_actionable_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = SourceConfig(name="mc4", kind="hf", path="allenai/c4", hf_config="{lang}", text_field="text")
    with pytest.raises(CorpusSourceError) as err:
        list(read_source(source, "de-DE"))
    msg = str(err.value)
    assert "'mc4'" in msg and "allenai/c4" in msg and "config 'de'" in msg
    assert "HF_HUB_OFFLINE" in msg and "kind: jsonl" in msg


def test_flores_code_placeholder(tmp_path):
    _write_gz(tmp_path / "deu_Latn.txt.gz", ["Hallo"])
    source = SourceConfig(name="f", kind="text", path=str(tmp_path / "{flores}.txt.gz"))
    assert list(read_source(source, "de-DE")) == ["Hallo"]


def test_config_validation_names_key_and_allowed_values():
    from core.config import load_config

    with pytest.raises(ConfigError, match="tokenizer.vocab_size: 300 is too small"):
        load_config(DataConfig, section="data", overrides=["tokenizer.vocab_size=300"])
    with pytest.raises(
        ConfigError, match=r"locales\[1\]: 'xx-XX' is not a MASSIVE locale; allowed values: af-ZA"
    ):
        load_config(DataConfig, section="data", overrides=["locales=[en-US, xx-XX]"])
    with pytest.raises(ConfigError, match="sampling.alpha"):
        load_config(DataConfig, section="data", overrides=["sampling.alpha=1.5"])
    with pytest.raises(ConfigError, match="must contain"):
        load_config(DataConfig, section="data", overrides=["corpus.sources=[{name: a, path: /tmp/a.txt}]"])
    cfg = load_config(DataConfig, section="data", preset="tiny")
    assert cfg.tokenizer.vocab_size == 4000 and cfg.packing.seq_len == 128 and "ja-JP" in cfg.locales
    assert math.isclose(cfg.sampling.alpha, 0.3)


# ----------------------------------------------------------------------------- aligned (parallel) sources


def test_aligned_source_lines_keep_their_numbers_and_leave_the_monolingual_pools(tmp_path, flores_dir):
    """corpus.aligned_sources (NTREX-like files, line n = the same sentence in every locale): their
    lines are keyed by line number, cleaned one by one (a refused or duplicated line drops only that
    locale's member), and are not monolingual sentences; the tokenizer still reads them."""
    from data_prep.corpus import aligned_groups

    flores_de = gzip.open(flores_dir / "de-DE.txt.gz", "rt", encoding="utf-8").read().splitlines()
    _write_gz(tmp_path / "mono" / "en-US.txt.gz", ["A monolingual sentence."])
    _write_gz(tmp_path / "mono" / "de-DE.txt.gz", ["Ein einsprachiger Satz."])
    _write_gz(tmp_path / "par" / "en-US.txt.gz", ["One.", "Two.", "Three.", "Four."])
    # de: line 1 is FLORES text (refused), line 3 repeats a monolingual sentence (a duplicate).
    _write_gz(tmp_path / "par" / "de-DE.txt.gz", ["Eins.", flores_de[3], "Drei.", "Ein einsprachiger Satz."])
    sources = [{"name": "mono", "kind": "text", "path": str(tmp_path / "mono" / "{locale}.txt.gz")},
               {"name": "par", "kind": "text", "path": str(tmp_path / "par" / "{locale}.txt.gz")}]
    cfg = _cfg(tmp_path, ["en-US", "de-DE"], sources=sources, aligned_sources=["par"])
    corpus = build_corpus(cfg, evaluation_text(cfg), progress=False)
    assert corpus.sentences == {"en-US": ["A monolingual sentence."], "de-DE": ["Ein einsprachiger Satz."]}
    assert corpus.aligned["en-US"] == [("par:0", "One."), ("par:1", "Two."), ("par:2", "Three."), ("par:3", "Four.")]
    assert corpus.aligned["de-DE"] == [("par:0", "Eins."), ("par:2", "Drei.")]
    report = corpus.report["de-DE"]
    assert (report.kept, report.aligned, report.refused, report.duplicates) == (1, 2, {"flores": 1}, 1)
    assert report.read == {"mono": 1, "par": 4}
    # Lines left in one locale have nothing to align with.
    assert aligned_groups(corpus.aligned) == {"par:0": [("en-US", "One."), ("de-DE", "Eins.")],
                                              "par:2": [("en-US", "Three."), ("de-DE", "Drei.")]}
    assert corpus.tokenizer_pools()["de-DE"] == ["Ein einsprachiger Satz.", "Eins.", "Drei."]


def test_aligned_sources_must_name_text_sources(tmp_path):
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="'ntrex' is not a source"):
        _cfg(tmp_path, ["en-US"], aligned_sources=["ntrex"])
    sources = [{"name": "j", "kind": "jsonl", "path": str(tmp_path / "{locale}.jsonl")}]
    with pytest.raises(ConfigError, match="only kind: text"):
        _cfg(tmp_path, ["en-US"], sources=sources, aligned_sources=["j"])


def test_join_mixtures_adds_the_aligned_block_after_the_sampled_one():
    from data_prep.corpus import join_mixtures

    mono = draw_mixture({"a": ["a1", "a2"], "b": ["b1"]}, 1.0, 3, seed=0)
    groups = {f"k{i}": [("a", f"pa{i}"), ("b", f"pb{i}")] for i in range(40)}
    aligned, held = draw_parallel(groups, 0.05, seed=0)
    joined = join_mixtures(mono, aligned)
    assert joined.documents == mono.documents + aligned.documents
    assert joined.locales == mono.locales + aligned.locales
    assert joined.sizes == {"a": 40, "b": 39} and joined.quotas == {"a": 40, "b": 39}
    assert sum(joined.probabilities.values()) == pytest.approx(1.0)
    assert not {d for d in held.documents} & set(joined.documents)
