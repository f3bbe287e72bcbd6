"""The distillation stage: a frozen teacher, a compact student on DeepSpeed, counterfactual role reversal.

`distill(cfg, run_dir, resume)` reads like a table of contents: config, data, teacher and student,
engine, then an explicit loop of train_step / maybe_log / maybe_eval / maybe_save (the skeleton of
core/loop.py; this stage passes `forward`, its log record and its held-out evaluation), and the
Hugging Face export.

One training micro-batch:

1. rows from the data (task=agnostic: packed pretraining rows; task=massive: MASSIVE train examples)
   and their counterfactuals x~ = sigma(x) (`data_prep.counterfactual`): for packed rows each document
   between `<sep>` markers is decoded, its language guessed, swapped, and re-encoded when it changed;
   for MASSIVE the words are swapped in the example's locale (one for one except a contraction that
   agreement splits or merges; the slot labels follow the words, the intent is unchanged);
2. CDA (`cda_items`): two_sided trains on x and x~, one_sided on x~ instead of x with probability
   cda_prob, repeat on x twice where two_sided puts x and x~ (the matched plain-KD reference); each
   training item keeps its counterfactual partner;
3. inputs/targets: the pretraining collator's example for a row at stream position i (its noise is
   seeded by i, so x and x~ of the same length get the same spans and CLM split) or the MASSIVE
   text-to-text pair;
4. the teacher (eval mode, frozen, on every rank, under torch.inference_mode) runs on the items and on
   their partners; p_T = softmax(z / T); with perturbation p^ = perturb_rows(p_T(x), p_T(x~)) at the
   target positions the token diff aligns, with the row language's token sigma, copied tokens left
   alone (`perturb_aligned`: rows perturbed somewhere; `perturb_swapped_positions`: positions with
   gendered pairs);
5. the student's loss alpha T^2 KL(p^ || q_T) + (1 - alpha) CE [+ w * hidden MSE] [+ c * pairing]
   through the engine; pairing (`counterfactual_pairing_weight` c, two-sided CDA): the symmetric KL
   between the student's own distributions on x and on x~ where their targets agree
   (`paired_positions`).

Held-out evaluation: the student's and the teacher's token cross-entropy on the held-out rows (MASSIVE
dev for task=massive) and KL(teacher_T || student_T) there, without augmentation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import bigmodel
from core.bigmodel import is_materialized, load_subset
from core.checkpoint import (
    CheckpointManager,
    config_yaml,
    export_hf,
    refuse_to_start_over,
    restore_or_start,
    seed_everything,
)
from core.config import ConfigError, save_stage_config, to_dict
from core.data import ResumableSampler, eval_micro_batches
from core.distributed import all_reduce_sum, build_engine, init_distributed, resolve_precision
from core.fsutil import atomic_write_json, check_output, safe_path
from core.loop import (
    MicroStep,
    StagePieces,
    eval_due,
    keep_best,
    log_due,
    run_training,
)
from core.metrics import LossWindow, MetricsLogger
from core.modeldir import check_model_dir
from data_prep.tokenizer import load_tokenizer
from distill.config import DistillConfig
from distill.losses import HiddenStateLoss, counterfactual_pairing, kd_loss, teacher_probs
from distill.perturb import align_positions, build_token_map, perturb_rows, plan_row
from distill.student_init import build_student, check_vocabulary, describe_student, layer_map, student_config
from massive.format import (
    TargetFormat,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from core.checkpoint import TrainState
    from core.distributed import DistInfo
    from core.metrics import MetricsLogger
    from distill.perturb import TokenMap

from distill.data import (
    Pair,
    load_distill_data,
    resolve_dir,
)

# ----------------------------------------------------------------------------- paths and models




def load_teacher(teacher_dir: Path, cfg: DistillConfig, run_dir: Path, dist_info: DistInfo, precision: str) -> Any:
    """The frozen teacher (eval mode, requires_grad False; safetensors, no remote code) placed as
    configured (`core.bigmodel`): a replica on every rank, accelerate's device map with CPU/disk
    offload (teacher_load), or sharded over the ranks by ZeRO-3 (teacher_shard=zero3)."""
    import dataclasses as dc

    import torch

    if cfg.teacher_dtype != "auto":
        dtype = bigmodel.resolve_dtype(cfg.teacher_dtype, dist_info.on_gpu)
    elif dist_info.on_gpu:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    else:
        dtype = torch.float32
    if cfg.teacher_shard == "zero3":
        teacher = bigmodel.shard_zero3(teacher_dir, "distill.teacher", dtype, dist_info)
    else:
        load = cfg.teacher_load
        if load.device_map != "none" and dist_info.on_gpu and dist_info.world_size > 1:
            raise ConfigError("distill.teacher_load.device_map=auto runs in one process; with several ranks on GPUs "
                              "shard the teacher with teacher_shard=zero3")
        folder = bigmodel.resolve_offload_folder(load.offload_folder, run_dir)
        if folder and dist_info.world_size > 1:
            folder = str(Path(folder) / f"rank{dist_info.rank}")  # one copy per rank, never two writers
        teacher = bigmodel.load_model(teacher_dir, "distill.teacher", device=dist_info.device, dtype=dtype,
                                      load=dc.replace(load, offload_folder=folder))
    if not dist_info.on_gpu and precision == "bf16" and dtype == torch.float32:
        bigmodel.autocast_forward(teacher, torch.bfloat16)  # as the student's engine runs on CPU
    return teacher


def student_init_source(teacher_dir: Path, teacher: Any, cfg: DistillConfig) -> Any:
    """What build_student copies layers from: the teacher itself when its weights are all in memory;
    for an offloaded or sharded teacher, its model with only the tensors a student may copy read
    from the safetensors (embeddings, output layer, final norms, the mapped layers and layer 0)."""
    if is_materialized(teacher):
        return teacher
    config = student_config(teacher.config, cfg.student)
    prefixes = ["shared.", "lm_head.", "encoder.final_layer_norm.", "decoder.final_layer_norm."]
    for stack, total, kept in (("encoder", teacher.config.num_layers, config.num_layers),
                               ("decoder", teacher.config.num_decoder_layers, config.num_decoder_layers)):
        prefixes += [f"{stack}.block.{i}." for i in sorted({0, *layer_map(total, kept)})]
    return load_subset(teacher_dir, prefixes)


def load_checked_tokenizer(cfg: DistillConfig, run_dir: Path, teacher_dir: Path, teacher: Any) -> Any:
    """The teacher's tokenizer; for task=agnostic also checked against the tokenizer of the data."""
    tokenizer = load_tokenizer(teacher_dir)
    if cfg.task == "agnostic" and cfg.tokenizer:
        data_tokenizer_dir = resolve_dir(run_dir, cfg.tokenizer, "tokenizer")
        check_vocabulary(tokenizer, teacher_dir, load_tokenizer(data_tokenizer_dir), data_tokenizer_dir,
                         embedding_rows=teacher.config.vocab_size)
    return tokenizer


# ----------------------------------------------------------------------------- one step


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def teacher_forward(teacher: Any, batch: dict[str, torch.Tensor], hidden: bool) -> Any:
    """Teacher outputs under inference mode (no graph, no gradient)."""
    import torch

    with torch.inference_mode():
        return teacher(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=teacher._shift_right(batch["labels"]),
            output_hidden_states=hidden,
        )


def paired_positions(pairs: list[Pair]) -> list[tuple[int, int, int, int]]:
    """(row, t, partner row, t') for counterfactual logit pairing: every original x followed in the batch
    by its x~ (two-sided CDA puts x~ right after x), at the target positions the token diff aligns
    (`align_positions`) where both targets hold the same token. A position where the two targets differ
    (a gendered word inside a copied slot value) is not paired: there the two answers should differ."""
    import numpy as np

    out = []
    for i in range(len(pairs) - 1):
        x, cf = pairs[i], pairs[i + 1]
        if x.swapped or not x.changed or not cf.swapped or not np.array_equal(cf.train.source, x.partner.source):
            continue
        target, cf_target = x.train.target, cf.train.target
        for t, t2 in enumerate(align_positions(target, cf_target)):
            if t2 >= 0 and target[t] == cf_target[t2]:
                out.append((i, t, i + 1, t2))
    return out


def distill_step(engine: Any, teacher: Any, pairs: list[Pair], data: Any, cfg: DistillConfig,
                 token_map: TokenMap, hidden_loss: Any, device: str) -> MicroStep:
    """Loss of one micro-batch (see the module doc, steps 3-5)."""
    n = len(pairs)
    batch = _to(data.pad([p.train for p in pairs]), device)
    tgt_len, src_len = batch["labels"].shape[1], batch["input_ids"].shape[1]
    perturb = cfg.perturb != "none"
    use_hidden = hidden_loss is not None
    # One teacher pass over the items and their partners, padded together (positions stay aligned).
    teacher_batch = _to(data.pad([p.train for p in pairs] + ([p.partner for p in pairs] if perturb else [])), device)
    t_out = teacher_forward(teacher, teacher_batch, use_hidden)
    probs = teacher_probs(t_out.logits[:n, :tgt_len], cfg.temperature)
    parts: dict[str, float] = {
        "rows": float(n),
        "rows_swapped": float(sum(p.swapped for p in pairs)),
        "rows_gendered": float(sum(p.changed for p in pairs)),
        "rows_conflict": float(sum(p.conflict for p in pairs)),
    }
    if perturb:
        # Positions aligned by a token diff of the two targets, the row language's sigma only, copied
        # target tokens left alone (data_prep.counterfactual, "Teacher perturbation").
        never = [i for i in (data.tokenizer.eos_token_id, data.tokenizer.pad_token_id) if i is not None]
        tokens = cfg.resolved_perturb_tokens()
        plans = [plan_row(p.train.target, p.partner.target, token_map.get(p.lang), tokens, p.train.source,
                          data.copy_min_run, never) for p in pairs]
        cf_probs = teacher_probs(t_out.logits[n:], cfg.temperature)
        perturbed = perturb_rows(probs, cf_probs, plans, cfg.perturb, tokens)
        mask = (batch["labels"] != -100).float()
        moved = ((perturbed - probs).abs().sum(-1) * mask).sum() / mask.sum().clamp_min(1.0)
        parts["perturb_aligned"] = float(sum(bool(plan.positions) for plan in plans))
        parts["perturb_positions"] = float(sum(len(plan.positions) for plan in plans))
        parts["perturb_swapped_positions"] = float(sum(plan.num_swapped_positions for plan in plans))
        parts["perturb_l1"] = float(moved)
        probs = perturbed
    out = engine(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=teacher._shift_right(batch["labels"]),
        output_hidden_states=use_hidden,
    )
    losses = kd_loss(out.logits, batch["labels"], teacher_probs_T=probs, alpha=cfg.alpha, temperature=cfg.temperature)
    total = losses.total
    parts["kd"] = float(losses.kd.detach())
    parts["ce"] = float(losses.ce.detach())
    if use_hidden:
        target_mask = batch["labels"] != -100
        decoder = hidden_loss(out.decoder_hidden_states[-1], t_out.decoder_hidden_states[-1][:n, :tgt_len], target_mask)
        encoder = hidden_loss(out.encoder_last_hidden_state, t_out.encoder_last_hidden_state[:n, :src_len],
                              batch["attention_mask"])
        hidden = 0.5 * (decoder + encoder)
        total = total + cfg.hidden_loss_weight * hidden
        parts["hidden"] = float(hidden.detach())
    if cfg.counterfactual_pairing_weight > 0:
        import torch

        index = torch.as_tensor(paired_positions(pairs), dtype=torch.long, device=out.logits.device).reshape(-1, 4)
        pairing = counterfactual_pairing(out.logits, *index.unbind(1))
        total = total + cfg.counterfactual_pairing_weight * pairing
        parts["pairing"] = float(pairing.detach())
        parts["paired_positions"] = float(index.shape[0])
    tokens = int(batch["attention_mask"].sum()) + losses.num_tokens
    return MicroStep(total, parts, tokens)


def micro_forward(engine: Any, teacher: Any, data: Any, cfg: DistillConfig, token_map: TokenMap, hidden_loss: Any,
                  device: str, epoch: int) -> Any:
    """`forward` for core.loop.train_step: one micro-batch of row indices -> `distill_step` on its pairs."""

    def forward(indices: list[int]) -> MicroStep:
        return distill_step(engine, teacher, data.pairs(indices, epoch), data, cfg, token_map, hidden_loss, device)

    return forward


# ----------------------------------------------------------------------------- held-out loss


def evaluate(engine: Any, teacher: Any, data: Any, cfg: DistillConfig, dist_info: DistInfo) -> dict[str, float]:
    """Held-out token CE of student and teacher, and KL(teacher_T || student_T), over all ranks."""
    import torch
    import torch.nn.functional as F

    engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # student CE, teacher CE, KL, tokens
    batches = eval_micro_batches(data.num_eval, cfg.train.micro_batch_size, cfg.train.num_eval_batches,
                                 dist_info.rank, dist_info.world_size)
    with torch.no_grad():
        for indices in batches:
            batch = _to(data.pad(data.eval_examples(indices)), dist_info.device)
            labels = batch["labels"]
            t_logits = teacher_forward(teacher, batch, False).logits.float()
            s_logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=teacher._shift_right(labels)).logits.float()
            mask = labels != -100
            for k, logits in enumerate((s_logits, t_logits)):
                sums[k] += float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum"))
            p = torch.softmax(t_logits / cfg.temperature, -1)
            log_q = torch.log_softmax(s_logits / cfg.temperature, -1)
            kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
            sums[2] += float((kl * mask).sum())
            sums[3] += float(mask.sum())
    engine.train()
    student_ce, teacher_ce, kl, tokens = all_reduce_sum(sums)
    tokens = max(tokens, 1.0)
    return {"heldout_student_ce": student_ce / tokens, "heldout_teacher_ce": teacher_ce / tokens,
            "heldout_kd": kl / tokens, "heldout_tokens": tokens}


# ----------------------------------------------------------------------------- the stage


def distill(cfg: DistillConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Distil cfg.teacher into a student; returns the exported student directory run_dir/<out>."""
    # config
    run_dir = Path(run_dir)
    teacher_dir = check_model_dir(resolve_dir(run_dir, cfg.teacher, "teacher"), "distill.teacher")
    check_output(safe_path(run_dir, cfg.out), "model", run_dir, inputs=[teacher_dir], flag="--out")
    dist_info = init_distributed(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    grad_accum = cfg.train.grad_accum_steps(dist_info.world_size)
    checkpoints = CheckpointManager(run_dir, cfg.out, keep=cfg.train.keep_checkpoints)
    refuse_to_start_over(checkpoints, resume)
    if dist_info.is_rank0:
        save_stage_config(cfg, run_dir, "distill", cfg.out)

    # teacher, tokenizer, data
    teacher_dir = resolve_dir(run_dir, cfg.teacher, "teacher")
    teacher = load_teacher(teacher_dir, cfg, run_dir, dist_info, resolve_precision(cfg.train.precision, dist_info))
    tokenizer = load_checked_tokenizer(cfg, run_dir, teacher_dir, teacher)
    # The teacher's MASSIVE text-to-text format, for task=massive.
    target_format = TargetFormat.of(teacher.config)
    if cfg.unlabelled_locales() and cfg.teacher_shard == "zero3":
        raise ConfigError("crosslingual.setting=teacher-labelled: the teacher labels the target utterances with "
                          "generate, which a ZeRO-3-sharded teacher does not run here; use teacher_shard=none")
    data = load_distill_data(cfg, run_dir, tokenizer, target_format, teacher)
    token_map = build_token_map(tokenizer, cfg.lexicon_languages or None)
    lengths = getattr(data, "train_lengths", None) if cfg.group_by_length else None
    sampler = ResumableSampler(data.num_train, cfg.train.micro_batch_size, grad_accum, dist_info.rank,
                               dist_info.world_size, cfg.train.seed, lengths=lengths)

    # student and engine
    student, init_info = build_student(student_init_source(teacher_dir, teacher, cfg), cfg.student, seed=cfg.train.seed)
    # A student distilled on MASSIVE targets emits them in the teacher's order.
    target_format.record(student.config)
    hidden_loss = (
        HiddenStateLoss(student.config.d_model, teacher.config.d_model) if cfg.hidden_loss_weight > 0 else None
    )
    engine = build_engine(student, cfg.train, dist_info, extra_params=[hidden_loss] if hidden_loss else ())
    if hidden_loss is not None:
        hidden_loss = engine.module.extras[0]
    state = restore_or_start(checkpoints, engine, resume, "distill", config_yaml(cfg), dist_info.world_size)
    metrics = MetricsLogger(run_dir, stage="distill", name=cfg.out)
    cfg_yaml = config_yaml(cfg)
    if dist_info.is_rank0:
        print(
            f"distill {cfg.out}: teacher {teacher_dir} -> {describe_student(init_info, student.config)}\n"
            f"  task={cfg.task} data: {data.description}; cda={cfg.cda} perturb={cfg.perturb} "
            f"alpha={cfg.alpha} T={cfg.temperature} hidden={cfg.hidden_loss_weight}; token pairs "
            f"{len(token_map)} ({_token_map_summary(token_map)}); world={dist_info.world_size} from step {state.step}",
            flush=True,
        )

    # the loop
    window = LossWindow()
    pieces = StagePieces(
        micro_batches=lambda st: sampler.micro_batches(st.epoch, st.epoch_position),
        forward=lambda st: micro_forward(engine, teacher, data, cfg, token_map, hidden_loss, dist_info.device, st.epoch),
        maybe_log=lambda st, bar: maybe_log(metrics, st, window, engine, cfg, bar),
        maybe_eval=lambda st: maybe_eval(metrics, st, engine, teacher, data, cfg, dist_info),
    )
    run_training(cfg.train, state, engine, sampler, checkpoints, cfg_yaml, pieces, f"distill {cfg.out}", window)

    # export
    out_dir = run_dir / cfg.out
    export_hf(engine, student, tokenizer, out_dir)
    if dist_info.is_rank0:
        atomic_write_json(out_dir / "distillation.json", {
            "teacher": str(teacher_dir),
            "student_init": dataclasses.asdict(init_info),
            "token_map": {"num_token_pairs": len(token_map), "per_language": token_map.stats},
            "config": to_dict(cfg),
            "final_step": state.step,
            "best_heldout_student_ce": state.best_eval_loss,
        })
    metrics.close()
    return out_dir


def _token_map_summary(token_map: TokenMap) -> str:
    return ", ".join(f"{lang} {s['rows_mapped']}/{s['pairs']} rows" for lang, s in token_map.stats.items())


# ----------------------------------------------------------------------------- log / eval / save


# Per-micro-batch means; the row counters become fractions of the training rows.
_MEAN_PARTS = ("kd", "ce", "hidden", "perturb_l1", "pairing", "paired_positions")
_ROW_PARTS = ("rows_swapped", "rows_gendered", "rows_conflict", "perturb_aligned")


def maybe_log(metrics: MetricsLogger, state: TrainState, window: LossWindow, engine: Any, cfg: DistillConfig,
              bar: Any) -> None:
    if not log_due(state, cfg.train) or window.count == 0:
        return
    rows = max(window.parts.get("rows", 0.0), 1.0)
    record: dict[str, Any] = {"loss": window.loss / window.count}
    record.update({k: window.parts[k] / window.micro_steps for k in _MEAN_PARTS if k in window.parts})
    record.update({f"{k}_fraction": window.parts[k] / rows for k in _ROW_PARTS if k in window.parts})
    record["rows_per_micro_batch"] = rows / window.micro_steps
    record.update(window.throughput(state, engine.get_lr()[0]))
    metrics.log(state.step, record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", kd=f"{record.get('kd', 0):.3f}")
    window.reset(state.tokens_seen)


def maybe_eval(metrics: MetricsLogger, state: TrainState, engine: Any, teacher: Any, data: Any,
               cfg: DistillConfig, dist_info: DistInfo) -> dict[str, float] | None:
    if data.num_eval == 0 or not eval_due(state, cfg.train):
        return None
    result = evaluate(engine, teacher, data, cfg, dist_info)
    keep_best(state, result["heldout_student_ce"])
    metrics.log(state.step, result)
    if dist_info.is_rank0:
        print(
            f"step {state.step}: held-out CE student {result['heldout_student_ce']:.4f} teacher "
            f"{result['heldout_teacher_ce']:.4f} KL {result['heldout_kd']:.4f}",
            flush=True,
        )
    return result
