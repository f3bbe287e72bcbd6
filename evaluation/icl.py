"""In-context learning: k-shot MASSIVE intent classification by rank classification, no fine-tuning.

For each query utterance and each k in `icl.shots`, the prompt is k labelled demonstrations plus the
query (`prompt_template`, `demo_template`), optionally prefixed with the `[CLM]` token so a teacher
pretrained with the causal-LM objective continues the text. The encoder reads the prompt once; the
decoder scores every intent's label text ("alarm_set" -> "alarm set"; followed by eos only when
`label_eos`, off by default: pretraining never shows eos after a label) with teacher forcing, and the
prediction is the label with the highest mean (default) or summed token log-prob. With
`calibration: contextual` (Zhao et al. 2021) every prompt is also scored with its demonstrations and a
content-free query ("N/A"), and labels are ranked by log p(label | prompt) - log p_cf(label)
(`contextual_calibration`); the uncalibrated accuracy is reported beside the calibrated one. The queries of every locale are the same seeded sample of test ids
(`evaluation.massive.sample_shared_ids`), and intervals are a bootstrap over those ids, as for
`evaluate massive`. Demonstrations come from the train partition of the query's locale
(`demo_source: same`) or of en-US (`demo_source: en-US`); they are drawn with a seed derived from
(seed, locale, query id), the k=1 set is a prefix of the k=5 set, and no demonstration shares the
query's id (MASSIVE ids are parallel across locales, so this also excludes the query's translation)
or its text.

Output of `evaluate icl --out DIR [--name NAME]` (NAME defaults to "icl"):
- `DIR/NAME.json`:
  {"kind": "icl", "model": str, "split": str, "demo_source": str, "normalize": "mean"|"sum",
   "clm_prompt": bool, "label_eos": bool, "calibration": "none"|"contextual",
   "content_free": [str] | null,          # the content-free queries (contextual calibration only)
   "num_labels": int, "chance": float, "shots": [int],
   "accuracy": {"<k>": float},            # unweighted mean over locales (calibrated when calibration is on)
   "accuracy_ci": {"<k>": [lo, hi]},
   "accuracy_uncalibrated": {"<k>": float}, "accuracy_uncalibrated_ci": {"<k>": [lo, hi]},  # contextual only
   "per_locale": {locale: {"n": int, "accuracy": {"<k>": float}, "accuracy_ci": {"<k>": [lo, hi]},
                           "top_prediction": {"<k>": [intent, fraction of queries]},
                           # contextual only: the same three for the uncalibrated ranking
                           "accuracy_uncalibrated": ..., "accuracy_uncalibrated_ci": ...,
                           "top_prediction_uncalibrated": ...}},
   "example_prompts": {locale: str},      # the largest-k prompt of the first query (in id order)
   "ci_method": str, "elapsed_s": float, "config": {...}}
- `DIR/NAME.md`: accuracy per locale and k (calibrated and uncalibrated side by side when calibration
  is on); `DIR/NAME.png`: accuracy per locale, one bar per k,
  with chance marked.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from massive.format import label_text


def sample_demos(pool: Sequence[Any], query: Any, k: int, seed: int, locale: str) -> list[Any]:
    """k demonstrations from `pool` for `query`, deterministic in (seed, locale, query id).

    Demos never share the query's id or utterance. The sample for a smaller k is a prefix of the
    sample for a larger k.
    """
    if k == 0:
        return []
    if not pool:
        raise ValueError("the demonstration pool is empty")
    rng = random.Random(f"{seed}:{locale}:{query.id}")
    demos: list[Any] = []
    seen: set[int] = set()
    # Draw indices from one seeded stream until k valid ones: a smaller k takes a prefix.
    for _ in range(100 * k + 1000):
        i = rng.randrange(len(pool))
        if i in seen:
            continue
        seen.add(i)
        candidate = pool[i]
        if candidate.id == query.id or candidate.utt == query.utt:
            continue
        demos.append(candidate)
        if len(demos) == k:
            return demos
    raise ValueError(f"demonstration pool of {len(pool)} examples is too small for k={k}")


def build_prompt(utt: str, demos: Sequence[Any], prompt_template: str, demo_template: str) -> str:
    """The prompt text for one query (demos are objects with .utt and .intent)."""
    demo_text = "".join(demo_template.format(utt=d.utt, label=label_text(d.intent)) for d in demos)
    return prompt_template.format(demos=demo_text, utt=utt)


def encode_prompt(tokenizer, text: str, clm_id: int | None, max_tokens: int) -> list[int]:
    """Token ids of a prompt (ending with eos, T5 convention), `[CLM]`-prefixed when clm_id is given.

    A prompt longer than max_tokens keeps its last tokens (the query) and drops the oldest ones.
    """
    ids = list(tokenizer(text)["input_ids"])
    budget = max_tokens - (1 if clm_id is not None else 0)
    if len(ids) > budget:
        ids = ids[len(ids) - budget :]
    return ([clm_id] if clm_id is not None else []) + ids


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


def score_candidates(
    model,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    *,
    pad_id: int,
    decoder_start_id: int,
    normalize: str = "mean",
    score_batch_size: int = 240,
):
    """Log-prob score of every candidate continuation for every prompt: a float tensor [P, C].

    `model(input_ids [R, T], attention_mask [R, T], decoder_input_ids [R, L]) -> logits [R, L, V]`
    (or an output with `.logits`). When the model has `get_encoder()` (transformers seq2seq), each
    prompt is encoded once and its encoder states are reused for all C candidates. A candidate's
    score is the sum (normalize="sum") or the mean (normalize="mean") of its tokens' log-probs under
    teacher forcing.
    """
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    from core.bigmodel import input_device
    from evaluation.massive import pad_right

    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    if any(len(c) == 0 for c in candidates):
        raise ValueError("every candidate needs at least one token")
    device = input_device(model)
    num_prompts, num_cands = len(prompts), len(candidates)

    input_ids, attention_mask = pad_right(prompts, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    # Decoder side, shared by all prompts: inputs = [start] + y[:-1], targets = y, mask on padding.
    targets, target_mask = pad_right(candidates, pad_id)
    decoder_input_ids, _ = pad_right([[decoder_start_id, *c[:-1]] for c in candidates], pad_id)
    targets, decoder_input_ids, target_mask = targets.to(device), decoder_input_ids.to(device), target_mask.bool().to(device)
    lengths = target_mask.sum(-1).float()  # [C]

    scores = torch.empty((num_prompts, num_cands), dtype=torch.float32)
    with torch.inference_mode():
        encoder_states = None
        if hasattr(model, "get_encoder"):
            encoder_states = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Rows are (prompt, candidate) pairs in prompt-major order, processed in chunks.
        num_rows = num_prompts * num_cands
        for start in range(0, num_rows, score_batch_size):
            rows = torch.arange(start, min(start + score_batch_size, num_rows), device=device)
            p_idx, c_idx = rows // num_cands, rows % num_cands
            if encoder_states is not None:
                output = model(
                    encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states[p_idx]),
                    attention_mask=attention_mask[p_idx],
                    decoder_input_ids=decoder_input_ids[c_idx],
                )
            else:
                output = model(
                    input_ids=input_ids[p_idx],
                    attention_mask=attention_mask[p_idx],
                    decoder_input_ids=decoder_input_ids[c_idx],
                )
            logits = _logits(output).float()  # [R, L, V]
            tgt = targets[c_idx]
            # log p(y_t) = logit(y_t) - logsumexp(logits): avoids a second [R, L, V] tensor.
            token_logp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            token_logp = token_logp.masked_fill(~target_mask[c_idx], 0.0)
            total = token_logp.sum(-1)
            if normalize == "mean":
                total = total / lengths[c_idx]
            scores.view(-1)[start : start + len(rows)] = total.cpu()
    return scores


def contextual_calibration(scores, content_free_scores):
    """Contextual calibration (Zhao et al. 2021): label scores [P, C] ranked against each prompt's
    content-free label distribution; returns calibrated log-scores [P, C] (higher is better).

    scores: log-scores of C labels for P prompts (`score_candidates`). content_free_scores: [P, C],
    or [N, P, C] for N content-free queries, each row scored with the same demonstrations as the
    matching prompt. Each content-free row is softmaxed over the labels into p_cf (N distributions are
    averaged in probability), and the result is log_softmax(scores) - log p_cf: in probability space,
    p(label | prompt) / p_cf(label), Zhao et al.'s diagonal W = diag(p_cf)^-1 with b = 0. A label the
    template or the demonstrations favour whatever the query says is discounted by exactly that
    preference; a uniform p_cf changes nothing.
    """
    import math

    import torch

    scores = torch.as_tensor(scores, dtype=torch.float32)
    cf = torch.as_tensor(content_free_scores, dtype=torch.float32)
    if cf.dim() == 2:
        cf = cf[None]
    if scores.dim() != 2 or cf.dim() != 3 or cf.shape[1:] != scores.shape:
        raise ValueError(
            f"content-free scores of shape {tuple(cf.shape)} do not match label scores of shape "
            f"{tuple(scores.shape)}; expected [P, C] or [N, P, C]"
        )
    # log of the mean of the N distributions, in log space: no underflow to log(0).
    log_p_cf = torch.logsumexp(cf.log_softmax(-1), dim=0) - math.log(cf.shape[0])
    return scores.log_softmax(-1) - log_p_cf


def label_token_ids(tokenizer, labels: Sequence[str], eos_id: int | None) -> list[list[int]]:
    """Token ids of each label text (no special tokens), followed by eos when eos_id is given."""
    out = []
    for label in labels:
        ids = list(tokenizer(label, add_special_tokens=False)["input_ids"])
        out.append(ids + ([eos_id] if eos_id is not None else []))
    return out


@dataclasses.dataclass
class RankScorer:
    """What rank classification needs of a seq2seq model: the model, its tokenizer, the [CLM] id to
    prefix prompts with (None without `clm_prompt`), each label's token ids, the pad and decoder-start ids."""

    model: Any
    tokenizer: Any
    clm_id: int | None
    candidates: list[list[int]]
    pad_id: int
    decoder_start_id: int

    def score(self, texts: Sequence[str], icfg: Any):
        """Label log-scores [len(texts), C] of prompt texts (encoded, truncated and batched by `icfg`)."""
        prompts = [encode_prompt(self.tokenizer, t, self.clm_id, icfg.max_prompt_tokens) for t in texts]
        return score_candidates(self.model, prompts, self.candidates, pad_id=self.pad_id,
                                decoder_start_id=self.decoder_start_id, normalize=icfg.normalize,
                                score_batch_size=icfg.score_batch_size)

    def content_free_scores(self, texts: Sequence[str], cache: dict[str, Any], icfg: Any):
        """Score rows [len(texts), C] of content-free prompts, each distinct text scored once: many prompts
        share one (every query at k = 0; en-US demonstrations in every language pair). `cache`: text -> row."""
        import torch

        missing = sorted(set(texts) - cache.keys())
        for i in range(0, len(missing), icfg.batch_size):
            chunk = missing[i : i + icfg.batch_size]
            cache.update(zip(chunk, self.score(chunk, icfg)))
        return torch.stack([cache[t] for t in texts])


def load_rank_scorer(model_dir: str | Path, cfg: Any, icfg: Any, intents: Sequence[str]) -> RankScorer:
    """The model of `model_dir` (placed by cfg.device/dtype/load) and the label tokens of `intents`."""
    from data_prep.tokenizer import special_ids
    from student import load_text_to_text

    model, tokenizer = load_text_to_text(model_dir, cfg.device, cfg.dtype, cfg.load)
    ids = special_ids(tokenizer)
    candidates = label_token_ids(tokenizer, [label_text(i) for i in intents], ids.eos if icfg.label_eos else None)
    decoder_start = model.config.decoder_start_token_id
    return RankScorer(model, tokenizer, ids.clm if icfg.clm_prompt else None, candidates, ids.pad,
                      ids.pad if decoder_start is None else decoder_start)


def _available_locales(source: Path, locales: Sequence[str]) -> list[str]:
    if not source.is_dir():
        return list(locales)
    present = [loc for loc in locales if any((source / f"{loc}{ext}").is_file() for ext in (".jsonl.gz", ".jsonl"))]
    missing = [loc for loc in locales if loc not in present]
    if missing:
        warnings.warn(f"{source}: no MASSIVE file for {', '.join(missing)}; skipping them", stacklevel=2)
    return present


def evaluate_icl(cfg, model_dir: str | Path, out_dir: str | Path, name: str = "icl") -> dict[str, Any]:
    """k-shot intent accuracy per locale; writes NAME.json, NAME.md and NAME.png into out_dir."""
    from tqdm.auto import tqdm

    from core.config import resolve_data_path
    from evaluation.config import section_dict
    from massive.loader import load_massive
    from massive.scoring import ci_method, sample_shared_ids, score_records, select_ids

    icfg = cfg.icl
    started = time.perf_counter()
    source = resolve_data_path(icfg.data)
    locales = _available_locales(source, icfg.locales)
    if not locales:
        raise FileNotFoundError(f"{source}: none of the locales {', '.join(icfg.locales)} is present")
    demo_locales = sorted(set(locales) | ({"en-US"} if icfg.demo_source == "en-US" else set()))
    data = load_massive(str(source), locales=demo_locales, partitions=("train", icfg.split))
    intents = list(data.intents)

    scorer = load_rank_scorer(model_dir, cfg, icfg, intents)
    shots = sorted(set(icfg.shots))
    split_examples = {loc: data.examples(locale=loc, partition=icfg.split) for loc in locales}
    query_ids = sample_shared_ids(split_examples, icfg.max_examples, icfg.seed)

    calibrate = icfg.calibration == "contextual"
    # The rankings scored: the headline one (calibrated when calibration is on) is reported under
    # "accuracy", the other one under "accuracy_uncalibrated". Suffix of each ranking's JSON keys:
    rankings = {"calibrated": "", "uncalibrated": "_uncalibrated"} if calibrate else {"uncalibrated": ""}

    per_locale: dict[str, Any] = {}
    # Per ranking and k, the scorer's per-utterance columns: the intervals come from the same
    # bootstrap over ids.
    records: dict[str, dict[int, dict[str, dict[str, list]]]] = {r: {k: {} for k in shots} for r in rankings}
    example_prompts: dict[str, str] = {}
    for loc in locales:
        queries = select_ids(split_examples[loc], query_ids)
        pool = data.examples(locale=loc if icfg.demo_source == "same" else "en-US", partition="train")
        intent_ok: dict[str, dict[int, list[int]]] = {r: {k: [] for k in shots} for r in rankings}
        # How often each intent is predicted: a degenerate model predicts one label for everything.
        predicted_counts: dict[str, dict[int, Counter[str]]] = {r: {k: Counter() for k in shots} for r in rankings}
        # Content-free prompt -> label scores; at k=0 every query of the locale shares one prompt.
        content_free_cache: dict[str, Any] = {}
        bar = tqdm(total=len(queries) * len(shots), desc=f"icl {loc}", unit="prompt", file=sys.stderr)
        for start in range(0, len(queries), icfg.batch_size):
            batch = queries[start : start + icfg.batch_size]
            demos = [sample_demos(pool, q, max(shots), icfg.seed, loc) for q in batch]
            for k in shots:
                texts = [build_prompt(q.utt, d[:k], icfg.prompt_template, icfg.demo_template) for q, d in zip(batch, demos)]
                if loc not in example_prompts and k == max(shots):
                    example_prompts[loc] = texts[0]
                ranked = {"uncalibrated": scorer.score(texts, icfg)}
                if calibrate:
                    cf_texts = [
                        build_prompt(cf, d[:k], icfg.prompt_template, icfg.demo_template)
                        for cf in icfg.content_free
                        for d in demos
                    ]
                    cf_scores = scorer.content_free_scores(cf_texts, content_free_cache, icfg)
                    cf_scores = cf_scores.view(len(icfg.content_free), len(batch), len(intents))
                    ranked["calibrated"] = contextual_calibration(ranked["uncalibrated"], cf_scores)
                for r, scores in ranked.items():
                    predicted = scores.argmax(-1).tolist()
                    intent_ok[r][k] += [int(intents[p] == q.intent) for p, q in zip(predicted, batch)]
                    predicted_counts[r][k].update(intents[p] for p in predicted)
                bar.update(len(batch))
        bar.close()
        n = len(queries)
        per_locale[loc] = {"n": n}
        for r, suffix in rankings.items():
            for k in shots:
                records[r][k][loc] = {"id": [q.id for q in queries], "intent_ok": intent_ok[r][k]}
            per_locale[loc][f"accuracy{suffix}"] = {}
            per_locale[loc][f"accuracy{suffix}_ci"] = {}
            per_locale[loc][f"top_prediction{suffix}"] = {
                str(k): [intent, count / n] for k in shots for intent, count in predicted_counts[r][k].most_common(1)
            }

    mean_accuracy: dict[str, dict[str, Any]] = {}
    for r, suffix in rankings.items():
        mean_accuracy[f"accuracy{suffix}"], mean_accuracy[f"accuracy{suffix}_ci"] = {}, {}
        for k in shots:
            scored = score_records(records[r][k], samples=cfg.bootstrap_samples, seed=icfg.seed, confidence=cfg.confidence)
            for loc, s in scored["per_locale"].items():
                per_locale[loc][f"accuracy{suffix}"][str(k)] = s["intent_acc"]
                per_locale[loc][f"accuracy{suffix}_ci"][str(k)] = s["intent_acc_ci"]
            mean_accuracy[f"accuracy{suffix}"][str(k)] = scored["intent_acc"]
            mean_accuracy[f"accuracy{suffix}_ci"][str(k)] = scored["intent_acc_ci"]
    result = {
        "kind": "icl",
        "model": str(model_dir),
        "split": icfg.split,
        "demo_source": icfg.demo_source,
        "normalize": icfg.normalize,
        "clm_prompt": icfg.clm_prompt,
        "label_eos": icfg.label_eos,
        "calibration": icfg.calibration,
        "content_free": list(icfg.content_free) if calibrate else None,
        "num_labels": len(intents),
        "chance": 1.0 / len(intents),
        "shots": shots,
        **mean_accuracy,
        "per_locale": per_locale,
        "example_prompts": example_prompts,
        "ci_method": ci_method(cfg.bootstrap_samples, cfg.confidence),
        "elapsed_s": round(time.perf_counter() - started, 3),
        "config": section_dict(cfg, "icl"),
    }
    write_icl_outputs(result, Path(out_dir), name)
    return result


def icl_markdown(result: dict[str, Any]) -> str:
    from core.tables import markdown_table

    shots = [str(k) for k in result["shots"]]
    last = shots[-1]
    # Older results lack the calibration keys: they were uncalibrated.
    calibrated = result.get("calibration", "none") != "none"
    # (JSON key, column label) per k: calibrated and uncalibrated side by side when calibration is on.
    columns = [("accuracy", "acc k={}"), ("accuracy_uncalibrated", "uncal. k={}")] if calibrated else [("accuracy", "acc k={}")]
    header = ["locale", "n"] + [label.format(k) for k in shots for _, label in columns] + [f"most predicted (k={last})"]

    def top(s: dict[str, Any]) -> str:
        intent, fraction = s["top_prediction"][last]
        return f"{intent} ({fraction:.0%})"

    def accs(s: dict[str, Any]) -> list[float]:
        return [s[key][k] for k in shots for key, _ in columns]

    rows = [[loc, s["n"], *accs(s), top(s)] for loc, s in sorted(result["per_locale"].items())]
    rows.append(["**mean**", sum(s["n"] for s in result["per_locale"].values()), *accs(result), ""])
    if calibrated:
        content_free = ", ".join(json.dumps(t, ensure_ascii=False) for t in result["content_free"])
        queries = "queries" if len(result["content_free"]) > 1 else "query"
        calibration = f"contextual calibration against the content-free {queries} {content_free} (acc: calibrated; uncal.: the raw scores)"
    else:
        calibration = "no calibration"
    title = (
        f"# In-context intent classification: {result['model']}\n\n"
        f"Rank classification over {result['num_labels']} intents (chance {result['chance']:.4f}); "
        f"demos from {result['demo_source']}; scores: {result['normalize']} token log-prob of the label"
        f"{' and eos' if result.get('label_eos') else ''}; {calibration}; "
        f"[CLM] prompt: {result['clm_prompt']}.\n\n"
    )
    return title + markdown_table(header, rows)


def write_icl_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from core.fsutil import atomic_write_json, atomic_write_text
    from evaluation.plots import grouped_bar_chart

    groups = {loc: {f"k={k}": acc for k, acc in s["accuracy"].items()} for loc, s in result["per_locale"].items()}
    groups["mean"] = {f"k={k}": acc for k, acc in result["accuracy"].items()}
    return [
        atomic_write_json(out_dir / f"{name}.json", result),
        atomic_write_text(out_dir / f"{name}.md", icl_markdown(result)),
        grouped_bar_chart(
            groups,
            out_dir / f"{name}.png",
            title=f"k-shot intent accuracy ({result['demo_source']} demos"
            f"{', calibrated' if result.get('calibration', 'none') != 'none' else ''}): {Path(result['model']).name}",
            ylabel="accuracy",
            series_order=[f"k={k}" for k in result["shots"]],
            hlines={"chance": result["chance"]},
        ),
    ]
