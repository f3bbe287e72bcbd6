"""In-context learning: k-shot MASSIVE intent classification by rank classification, no fine-tuning.

For each query utterance and each k in `icl.shots`, the prompt is k labelled demonstrations plus the
query (`prompt_template`, `demo_template`), optionally prefixed with the `[CLM]` token so a teacher
pretrained with the causal-LM objective continues the text. The encoder reads the prompt once; the
decoder scores every intent's label text ("alarm_set" -> "alarm set", plus eos when `label_eos`) with
teacher forcing, and the prediction is the label with the highest mean (default) or summed token
log-prob. The queries of every locale are the same seeded sample of test ids
(`evaluation.massive.sample_shared_ids`), and intervals are a bootstrap over those ids, as for
`evaluate massive`. Demonstrations come from the train partition of the query's locale
(`demo_source: same`) or of en-US (`demo_source: en-US`); they are drawn with a seed derived from
(seed, locale, query id), the k=1 set is a prefix of the k=5 set, and no demonstration shares the
query's id (MASSIVE ids are parallel across locales, so this also excludes the query's translation)
or its text.

Output of `evaluate icl --out DIR [--name NAME]` (NAME defaults to "icl"):
- `DIR/NAME.json`:
  {"kind": "icl", "model": str, "split": str, "demo_source": str, "normalize": "mean"|"sum",
   "clm_prompt": bool, "num_labels": int, "chance": float, "shots": [int],
   "accuracy": {"<k>": float},            # unweighted mean over locales
   "accuracy_ci": {"<k>": [lo, hi]},
   "per_locale": {locale: {"n": int, "accuracy": {"<k>": float}, "accuracy_ci": {"<k>": [lo, hi]},
                           "top_prediction": {"<k>": [intent, fraction of queries]}}},
   "example_prompts": {locale: str},      # the largest-k prompt of the first query (in id order)
   "ci_method": str, "elapsed_s": float, "config": {...}}
- `DIR/NAME.md`: accuracy per locale and k; `DIR/NAME.png`: accuracy per locale, one bar per k,
  with chance marked.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def intent_label_text(intent: str) -> str:
    """The natural-language label of an intent: "alarm_set" -> "alarm set"."""
    return intent.replace("_", " ")


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
    demo_text = "".join(demo_template.format(utt=d.utt, label=intent_label_text(d.intent)) for d in demos)
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

    from evaluation.massive import pad_right

    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    if any(len(c) == 0 for c in candidates):
        raise ValueError("every candidate needs at least one token")
    device = next(model.parameters()).device
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


def label_token_ids(tokenizer, labels: Sequence[str], eos_id: int | None) -> list[list[int]]:
    """Token ids of each label text (no special tokens), followed by eos when eos_id is given."""
    out = []
    for label in labels:
        ids = list(tokenizer(label, add_special_tokens=False)["input_ids"])
        out.append(ids + ([eos_id] if eos_id is not None else []))
    return out


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

    from data_prep.massive import load_massive
    from data_prep.tokenizer import special_ids
    from evaluation.config import section_dict
    from evaluation.massive import ci_method, load_seq2seq, sample_shared_ids, score_records, select_ids
    from launch.config import resolve_data_path

    icfg = cfg.icl
    started = time.perf_counter()
    source = resolve_data_path(icfg.data)
    locales = _available_locales(source, icfg.locales)
    if not locales:
        raise FileNotFoundError(f"{source}: none of the locales {', '.join(icfg.locales)} is present")
    demo_locales = sorted(set(locales) | ({"en-US"} if icfg.demo_source == "en-US" else set()))
    data = load_massive(str(source), locales=demo_locales, partitions=("train", icfg.split))
    intents = list(data.intents)

    model, tokenizer = load_seq2seq(model_dir, cfg.device, cfg.dtype)
    ids = special_ids(tokenizer)
    clm_id = ids.clm if icfg.clm_prompt else None
    candidates = label_token_ids(tokenizer, [intent_label_text(i) for i in intents], ids.eos if icfg.label_eos else None)
    decoder_start = model.config.decoder_start_token_id
    if decoder_start is None:
        decoder_start = ids.pad
    shots = sorted(set(icfg.shots))
    split_examples = {loc: data.examples(locale=loc, partition=icfg.split) for loc in locales}
    query_ids = sample_shared_ids(split_examples, icfg.max_examples, icfg.seed)

    per_locale: dict[str, Any] = {}
    # Per k, the scorer's per-utterance columns: the intervals come from the same bootstrap over ids.
    records: dict[int, dict[str, dict[str, list]]] = {k: {} for k in shots}
    example_prompts: dict[str, str] = {}
    for loc in locales:
        queries = select_ids(split_examples[loc], query_ids)
        pool = data.examples(locale=loc if icfg.demo_source == "same" else "en-US", partition="train")
        intent_ok: dict[int, list[int]] = {k: [] for k in shots}
        # How often each intent is predicted: a degenerate model predicts one label for everything.
        predicted_counts: dict[int, Counter[str]] = {k: Counter() for k in shots}
        bar = tqdm(total=len(queries) * len(shots), desc=f"icl {loc}", unit="prompt", file=sys.stderr)
        for start in range(0, len(queries), icfg.batch_size):
            batch = queries[start : start + icfg.batch_size]
            demos = [sample_demos(pool, q, max(shots), icfg.seed, loc) for q in batch]
            for k in shots:
                texts = [build_prompt(q.utt, d[:k], icfg.prompt_template, icfg.demo_template) for q, d in zip(batch, demos)]
                if loc not in example_prompts and k == max(shots):
                    example_prompts[loc] = texts[0]
                prompts = [encode_prompt(tokenizer, t, clm_id, icfg.max_prompt_tokens) for t in texts]
                scores = score_candidates(
                    model,
                    prompts,
                    candidates,
                    pad_id=ids.pad,
                    decoder_start_id=decoder_start,
                    normalize=icfg.normalize,
                    score_batch_size=icfg.score_batch_size,
                )
                predicted = scores.argmax(-1).tolist()
                intent_ok[k] += [int(intents[p] == q.intent) for p, q in zip(predicted, batch)]
                predicted_counts[k].update(intents[p] for p in predicted)
                bar.update(len(batch))
        bar.close()
        n = len(queries)
        for k in shots:
            records[k][loc] = {"id": [q.id for q in queries], "intent_ok": intent_ok[k]}
        per_locale[loc] = {
            "n": n,
            "accuracy": {},
            "accuracy_ci": {},
            "top_prediction": {
                str(k): [intent, count / n] for k in shots for intent, count in predicted_counts[k].most_common(1)
            },
        }

    mean_accuracy, mean_ci = {}, {}
    for k in shots:
        scored = score_records(records[k], samples=cfg.bootstrap_samples, seed=icfg.seed, confidence=cfg.confidence)
        for loc, s in scored["per_locale"].items():
            per_locale[loc]["accuracy"][str(k)] = s["intent_acc"]
            per_locale[loc]["accuracy_ci"][str(k)] = s["intent_acc_ci"]
        mean_accuracy[str(k)], mean_ci[str(k)] = scored["intent_acc"], scored["intent_acc_ci"]
    result = {
        "kind": "icl",
        "model": str(model_dir),
        "split": icfg.split,
        "demo_source": icfg.demo_source,
        "normalize": icfg.normalize,
        "clm_prompt": icfg.clm_prompt,
        "num_labels": len(intents),
        "chance": 1.0 / len(intents),
        "shots": shots,
        "accuracy": mean_accuracy,
        "accuracy_ci": mean_ci,
        "per_locale": per_locale,
        "example_prompts": example_prompts,
        "ci_method": ci_method(cfg.bootstrap_samples, cfg.confidence),
        "elapsed_s": round(time.perf_counter() - started, 3),
        "config": section_dict(cfg, "icl"),
    }
    write_icl_outputs(result, Path(out_dir), name)
    return result


def icl_markdown(result: dict[str, Any]) -> str:
    from evaluation.plots import markdown_table

    shots = [str(k) for k in result["shots"]]
    last = shots[-1]
    header = ["locale", "n"] + [f"acc k={k}" for k in shots] + [f"most predicted (k={last})"]

    def top(s: dict[str, Any]) -> str:
        intent, fraction = s["top_prediction"][last]
        return f"{intent} ({fraction:.0%})"

    rows = [[loc, s["n"]] + [s["accuracy"][k] for k in shots] + [top(s)] for loc, s in sorted(result["per_locale"].items())]
    rows.append(["**mean**", sum(s["n"] for s in result["per_locale"].values())] + [result["accuracy"][k] for k in shots] + [""])
    title = (
        f"# In-context intent classification: {result['model']}\n\n"
        f"Rank classification over {result['num_labels']} intents (chance {result['chance']:.4f}); "
        f"demos from {result['demo_source']}; scores: {result['normalize']} token log-prob; "
        f"[CLM] prompt: {result['clm_prompt']}.\n\n"
    )
    return title + markdown_table(header, rows)


def write_icl_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from evaluation.plots import grouped_bar_chart
    from launch.fsutil import atomic_write_json, atomic_write_text

    groups = {loc: {f"k={k}": acc for k, acc in s["accuracy"].items()} for loc, s in result["per_locale"].items()}
    groups["mean"] = {f"k={k}": acc for k, acc in result["accuracy"].items()}
    return [
        atomic_write_json(out_dir / f"{name}.json", result),
        atomic_write_text(out_dir / f"{name}.md", icl_markdown(result)),
        grouped_bar_chart(
            groups,
            out_dir / f"{name}.png",
            title=f"k-shot intent accuracy ({result['demo_source']} demos): {Path(result['model']).name}",
            ylabel="accuracy",
            series_order=[f"k={k}" for k in result["shots"]],
            hlines={"chance": result["chance"]},
        ),
    ]


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    from evaluation.cli import add_common_arguments

    p = sub.add_parser(
        "icl",
        help="k-shot intent classification by prompting (rank classification over all intents)",
        description="In-context learning on MASSIVE without fine-tuning: k labelled demonstrations and "
        "the query; the prediction is the intent label the model scores highest. Accuracy per "
        "locale for each k. Writes NAME.json, NAME.md and NAME.png into --out.",
    )
    add_common_arguments(p, default_name="icl")
    p.add_argument("--locales", nargs="+", default=None, help="locales to evaluate (default: icl.locales)")
    p.add_argument("--shots", nargs="+", type=int, default=None, help="numbers of demonstrations (default 0 1 5)")
    p.add_argument("--demo-source", choices=["same", "en-US"], default=None, help="demos from the same locale or en-US")
    p.add_argument(
        "--max-examples", type=int, default=None, help="query ids, a seeded sample shared by every locale (default 200; 0 = all)"
    )
    p.add_argument("--no-clm", action="store_true", help="plain prompt without the [CLM] prefix")
    p.set_defaults(func=run_icl)


def run_icl(args: argparse.Namespace) -> int:
    from evaluation.cli import run_common

    flags = {
        "locales": args.locales,
        "shots": args.shots,
        "demo_source": args.demo_source,
        "max_examples": args.max_examples,
        "clm_prompt": False if args.no_clm else None,
    }

    def summary(result: dict[str, Any]) -> str:
        accs = "  ".join(f"k={k}: {acc:.4f}" for k, acc in result["accuracy"].items())
        return f"ICL intent accuracy (mean over {len(result['per_locale'])} locales; chance {result['chance']:.4f}): {accs}"

    return run_common(args, "icl", flags, evaluate_icl, summary)
