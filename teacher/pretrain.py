"""The teacher pretraining loop (stage 1: general domain; stage 2: in-domain with init_from).

`pretrain(cfg, run_dir, resume)` reads top to bottom: config -> data -> model -> engine -> an explicit
loop of train_step / maybe_log / maybe_eval / maybe_save (the skeleton of core/loop.py; this stage
passes `forward`, its log record and its held-out loss) -> export of a Hugging Face directory.
Runs unchanged in one process or under `polyteacher launch` (ranks come from the environment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.checkpoint import (
    CheckpointManager,
    TrainState,
    config_yaml,
    export_hf,
    refuse_to_start_over,
    restore_or_start,
    seed_everything,
)
from core.config import ConfigError, save_stage_config
from core.data import ResumableSampler, eval_micro_batches
from core.distributed import (
    DistInfo,
    all_reduce_sum,
    build_engine,
    init_distributed,
    is_rank0,
)
from core.fsutil import check_output
from core.loop import (
    MicroStep,
    StagePieces,
    eval_due,
    keep_best,
    log_due,
    run_training,
)
from core.metrics import LossWindow, MetricsLogger, default_peak_tflops
from core.modeldir import check_model_dir, load_seq2seq_model
from core.models import ModelSpec, build_model, model_flops_per_example
from data_prep.objectives import OBJECTIVE_NAMES, IclCollator, IclRows, PretrainCollator, loss_by_objective
from data_prep.packing import load_packed, unigram_cross_entropy
from data_prep.tokenizer import load_tokenizer, special_ids
from teacher.config import PretrainConfig, PretrainPaths, resolve_paths

STAGE = "pretrain"


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Pretrain (or continue pretraining) a teacher; returns the exported model directory."""
    # -- config and processes
    cfg.validate()
    paths = resolve_paths(cfg, run_dir)
    check_inputs(paths, icl=cfg.icl.enabled)
    check_output(paths.out, "model", paths.run_dir,
                 inputs=[paths.train_data.parent, paths.tokenizer, paths.init_from], flag="--out")
    dist = init_distributed(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    cfg_yaml = config_yaml(cfg)
    if dist.is_rank0:
        save_stage_config(cfg, paths.run_dir, STAGE, cfg.out)

    # -- data
    if cfg.icl.enabled:
        tokenizer, train_data, heldout_data, collator = load_icl_data(cfg, paths)
    else:
        tokenizer, train_data, heldout_data = load_data(paths)
        collator = PretrainCollator.from_tokenizer(cfg.objective, tokenizer, seed=cfg.train.seed)
    grad_accum = cfg.train.grad_accum_steps(dist.world_size)
    sampler = ResumableSampler(len(train_data), cfg.train.micro_batch_size, grad_accum, dist.rank,
                               dist.world_size, cfg.train.seed)
    eval_batches = eval_micro_batches(len(heldout_data), cfg.train.micro_batch_size, cfg.train.num_eval_batches,
                                      dist.rank, dist.world_size)

    # -- model and engine
    model = load_or_build_model(cfg, paths, tokenizer)
    spec = spec_of(model)
    engine = build_engine(model, cfg.train, dist)

    # -- state: fresh or from the latest complete checkpoint
    checkpoints = CheckpointManager(paths.run_dir, cfg.out, keep=cfg.train.keep_checkpoints)
    refuse_to_start_over(checkpoints, resume, hint="choose another out= name / remove the directory")
    state = restore_or_start(checkpoints, engine, resume, STAGE, cfg_yaml, dist.world_size)
    metrics = MetricsLogger(paths.run_dir, STAGE, name=cfg.out)
    peak_tflops = default_peak_tflops(cfg.train, dist)
    window = LossWindow()

    # -- the loop (held-out baselines first, at step 0: the model, and a unigram model of the data)
    if state.step == 0 and not cfg.icl.enabled:
        log_unigram_reference(tokenizer, train_data, heldout_data, metrics)
    maybe_eval(cfg, state, engine, collator, heldout_data, eval_batches, metrics)
    pieces = StagePieces(
        micro_batches=lambda st: sampler.micro_batches(st.epoch, st.epoch_position),
        forward=lambda st: micro_forward(engine, collator, train_data, spec, stream_offset=st.epoch * len(train_data)),
        maybe_log=lambda st, bar: maybe_log(cfg, st, engine, window, metrics, peak_tflops, dist),
        maybe_eval=lambda st: maybe_eval(cfg, st, engine, collator, heldout_data, eval_batches, metrics),
    )
    run_training(cfg.train, state, engine, sampler, checkpoints, cfg_yaml, pieces, f"{STAGE} {cfg.out}", window)

    # -- export
    out = export_hf(engine, model, tokenizer, paths.out)
    report_rank_summary(dist, state, engine, model, window)
    metrics.close()
    return paths.out if out is None else out


# ----------------------------------------------------------------------------- set-up


def check_inputs(paths: PretrainPaths, icl: bool = False) -> None:
    """Fail before any process group or model exists when an input directory is missing (in-context
    training reads MASSIVE, not the packed data)."""
    inputs = [] if icl else [(paths.train_data, "training data"), (paths.heldout_data, "held-out data")]
    inputs.append((paths.tokenizer, "tokenizer"))
    if paths.init_from is not None:
        inputs.append((paths.init_from / "config.json", "init_from model"))
    for path, what in inputs:
        if not path.exists():
            raise FileNotFoundError(
                f"{what} not found at {path}; run `polyteacher data prepare --run-dir {paths.run_dir}` (and the "
                "stage that writes init_from) first, or set data=/tokenizer=/init_from= to the right directory"
            )
    if paths.init_from is not None:
        check_model_dir(paths.init_from, "init_from")


def load_data(paths: PretrainPaths) -> tuple[Any, Any, Any]:
    """(tokenizer, train rows, held-out rows); each dataset has an `input_ids` column."""
    return load_tokenizer(paths.tokenizer), load_packed(paths.train_data), load_packed(paths.heldout_data)


def load_icl_data(cfg: PretrainConfig, paths: PretrainPaths) -> tuple[Any, Any, Any, Any]:
    """(tokenizer, train rows, held-out rows, collator) of in-context training: prompts from MASSIVE
    train (`icl.num_prompts` per epoch) and dev (`icl.num_heldout_prompts`, fixed), held-out scenarios
    excluded (data_prep/icl.py)."""
    from data_prep.icl import IclPromptSampler, load_icl_pools

    tokenizer = load_tokenizer(paths.tokenizer)
    train = IclPromptSampler(load_icl_pools(cfg.icl, "train"), cfg.icl)
    heldout = IclPromptSampler(load_icl_pools(cfg.icl, "dev"), cfg.icl, seed=cfg.icl.seed + 1)
    collator = IclCollator(cfg.objective, tokenizer, cfg.icl.clm_prompt, cfg.icl.max_prompt_tokens, seed=cfg.train.seed)
    return tokenizer, IclRows(train, cfg.icl.num_prompts), IclRows(heldout, cfg.icl.num_heldout_prompts), collator


def log_unigram_reference(tokenizer: Any, train_data: Any, heldout_data: Any, metrics: MetricsLogger) -> float:
    """Log (metrics key heldout_unigram_ce) and print the held-out cross-entropy of a unigram model
    of the train rows: the line the held-out loss must fall far below."""
    ids = special_ids(tokenizer)
    value = unigram_cross_entropy(train_data, heldout_data, len(tokenizer), ignore_ids=[ids.pad, ids.sep])
    metrics.log(0, {"heldout_unigram_ce": value})
    if is_rank0():
        print(f"held-out unigram cross-entropy: {value:.3f} nats/token (token frequencies alone)", flush=True)
    return value


def load_or_build_model(cfg: PretrainConfig, paths: PretrainPaths, tokenizer: Any) -> Any:
    """A new teacher from cfg.teacher (seeded), or the init_from directory's weights (stage 2)."""
    if paths.init_from is None:
        return build_model(cfg.teacher, tokenizer, seed=cfg.train.seed)
    model = load_seq2seq_model(paths.init_from, "init_from")
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"init_from model has {model.config.vocab_size} embedding rows, tokenizer {len(tokenizer)}")
    return model


def spec_of(model: Any) -> ModelSpec:
    """The ModelSpec of a built T5 (its actual shape, whatever preset or directory it came from)."""
    c = model.config
    return ModelSpec(
        name=getattr(c, "name_or_path", "") or "model", num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers, d_model=c.d_model, num_heads=c.num_heads, d_kv=c.d_kv,
        d_ff=c.d_ff, feed_forward_proj=c.feed_forward_proj, tie_word_embeddings=bool(c.tie_word_embeddings),
        dropout=c.dropout_rate, reference_vocab_size=c.vocab_size, vocab_size=c.vocab_size,
        pad_vocab_to_multiple_of=1,
    )


# ----------------------------------------------------------------------------- one optimizer step


def micro_forward(engine: Any, collator: PretrainCollator, train_data: Any, spec: ModelSpec,
                  stream_offset: int) -> Any:
    """`forward` for core.loop.train_step: one micro-batch of row indices -> its loss, the summed
    per-objective cross-entropy and target tokens, and the model FLOPs behind it."""

    def forward(indices: list[int]) -> MicroStep:
        # The stream position seeds each example's noise: later epochs see new noise, resume the same.
        rows = train_data[indices]["input_ids"]
        batch = collator.collate(rows, [stream_offset + j for j in indices])
        objective = batch.pop("objective")
        src_lens = batch["attention_mask"].sum(dim=1).tolist()
        tgt_lens = batch["decoder_attention_mask"].sum(dim=1).tolist()
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        output = engine(**batch)
        parts: dict[str, float] = {}
        by_objective = loss_by_objective(output.logits, batch["labels"], objective.to(engine.device))
        for name, (loss_sum, count) in by_objective.items():
            parts[f"loss_sum_{name}"] = float(loss_sum)
            parts[f"tokens_{name}"] = float(count)
        parts["flops"] = sum(model_flops_per_example(spec, None, s, t) for s, t in zip(src_lens, tgt_lens))
        return MicroStep(output.loss, parts, int(sum(src_lens) + sum(tgt_lens)))

    return forward


# ----------------------------------------------------------------------------- log, eval, save


def maybe_log(cfg: PretrainConfig, state: TrainState, engine: Any, window: LossWindow, metrics: MetricsLogger,
              peak_tflops: float | None, dist: DistInfo) -> None:
    if not log_due(state, cfg.train):
        return
    elapsed = max(window.train_seconds, 1e-9)
    state.wall_time_s += elapsed
    sums = all_reduce_sum([window.parts.get(f"loss_sum_{name}", 0.0) for name in OBJECTIVE_NAMES]
                          + [window.parts.get(f"tokens_{name}", 0.0) for name in OBJECTIVE_NAMES]
                          + [float(window.local_tokens), window.parts.get("flops", 0.0)])
    num = len(OBJECTIVE_NAMES)
    loss_sums, token_counts, tokens, flops = sums[:num], sums[num : 2 * num], sums[-2], sums[-1]
    record: dict[str, Any] = {"loss": window.loss / max(1, window.count)}
    for name, loss_sum, count in zip(OBJECTIVE_NAMES, loss_sums, token_counts):
        if count:
            record[f"loss_{name}"] = loss_sum / count
    record["lr"] = float(engine.lr_scheduler.get_last_lr()[0])
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    record["tokens_per_s"] = tokens / elapsed
    record["tflops_per_device"] = flops / elapsed / dist.world_size / 1e12
    if peak_tflops:
        record["mfu"] = record["tflops_per_device"] / peak_tflops
    record.update(state.progress())
    metrics.log(state.step, record)
    window.reset(state.tokens_seen)


def maybe_eval(cfg: PretrainConfig, state: TrainState, engine: Any, collator: PretrainCollator, heldout: Any,
               eval_batches: list[list[int]], metrics: MetricsLogger) -> float | None:
    if not (state.step == 0 or eval_due(state, cfg.train)):
        return None
    result = heldout_loss(engine, collator, heldout, eval_batches)
    keep_best(state, result["eval_loss"])
    metrics.log(state.step, result)
    return result["eval_loss"]


def heldout_loss(engine: Any, collator: PretrainCollator, heldout: Any, eval_batches: list[list[int]]) -> dict[str, float]:
    """Token-weighted cross-entropy on the fixed held-out batches (same noise every time), over all ranks."""
    import torch

    num = len(OBJECTIVE_NAMES)
    local = [0.0] * (2 * num)
    engine.eval()
    with torch.no_grad():
        for indices in eval_batches:
            batch = collator.collate(heldout[indices]["input_ids"], indices)
            objective = batch.pop("objective").to(engine.device)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            output = engine(**batch)
            for k, (loss_sum, count) in enumerate(loss_by_objective(output.logits, batch["labels"], objective).values()):
                local[k] += float(loss_sum)
                local[num + k] += float(count)
    engine.train()
    sums = all_reduce_sum(local)
    total_tokens = sum(sums[num:])
    result = {"eval_loss": sum(sums[:num]) / max(1.0, total_tokens)}
    for k, name in enumerate(OBJECTIVE_NAMES):
        if sums[num + k]:
            result[f"eval_loss_{name}"] = sums[k] / sums[num + k]
    return result


def report_rank_summary(dist: DistInfo, state: TrainState, engine: Any, model: Any, window: LossWindow) -> None:
    """One line per rank on stdout; the checksum of the replicated weights (ZeRO 0-2) shows that every
    rank holds the same model."""
    import torch

    checksum = "partitioned (ZeRO-3)"
    if engine.zero_optimization_stage() < 3:
        with torch.no_grad():
            checksum = f"{float(sum(p.detach().double().abs().sum() for p in model.parameters())):.6f}"
    print(f"[rank {dist.rank}/{dist.world_size}] {STAGE} done: step {state.step} loss {window.last_loss:.6f} "
          f"weights_abs_sum {checksum}", flush=True)
