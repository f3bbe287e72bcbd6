"""A classical reference row for MASSIVE intents: TF-IDF + logistic regression, `evaluate baseline`.

A table of model scores says little without a floor a reader knows: this is the classifier any
text-classification course starts with. Per locale, a scikit-learn pipeline is trained on that
locale's train partition (all of it, or a seeded sample of `baseline.max_train` utterances):
TF-IDF of word 1-2 grams and of character 2-4 grams inside word boundaries (`char_wb`), both with
sublinear tf, side by side, then multinomial logistic regression with C = 10. Its input is the
utterance's words joined by spaces, as the models read them (characters for ja-JP, zh-CN, zh-TW,
where the word n-grams are thus character n-grams).

It is scored on the ids `evaluate massive` scores (massive.data, locales, split, max_examples, seed)
with the same scorer and bootstrap; it predicts intents only, so EM and slot F1 are None.

Output of `evaluate baseline --out DIR [--name NAME]` (NAME defaults to "baseline"):
- `DIR/NAME.json`: the keys of `evaluate massive`'s JSON, with intents only (schema: docs/internals.md,
  "Evaluation outputs"), plus "num_train": {locale: int}.
- `DIR/NAME.md`: the same table as `evaluate massive`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The reference recipe is fixed on purpose: a floor tuned per run would stop being a known one.
C = 10.0
# lbfgs stops when it converges; the cap only has to be out of the way (en-US, all 11.5k train
# utterances, converges in about 75 iterations, close to scikit-learn's default cap of 100).
MAX_ITER = 1000
NAME = "TF-IDF + logistic regression"


@dataclass(frozen=True)
class IntentPrediction:
    """A prediction without slots: the scorer then scores the intent only."""

    intent: str


def classifier_text(example: Any) -> str:
    return " ".join(example.words)


def build_classifier() -> Any:
    """The untrained scikit-learn pipeline: text -> intent."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        # Every space-separated word is a token: the default pattern drops one-character words, which
        # are all the words of ja-JP and zh-*.
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"\S+"),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True),
    )
    return make_pipeline(features, LogisticRegression(C=C, max_iter=MAX_ITER))


def train_intent_classifier(examples: Sequence[Any], max_train: int | None, seed: int) -> tuple[Any, int]:
    """(fitted classifier, number of train utterances) from examples with .words and .intent; with
    max_train, on a seeded random sample of that many."""
    chosen = list(examples)
    if max_train and max_train < len(chosen):
        chosen = random.Random(seed).sample(chosen, max_train)
    if len({ex.intent for ex in chosen}) < 2:
        raise ValueError(f"{len(chosen)} train utterances with fewer than two intents: nothing to classify")
    classifier = build_classifier()
    classifier.fit([classifier_text(ex) for ex in chosen], [ex.intent for ex in chosen])
    return classifier, len(chosen)


def evaluate_baseline(cfg: Any, out_dir: str | Path, name: str = "baseline") -> dict[str, Any]:
    """Train per locale, score on the `massive` section's ids; write NAME.json and NAME.md into out_dir."""
    from joblib import Parallel, delayed

    from core.config import ConfigError, resolve_data_path
    from core.fsutil import atomic_write_text
    from evaluation.config import section_dict
    from evaluation.massive import crosslingual_summary, load_split, massive_markdown, result_json
    from massive.loader import load_massive
    from massive.scoring import score_records, utterance_records

    mcfg = cfg.massive
    if mcfg.split == "train":
        raise ConfigError("massive.split: the baseline is trained on the train partition; score dev or test")
    started = time.perf_counter()
    _, per_locale = load_split(mcfg.data, mcfg.locales, mcfg.split, mcfg.max_examples, mcfg.seed)
    golds: list[Any] = []
    preds: list[Any] = []
    num_train: dict[str, int] = {}
    if cfg.baseline.train_on == "sources":
        # The zero-shot reference: one classifier on the source locales' gold labels, for every locale.
        sources = list(cfg.crosslingual.source_locales)
        train = load_massive(str(resolve_data_path(mcfg.data)), locales=sources, partitions=("train",))
        one = train_intent_classifier([ex for loc in sources for ex in train.examples(locale=loc, partition="train")],
                                      cfg.baseline.max_train, mcfg.seed)
        fitted = [one] * len(per_locale)
    else:
        train = load_massive(str(resolve_data_path(mcfg.data)), locales=list(per_locale), partitions=("train",))
        # One classifier per locale, trained side by side (each fit is single-threaded).
        fitted = Parallel(n_jobs=min(len(per_locale), os.cpu_count() or 1))(
            delayed(train_intent_classifier)(train.examples(locale=loc, partition="train"), cfg.baseline.max_train,
                                             mcfg.seed)
            for loc in per_locale
        )
    for (loc, examples), (classifier, count) in zip(per_locale.items(), fitted):
        num_train[loc] = count
        golds += examples
        preds += [IntentPrediction(str(i)) for i in classifier.predict([classifier_text(ex) for ex in examples])]
    records = utterance_records(golds, preds)
    result = {
        "kind": "baseline",
        "model": NAME,
        "predictor": f"{NAME} (word 1-2 + char_wb 2-4 grams, C={C:g}), trained "
                     + ("per locale" if cfg.baseline.train_on == "each" else
                        f"on {', '.join(cfg.crosslingual.source_locales)} only"),
        "split": mcfg.split,
        **score_records(records, samples=cfg.bootstrap_samples, seed=mcfg.seed, confidence=cfg.confidence),
        "crosslingual": crosslingual_summary(
            dataclasses.replace(cfg, crosslingual=dataclasses.replace(
                cfg.crosslingual, setting="zero-shot" if cfg.baseline.train_on == "sources" else "supervised")),
            records, cfg.bootstrap_samples, mcfg.seed, cfg.confidence),
        "num_train": num_train,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "config": {**section_dict(cfg, "massive"), **section_dict(cfg, "baseline")},
        "records": records,
    }
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / f"{name}.json", result_json(result))
    train_sizes = ", ".join(f"{loc} {n}" for loc, n in num_train.items())
    atomic_write_text(out_dir / f"{name}.md", massive_markdown(result) + f"\nTrain utterances per locale: {train_sizes}.\n")
    return result


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baseline",
        help="classical reference: TF-IDF + logistic regression intent accuracy on the MASSIVE ids",
        description=f"Train a {NAME} intent classifier per locale on MASSIVE train and score it on the "
        "ids `evaluate massive` scores (the massive section: data, locales, split, max_examples, seed), "
        "with the same scorer and intervals. Writes NAME.json and NAME.md into --out.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default=None, help="preset name (launch/presets) or YAML path; its evaluate section is used")
    p.add_argument("--name", default="baseline", help="base name of the output files (default 'baseline')")
    p.add_argument("--locales", nargs="+", default=None, help="locales (default: massive.locales, empty = all)")
    p.add_argument("--split", choices=["dev", "test"], default=None, help="partition scored (default: massive.split = test)")
    p.add_argument("--max-examples", type=int, default=None, help="N test ids, as `evaluate massive` (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the ids, the train sample and the bootstrap (default 0)")
    p.add_argument("--max-train", type=int, default=None, help="train utterances per locale, a seeded sample (default: all)")
    p.add_argument("--train-on", choices=["each", "sources"], default=None,
                   help="each: a classifier per locale (supervised); sources: one on crosslingual.source_locales "
                   "for every locale (zero-shot; --source-locales sets them) (default: baseline.train_on = each)")
    p.add_argument("--source-locales", nargs="+", default=None, help="crosslingual.source_locales (default en-US)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the evaluate section, e.g. massive.data=DIR")
    p.set_defaults(func=run_baseline)


def run_baseline(args: argparse.Namespace) -> int:
    from evaluation.cli import resolve_config

    massive = {"locales": args.locales, "split": args.split, "max_examples": args.max_examples, "seed": args.seed}
    if args.locales and args.locales == ["all"]:
        massive["locales"] = []
    cfg = resolve_config(args, {"massive": massive, "baseline": {"max_train": args.max_train, "train_on": args.train_on},
                                "crosslingual": {"source_locales": args.source_locales}})
    result = evaluate_baseline(cfg, Path(args.out), args.name)
    low, high = result["intent_acc_ci"]
    print(
        f"{NAME} on MASSIVE {result['split']} ({len(result['per_locale'])} locales, {result['num_examples']} "
        f"utterances): intent acc {result['intent_acc']:.4f} [{low:.4f}, {high:.4f}]"
    )
    print(f"wrote {Path(args.out) / (args.name + '.json')}")
    return 0
