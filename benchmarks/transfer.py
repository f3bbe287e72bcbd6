"""Where pretraining transfers to MASSIVE: the intent token against the rest of the target, and a
linear intent probe on the encoder.

Two measurements on a seeded sample of dev ids shared by the locales:

- `--finetuned NAME=DIR ...` (seq2seq models fine-tuned on intent-first targets, e.g. the teacher and
  the from-scratch reference): teacher-forced NLL (nats) and argmax accuracy of the intent token,
  the first target token, and the NLL per token of the rest of the target (slot labels and copied
  values), each with a bootstrap interval over ids, and each model's paired difference from
  `--baseline` (the same resampled ids for both). On `small` a fine-tuned teacher that loses to its
  from-scratch reference on EM can be better on the rest and worse on the intent: pretraining then
  pays where it teaches copying, not where it teaches meaning.
- `--pretrained NAME=DIR ...` (any seq2seq model): a logistic-regression probe of the intent from the
  mean-pooled last encoder states, trained on `--num-train` train utterances per locale and scored on
  the dev sample. The reference row `random` is the first model's architecture with freshly drawn
  weights (seeded), and each model is paired against it: a pretrained encoder below it holds less
  linearly readable intent than random features do. The probe needs data: with 1,000 utterances per
  locale over six locales every model sat at 24%; the defaults (three locales, 2,000 each) separate
  them. A minute or two per model on 2 CPU cores, against ~15 for a fine-tuning run.

    .venv/bin/python -m benchmarks.transfer --run-dir runs/small \\
        --finetuned teacher=teacher-ft student=student-ft scratch=scratch-ft \\
        --pretrained teacher=teacher stage2=teacher-indomain

Prints tables, writes benchmarks/results/transfer.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)

DEFAULT_LOCALES = ["en-US", "de-DE", "ja-JP"]


def named_dirs(values: list[str], run_dir: Path | None) -> dict[str, Path]:
    """NAME=DIR pairs; DIR relative to --run-dir when given."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"expected NAME=DIR, got {value!r}")
        out[name] = (run_dir / path) if run_dir and not Path(path).is_absolute() else Path(path)
    return out


def intent_split_nll(model: Any, tokenizer: Any, examples: list[Any], batch_size: int = 64) -> dict[str, Any]:
    """Per example: NLL of the first target token (the intent of an intent-first target), whether it is
    the argmax, and the summed NLL and token count of the rest, in the model's own format
    (`TargetFormat.of(model.config)`). Arrays of length len(examples)."""
    import numpy as np
    import torch

    from massive.format import TargetFormat, has_label_tokens

    fmt = TargetFormat.of(model.config)
    if not fmt.intent_first:
        raise SystemExit(f"{getattr(model, 'name_or_path', 'model')}: not fine-tuned on intent-first targets")
    whole = has_label_tokens(tokenizer)
    pairs = [fmt.pair(ex.words, ex.slots, ex.intent, whole) for ex in examples]
    first_nll, first_ok, rest_nll, rest_count = [], [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        source = tokenizer([s for s, _ in chunk], return_tensors="pt", padding=True)
        target = tokenizer([t for _, t in chunk], return_tensors="pt", padding=True)["input_ids"]
        labels = target.masked_fill(target == tokenizer.pad_token_id, -100)
        with torch.inference_mode():
            logits = model(input_ids=source["input_ids"], attention_mask=source["attention_mask"], labels=labels).logits
        logp = torch.log_softmax(logits.float(), -1)
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
        first_nll.append(nll[:, 0].numpy())
        first_ok.append((logits[:, 0].argmax(-1) == labels[:, 0]).numpy())
        rest_nll.append(nll[:, 1:].sum(-1).numpy())
        rest_count.append((labels[:, 1:] != -100).sum(-1).numpy())
    return {"intent_nll": np.concatenate(first_nll), "intent_ok": np.concatenate(first_ok).astype(float),
            "rest_nll": np.concatenate(rest_nll), "rest_tokens": np.concatenate(rest_count).astype(float)}


def mean_pooled(model: Any, tokenizer: Any, examples: list[Any], batch_size: int = 128) -> Any:
    """[len(examples), d_model]: the last encoder states of each utterance's text-to-text source,
    averaged over its tokens."""
    import numpy as np
    import torch

    from massive.format import t2t_source

    out = []
    for start in range(0, len(examples), batch_size):
        batch = tokenizer([t2t_source(ex.words) for ex in examples[start : start + batch_size]],
                          return_tensors="pt", padding=True)
        with torch.inference_mode():
            states = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(((states.float() * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(out)


def probe_accuracy(train_x: Any, train_y: list[str], test_x: Any, test_y: list[str], seed: int = 0) -> Any:
    """Per test example, whether a logistic regression on standardised features gets its intent."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit((train_x - mean) / std, train_y)
    return (clf.predict((test_x - mean) / std) == np.asarray(test_y)).astype(float)


def _stat(x: dict[str, Any], key: str, w: Any) -> Any:
    """A metric of per-example arrays `x` under example weights `w` ([len] or [samples, len]): the mean
    of `intent_nll`, `intent_ok` or `probe_ok`; `rest_nll` per token of `rest_tokens`."""
    if key == "rest_nll":
        return (w @ x["rest_nll"]) / (w @ x["rest_tokens"])
    return (w @ x[key]) / w.sum(-1)


def summarise(x: dict[str, Any], key: str, weights: Any, confidence: float = 0.95) -> tuple[float, list[float]]:
    """(the metric on all examples, its percentile interval over the bootstrap resamples `weights`)."""
    import numpy as np

    from massive.scoring import percentile_interval

    return float(_stat(x, key, np.ones(weights.shape[1]))), percentile_interval(_stat(x, key, weights), confidence)


def paired_diff(a: dict[str, Any], b: dict[str, Any], weights: Any, confidence: float = 0.95) -> dict[str, Any]:
    """B - A for per-example arrays of two models scored on the same examples: {metric: {"diff",
    "diff_ci"}} for each metric of `_stat` both have, the same resampled ids for both."""
    import numpy as np

    from massive.scoring import percentile_interval

    ones = np.ones(weights.shape[1])
    return {key: {"diff": float(_stat(b, key, ones) - _stat(a, key, ones)),
                  "diff_ci": percentile_interval(_stat(b, key, weights) - _stat(a, key, weights), confidence)}
            for key in ("intent_nll", "intent_ok", "rest_nll", "probe_ok") if key in a and key in b}


def _fmt(value: float, ci: list[float], scale: float = 1.0, spec: str = ".3f") -> str:
    """`value [low, high]`, each times `scale`."""
    return f"{scale * value:{spec}} [{scale * ci[0]:{spec}}, {scale * ci[1]:{spec}}]"


def _fmt_diff(entry: dict[str, Any], scale: float = 1.0) -> str:
    return _fmt(entry["diff"], entry["diff_ci"], scale, "+.3f")


def load_sample(massive: str, locales: list[str], num_dev: int, num_train: int, seed: int) -> tuple[list, list]:
    """(dev examples: `num_dev` ids shared by the locales, in each locale; train examples: `num_train`
    per locale, seeded)."""
    from core.config import resolve_data_path
    from massive.loader import load_massive
    from massive.scoring import sample_shared_ids, select_ids

    data = load_massive(str(resolve_data_path(massive)), locales=locales, partitions=("train", "dev"), progress=False)
    dev_by_locale = {loc: data.examples(locale=loc, partition="dev") for loc in locales}
    ids = sample_shared_ids(dev_by_locale, num_dev, seed)
    dev = [ex for loc in locales for ex in select_ids(dev_by_locale[loc], ids)]
    rng = random.Random(seed)
    train = []
    for loc in locales:
        examples = data.examples(locale=loc, partition="train")
        train.extend(rng.sample(examples, min(num_train, len(examples))))
    return dev, train


def id_weights(dev: list[Any], samples: int, seed: int) -> Any:
    """[samples, len(dev)] bootstrap counts that resample ids (every locale's copy of an id together)."""
    import numpy as np

    from massive.scoring import bootstrap_weights

    ids = sorted({str(ex.id) for ex in dev})
    index = {i: k for k, i in enumerate(ids)}
    per_id = bootstrap_weights(len(ids), samples, seed)
    return per_id[:, np.array([index[str(ex.id)] for ex in dev])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="directory the model paths are relative to")
    parser.add_argument("--finetuned", nargs="*", default=[], metavar="NAME=DIR",
                        help="seq2seq models fine-tuned on intent-first MASSIVE targets: intent vs rest NLL")
    parser.add_argument("--baseline", help="the --finetuned model the others are compared with, paired "
                        "(default: the last one)")
    parser.add_argument("--pretrained", nargs="*", default=[], metavar="NAME=DIR",
                        help="seq2seq models whose encoder is probed for the intent (a random reference row is added)")
    parser.add_argument("--massive", default="@data/massive/data", help="MASSIVE data (default: the shared copy)")
    parser.add_argument("--locales", nargs="+", default=DEFAULT_LOCALES)
    parser.add_argument("--num-dev", type=int, default=400, help="shared dev ids per locale (0 = all)")
    parser.add_argument("--num-train", type=int, default=2000, help="probe training utterances per locale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS / "transfer.json")
    args = parser.parse_args(argv)
    if not args.finetuned and not args.pretrained:
        parser.error("nothing to measure: give --finetuned and/or --pretrained")

    import torch
    from tabulate import tabulate
    from transformers import AutoConfig, T5ForConditionalGeneration

    from core.modeldir import load_seq2seq_model
    from data_prep.tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    dev, train = load_sample(args.massive, args.locales, args.num_dev, args.num_train, args.seed)
    weights = id_weights(dev, args.bootstrap_samples, args.seed)
    result: dict[str, Any] = {"locales": args.locales, "num_dev_ids": len(dev) // len(args.locales),
                              "num_train_per_locale": args.num_train, "seed": args.seed, "finetuned": {}, "probe": {}}

    rows = []
    finetuned = named_dirs(args.finetuned, args.run_dir)
    baseline = args.baseline or (list(finetuned)[-1] if finetuned else None)
    if finetuned and baseline not in finetuned:
        raise SystemExit(f"--baseline {baseline!r} is not a --finetuned name ({', '.join(finetuned)})")
    per_example: dict[str, Any] = {}
    for name, path in finetuned.items():
        model, tokenizer = load_seq2seq_model(path, "--finetuned").eval(), load_tokenizer(path)
        s = per_example[name] = intent_split_nll(model, tokenizer, dev)
        entry: dict[str, Any] = {"model": str(path)}
        for key, field in (("intent_nll", "intent_nll"), ("intent_ok", "intent_acc"), ("rest_nll", "rest_nll_per_token")):
            entry[field], entry[f"{field}_ci"] = summarise(s, key, weights)
        result["finetuned"][name] = entry
        rows.append([name, _fmt(entry["intent_nll"], entry["intent_nll_ci"]),
                     _fmt(entry["intent_acc"], entry["intent_acc_ci"], 100, ".1f"),
                     _fmt(entry["rest_nll_per_token"], entry["rest_nll_per_token_ci"])])
    if rows:
        print(f"Teacher-forced on {len(dev)} dev utterances ({result['num_dev_ids']} shared ids x {len(args.locales)} locales)")
        print(tabulate(rows, ["model", "intent NLL (nats)", "intent acc (%)", "rest NLL / token"], tablefmt="github"))
        rows = []
        for name in finetuned:
            if name != baseline:
                d = result["finetuned"][name]["vs_baseline"] = paired_diff(per_example[baseline], per_example[name], weights)
                rows.append([f"{name} - {baseline}", _fmt_diff(d["intent_nll"]), _fmt_diff(d["intent_ok"], 100),
                             _fmt_diff(d["rest_nll"])])
        if rows:
            print("\nPaired differences (95% bootstrap over ids)")
            print(tabulate(rows, ["models", "intent NLL", "intent acc (points)", "rest NLL / token"], tablefmt="github"))

    pretrained = named_dirs(args.pretrained, args.run_dir)
    if pretrained:
        rows = []
        probes: dict[str, Any] = {}
        first = next(iter(pretrained.values()))
        # One model in memory at a time; the reference has the first one's architecture and tokenizer.
        reference = T5ForConditionalGeneration(AutoConfig.from_pretrained(first)).eval()
        for name, path in {"random": first, **pretrained}.items():
            model = reference if name == "random" else load_seq2seq_model(path, "--pretrained").eval()
            tokenizer = load_tokenizer(path)
            ok = probe_accuracy(mean_pooled(model, tokenizer, train), [ex.intent for ex in train],
                                mean_pooled(model, tokenizer, dev), [ex.intent for ex in dev], args.seed)
            probes[name] = {"probe_ok": ok}
            entry = {"model": str(path) if name != "random" else f"random weights, the architecture of {first}"}
            entry["probe_intent_acc"], entry["probe_intent_acc_ci"] = summarise(probes[name], "probe_ok", weights)
            if name != "random":
                entry["vs_random"] = paired_diff(probes["random"], probes[name], weights)["probe_ok"]
            result["probe"][name] = entry
            rows.append([name, _fmt(entry["probe_intent_acc"], entry["probe_intent_acc_ci"], 100, ".1f"),
                         _fmt_diff(entry["vs_random"], 100) if "vs_random" in entry else "-"])
        print(f"\nLinear intent probe on mean-pooled encoder states: {len(train)} train utterances, {len(dev)} dev")
        print(tabulate(rows, ["model", "probe intent acc (%)", "- random, paired (points)"], tablefmt="github"))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
