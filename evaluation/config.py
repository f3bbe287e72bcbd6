"""EvalConfig: the `evaluate` section of a preset (MASSIVE scoring, in-context learning, translation,
the classical baseline, fairness, latency).

Each `polyteacher evaluate X` command reads `EvalConfig` with `load_config(EvalConfig, "evaluate",
preset, overrides)`; its flags (`--locales`, `--max-examples`, ...) are shorthands for the dotted
overrides `X.locales=...`, `X.max_examples=...`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from core.bigmodel import ModelLoadConfig
from core.config import ConfigError
from core.crosslingual import CrossLingualConfig
from core.locales import DEFAULT_LOCALES, FAIRNESS_LOCALES, LATENCY_LOCALES, TRANSLATION_LOCALES
from data_prep.icl import HELDOUT_SCENARIOS

# Placeholders each template must contain, checked at start-up.
ICL_PROMPT_FIELDS = ("{demos}", "{utt}")
ICL_DEMO_FIELDS = ("{utt}", "{label}")
TRANSLATION_PROMPT_FIELDS = ("{demo}", "{src_lang}", "{tgt_lang}", "{src}")
TRANSLATION_DEMO_FIELDS = ("{src_lang}", "{tgt_lang}", "{src}", "{tgt}")


def _check_template(key: str, template: str, required: tuple[str, ...]) -> None:
    missing = [name for name in required if name not in template]
    if missing:
        raise ConfigError(f"{key}: template {template!r} lacks {', '.join(missing)}; it must contain {', '.join(required)}")
    try:
        template.format(**{name.strip("{}"): "" for name in required})
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"{key}: template {template!r} has an unknown or malformed placeholder ({e}); "
            f"allowed placeholders: {', '.join(required)}"
        ) from e


def _check_locales(key: str, locales: list[str]) -> None:
    # Imported here: massive.format pulls in nothing heavy, but the
    # config must stay importable on its own.
    try:
        from massive.format import MASSIVE_LOCALES
    except ModuleNotFoundError:
        return
    unknown = [loc for loc in locales if loc not in MASSIVE_LOCALES]
    if unknown:
        raise ConfigError(f"{key}: unknown locale(s) {', '.join(unknown)}; allowed: {', '.join(MASSIVE_LOCALES)}")


def _check_batch_and_sample(section: str, batch_size: int, max_examples: Optional[int]) -> None:
    """ConfigError unless a section's batch_size >= 1 and its sample size is >= 0 (0 = all) or null."""
    if batch_size < 1:
        raise ConfigError(f"{section}.batch_size must be >= 1, got {batch_size}")
    if max_examples is not None and max_examples < 0:
        raise ConfigError(f"{section}.max_examples must be >= 0 (0 = all) or null, got {max_examples}")


@dataclass
class MassiveEvalConfig:
    data: str = "@data/massive/data"
    """MASSIVE source for load_massive: a directory of <locale>.jsonl[.gz] (`@data/` = under the data root)."""
    locales: list[str] = field(default_factory=list)
    """Locales to score; empty (or `--locales all`) means every locale file the data directory has,
    a file added after training included (the tokenizer's byte fallback reads any script)."""
    split: Literal["train", "dev", "test"] = "test"
    """MASSIVE partition to score."""
    max_examples: Optional[int] = None
    """Test ids scored per locale: a random sample (`seed`) of the ids every requested locale has,
    the same ids in each locale (MASSIVE is parallel across locales); 0 or null for all of them."""
    seed: int = 0
    """Seed of the sample of ids and of the bootstrap resamples behind the intervals."""
    batch_size: int = 32
    """Utterances per predictor call (examples are sorted by length first, so batches pad little)."""
    max_new_tokens_margin: int = 4
    """Seq2seq predictors generate at most (words x tokens of the longest slot label) + tokens of the
    longest intent + this margin new tokens."""
    num_threads: int = 1
    """Intra-op threads for ONNX predictors (onnxruntime)."""

    def validate(self) -> None:
        _check_batch_and_sample("massive", self.batch_size, self.max_examples)
        if self.max_new_tokens_margin < 0:
            raise ConfigError(f"massive.max_new_tokens_margin must be >= 0, got {self.max_new_tokens_margin}")
        _check_locales("massive.locales", self.locales)


@dataclass
class ICLConfig:
    data: str = "@data/massive/data"
    """MASSIVE source: queries come from `split`, demonstrations from the train partition."""
    locales: list[str] = field(default_factory=lambda: list(DEFAULT_LOCALES))
    """Locales to evaluate (locales missing from the data are skipped with a warning)."""
    split: Literal["dev", "test"] = "test"
    """Partition the queries come from."""
    shots: list[int] = field(default_factory=lambda: [0, 1, 5])
    """Numbers of demonstrations k; accuracy is reported for each."""
    demo_source: Literal["same", "en-US"] = "same"
    """Where demonstrations come from: the query's own locale (train partition), or en-US train
    (cross-lingual)."""
    max_examples: Optional[int] = 200
    """Queries per locale: a random sample (`seed`) of the ids every locale has, the same ids in each
    (as massive.max_examples); 0 or null for all of them."""
    prompt_template: str = "{demos}Utterance: {utt} Intent:"
    """Prompt for one query; {demos} is the concatenation of the demonstrations, {utt} the query."""
    demo_template: str = "Utterance: {utt} Intent: {label}\n"
    """One demonstration; {label} is the intent's label text (alarm_set -> "alarm set")."""
    clm_prompt: bool = True
    """Prefix the encoder input with the [CLM] token, so a teacher pretrained with the causal-LM
    objective continues the prompt; false feeds the plain prompt."""
    normalize: Literal["mean", "sum"] = "mean"
    """How a label's token log-probs are combined: length-normalised mean (default; labels have 1-5
    tokens and a sum favours short ones) or plain sum."""
    label_eos: bool = False
    """Score the end-of-sequence token after the label too. Off by default: pretraining never shows a
    label followed by eos (a demonstration's label is followed by a newline and the next one), so the
    eos probability measures the model's guess about where the text ends, not the label. On, a label
    that is a prefix of a longer continuation ("play" vs "play music") is not favoured."""
    calibration: Literal["none", "contextual"] = "none"
    """`contextual`: contextual calibration (Zhao et al. 2021, "Calibrate Before Use"). Every prompt
    is scored once more with the same demonstrations and a content-free query (`content_free`), and
    labels are ranked by log p(label | prompt) - log p_cf(label), where p_cf is that prompt's label
    distribution (the scores softmaxed over labels; the mean of the distributions when there are
    several content-free strings). This removes the label prior that the template and the
    demonstrations induce (majority and recency labels, common label words). It costs one more
    encoder pass per prompt (one per locale at k=0); the uncalibrated accuracy is reported beside
    the calibrated one. `none`: rank by the scores themselves."""
    content_free: list[str] = field(default_factory=lambda: ["N/A"])
    """Content-free queries for `calibration: contextual`, put in the prompt template in place of the
    utterance; several (e.g. ["N/A", "", "[MASK]"], as in Zhao et al.) are averaged in probability."""
    max_prompt_tokens: int = 512
    """Longer prompts lose their oldest demonstration tokens (the query and [CLM] are kept)."""
    batch_size: int = 8
    """Queries per encoder pass."""
    score_batch_size: int = 240
    """(query, label) rows per decoder pass; bounds memory at rows x label tokens x vocabulary."""
    seed: int = 0
    """Seed of the sample of queries, of the demonstrations (deterministic per query; k=1 demos are a
    prefix of k=5) and of the bootstrap resamples."""
    protocol: Literal["all_intents", "heldout"] = "all_intents"
    """all_intents: rank all 60 intents, demos drawn at random (evaluation/icl.py); heldout: N-way
    candidate sets over the held-out intents, k demos per candidate label, same- and cross-language
    pairs, TF-IDF nearest-neighbour reference (evaluation/icl_heldout.py, docs/icl.md)."""
    heldout_scenarios: list[str] = field(default_factory=lambda: list(HELDOUT_SCENARIOS))
    """protocol heldout: the held-out scenarios (default data_prep.icl.HELDOUT_SCENARIOS, 11 intents);
    must equal the ones in-context training excluded (pretrain icl.heldout_scenarios)."""
    way: int = 5
    """protocol heldout: candidate labels per query (chance 1/way)."""
    heldout_shots: list[int] = field(default_factory=lambda: [0, 1, 2, 5])
    """protocol heldout: demonstrations per candidate label."""
    heldout_split: Literal["dev", "test"] = "dev"
    """protocol heldout: partition of the queries (select on dev; read test once)."""

    def validate(self) -> None:
        _check_template("icl.prompt_template", self.prompt_template, ICL_PROMPT_FIELDS)
        _check_template("icl.demo_template", self.demo_template, ICL_DEMO_FIELDS)
        if not self.shots or any(k < 0 for k in self.shots):
            raise ConfigError(f"icl.shots must be a non-empty list of k >= 0, got {self.shots}")
        for name in ("batch_size", "score_batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"icl.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_examples is not None and self.max_examples < 0:
            raise ConfigError(f"icl.max_examples must be >= 0 (0 = all) or null, got {self.max_examples}")
        _check_locales("icl.locales", self.locales)
        if self.way < 2:
            raise ConfigError(f"icl.way must be >= 2, got {self.way}")
        if not self.heldout_shots or any(k < 0 for k in self.heldout_shots):
            raise ConfigError(f"icl.heldout_shots must be a non-empty list of k >= 0, got {self.heldout_shots}")
        if not self.heldout_scenarios:
            raise ConfigError("icl.heldout_scenarios must name at least one scenario")
        if self.calibration == "contextual" and not self.content_free:
            raise ConfigError("icl.content_free must hold at least one string when icl.calibration is 'contextual'")


@dataclass
class TranslationConfig:
    data: str = "@data/corpora/flores200/dev"
    """FLORES-200 dev directory of <locale>.txt.gz files (997 line-aligned sentences each)."""
    locales: list[str] = field(default_factory=lambda: list(TRANSLATION_LOCALES))
    """Languages paired with en-US (locales missing from the data are skipped with a warning)."""
    directions: list[Literal["en-xx", "xx-en"]] = field(default_factory=lambda: ["en-xx", "xx-en"])
    """Translation directions to evaluate."""
    num_demo_lines: int = 100
    """The first N dev lines are the demonstration pool; evaluated sentences come from the rest."""
    max_examples: Optional[int] = 100
    """Evaluated sentences per direction (the first N after the demo pool); null for all."""
    prompt_template: str = "{demo}{src_lang}: {src}\n{tgt_lang}:"
    """Prompt; {demo} is the formatted demonstration pair."""
    demo_template: str = "{src_lang}: {src}\n{tgt_lang}: {tgt}\n"
    """The one demonstration pair."""
    clm_prompt: bool = True
    """Prefix the encoder input with the [CLM] token (see icl.clm_prompt)."""
    max_new_tokens: int = 256
    """Cap on generated tokens; the actual limit is min(cap, 2 x source tokens + 16)."""
    max_prompt_tokens: int = 512
    """Longer prompts lose their oldest tokens (the source sentence and [CLM] are kept)."""
    batch_size: int = 8
    """Sentences per generate call (greedy, one beam)."""
    seed: int = 0
    """Seed of the demonstration choice (deterministic per evaluated sentence)."""
    spbleu_tokenize: Literal["flores200", "flores101"] = "flores200"
    """sacrebleu SentencePiece tokenizer for spBLEU. It is used only when its model file is already in
    sacrebleu's cache ($SACREBLEU or ~/.sacrebleu/models); otherwise spBLEU is reported as null with
    a note, never replaced silently."""

    def validate(self) -> None:
        _check_template("translation.prompt_template", self.prompt_template, TRANSLATION_PROMPT_FIELDS)
        _check_template("translation.demo_template", self.demo_template, TRANSLATION_DEMO_FIELDS)
        if not self.directions:
            raise ConfigError("translation.directions must not be empty; allowed values: 'en-xx', 'xx-en'")
        if self.num_demo_lines < 1:
            raise ConfigError(f"translation.num_demo_lines must be >= 1, got {self.num_demo_lines}")
        for name in ("batch_size", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"translation.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"translation.max_examples must be >= 1 or null, got {self.max_examples}")
        _check_locales("translation.locales", self.locales)


@dataclass
class BaselineConfig:
    max_train: Optional[int] = None
    """Train utterances per locale for the classifier: a random sample (massive.seed) of the locale's
    train partition; 0 or null for all of them."""
    train_on: Literal["each", "sources"] = "each"
    """each: one classifier per scored locale, trained on its own train partition (the supervised
    reference); sources: one classifier trained on crosslingual.source_locales and applied to every
    scored locale (the zero-shot reference: what shared character n-grams carry across)."""

    def validate(self) -> None:
        if self.max_train is not None and self.max_train < 0:
            raise ConfigError(f"baseline.max_train must be >= 0 (0 = all) or null, got {self.max_train}")


@dataclass
class FairnessEvalConfig:
    data: str = "@data/massive/data"
    """MASSIVE source of the utterances with gendered words (`@data/` = under the data root)."""
    locales: list[str] = field(default_factory=lambda: list(FAIRNESS_LOCALES))
    """Locales to measure (those without a lexicon in data_prep/lexicons are skipped)."""
    split: Literal["train", "dev", "test"] = "test"
    """MASSIVE partition of the utterances."""
    max_examples: Optional[int] = None
    """Utterances with gendered words per locale for counterfactual consistency: a seeded sample of N;
    0 or null = all of them (flip rates with paired intervals need them all). With `--metrics pairs`:
    a seeded sample of N ids of the split for the name and sigma pairs."""
    seed: int = 0
    """Seed of the sample of utterances."""
    batch_size: int = 32
    """Utterances per predictor call."""

    def validate(self) -> None:
        _check_batch_and_sample("fairness", self.batch_size, self.max_examples)
        _check_locales("fairness.locales", self.locales)


@dataclass
class LatencyEvalConfig:
    data: str = "@data/massive/data"
    """MASSIVE directory of the timed utterances (`@data/` = under the data root)."""
    locales: list[str] = field(default_factory=lambda: list(LATENCY_LOCALES))
    """Locales whose utterances are timed."""
    split: Literal["train", "dev", "test"] = "test"
    """MASSIVE partition of the timed utterances."""
    max_examples: int = 50
    """Utterances timed per locale (batch 1, one call each)."""
    threads: int = 1
    """Intra-op threads for onnxruntime and PyTorch."""
    warmup: int = 3
    """Untimed calls before timing."""
    max_new_tokens: Optional[int] = None
    """Generation budget of every seq2seq model; null: an export's max_target_length, the PyTorch
    default (evaluation.latency.DEFAULT_MAX_NEW_TOKENS) otherwise."""
    memory_repeats: int = 2
    """Fresh processes (each with and without the model) measuring the resident memory a model adds
    and its cold start; the median is reported (0 skips)."""
    throughput_batch: int = 32
    """Utterances per call for the throughput measurement (0 skips)."""

    def validate(self) -> None:
        for name in ("max_examples", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"latency.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"latency.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        for name in ("warmup", "memory_repeats", "throughput_batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"latency.{name} must be >= 0, got {getattr(self, name)}")
        _check_locales("latency.locales", self.locales)


@dataclass
class EvalConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where PyTorch models run; auto picks cuda when available."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype of PyTorch models; auto: bf16 on GPUs that support it (else fp16), float32 on CPU (bf16 matmuls are very slow on most CPUs)."""
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    """Big models (seq2seq PyTorch models): accelerate's device_map, max_memory per device and offload_folder; `--device-map`, `--max-memory`, `--offload-folder` set them."""
    confidence: float = 0.95
    """Coverage of every interval: the (1 - c)/2 and (1 + c)/2 percentiles of the bootstrap values."""
    bootstrap_samples: int = 1000
    """Resamples of the test ids behind every interval (the same resampled ids in every locale)."""
    massive: MassiveEvalConfig = field(default_factory=MassiveEvalConfig)
    """`evaluate massive`: intent accuracy, slot F1 and exact match per locale."""
    icl: ICLConfig = field(default_factory=ICLConfig)
    """`evaluate icl`: k-shot intent classification by rank classification."""
    translation: TranslationConfig = field(default_factory=TranslationConfig)
    """`evaluate translation`: 1-shot FLORES-200 translation, chrF++ and spBLEU."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """`evaluate baseline`: the TF-IDF + logistic regression intent classifier (scored on `massive`'s ids)."""
    fairness: FairnessEvalConfig = field(default_factory=FairnessEvalConfig)
    """`evaluate fairness`: counterfactual consistency, generation disparity and gender pairs."""
    latency: LatencyEvalConfig = field(default_factory=LatencyEvalConfig)
    """`evaluate latency`: latency at batch 1, size, memory, cold start and throughput."""
    crosslingual: CrossLingualConfig = field(default_factory=CrossLingualConfig)
    """Source and target locales and the setting the model was trained under (preset section
    `crosslingual`): `evaluate massive` names the setting, marks each locale's role and reports the
    mean over the target locales beside the paper's reference lines."""

    def validate(self) -> None:
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.bootstrap_samples < 1:
            raise ConfigError(f"bootstrap_samples must be >= 1, got {self.bootstrap_samples}")


# The sections of EvalConfig; its other fields are shared by every evaluation.
SECTIONS = ("massive", "icl", "translation", "baseline", "fairness", "latency", "crosslingual")


def section_dict(cfg: EvalConfig, section: str) -> dict:
    """The resolved config of one evaluation (plus the shared keys), for the output JSON."""
    from core.config import to_dict

    full = to_dict(cfg)
    shared = {f.name: full[f.name] for f in dataclasses.fields(cfg) if f.name not in SECTIONS}
    return {**shared, section: full[section]}
