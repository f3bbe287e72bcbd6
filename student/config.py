"""`FinetuneConfig`: MASSIVE fine-tuning (preset section `finetune`).

Fine-tunes a seq2seq model directory (ours or any Hugging Face T5-family model), or a freshly
initialised model of a size preset, on MASSIVE: text-to-text (`head: seq2seq`) or encoder-only
with intent and slot heads (`head: encoder`). Light on imports: the CLI imports this at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.config import LOCALE_RE, ConfigError
from core.crosslingual import CrossLingualConfig
from core.models import PRESETS, ModelConfig
from core.train_config import TrainConfig

SCRATCH_PREFIX = "scratch:"


def _default_train() -> TrainConfig:
    return TrainConfig()


@dataclass
class FinetuneConfig:
    """MASSIVE fine-tuning of a seq2seq model (text-to-text) or of its encoder (intent + slot heads)."""

    init: str = ""
    """The model to start from: a Hugging Face seq2seq model directory (a path, or a name relative to
    the run directory such as `teacher-indomain`), or `scratch:<size preset>` (e.g. scratch:tiny) for
    a randomly initialised model of that preset's architecture with `tokenizer`. `--model` sets it."""
    tokenizer: str = "tokenizer"
    """Tokenizer directory for `scratch:` models (relative to the run directory or absolute). Model
    directories carry their own tokenizer, which is used instead."""
    out: str = ""
    """Name of the output model directory under the run directory; also names the checkpoints
    (checkpoints/<out>/), the TensorBoard folder (tb/<out>/) and the metrics stage ("finetune/<out>"). Empty: `<init name>-ft`
    (seq2seq) or `<init name>-nlu` (encoder), with init name `scratch-<preset>` for scratch models."""
    head: Literal["seq2seq", "encoder"] = "seq2seq"
    """seq2seq: text-to-text in the official MASSIVE format (greedy generation predicts slots and
    intent); encoder: the model's encoder with an intent head (masked mean pooling) and a slot head
    on each word's first sub-word, trained jointly."""
    setting: Literal["full", "zero_shot"] = "full"
    """full: train on the train partition of every locale in `locales`; zero_shot: train on
    `zero_shot_locale` only and evaluate on all `locales` (the MASSIVE paper's two settings)."""
    zero_shot_locale: str = "en-US"
    """The only training locale in the zero_shot setting."""
    locales: list[str] = field(default_factory=list)
    """MASSIVE locales to train on (setting full) and evaluate on; empty = every locale the MASSIVE
    source holds."""
    massive: str = "@data/massive/data"
    """MASSIVE source: a directory of <locale>.jsonl[.gz] files (may start with @data/, meaning the
    data root), a release tarball, or `hub`."""
    num_train_examples: int = 0
    """Keep at most this many train examples per locale (a seeded random subset); 0 keeps all 11,514."""
    cda: Literal["none", "one_sided", "two_sided"] = "none"
    """Counterfactual data augmentation of the train examples (locales with a lexicon in data_prep/lexicons): none; one_sided (every gendered utterance replaced by its gender-swapped counterfactual, slot labels carried word by word); two_sided (both)."""
    num_eval_examples: int = 256
    """Size of the dev subset scored at each evaluation (dev loss and exact match), split evenly
    across the evaluation locales and drawn once with the seed; 0 skips evaluation."""
    eval_batch_size: int = 64
    """Utterances per forward pass (and per generate call) during evaluation, per process."""
    max_source_len: int = 64
    """Maximum input tokens (eos included): the "Annotate: ..." text, or the utterance for the
    encoder head. Longer inputs are truncated (their last words then score as "Other")."""
    max_target_len: int = 64
    """Maximum target tokens (eos included) of the text-to-text target "<slot per word> <intent>";
    also the generation limit. Unused by the encoder head."""
    intent_first: bool = False
    """seq2seq: put the intent before the slot labels in the target ("<intent> <slot per word>"), the
    MASSIVE repository's `intent_first` option; false is the official order. Recorded in the model's
    config.json so evaluation parses its output the same way. Small decoders trained briefly learn
    intents much sooner this way (they loop on "Other" before learning to stop after the last word)."""
    sentinels: bool = False
    """seq2seq: mark every source word and its target label with the same sentinel
    (`Annotate: <extra_id_0> w1 ...` -> `<extra_id_0><Other>...`), the MASSIVE repository's sentinel
    option, so labels align with words by construction. Recorded in config.json (the number of
    sentinels used) for every predictor."""
    spans: bool = False
    """seq2seq: targets name the intent and then only the slot spans, each as its label token and
    its words (`<alarm_set><time>five am`), instead of one label per word; predictors put the
    spans back on the utterance's words (massive.format.place_spans). The decoder copies values
    (what denoising pretraining teaches) instead of counting words, and targets are shorter. Needs
    the tokenizer's whole label tokens; excludes sentinels. Recorded in config.json."""
    label_init: Literal["keep", "words", "random"] = "words"
    """seq2seq from a pretrained model whose tokenizer has whole label tokens (`<alarm_set>`): how
    their embedding rows start. Pretraining never shows these tokens, so every softmax pushes their
    (tied) rows down, and the longer it runs the further fine-tuning has to bring them back.
    words: each row starts as the mean of the rows of its label's words ("alarm set"), shared
    input and output embeddings alike; random: drawn afresh, each entry from a normal with the
    standard deviation of the whole table (what a model from scratch starts with: distinct rows even
    for labels that share words, alarm_set / alarm_query; on `small` no better than words, README);
    keep: as pretraining left them. Unused for models from
    scratch and for models already trained on MASSIVE targets (their config.json records the order)."""
    init_weight: float = 1.0
    """Start from a pretrained model pulled part of the way back to a fresh initialisation: each
    parameter is init_weight * pretrained + (1 - init_weight) * fresh (the same architecture drawn
    with train.seed, i.e. the from-scratch reference's start; `core.models.interpolate_with_fresh_init`).
    1 = the pretrained model as it is. Unused for models from scratch."""
    slot_loss_weight: float = 1.0
    """Encoder head: loss = intent CE + slot_loss_weight * slot CE (over first sub-words)."""
    teacher: str = ""
    """Encoder head: an encoder NLU model directory (the fine-tuned teacher's, `finetune --head encoder`
    of the teacher; run-relative or absolute) whose intent and slot distributions the model learns
    from, which makes it a distilled NLU student; empty = gold labels only (a reference, not a student).
    It must share the model's tokenizer."""
    teacher_weight: float = 0.5
    """With `teacher`: loss = (1 - w) * gold loss + w * teacher term, where the teacher term is
    T^2 KL(teacher_T || student_T) of the intent plus slot_loss_weight x that of the slots (per word).
    Teacher-labelled target utterances carry no gold label and train on the teacher term alone."""
    teacher_temperature: float = 2.0
    """Softmax temperature T of the teacher term."""
    num_unlabelled_examples: int = 0
    """Encoder head with `teacher`, crosslingual.setting=teacher-labelled: train utterances per target
    locale added without labels (the first N of the file's train partition; 0 = all)."""
    ngram_buckets: int = 0
    """Encoder head: hashed token n-gram embeddings (`student.nlu.TokenNgrams`), fastText-style
    features a small encoder cannot learn in its layers: number of hash buckets (rows of
    d_model weights each), 0 = none. Saved in nlu_labels.json and exported with the model."""
    ngram_orders: list[int] = field(default_factory=lambda: [2, 3])
    """Encoder head: the n-gram lengths (in tokens, each >= 2) hashed into the buckets."""
    ngram_inputs: bool = False
    """Encoder head: also add each position's n-gram embeddings to the encoder's input embeddings
    (otherwise they reach only the intent head, through the pooled vector)."""
    dropout: float | None = None
    """Dropout rate in every block during fine-tuning (and of the heads); null keeps the model's
    own rate (0.0 for our pretrained presets)."""
    group_by_length: bool = True
    """Batch utterances of similar length together (sorted within runs of 64 global batches, the
    batches then shuffled), so batches pad little and ranks finish their micro-batches together."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """scratch: only: per-field size overrides (e.g. model.num_layers=2); model.preset is taken
    from init (scratch:<preset>)."""
    train: TrainConfig = field(default_factory=_default_train)
    """Optimisation, batch sizes, schedule, ZeRO stage, precision, logging/eval/save intervals, seed."""
    crosslingual: CrossLingualConfig = field(default_factory=CrossLingualConfig)
    """Source and target locales and the setting (preset section `crosslingual`): the locales trained
    on must be ones whose gold labels the setting allows."""

    def train_locales(self) -> list[str]:
        """The locales whose gold labels training reads (empty = every locale of the source)."""
        return [self.zero_shot_locale] if self.setting == "zero_shot" else list(self.locales)

    @property
    def scratch_preset(self) -> str | None:
        """The size preset of a `scratch:<preset>` init, else None."""
        return self.init[len(SCRATCH_PREFIX) :] if self.init.startswith(SCRATCH_PREFIX) else None

    def validate(self) -> None:
        if self.init.startswith(SCRATCH_PREFIX) and not self.scratch_preset:
            raise ConfigError("finetune.init: scratch: needs a size preset name, e.g. scratch:tiny")
        if self.out and ("/" in self.out or "\\" in self.out or self.out.startswith(".")):
            raise ConfigError(f"finetune.out: {self.out!r} must be a plain directory name inside the run directory")
        bad = [loc for loc in self.locales if not LOCALE_RE.match(loc)]
        if bad:
            raise ConfigError(f"finetune.locales: {bad} are not MASSIVE locale names (like en-US, de-DE)")
        if not LOCALE_RE.match(self.zero_shot_locale):
            raise ConfigError(f"finetune.zero_shot_locale: {self.zero_shot_locale!r} is not a locale name like en-US")
        self.crosslingual.check_gold("finetune.locales" if self.setting == "full" else "finetune.zero_shot_locale",
                                     self.train_locales())
        if self.setting == "zero_shot" and self.locales and self.zero_shot_locale not in self.locales:
            raise ConfigError(
                f"finetune.setting=zero_shot trains on {self.zero_shot_locale}, which is missing from "
                f"finetune.locales {self.locales}; add it or change finetune.zero_shot_locale"
            )
        for key, value, low in (
            ("num_train_examples", self.num_train_examples, 0),
            ("num_eval_examples", self.num_eval_examples, 0),
            ("eval_batch_size", self.eval_batch_size, 1),
            ("max_source_len", self.max_source_len, 4),
            ("max_target_len", self.max_target_len, 2),
        ):
            if value < low:
                raise ConfigError(f"finetune.{key}: {value} must be >= {low}")
        from student.kinds import kind_for_head

        takes_teacher = kind_for_head(self.head).training.teacher_term
        if self.teacher and not takes_teacher:
            raise ConfigError("finetune.teacher: the teacher term trains the encoder head; set head=encoder or "
                              "distil a text-to-text student with `distill --section taskdistill`")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ConfigError(f"finetune.teacher_weight: {self.teacher_weight} must be in [0, 1]")
        if self.teacher_temperature <= 0:
            raise ConfigError(f"finetune.teacher_temperature: {self.teacher_temperature} must be > 0")
        if self.num_unlabelled_examples < 0:
            raise ConfigError(f"finetune.num_unlabelled_examples: {self.num_unlabelled_examples} must be >= 0")
        if self.crosslingual.unlabelled_locales() and takes_teacher and not self.teacher:
            raise ConfigError("crosslingual.setting=teacher-labelled: the target utterances need a teacher to label "
                              "them; set finetune.teacher to the fine-tuned teacher's encoder NLU model")
        if self.slot_loss_weight < 0:
            raise ConfigError(f"finetune.slot_loss_weight: {self.slot_loss_weight} must be >= 0")
        if self.spans and self.sentinels:
            raise ConfigError("finetune.spans and finetune.sentinels are two target formats; choose one")
        if self.ngram_buckets < 0:
            raise ConfigError(f"finetune.ngram_buckets: {self.ngram_buckets} must be >= 0 (0 = no n-gram features)")
        if self.ngram_buckets and (not self.ngram_orders or min(self.ngram_orders) < 2):
            raise ConfigError(f"finetune.ngram_orders: {self.ngram_orders} must be n-gram lengths >= 2")
        if self.scratch_preset is not None and self.scratch_preset not in PRESETS:
            raise ConfigError(
                f"finetune.init: {self.init!r} names no size preset; allowed: "
                + ", ".join(SCRATCH_PREFIX + name for name in PRESETS)
            )
        if not 0.0 <= self.init_weight <= 1.0:
            raise ConfigError(f"finetune.init_weight: {self.init_weight} must be in [0, 1] (1 = the pretrained model as it is)")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"finetune.dropout: {self.dropout} must be in [0, 1)")
