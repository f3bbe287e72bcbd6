"""MASSIVE fine-tuning on the DeepSpeed loop: text-to-text (seq2seq) or encoder with NLU heads.

`finetune(cfg, run_dir, resume)` reads like a table of contents: config, data, model, engine, then
an explicit loop of train_step / maybe_log / maybe_eval / maybe_save (the skeleton of core/loop.py;
this stage passes `forward`, its log record and its dev evaluation), and the Hugging Face export.

The head (`--head`) picks a trainable model kind of the registry (student/kinds.py), whose pieces
build the model, encode and collate the items, compute the loss and the dev predictions:
- seq2seq (student/text_to_text.py): source "Annotate: w1 w2 ...", target "s1 s2 ... intent"
  (massive/format.py's official format); loss = token cross-entropy over the target. Evaluation:
  teacher-forced dev loss and greedy generation parsed with `parse_target`, scored as the official scorer.
- encoder (student/nlu.py): `EncoderNLUModel` on the words; loss = intent CE + slot CE over each
  word's first sub-word. Evaluation: dev loss and argmax predictions, scored the same way.

Settings: `full` trains on every chosen locale, `zero_shot` only on en-US (evaluation always covers
every chosen locale). Runtime state (step, data position) is in `TrainState`, checkpointed with the
engine for exact resume; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.checkpoint import (
    CheckpointManager,
    TrainState,
    config_yaml,
    export_hf,
    refuse_to_start_over,
    restore_or_start,
    seed_everything,
)
from core.config import ConfigError, resolve_data_path, save_stage_config
from core.data import ResumableSampler
from core.distributed import DistInfo, all_reduce_sum, barrier, build_engine, init_distributed
from core.fsutil import check_output, safe_path
from core.loop import (
    MicroStep,
    StagePieces,
    eval_due,
    keep_best,
    log_due,
    run_training,
)
from core.metrics import LossWindow, MetricsLogger
from core.modeldir import check_model_dir, load_seq2seq_model
from core.models import build_model, interpolate_with_fresh_init
from data_prep.counterfactual import cda_examples
from massive.format import OTHER
from massive.loader import load_massive
from massive.scoring import GENERATION_FIELDS, GENERATION_METRICS, score_locale
from student.config import FinetuneConfig
from student.kinds import kind_for_head, load_nlu_model
from student.nlu import NLULabels, count_parameters

if TYPE_CHECKING:
    import torch

    from massive.format import MassiveExample, NLUPrediction


# ----------------------------------------------------------------------------- names and paths


def output_name(cfg: FinetuneConfig) -> str:
    """The output model directory's name (cfg.out, else derived from init and head)."""
    if cfg.out:
        return cfg.out
    source = f"scratch-{cfg.scratch_preset}" if cfg.scratch_preset else Path(cfg.init.rstrip("/")).name
    return f"{source}-{kind_for_head(cfg.head).training.output_suffix}"


def resolve_dir(run_dir: Path, value: str, what: str) -> Path:
    """A model/tokenizer directory: absolute, else under the run directory (never escaping it),
    else relative to the working directory."""
    path = Path(value).expanduser()
    if path.is_absolute():
        candidate = path
    else:
        inside = safe_path(run_dir, value)
        candidate = inside if inside.exists() or not path.exists() else path
    if not candidate.is_dir():
        raise ConfigError(f"finetune.{what}: {value!r} is not a directory (looked at {candidate})")
    return candidate


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Unlabelled:
    """A target-locale utterance without its labels: what the teacher term trains on."""

    words: tuple[str, ...]
    locale: str
    intent: None = None
    slots: None = None


@dataclass
class FinetuneData:
    """Train and dev examples, and the label inventory of the encoder head."""

    train: list[MassiveExample]
    dev: list[MassiveExample]
    """The fixed dev subset scored at each evaluation, over every evaluation locale."""
    train_locales: list[str]
    eval_locales: list[str]
    intents: list[str]
    slot_labels: list[str]
    """"Other" first, then MASSIVE's slot types."""
    unlabelled: list[Unlabelled] = field(default_factory=list)
    """Teacher-labelled target utterances (words only), after `train` in the sampler's index space."""


def load_finetune_data(cfg: FinetuneConfig, run_dir: Path, dist_info: DistInfo) -> FinetuneData:
    """MASSIVE train (capped per locale) and the dev subset, from cfg.massive.

    Parsed splits are cached as Arrow under run_dir/.cache/massive; rank 0 parses (and writes the
    cache) first, the other ranks then read it.
    """
    source = cfg.massive if cfg.massive == "hub" else str(resolve_data_path(cfg.massive))
    cache_dir = run_dir / ".cache" / "massive"

    def load() -> Any:
        return load_massive(source, locales=list(cfg.locales) or None, partitions=("train", "dev"),
                            cache_dir=cache_dir, progress=dist_info.is_rank0)

    if dist_info.is_rank0:
        data = load()
        barrier()
    else:
        barrier()
        data = load()
    eval_locales = list(cfg.locales) or sorted(data.locales)
    missing = [loc for loc in eval_locales if loc not in data.locales]
    if missing:
        raise ConfigError(
            f"finetune.locales: no MASSIVE train data for {missing} in {source}; available: {', '.join(sorted(data.locales))}"
        )
    train_locales = [cfg.zero_shot_locale] if cfg.setting == "zero_shot" else eval_locales
    if cfg.zero_shot_locale not in data.locales and cfg.setting == "zero_shot":
        raise ConfigError(f"finetune.zero_shot_locale: {cfg.zero_shot_locale} is not in {source}")
    rng = random.Random(cfg.train.seed)
    train: list[MassiveExample] = []
    for loc in train_locales:
        examples = data.examples(locale=loc, partition="train")
        if cfg.num_train_examples and len(examples) > cfg.num_train_examples:
            examples = rng.sample(examples, cfg.num_train_examples)
        train.extend(examples)
    if cfg.cda != "none":
        train = cda_examples(train, cfg.cda, seed=cfg.train.seed)
    dev: list[MassiveExample] = []
    # The dev loss and EM watched during training read gold labels too: under a cross-lingual setting
    # other than supervised, only the sources'.
    dev_locales = cfg.crosslingual.gold_locales(eval_locales) if cfg.crosslingual.target_locales else eval_locales
    if cfg.num_eval_examples and dev_locales:
        per_locale = -(-cfg.num_eval_examples // len(dev_locales))
        for loc in dev_locales:
            examples = data.examples(locale=loc, partition="dev")
            dev.extend(rng.sample(examples, min(per_locale, len(examples))))
        dev = dev[: cfg.num_eval_examples]
    unlabelled: list[Unlabelled] = []
    if cfg.teacher:  # only the encoder head has one (FinetuneConfig refuses it elsewhere)
        targets = cfg.crosslingual.unlabelled_locales()
        if targets:
            extra = load_massive(source, locales=targets, partitions=("train",), cache_dir=cache_dir, progress=False)
            for loc in targets:
                split = extra.dataset(locale=loc, partition="train")
                if cfg.num_unlabelled_examples:
                    split = split.select(range(min(cfg.num_unlabelled_examples, len(split))))
                # Only the words column: no label of a target locale is read.
                unlabelled += [Unlabelled(tuple(w), loc) for w in split.select_columns(["words"])["words"]]
    return FinetuneData(
        train=train,
        dev=dev,
        train_locales=train_locales,
        eval_locales=eval_locales,
        unlabelled=unlabelled,
        intents=list(data.intents),
        slot_labels=[OTHER, *[s for s in data.slot_types if s != OTHER]],
    )


# ----------------------------------------------------------------------------- model


def load_finetune_tokenizer(cfg: FinetuneConfig, run_dir: Path) -> Any:
    """The init model directory's tokenizer, or cfg.tokenizer for scratch: models."""
    from transformers import AutoTokenizer

    where = resolve_dir(run_dir, cfg.tokenizer if cfg.scratch_preset else cfg.init, "tokenizer" if cfg.scratch_preset else "init")
    tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError(f"{where}: the tokenizer defines no pad or eos token")
    return tokenizer


def build_backbone(cfg: FinetuneConfig, run_dir: Path, tokenizer: Any) -> Any:
    """The seq2seq model every head starts from: loaded from a directory, or fresh from a size preset."""
    if cfg.scratch_preset:
        model = build_model(dataclasses.replace(cfg.model, preset=cfg.scratch_preset), tokenizer, seed=cfg.train.seed)
    else:
        model = load_seq2seq_model(resolve_dir(run_dir, cfg.init, "init"), "finetune.init", dtype="float32")
        interpolate_with_fresh_init(model, cfg.init_weight, seed=cfg.train.seed)
    if cfg.dropout is not None:
        _set_dropout(model, cfg.dropout)
    return model


def _set_dropout(model: Any, rate: float) -> None:
    import torch

    model.config.dropout_rate = rate
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate


def build_finetune_model(cfg: FinetuneConfig, run_dir: Path, tokenizer: Any, data: FinetuneData) -> Any:
    """The model the engine trains: the head's kind builds it on the seq2seq backbone (the model
    itself for text-to-text, an EncoderNLUModel on its encoder)."""
    return kind_for_head(cfg.head).training.build(build_backbone(cfg, run_dir, tokenizer), cfg, tokenizer, data)


# ----------------------------------------------------------------------------- steps


def train_loss(engine: Any, batch: dict[str, torch.Tensor], cfg: FinetuneConfig, device: str,
               teacher: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward one micro-batch through the engine; (loss to backpropagate, detached parts). With a
    `teacher` (encoder NLU, frozen): (1 - w) * gold loss + w * teacher term (finetune.teacher_weight)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    loss, parts = kind_for_head(cfg.head).training.loss(engine, batch, cfg, teacher)
    return loss, {k: float(v) for k, v in parts.items()}


def load_nlu_teacher(cfg: FinetuneConfig, run_dir: Path, tokenizer: Any, labels: NLULabels, device: str) -> Any:
    """The frozen encoder NLU teacher of finetune.teacher, checked against the student's labels and
    tokenizer (the teacher term reads both models on the same input ids)."""
    teacher_dir = check_model_dir(resolve_dir(run_dir, cfg.teacher, "teacher"), "finetune.teacher")
    teacher = load_nlu_model(teacher_dir)
    if teacher.labels.intents != labels.intents or teacher.labels.slot_labels != labels.slot_labels:
        raise ConfigError(f"finetune.teacher: {teacher_dir} predicts other intents or slot labels than this "
                          "fine-tuning's MASSIVE source; fine-tune the teacher on the same source")
    if teacher.tokenizer is None or teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"finetune.teacher: {teacher_dir} has another tokenizer than the model; the teacher term "
                          "needs one tokenizer (fine-tune both from the same run)")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def num_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad input tokens (+ target tokens for seq2seq)."""
    count = int(batch["attention_mask"].sum())
    if "labels" in batch:
        count += int((batch["labels"] != -100).sum())
    return count


def evaluate(
    engine: Any,
    model: Any,
    tokenizer: Any,
    dev: list[MassiveExample],
    dev_items: list[Any],
    cfg: FinetuneConfig,
    dist_info: DistInfo,
    intents: list[str] | None = None,
) -> dict[str, float]:
    """Dev loss, exact match, intent accuracy and slot F1 on the dev subset, over all ranks; for the
    text-to-text head with `intents` given, also the shares of generated targets that stop, have the
    right label count and carry a known intent (`dev_stop_rate`, `dev_label_count_rate`,
    `dev_known_intent_rate`).

    Each rank scores an equal share (the subset is cut to a multiple of the world size so every
    rank runs the same number of forward passes, which ZeRO-3 needs); counts are summed over ranks.
    """
    import torch

    world, rank = dist_info.world_size, dist_info.rank
    usable = len(dev) // world * world
    mine = list(range(rank, usable, world))
    engine.eval()
    loss_sum = loss_count = 0.0
    preds: list[NLUPrediction] = []
    synced = cfg.train.zero_stage == 3 and world > 1
    training = kind_for_head(cfg.head).training
    with torch.no_grad():
        for start in range(0, len(mine), cfg.eval_batch_size):
            idx = mine[start : start + cfg.eval_batch_size]
            examples = [dev[i] for i in idx]
            loss, count, batch_preds = training.evaluate(engine, model, tokenizer, [dev_items[i] for i in idx],
                                                         examples, cfg, dist_info.device, synced, intents)
            loss_sum += loss
            loss_count += count
            preds.extend(batch_preds)
    engine.train()
    golds = [dev[i] for i in mine]
    s = score_locale(golds, preds) if golds else {"em": 0, "intent_acc": 0, "n": 0, "num_gold_spans": 0,
                                                    "num_pred_spans": 0, "num_correct_spans": 0}
    checks = [p.generation for p in preds if getattr(p, "generation", None) is not None]
    generation = [float(sum(getattr(c, name) for c in checks)) for name in GENERATION_FIELDS]
    totals = all_reduce_sum([
        loss_sum, loss_count, s["em"] * s["n"], s["intent_acc"] * s["n"], s["n"],
        s["num_gold_spans"], s["num_pred_spans"], s["num_correct_spans"], float(len(checks)), *generation,
    ])
    t_loss, t_count, t_exact, t_intent, t_n, t_gold, t_pred, t_correct, t_checked = totals[:9]
    result = {
        "dev_loss": t_loss / max(t_count, 1.0),
        "dev_em": t_exact / max(t_n, 1.0),
        "dev_intent_acc": t_intent / max(t_n, 1.0),
        "dev_slot_f1": 2 * t_correct / (t_gold + t_pred) if t_gold + t_pred else 0.0,
        "dev_examples": int(t_n),
    }
    if t_checked:
        for name, count in zip(GENERATION_METRICS, totals[9:]):
            result[f"dev_{name}"] = count / t_checked
    return result


# ----------------------------------------------------------------------------- the loop


def finetune(cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Fine-tune cfg.init on MASSIVE; returns the exported model directory run_dir/<out>."""
    # config
    run_dir = Path(run_dir)
    name = output_name(cfg)
    # A different-kind directory (tokenizer, data) is refused by its marker; a model input by name.
    init = None if cfg.scratch_preset or not cfg.init else resolve_dir(run_dir, cfg.init, "init")
    if init is not None:
        check_model_dir(init, "finetune.init")
    check_output(safe_path(run_dir, name), "model", run_dir, inputs=[init], flag="--out")
    dist_info = init_distributed(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    grad_accum = cfg.train.grad_accum_steps(dist_info.world_size)
    checkpoints = CheckpointManager(run_dir, name, keep=cfg.train.keep_checkpoints)
    refuse_to_start_over(checkpoints, resume)
    if dist_info.is_rank0:
        save_stage_config(cfg, run_dir, "finetune", name)

    # data
    tokenizer = load_finetune_tokenizer(cfg, run_dir)
    data = load_finetune_data(cfg, run_dir, dist_info)
    training = kind_for_head(cfg.head).training
    # The training items: gold, then teacher-labelled (the encoder's only: it alone has a teacher).
    train_items, truncated = training.encode(tokenizer, [*data.train, *data.unlabelled], cfg)
    dev_items, _ = training.encode(tokenizer, data.dev, cfg)
    if dist_info.is_rank0 and any(truncated.values()):
        print(
            f"finetune: {truncated['num_truncated_sources']} of {len(data.train)} training sources exceed "
            f"max_source_len={cfg.max_source_len} and {truncated['num_truncated_targets']} targets exceed "
            f"max_target_len={cfg.max_target_len} tokens; they are cut (eos kept)",
            file=sys.stderr, flush=True,
        )
    lengths = [training.length(item) for item in train_items] if cfg.group_by_length else None
    sampler = ResumableSampler(len(train_items), cfg.train.micro_batch_size, grad_accum, dist_info.rank,
                               dist_info.world_size, cfg.train.seed, lengths=lengths)

    # model and engine
    model = build_finetune_model(cfg, run_dir, tokenizer, data)
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    teacher = None
    if cfg.teacher:
        teacher = load_nlu_teacher(cfg, run_dir, tokenizer, model.labels, dist_info.device)
        teacher_params = count_parameters(teacher)
        # Recorded with the model: every table that shows the student can show the ratio.
        model.labels.extra.update({"teacher": str(cfg.teacher), "teacher_parameters": teacher_params,
                                   "parameters": num_params, "teacher_weight": cfg.teacher_weight,
                                   "crosslingual_setting": cfg.crosslingual.setting})
        if dist_info.is_rank0:
            print(f"finetune {name}: distilled NLU student, {num_params:,} parameters against the teacher's "
                  f"{teacher_params:,} ({num_params / teacher_params:.2f}x, n-gram tables included); "
                  f"{len(data.unlabelled)} teacher-labelled utterances", flush=True)
    engine = build_engine(model, cfg.train, dist_info)
    state = restore_or_start(checkpoints, engine, resume, "finetune", config_yaml(cfg), dist_info.world_size)
    metrics = MetricsLogger(run_dir, stage=f"finetune/{name}", name=name)
    cfg_yaml = config_yaml(cfg)
    if dist_info.is_rank0:
        print(
            f"finetune {name}: head={cfg.head} setting={cfg.setting} init={cfg.init} "
            f"train={len(data.train)} examples ({', '.join(data.train_locales)}) dev={len(data.dev)} "
            f"params={num_params:,} world={dist_info.world_size} "
            f"from step {state.step}",
            flush=True,
        )

    # the loop
    window = LossWindow()

    def micro_batches(st: TrainState) -> list[dict[str, torch.Tensor]]:
        return [training.collate([train_items[i] for i in indices], tokenizer, model, cfg)
                for indices in sampler.micro_batches(st.epoch, st.epoch_position)]

    pieces = StagePieces(
        micro_batches=micro_batches,
        forward=lambda st: micro_forward(engine, cfg, dist_info.device, grad_accum, teacher),
        maybe_log=lambda st, bar: maybe_log(metrics, st, window, engine, cfg, bar),
        maybe_eval=lambda st: maybe_eval(metrics, st, engine, model, tokenizer, data, dev_items, cfg, dist_info),
    )
    run_training(cfg.train, state, engine, sampler, checkpoints, cfg_yaml, pieces, f"finetune {name}", window)

    # export
    out_dir = run_dir / name
    export_hf(engine, model, tokenizer, out_dir)
    metrics.close()
    return out_dir


def micro_forward(engine: Any, cfg: FinetuneConfig, device: str, num_micro_batches: int, teacher: Any = None) -> Any:
    """`forward` for core.loop.train_step: one collated micro-batch -> its loss, its loss parts (each a
    share of the step's mean) and its tokens."""

    def forward(batch: dict[str, torch.Tensor]) -> MicroStep:
        loss, loss_parts = train_loss(engine, batch, cfg, device, teacher)
        return MicroStep(loss, {k: v / num_micro_batches for k, v in loss_parts.items()}, num_tokens(batch))

    return forward


def maybe_log(metrics: MetricsLogger, state: TrainState, window: LossWindow, engine: Any, cfg: FinetuneConfig, bar: Any) -> None:
    if not log_due(state, cfg.train) or window.count == 0:
        return
    record = {
        "loss": window.loss / window.count,
        **{k: v / window.count for k, v in window.parts.items()},
        **window.throughput(state, engine.get_lr()[0]),
    }
    metrics.log(state.step, record)
    bar.set_postfix(loss=f"{record['loss']:.3f}")
    window.reset(state.tokens_seen)


def maybe_eval(
    metrics: MetricsLogger, state: TrainState, engine: Any, model: Any, tokenizer: Any, data: FinetuneData,
    dev_items: list[Any], cfg: FinetuneConfig, dist_info: DistInfo,
) -> dict[str, float] | None:
    if not data.dev or not eval_due(state, cfg.train):
        return None
    result = evaluate(engine, model, tokenizer, data.dev, dev_items, cfg, dist_info, data.intents)
    keep_best(state, result["dev_loss"])
    metrics.log(state.step, result)
    if dist_info.is_rank0:
        print(
            f"step {state.step}: dev_loss {result['dev_loss']:.4f} em {result['dev_em']:.3f} "
            f"intent_acc {result['dev_intent_acc']:.3f} slot_f1 {result['dev_slot_f1']:.3f}"
            + (
                f" | generated: stopped {result['dev_stop_rate']:.3f} label count right "
                f"{result['dev_label_count_rate']:.3f} known intent {result['dev_known_intent_rate']:.3f}"
                if "dev_stop_rate" in result else ""
            ),
            flush=True,
        )
    return result
