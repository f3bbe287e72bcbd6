"""`DistillConfig`: the `distill` section (preset `launch/presets/<name>/distill.yaml`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from core.bigmodel import ModelLoadConfig
from core.config import ConfigError
from core.crosslingual import CrossLingualConfig
from core.locales import DEFAULT_LOCALES
from core.train_config import TrainConfig
from data_prep.objectives import ObjectiveConfig
from distill.student_init import StudentConfig


def _default_train() -> TrainConfig:
    return TrainConfig(micro_batch_size=8, global_batch_size=16, max_steps=1000, lr=1e-3, warmup_steps=50)


@dataclasses.dataclass
class DistillConfig:
    """Distil a teacher into a compact student with counterfactual role reversal."""

    teacher: str = "teacher"
    """Teacher model directory (HF save_pretrained + tokenizer): absolute, or relative to the run directory."""
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Teacher weights: auto = the training precision on GPU (bf16/fp16; fp32 when training in fp32) and float32 on CPU, where bf16 training runs the teacher under the student's bf16 autocast."""
    teacher_shard: Literal["none", "zero3"] = "none"
    """none: every rank holds the whole teacher (or places it with teacher_load); zero3: the teacher is sharded over all ranks by a ZeRO-3 engine without optimizer (P / world_size of its weights per rank, each layer gathered for its forward)."""
    teacher_load: ModelLoadConfig = dataclasses.field(default_factory=ModelLoadConfig)
    """Big teachers in one process per rank: accelerate's device_map, max_memory per device and offload_folder (relative: inside the run directory)."""
    out: str = "student"
    """Name of the student: its model directory run_dir/<out>, checkpoints under checkpoints/<out>/."""
    data: str = "data"
    """task=agnostic: packed pretraining data directory (with train/ and heldout/), relative to the run directory or absolute."""
    tokenizer: str = "tokenizer"
    """Tokenizer the packed data was made with (run-relative or absolute); checked against the teacher's at start-up. Empty = skip the check."""
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    """Student size relative to the teacher and its initialisation."""
    alpha: float = 0.5
    """Weight of the KD term: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""
    temperature: float = 2.0
    """Softmax temperature T of teacher and student distributions in the KD term."""
    hidden_loss_weight: float = 0.0
    """Weight of the MSE between the student's final encoder and decoder hidden states (through a learned projection) and the teacher's; 0 = off."""
    cda: Literal["none", "one_sided", "two_sided", "repeat"] = "two_sided"
    """Counterfactual data augmentation: none, one_sided (every gendered x replaced by its gender-swapped x~, the paper's one-sided variant; see cda_prob), two_sided (train on x and x~) or repeat (no swap: x twice where two_sided trains on x and x~, so the same items, steps and exposure per gendered utterance as two_sided with the same cda_repeat; the matched plain-KD reference of CRR)."""
    cda_prob: float = 1.0
    """cda=one_sided: probability of replacing a gendered x by x~ (1.0 = counterfactual only, as in the paper)."""
    cda_repeat: int = 1
    """task=massive, cda != none: each train utterance that sigma changes appears this many times per pass over the data (with two_sided, x and x~ each time; with repeat, x twice each time; 1 = once). More of the counterfactual signal within the same steps: gendered utterances are a few percent of MASSIVE."""
    perturb: Literal["none", "max", "mean"] = "max"
    """Teacher-prediction perturbation: p^(w) = f(p(w|x), p(sigma(w)|x~)) at target positions aligned with the counterfactual's, f = max or mean, renormalised; none = plain teacher."""
    perturb_tokens: Literal["auto", "gendered", "all"] = "auto"
    """Which tokens p^ changes: gendered (the row language's token-level sigma, as in the paper); all (every token, sigma extended by the identity: the teacher's label distributions on x and x~ are combined); auto = all for task=massive (its targets hold labels, no gendered word), gendered for task=agnostic."""

    def resolved_perturb_tokens(self) -> str:
        """perturb_tokens with auto resolved for the task."""
        if self.perturb_tokens != "auto":
            return self.perturb_tokens
        return "all" if self.task == "massive" else "gendered"
    counterfactual_pairing_weight: float = 0.0
    """Weight of counterfactual logit pairing (Garg et al., 2019): the symmetric KL between the student's own distributions on x and on x~ (both in the batch with cda=two_sided) at the target positions the token diff aligns where the two targets hold the same token; it asks the student for the same labels on both, not only the same teacher target. 0 = off."""
    lexicon_languages: list[str] = dataclasses.field(default_factory=list)
    """Lexicon languages used for swaps and the token map (empty = every lexicon in data_prep/lexicons)."""
    task: Literal["agnostic", "massive"] = "agnostic"
    """agnostic: distil on the pretraining mixture (packed data, the pretraining objectives); massive: task-specific distillation from a fine-tuned teacher on MASSIVE text-to-text."""
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    """task=agnostic: the denoising/CLM mixture that turns packed rows into inputs and targets."""
    massive_data: str = "@data/massive/data"
    """task=massive: MASSIVE source (directory of <locale>.jsonl[.gz], tarball or hub)."""
    locales: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LOCALES))
    """task=massive: locales to distil on (train partition; dev for the held-out loss)."""
    num_train_examples: int = 0
    """task=massive: examples per locale from the train partition (0 = all)."""
    num_eval_examples: int = 64
    """task=massive: dev examples per locale for the held-out loss."""
    max_source_len: int = 64
    """task=massive: source tokens kept (truncated beyond)."""
    max_target_len: int = 64
    """task=massive: target tokens kept (truncated beyond)."""
    group_by_length: bool = True
    """task=massive: batch utterances of similar length together (as finetune.group_by_length), so
    batches pad little and ranks finish together; packed rows (task=agnostic) all have one length."""
    train: TrainConfig = dataclasses.field(default_factory=_default_train)
    """Batch sizes, steps, optimiser, ZeRO stage, logging/eval/save intervals, seed."""
    crosslingual: CrossLingualConfig = dataclasses.field(default_factory=CrossLingualConfig)
    """task=massive: source and target locales and the setting (preset section `crosslingual`).
    `locales` are read with their gold labels, so they must be ones the setting allows; under
    teacher-labelled the train utterances of `crosslingual.target_locales` are added without labels,
    their targets generated by the teacher (see `unlabelled_locales`)."""
    num_unlabelled_examples: int = 0
    """task=massive, teacher-labelled: train utterances per target locale that the teacher labels
    (the first N of each file's train partition; 0 = all)."""

    def unlabelled_locales(self) -> list[str]:
        """task=massive: the target locales whose utterances the teacher labels (teacher-labelled only)."""
        return self.crosslingual.unlabelled_locales() if self.task == "massive" else []

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha: must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"distill.temperature: must be > 0, got {self.temperature}")
        if self.hidden_loss_weight < 0:
            raise ConfigError(f"distill.hidden_loss_weight: must be >= 0, got {self.hidden_loss_weight}")
        if not 0.0 <= self.cda_prob <= 1.0:
            raise ConfigError(f"distill.cda_prob: must be in [0, 1], got {self.cda_prob}")
        if self.cda_repeat < 1:
            raise ConfigError(f"distill.cda_repeat: must be >= 1, got {self.cda_repeat}")
        if self.cda_repeat > 1 and (self.task != "massive" or self.cda == "none"):
            raise ConfigError(
                f"distill.cda_repeat={self.cda_repeat} repeats the MASSIVE utterances that sigma changes: it needs "
                f"task=massive and cda one_sided, two_sided or repeat (got task={self.task}, cda={self.cda})"
            )
        if self.counterfactual_pairing_weight < 0:
            raise ConfigError(
                f"data_prep.counterfactual_pairing_weight: must be >= 0, got {self.counterfactual_pairing_weight}")
        if self.counterfactual_pairing_weight > 0 and self.cda != "two_sided":
            raise ConfigError(
                f"data_prep.counterfactual_pairing_weight={self.counterfactual_pairing_weight} pairs x with x~ in the "
                f"same batch: it needs cda=two_sided (got cda={self.cda})"
            )
        if self.teacher_shard == "zero3" and self.teacher_load.device_map != "none":
            raise ConfigError(
                "distill.teacher_shard=zero3 and distill.teacher_load.device_map=auto are two ways of placing the "
                "teacher; choose one (zero3 shards it over the ranks, device_map spreads it over one process's devices)"
            )
        if not self.out or "/" in self.out or self.out in (".", ".."):
            raise ConfigError(f"distill.out: {self.out!r} must be a plain directory name")
        from data_prep.counterfactual import available_languages

        unknown = [lang for lang in self.lexicon_languages if lang not in available_languages()]
        if unknown:
            raise ConfigError(
                f"distill.lexicon_languages: no lexicon for {', '.join(unknown)}; allowed values: "
                + ", ".join(available_languages())
            )
        if self.task == "massive":
            self.crosslingual.check_gold("taskdistill.locales", self.locales)
        for name in ("num_train_examples", "num_unlabelled_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("num_eval_examples", "max_source_len", "max_target_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name}: must be >= 1, got {getattr(self, name)}")
