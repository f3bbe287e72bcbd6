"""Does an in-context trained model read labels off its demonstrations? A training-health check on
the intents it was trained on (the held-out-intent evaluation, `evaluate icl --protocol heldout`,
is the claim; this says why it fails or holds).

Prompts are drawn by the training sampler (`data_prep.icl.IclPromptSampler`, MASSIVE dev, held-out
scenarios excluded) with a fixed way and k. Each model ranks the prompt's label texts (mean token
log-prob, as the evaluation). Three conditions on the same query draws:

- `real`: the labels carry their own names; memory of the intent and the demonstrations agree;
- `renamed`: every label set is permuted among its labels (`icl.p_rename` 1), so the answer is
  only in the demonstrations; `memory` is how often the model picks the query's real label name
  instead (it is among the shown texts, under another label's demonstrations);
- k = 0 (`real` only): memory alone, the reference a model with demonstrations should not fall under.

`--p-query-demo 1` puts the query itself among its label's demonstrations: whether the model can copy
a label at all (the curriculum of `icl.p_query_demo`).

    .venv/bin/python -m benchmarks.icl_binding --models base=runs/demo/teacher-indomain \\
        icl=runs/demo/teacher-icl --locales en-US de-DE ja-JP --way 5 --shots 0 2 5 --prompts 200

Prints the table, writes JSON (default benchmarks/results/icl_binding.json). Intervals: percentile
bootstrap over prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)


def rank_accuracy(model: Any, tokenizer: Any, pools: dict[str, list[Any]], locales: list[str], way: int, k: int,
                  renamed: bool, prompts: int, seed: int, p_query_demo: float = 0.0) -> dict[str, list[int]]:
    """Per prompt: 1 where the top-ranked label text is the target ("correct") and where it is the
    query intent's real name ("memory"). `pools`: `load_icl_pools(..., "dev")` of the locales."""
    import torch

    from data_prep.icl import IclPromptSampler, IclTrainConfig
    from data_prep.tokenizer import special_ids
    from evaluation.icl import encode_prompt, label_token_ids, score_candidates
    from massive.format import label_text

    cfg = IclTrainConfig(locales=locales, min_way=way, max_way=way, shots=[k],
                         p_rename=1.0 if renamed else 0.0, p_query_demo=p_query_demo, seed=seed)
    sampler = IclPromptSampler(pools, cfg)
    ids = special_ids(tokenizer)
    start = model.config.decoder_start_token_id
    correct, memory = [], []
    for i in range(prompts):
        p = sampler.prompt(i)
        candidates = label_token_ids(tokenizer, list(p.labels), ids.eos)
        with torch.no_grad():
            scores = score_candidates(model, [encode_prompt(tokenizer, p.text, ids.clm, cfg.max_prompt_tokens)],
                                      candidates, pad_id=ids.pad, decoder_start_id=ids.pad if start is None else start)[0]
        top = p.labels[int(scores.argmax())]
        q_intent = p.intents[p.labels.index(p.target)]
        correct.append(int(top == p.target))
        memory.append(int(top == label_text(q_intent)))
    return {"correct": correct, "memory": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR", help="seq2seq model directories")
    parser.add_argument("--locales", nargs="+", default=["en-US", "de-DE", "ja-JP"],
                        help="query and demonstration locales (demonstrations mixed as in training)")
    parser.add_argument("--way", type=int, default=5, help="labels per prompt (chance 1/way)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 2, 5], help="demonstrations per label")
    parser.add_argument("--prompts", type=int, default=200, help="prompts per model, k and condition")
    parser.add_argument("--p-query-demo", type=float, default=0.0,
                        help="probability that a demonstration is the query itself (1: can the model copy a label?)")
    parser.add_argument("--seed", type=int, default=123, help="prompt seed (not the training seed: other draws)")
    parser.add_argument("--data", default="@data/massive/data", help="MASSIVE source")
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--out", type=Path, default=RESULTS / "icl_binding.json", help="JSON output")
    args = parser.parse_args(argv)
    if any("=" not in m for m in args.models):
        print("icl_binding.py: --models takes NAME=DIR", file=sys.stderr)
        return 2
    import numpy as np
    from tabulate import tabulate

    from core.fsutil import atomic_write_json
    from data_prep.icl import IclTrainConfig, load_icl_pools
    from massive.scoring import bootstrap_weights, percentile_interval
    from student import load_text_to_text

    weights = bootstrap_weights(args.prompts, args.samples, seed=0)
    pools = load_icl_pools(IclTrainConfig(massive=args.data, locales=args.locales), "dev")

    def summary(values: list[int]) -> dict[str, Any]:
        v = np.asarray(values, dtype=np.float64)
        return {"value": float(v.mean()), "ci": percentile_interval(weights @ v / args.prompts, 0.95)}

    result: dict[str, Any] = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("models", "out")},
                                           "chance": 1.0 / args.way}, "models": {}}
    rows = []
    for name, model_dir in (m.split("=", 1) for m in args.models):
        per_model = result["models"][name] = {"dir": model_dir}
        model, tokenizer = load_text_to_text(model_dir, "cpu", "float32")
        model.eval()
        for k in args.shots:
            for renamed in ([False] if k == 0 else [False, True]):
                got = rank_accuracy(model, tokenizer, pools, args.locales, args.way, k, renamed, args.prompts, args.seed,
                                    args.p_query_demo)
                cell = {"correct": summary(got["correct"]), "memory": summary(got["memory"])}
                per_model[f"k{k}_{'renamed' if renamed else 'real'}"] = cell
                c, m = cell["correct"], cell["memory"]
                rows.append([name, k, "renamed" if renamed else "real",
                             f"{c['value']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]",
                             f"{m['value']:.3f}" if renamed else "-"])
    print(f"\nlabel binding on dev prompts of the trained intents ({', '.join(args.locales)}; {args.way}-way, chance "
          f"{1 / args.way:.3f}; {args.prompts} prompts per cell)\n")
    print(tabulate(rows, headers=["model", "k", "labels", "top = target [95%]", "top = query's real name"],
                   tablefmt="github", disable_numparse=True))
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

