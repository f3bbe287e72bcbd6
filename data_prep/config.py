"""`DataConfig`: the data_prep stage's configuration (preset section `data`).

Sections: `corpus` (monolingual sources, filtering, evaluation-text exclusion), `sampling`
(temperature sampling of languages), `tokenizer` (SentencePiece training), `packing` (fixed-length
Arrow shards) and `massive` (the labelled NLU set, whose train utterances are the in-domain text).
Light on imports: the CLI imports this module at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.config import LOCALE_RE, ConfigError
from core.crosslingual import CrossLingualConfig
from core.locales import PROVIDED_LOCALES

# The default data-prep locales, kept under their old name for callers (core.locales names them).
DEFAULT_LOCALES = list(PROVIDED_LOCALES)

# Special tokens that come before any learned piece, in id order (docs/internals.md).
RESERVED_TOKENS = ("<pad>", "</s>", "<unk>", "[CLM]", "<sep>")
# SentencePiece byte fallback adds one piece per byte value.
NUM_BYTE_PIECES = 256
# Below this many learned pieces a unigram model is not useful (and SentencePiece may refuse).
MIN_LEARNED_PIECES = 64


@dataclass
class SourceConfig:
    """One monolingual text source, read per locale."""

    name: str = "tatoeba"
    """Label used in reports (sentences per source and locale)."""
    kind: Literal["text", "jsonl", "hf"] = "text"
    """text: one sentence per line (.txt or .txt.gz); jsonl: one JSON object per line (.jsonl or
    .jsonl.gz) with the sentence under `text_field`; hf: a Hugging Face dataset read by name
    (streaming; needs network access or a local datasets cache)."""
    path: str = "@data/corpora/tatoeba/{locale}.txt.gz"
    """text/jsonl: file path pattern with {locale} (MASSIVE locale, e.g. de-DE), {lang} (the
    language part, de) or {flores} (FLORES-200 code, deu_Latn); may start with @data/. A locale whose
    file is missing has no text from this source (reported, not an error). hf: the dataset name."""
    hf_config: str | None = None
    """hf only: the dataset config name pattern (same placeholders as path), e.g. '{lang}'."""
    split: str = "train"
    """hf only: the split to read."""
    text_field: str = "text"
    """jsonl/hf: the field holding the sentence."""


def _default_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="tatoeba", kind="text", path="@data/corpora/tatoeba/{locale}.txt.gz"),
        SourceConfig(name="ntrex", kind="text", path="@data/corpora/ntrex/{locale}.txt.gz"),
    ]


@dataclass
class CorpusConfig:
    """Where monolingual text comes from and what is refused."""

    sources: list[SourceConfig] = field(default_factory=_default_sources)
    """Monolingual text sources, read for every locale (see SourceConfig keys: name, kind, path,
    hf_config, split, text_field)."""
    aligned_sources: list[str] = field(default_factory=list)
    """Names of `kind: text` sources whose files are line-aligned across locales (line n of every
    locale's file is the same sentence, as in NTREX). Their lines leave the monolingual pools: the
    translations of one line that survive cleaning are packed next to each other in the pretraining
    data (translation language modelling, as in XLM: a masked span can be read off a translation in
    the same row), in natural proportions, and a heldout line is heldout in every locale. They stay
    tokenizer text. Empty: every source is monolingual."""
    max_sentences_per_language: int | None = None
    """Keep at most this many sentences per locale after deduplication and exclusion (a seeded
    random subset); null keeps all (aligned lines are not capped)."""
    max_sentences_per_source: int | None = None
    """Read at most this many lines per source file (the first ones); bounds reading time on huge
    sources. null reads everything."""
    min_chars: int = 1
    """Drop sentences shorter than this many characters (after whitespace normalisation)."""
    max_chars: int = 1000
    """Drop sentences longer than this many characters."""
    evaluation_text: list[str] = field(default_factory=lambda: ["@data/corpora/flores200/dev"])
    """Evaluation text never admitted to pretraining or tokenizer text: directories of *.txt(.gz)
    files (all languages are read) or single files. MASSIVE dev/test utterances are always refused
    as well."""


@dataclass
class SamplingConfig:
    """Temperature sampling of languages: p_l proportional to n_l ** alpha.

    A language's share of a sample of M sentences is its exact quota round(p_l * M) (largest
    remainder). Languages with more sentences than their quota get a seeded random subset;
    up-sampled languages repeat whole epochs of their sentences plus a random subset for the rest
    (no sentence appears k+1 times before every sentence appears k times).
    """

    alpha: float = 0.3
    """Sampling exponent: 1 keeps natural proportions, 0 gives every language the same share."""
    tokenizer_sentences: int = 200_000
    """Sentences in the tokenizer's training sample (drawn with the language sampling)."""
    pretrain_sentences: int | None = None
    """Sentences in the pretraining mixture; null uses the corpus size (sum of n_l), re-weighted."""
    massive_train_in_tokenizer: bool = True
    """Add MASSIVE train utterances (unlabelled text) to each locale's tokenizer training text, so
    the vocabulary also fits the in-domain text."""


@dataclass
class TokenizerConfig:
    """SentencePiece unigram tokenizer with byte fallback, saved as a Hugging Face fast tokenizer."""

    vocab_size: int = 32_000
    """Total vocabulary size including the reserved tokens, sentinels and 256 byte pieces."""
    character_coverage: float = 0.9995
    """Share of characters covered by pieces; rarer characters fall back to bytes."""
    num_sentinels: int = 100
    """Number of sentinel tokens <extra_id_0> ... <extra_id_{n-1}> for span corruption."""
    split_digits: bool = True
    """Split numbers into single digits (consistent number handling across languages)."""
    max_sentence_length: int = 4192
    """SentencePiece's limit in bytes; longer training sentences are skipped by the trainer."""
    num_threads: int = 2
    """Trainer threads."""
    hard_vocab_limit: bool = False
    """false: a small training text may yield fewer pieces than vocab_size instead of an error."""
    label_tokens: bool = True
    """Add one whole token `<label>` for every MASSIVE intent, slot label and `Other` found in the
    loaded train partitions (appended after the SentencePiece pieces, never matched inside text), so
    a text-to-text target is one token per word plus one for the intent. Spelled with pieces, a
    target is 3-4x longer (`Other` 2 pieces, an intent about 4 at a 4000-piece vocabulary), the
    decoder must learn the spellings, and generation takes that many more steps."""


@dataclass
class PackingConfig:
    """Tokenize and pack documents into fixed-length sequences stored as Arrow shards."""

    seq_len: int = 512
    """Tokens per packed row (documents joined by <sep>; the last row may be shorter)."""
    heldout_fraction: float = 0.01
    """Fraction of documents (not rows) held out for evaluation; disjoint from train."""
    min_heldout_documents: int = 1
    """At least this many documents go to heldout when there are enough documents."""
    tokenize_batch_size: int = 1000
    """Documents per batch call of the fast tokenizer."""
    max_shard_size: str = "200MB"
    """Largest Arrow shard size written by datasets.save_to_disk."""


@dataclass
class MassiveSourceConfig:
    """The labelled NLU set: loaded for its train utterances (in-domain text) and for exclusion."""

    source: str = "@data/massive/data"
    """Directory of <locale>.jsonl(.gz), a release tarball path or URL, or 'hub'."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed row does: error (stop, naming file and line) or skip (count in the report)."""
    cache_dir: str | None = None
    """Where parsed MASSIVE splits are cached as Arrow (null: <run-dir>/.cache/massive)."""
    exclude_all_locales: bool = True
    """Refuse the dev/test utterances of every locale the source has (true), or only of the
    configured locales (false: loads less, for small runs)."""
    indomain: bool = True
    """Pack MASSIVE train utterances of the configured locales into data-indomain/ (stage 2)."""
    indomain_order: Literal["shuffled", "parallel"] = "shuffled"
    """How data-indomain/ orders the utterances: shuffled (each one alone among others), or parallel
    (the translations of one MASSIVE utterance in the configured locales follow each other, so a
    packed row holds the same utterances in several languages: denoising can copy across languages
    and the causal-LM continuation is a translation, as XLM's translation language modelling; the
    heldout split is by id). Uses the MASSIVE ids, never the labels."""


@dataclass
class DataConfig:
    """The data_prep stage: corpus -> tokenizer -> packed data -> in-domain data."""

    locales: list[str] = field(default_factory=lambda: list(PROVIDED_LOCALES))
    """MASSIVE locale names to prepare (default: the 48 provided under the data root)."""
    seed: int = 0
    """Seed for every random choice of the stage (subsets, sampling, heldout split)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Monolingual sources and filters."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Language sampling for the tokenizer sample and the pretraining mixture."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """SentencePiece training."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    """Packing into Arrow shards."""
    massive: MassiveSourceConfig = field(default_factory=MassiveSourceConfig)
    """The MASSIVE data set."""
    crosslingual: CrossLingualConfig = field(default_factory=CrossLingualConfig)
    """Source and target locales and the setting (preset section `crosslingual`): under zero-shot the
    MASSIVE train utterances of the target locales stay out of the in-domain data (the targets are
    seen only in the generic corpora); under zero-shot and teacher-labelled they stay out of the
    tokenizer's text, so both arms share one tokenizer and one stage-1 teacher."""

    def tokenizer_massive_locales(self) -> list[str]:
        """The locales whose MASSIVE train utterances join the tokenizer's text: never a named target,
        whatever the setting, so that every arm of a cross-lingual comparison shares one tokenizer."""
        if self.crosslingual.setting == "supervised":
            return list(self.locales)
        return [loc for loc in self.locales if loc not in self.crosslingual.targets]

    def massive_text_locales(self) -> list[str]:
        """The locales whose MASSIVE train utterances the stage reads as unlabelled text."""
        if self.crosslingual.setting != "zero-shot":
            return list(self.locales)
        return [loc for loc in self.locales if loc not in self.crosslingual.targets]

    def validate(self) -> None:
        _validate_data_config(self)




def _known_locales() -> tuple[str, ...]:
    try:
        from massive.format import MASSIVE_LOCALES
    except ImportError:  # massive.py not installed in this checkout: accept the well-formed names
        return ()
    return tuple(MASSIVE_LOCALES)


def _validate_data_config(cfg: DataConfig) -> None:
    if not cfg.locales:
        raise ConfigError("locales: the list is empty; give at least one MASSIVE locale, e.g. en-US")
    known = _known_locales()
    for i, loc in enumerate(cfg.locales):
        if not LOCALE_RE.match(loc) or (known and loc not in known):
            allowed = ", ".join(known) if known else "names like en-US"
            raise ConfigError(f"locales[{i}]: {loc!r} is not a MASSIVE locale; allowed values: {allowed}")
    if len(set(cfg.locales)) != len(cfg.locales):
        dup = sorted({x for x in cfg.locales if cfg.locales.count(x) > 1})
        raise ConfigError(f"locales: duplicated {', '.join(dup)}")

    c = cfg.corpus
    if not c.sources and not cfg.massive.indomain:
        raise ConfigError("corpus.sources: empty; give at least one source (kind: text, jsonl or hf)")
    names = [s.name for s in c.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"corpus.sources: source names must be unique, got {names}")
    for i, s in enumerate(c.sources):
        if (
            s.kind in ("text", "jsonl")
            and "{locale}" not in s.path
            and "{lang}" not in s.path
            and "{flores}" not in s.path
        ):
            raise ConfigError(
                f"corpus.sources[{i}].path: {s.path!r} must contain {{locale}}, {{lang}} or {{flores}} "
                "(one file per locale)"
            )
        if s.kind in ("jsonl", "hf") and not s.text_field:
            raise ConfigError(f"corpus.sources[{i}].text_field: must name the field holding the text")
    kinds = {src.name: src.kind for src in c.sources}
    for name in c.aligned_sources:
        if name not in kinds:
            raise ConfigError(f"corpus.aligned_sources: {name!r} is not a source; sources: {', '.join(kinds) or 'none'}")
        if kinds[name] != "text":
            raise ConfigError(f"corpus.aligned_sources: {name!r} is a {kinds[name]} source; only kind: text files keep "
                              "their line numbers")
    for key in ("max_sentences_per_language", "max_sentences_per_source"):
        value = getattr(c, key)
        if value is not None and value < 1:
            raise ConfigError(f"corpus.{key}: {value} must be >= 1 or null")
    if c.min_chars < 1 or c.max_chars < c.min_chars:
        raise ConfigError(
            f"corpus.min_chars/max_chars: need 1 <= min_chars <= max_chars, got {c.min_chars}, {c.max_chars}"
        )

    s = cfg.sampling
    if not 0.0 <= s.alpha <= 1.0:
        raise ConfigError(f"sampling.alpha: {s.alpha} must be in [0, 1]")
    if s.tokenizer_sentences < 100:
        raise ConfigError(f"sampling.tokenizer_sentences: {s.tokenizer_sentences} is too small (>= 100)")
    if s.pretrain_sentences is not None and s.pretrain_sentences < 1:
        raise ConfigError(f"sampling.pretrain_sentences: {s.pretrain_sentences} must be >= 1 or null")

    t = cfg.tokenizer
    if t.num_sentinels < 0:
        raise ConfigError(f"tokenizer.num_sentinels: {t.num_sentinels} must be >= 0")
    minimum = min_vocab_size(t.num_sentinels)
    if t.vocab_size < minimum:
        raise ConfigError(
            f"tokenizer.vocab_size: {t.vocab_size} is too small: {len(RESERVED_TOKENS)} reserved tokens + "
            f"{t.num_sentinels} sentinels + {NUM_BYTE_PIECES} byte pieces + {MIN_LEARNED_PIECES} learned "
            f"pieces need at least {minimum}"
        )
    if not 0.9 <= t.character_coverage <= 1.0:
        raise ConfigError(f"tokenizer.character_coverage: {t.character_coverage} must be in [0.9, 1.0]")
    if t.num_threads < 1:
        raise ConfigError(f"tokenizer.num_threads: {t.num_threads} must be >= 1")

    p = cfg.packing
    if p.seq_len < 8:
        raise ConfigError(f"packing.seq_len: {p.seq_len} must be >= 8")
    if not 0.0 <= p.heldout_fraction < 0.5:
        raise ConfigError(f"packing.heldout_fraction: {p.heldout_fraction} must be in [0, 0.5)")
    if p.tokenize_batch_size < 1:
        raise ConfigError(f"packing.tokenize_batch_size: {p.tokenize_batch_size} must be >= 1")


def min_vocab_size(num_sentinels: int) -> int:
    """The smallest vocab_size that leaves room for MIN_LEARNED_PIECES learned pieces."""
    return len(RESERVED_TOKENS) + num_sentinels + NUM_BYTE_PIECES + MIN_LEARNED_PIECES
