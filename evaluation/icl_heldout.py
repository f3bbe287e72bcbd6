"""In-context learning on held-out intents: does the model learn from its demonstrations?

`evaluate icl --protocol heldout` (`icl.protocol: heldout`). The queries are the dev (default;
`--split test` is read once, after selection on dev) utterances of the held-out intents
(`icl.heldout_scenarios`, default `data_prep.icl.HELDOUT_SCENARIOS`: 11 intents of 4 scenarios, the
same ones in-context training never shows), a seeded sample of ids shared by every locale. Each query
gets an N-way candidate set (`icl.way`, default 5: chance 1/N), its own intent and N - 1 other held-out
intents, drawn from (seed, query id), the same in every locale. For each k in `icl.heldout_shots`
(default 0, 1, 2, 5) the prompt holds k demonstrations per candidate label (train utterances, the
same ids in every language: MASSIVE ids are parallel), shuffled in an order fixed per query, the k=1
set a prefix of the k=5 set; the model ranks the N candidate label texts by their token log-prob
given the prompt (`evaluation.icl.score_candidates`, mean or sum by `icl.normalize`).

With `icl.calibration: contextual` (Zhao et al. 2021; `evaluation.icl.contextual_calibration`) every
prompt is also scored with the same demonstrations and a content-free query (`icl.content_free`), and
the candidates are ranked by log p(label | prompt) - log p_cf(label): a label that the demonstrations
favour whatever the query says (a frequent label word copied from the prompt) is discounted by that
preference. The uncalibrated accuracy is reported beside it (`accuracy_uncalibrated`).

Language pairs: same-language (demonstrations and query in locale L, for every L) and cross-language
(demonstrations in en-US, query in L, for every L != en-US).

Reference on exactly the same prompts: TF-IDF nearest neighbour (scikit-learn `TfidfVectorizer`,
char_wb 2-4-grams fitted on the prompt's demonstrations and query; the label of the demonstration
most cosine-similar to the query). At k = 0 there is no demonstration: the reference is undefined
(null).

Intervals (`massive.scoring`: `bootstrap_weights`, `percentile_interval`) resample query ids, the same
resample for every pair, k and system, so every difference is paired: model vs chance (the
interval of accuracy - 1/N), model at k vs the same model at k = 0, model vs the TF-IDF reference.

Output `DIR/NAME.json`:
  {"kind": "icl_heldout", "model", "split", "heldout_scenarios", "heldout_intents", "way", "chance",
   "shots", "normalize", "clm_prompt", "calibration", "content_free", "num_queries",
   "pairs": {"<demo locale>-><query locale>": {"kind": "same"|"cross", "n": int,
       "accuracy": {"<k>": float}, "accuracy_ci": {"<k>": [lo, hi]},
       "vs_chance_ci": {"<k>": [lo, hi]}, "vs_k0": {"<k>": float}, "vs_k0_ci": {"<k>": [lo, hi]},
       "tfidf": {"<k>": float|null}, "tfidf_ci": ..., "vs_tfidf": {"<k>": float|null}, "vs_tfidf_ci": ...,
       "accuracy_uncalibrated": {"<k>": float}}},   # the last with calibration: contextual only
   "mean": {"same": {...}, "cross": {...}}   # the same keys, unweighted mean over pairs of a kind
   "example_prompt": str, "ci_method": str, "elapsed_s": float, "config": {...}}
plus `DIR/NAME.md` (tables) and `DIR/NAME.png` (k-shot curves per pair, chance and TF-IDF lines).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.icl import format_prompt, heldout_intents
from massive.format import label_text


def candidate_set(intents: Sequence[str], gold: str, way: int, seed: int, query_id: str) -> list[str]:
    """The query's N-way candidates: gold plus way - 1 other intents, in a seeded order."""
    rng = random.Random(f"cands:{seed}:{query_id}")
    others = [i for i in intents if i != gold]
    chosen = [gold] + rng.sample(others, min(way - 1, len(others)))
    rng.shuffle(chosen)
    return chosen


def demo_plan(
    candidates: Sequence[str], pool_ids: Mapping[str, Sequence[str]], max_k: int, seed: int, query_id: str
) -> list[tuple[int, str, str]]:
    """[(rank, intent, train id)] in prompt order: up to max_k ids per candidate intent (rank < k
    gives the k-shot prompt, keeping this order), from sorted `pool_ids` {intent: [id]}."""
    rng = random.Random(f"demos:{seed}:{query_id}")
    plan: list[tuple[int, str, str]] = []
    for intent in candidates:
        ids = list(pool_ids[intent])
        picked = rng.sample(ids, min(max_k, len(ids)))
        plan += [(rank, intent, i) for rank, i in enumerate(picked)]
    rng.shuffle(plan)
    return plan


def tfidf_nearest(demos: Sequence[tuple[str, str]], query: str) -> str | None:
    """Label of the demonstration most TF-IDF-cosine-similar to the query (char_wb 2-4-grams); None without demos."""
    if not demos:
        return None
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    texts = [u for u, _ in demos] + [query]
    matrix = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), lowercase=True).fit_transform(texts)
    sims = cosine_similarity(matrix[-1], matrix[:-1])[0]
    return demos[int(np.argmax(sims))][1]


def paired_summary(correct: np.ndarray, weights: np.ndarray, confidence: float) -> tuple[float, list[float]]:
    """Mean of per-query values [n] and its bootstrap interval under resample weights [S, n]."""
    from massive.scoring import percentile_interval

    boot = weights @ correct / weights.sum(1)
    return float(correct.mean()), percentile_interval(boot, confidence)


def evaluate_icl_heldout(cfg, model_dir: str | Path, out_dir: str | Path, name: str = "icl") -> dict[str, Any]:
    """Held-out-intent k-shot accuracy per language pair; writes NAME.json, NAME.md, NAME.png."""
    from tqdm.auto import tqdm

    from core.config import resolve_data_path
    from evaluation.config import section_dict
    from evaluation.icl import _available_locales, contextual_calibration, load_rank_scorer
    from massive.loader import load_massive
    from massive.scoring import bootstrap_weights, ci_method, sample_shared_ids

    icfg = cfg.icl
    started = time.perf_counter()
    split = icfg.heldout_split
    source = resolve_data_path(icfg.data)
    locales = _available_locales(source, icfg.locales)
    if not locales:
        raise FileNotFoundError(f"{source}: none of the locales {', '.join(icfg.locales)} is present")
    load_locales = sorted(set(locales) | {"en-US"})
    data = load_massive(str(source), locales=load_locales, partitions=("train", split))
    scenarios = list(icfg.heldout_scenarios)
    intents = heldout_intents(data.examples(locale="en-US", partition="train"), scenarios)
    if len(intents) < icfg.way:
        raise ValueError(f"{source}: the held-out scenarios {scenarios} have {len(intents)} intents, fewer than icl.way={icfg.way}")
    shots = sorted(set(icfg.heldout_shots))
    max_k = max(shots)

    # Train utterances by (locale, id); demonstration ids must exist in every locale that shows them.
    train = {loc: {ex.id: ex for ex in data.examples(locale=loc, partition="train") if ex.intent in intents}
             for loc in load_locales}
    common = set.intersection(*(set(t) for t in train.values()))
    pool_ids: dict[str, list[str]] = {i: [] for i in intents}
    for ex_id in sorted(common):
        pool_ids[train["en-US"][ex_id].intent].append(ex_id)
    queries_by_loc = {loc: [ex for ex in data.examples(locale=loc, partition=split) if ex.intent in intents]
                      for loc in locales}
    query_ids = sample_shared_ids(queries_by_loc, icfg.max_examples, icfg.seed)
    queries = {loc: {ex.id: ex for ex in queries_by_loc[loc]} for loc in locales}
    gold_of = {i: queries[locales[0]][i].intent for i in query_ids}
    cands = {i: candidate_set(intents, gold_of[i], icfg.way, icfg.seed, i) for i in query_ids}
    plans = {i: demo_plan(cands[i], pool_ids, max_k, icfg.seed, i) for i in query_ids}

    scorer = load_rank_scorer(model_dir, cfg, icfg, intents)
    col = {i: c for c, i in enumerate(intents)}

    pairs = [(loc, loc, "same") for loc in locales] + [("en-US", loc, "cross") for loc in locales if loc != "en-US"]
    calibrate = icfg.calibration == "contextual"
    # The headline ranking (calibrated when calibration is on) and, with calibration, the uncalibrated one.
    rankings = ("calibrated", "uncalibrated") if calibrate else ("uncalibrated",)
    # Content-free prompt -> label scores, over every pair: a cross pair's (en-US demonstrations) are
    # the en-US pair's, and at k = 0 every query shares one.
    content_free_cache: dict[str, Any] = {}
    correct: dict[str, dict[int, np.ndarray]] = {}
    # The ranking without calibration, reported beside the calibrated one (calibration: contextual).
    uncalibrated: dict[str, dict[int, np.ndarray]] = {}
    ref_correct: dict[str, dict[int, np.ndarray]] = {}
    example_prompt = ""
    for demo_loc, query_loc, _kind in pairs:
        key = f"{demo_loc}->{query_loc}"
        correct[key], uncalibrated[key], ref_correct[key] = {}, {}, {}
        bar = tqdm(total=len(query_ids) * len(shots), desc=f"icl heldout {key}", unit="prompt", file=sys.stderr)
        for k in shots:
            texts, all_demos, refs = [], [], []
            for qid in query_ids:
                q = queries[query_loc][qid]
                demos = [(train[demo_loc][d].utt, label_text(intent)) for rank, intent, d in plans[qid] if rank < k]
                texts.append(format_prompt(q.utt, demos, icfg.prompt_template, icfg.demo_template))
                all_demos.append(demos)
                refs.append(tfidf_nearest(demos, q.utt))
            if not example_prompt and k == max_k:
                example_prompt = texts[0]
            hits = {r: np.zeros(len(query_ids)) for r in rankings}
            for start in range(0, len(texts), icfg.batch_size):
                chunk = texts[start : start + icfg.batch_size]
                scores = scorer.score(chunk, icfg)
                ranked = {"uncalibrated": scores}
                if calibrate:
                    # The same demonstrations with a content-free query: the label prior they induce,
                    # [N content-free strings, P, C]. With one string, a query's candidates are ranked by
                    # score - content-free score, whatever the labels outside its candidate set score.
                    cf_texts = [format_prompt(cf, demos, icfg.prompt_template, icfg.demo_template)
                                for cf in icfg.content_free for demos in all_demos[start : start + len(chunk)]]
                    cf = scorer.content_free_scores(cf_texts, content_free_cache, icfg)
                    ranked["calibrated"] = contextual_calibration(scores, cf.view(len(icfg.content_free), len(chunk), -1))
                for r, out in hits.items():
                    for j, row in enumerate(ranked[r].tolist()):
                        qid = query_ids[start + j]
                        best = max(cands[qid], key=lambda i: row[col[i]])
                        out[start + j] = float(best == gold_of[qid])
                bar.update(len(chunk))
            correct[key][k] = hits[rankings[0]]
            if calibrate:
                uncalibrated[key][k] = hits["uncalibrated"]
            ref_correct[key][k] = np.array([float(r == label_text(gold_of[q])) for r, q in zip(refs, query_ids)])
            if refs and refs[0] is None:
                ref_correct[key][k] = None  # type: ignore[assignment]
        bar.close()

    weights = bootstrap_weights(len(query_ids), cfg.bootstrap_samples, icfg.seed)
    chance = 1.0 / icfg.way

    def summarize(model_ok: Mapping[int, np.ndarray], ref_ok: Mapping[int, np.ndarray | None]) -> dict[str, Any]:
        out: dict[str, Any] = {key: {} for key in ("accuracy", "accuracy_ci", "vs_chance_ci", "vs_k0", "vs_k0_ci",
                                                   "tfidf", "tfidf_ci", "vs_tfidf", "vs_tfidf_ci")}
        for k in shots:
            s = str(k)
            acc, ci = paired_summary(model_ok[k], weights, cfg.confidence)
            out["accuracy"][s], out["accuracy_ci"][s] = acc, ci
            out["vs_chance_ci"][s] = [ci[0] - chance, ci[1] - chance]
            base = model_ok[min(shots)]
            out["vs_k0"][s], out["vs_k0_ci"][s] = paired_summary(model_ok[k] - base, weights, cfg.confidence)
            ref = ref_ok[k]
            if ref is None:
                out["tfidf"][s] = out["tfidf_ci"][s] = out["vs_tfidf"][s] = out["vs_tfidf_ci"][s] = None
            else:
                out["tfidf"][s], out["tfidf_ci"][s] = paired_summary(ref, weights, cfg.confidence)
                out["vs_tfidf"][s], out["vs_tfidf_ci"][s] = paired_summary(model_ok[k] - ref, weights, cfg.confidence)
        return out

    result_pairs: dict[str, Any] = {}
    for demo_loc, query_loc, kind in pairs:
        key = f"{demo_loc}->{query_loc}"
        result_pairs[key] = {"kind": kind, "n": len(query_ids), **summarize(correct[key], ref_correct[key])}
        if calibrate:
            result_pairs[key]["accuracy_uncalibrated"] = {str(k): float(uncalibrated[key][k].mean()) for k in shots}
    mean: dict[str, Any] = {}
    for kind in ("same", "cross"):
        keys = [f"{d}->{q}" for d, q, kd in pairs if kd == kind]
        if not keys:
            continue
        # The mean over pairs per query: its interval comes from the same resampled ids.
        model_mean = {k: np.mean([correct[key][k] for key in keys], axis=0) for k in shots}
        ref_mean = {k: None if ref_correct[keys[0]][k] is None else np.mean([ref_correct[key][k] for key in keys], axis=0)
                    for k in shots}
        mean[kind] = {"pairs": keys, **summarize(model_mean, ref_mean)}
        if calibrate:
            mean[kind]["accuracy_uncalibrated"] = {str(k): float(np.mean([uncalibrated[key][k] for key in keys]))
                                                   for k in shots}

    result = {
        "kind": "icl_heldout",
        "model": str(model_dir),
        "split": split,
        "heldout_scenarios": scenarios,
        "heldout_intents": intents,
        "way": icfg.way,
        "chance": chance,
        "shots": shots,
        "normalize": icfg.normalize,
        "clm_prompt": icfg.clm_prompt,
        "calibration": icfg.calibration,
        "content_free": list(icfg.content_free) if calibrate else None,
        "num_queries": len(query_ids),
        "pairs": result_pairs,
        "mean": mean,
        "example_prompt": example_prompt,
        "ci_method": ci_method(cfg.bootstrap_samples, cfg.confidence) + "; differences paired on the same resamples",
        "elapsed_s": round(time.perf_counter() - started, 3),
        "config": section_dict(cfg, "icl"),
    }
    write_outputs(result, Path(out_dir), name)
    return result


def _fmt(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci is not None else f"{value:.3f}"


def heldout_markdown(result: dict[str, Any]) -> str:
    from core.tables import markdown_table

    shots = [str(k) for k in result["shots"]]
    k0 = shots[0]
    # Older results lack the key: they were uncalibrated.
    calibrated = result.get("calibration", "none") != "none"
    header = ["pair", "kind"] + [f"acc k={k}" for k in shots] + [f"uncal. k={k}" for k in shots if calibrated] + \
             [f"tf-idf k={k}" for k in shots if k != k0] + [f"k={shots[-1]} - k={k0}", f"k={shots[-1]} - tf-idf"]
    rows = []
    items = list(result["pairs"].items()) + [(f"**mean {kind}**", s | {"kind": kind}) for kind, s in result["mean"].items()]
    last = shots[-1]
    for key, s in items:
        rows.append([key, s["kind"], *[f"{s['accuracy'][k]:.3f}" for k in shots],
                     *[f"{s['accuracy_uncalibrated'][k]:.3f}" for k in shots if calibrated],
                     *[_fmt(s["tfidf"][k], None) for k in shots if k != k0],
                     _fmt(s["vs_k0"][last], s["vs_k0_ci"][last]), _fmt(s["vs_tfidf"][last], s["vs_tfidf_ci"][last])])
    calibration = (f" Ranked with contextual calibration (content-free queries {result['content_free']}); "
                   "`uncal.`: the same scores without it." if calibrated else "")
    intents = ", ".join(result["heldout_intents"])
    return (
        f"# In-context learning on held-out intents: {result['model']}\n\n"
        f"{result['split']} queries of the held-out scenarios {', '.join(result['heldout_scenarios'])} "
        f"({len(result['heldout_intents'])} intents: {intents}); {result['num_queries']} query ids shared by every "
        f"locale; {result['way']}-way candidate sets (chance {result['chance']:.3f}); k demonstrations per candidate "
        f"label. Differences are paired (bootstrap over query ids), shown as value [interval].{calibration}\n\n"
        + markdown_table(header, rows)
    )


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    from evaluation.plots import _pyplot, _save

    plt = _pyplot()
    kinds = [kind for kind in ("same", "cross") if kind in result["mean"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    shots = result["shots"]
    for ax, kind in zip(axes[0], kinds):
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for c, (key, s) in enumerate((key, s) for key, s in result["pairs"].items() if s["kind"] == kind):
            color = colors[c % len(colors)]
            ax.plot(shots, [s["accuracy"][str(k)] for k in shots], marker="o", color=color, label=f"{key} model")
            ref = [(k, s["tfidf"][str(k)]) for k in shots if s["tfidf"][str(k)] is not None]
            ax.plot([k for k, _ in ref], [v for _, v in ref], linestyle="--", color=color, alpha=0.6, label=f"{key} TF-IDF NN")
        ax.axhline(result["chance"], color="grey", linestyle=":", label="chance")
        ax.set_title(f"{'same language' if kind == 'same' else 'across languages (en-US demos)'}")
        ax.set_xlabel("demonstrations per candidate label (k)")
        ax.set_ylabel("accuracy")
        ax.set_xticks(shots)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
    fig.suptitle(f"held-out intents, {result['way']}-way, {result['split']}: {Path(result['model']).name}")
    return _save(fig, path)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from core.fsutil import atomic_write_json, atomic_write_text

    return [
        atomic_write_json(out_dir / f"{name}.json", result),
        atomic_write_text(out_dir / f"{name}.md", heldout_markdown(result)),
        plot_curves(result, out_dir / f"{name}.png"),
    ]


# ----------------------------------------------------------------------------- `evaluate icl` (both protocols)


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
    p.add_argument("--shots", nargs="+", type=int, default=None, help="numbers of demonstrations (default 0 1 5; with --protocol heldout, per candidate label, default 0 1 2 5)")
    p.add_argument("--demo-source", choices=["same", "en-US"], default=None, help="demos from the same locale or en-US")
    p.add_argument(
        "--max-examples", type=int, default=None, help="query ids, a seeded sample shared by every locale (default 200; 0 = all)"
    )
    p.add_argument("--no-clm", action="store_true", help="plain prompt without the [CLM] prefix")
    p.add_argument(
        "--calibration",
        choices=["none", "contextual"],
        default=None,
        help="contextual: rank labels against a content-free query's label distribution (Zhao et al. 2021); "
        "the uncalibrated accuracy is reported beside it (default: icl.calibration)",
    )
    p.add_argument(
        "--protocol",
        choices=["all_intents", "heldout"],
        default=None,
        help="all_intents: rank all intents (the original harness); heldout: N-way held-out intents, same- and "
        "cross-language pairs, TF-IDF reference, paired intervals (docs/icl.md) (default: icl.protocol)",
    )
    p.add_argument("--split", choices=["dev", "test"], default=None,
                   help="partition of the queries (default: icl.split, or icl.heldout_split = dev with --protocol heldout)")
    p.add_argument("--way", type=int, default=None, help="--protocol heldout: candidate labels per query (default 5)")
    p.set_defaults(func=run_icl)


def run_icl(args: argparse.Namespace) -> int:
    from evaluation.cli import run_common

    flags = {
        "locales": args.locales,
        "shots": args.shots,
        "demo_source": args.demo_source,
        "max_examples": args.max_examples,
        "clm_prompt": False if args.no_clm else None,
        "calibration": args.calibration,
        "protocol": args.protocol,
        "way": args.way,
    }
    heldout = args.protocol == "heldout"
    if args.split is not None:
        flags["heldout_split" if heldout else "split"] = args.split
    if heldout and args.shots is not None:
        flags["heldout_shots"], flags["shots"] = args.shots, None

    def evaluate(cfg: Any, model_dir: Any, out_dir: Any, name: str) -> dict[str, Any]:
        if cfg.icl.protocol == "heldout":
            return evaluate_icl_heldout(cfg, model_dir, out_dir, name)
        from evaluation.icl import evaluate_icl

        return evaluate_icl(cfg, model_dir, out_dir, name)

    def summary(result: dict[str, Any]) -> str:
        if result["kind"] == "icl_heldout":
            parts = []
            for kind, s in result["mean"].items():
                accs = "  ".join(f"k={k}: {acc:.3f}" for k, acc in s["accuracy"].items())
                parts.append(f"{kind}-language mean: {accs}")
            return f"held-out-intent ICL ({result['way']}-way, chance {result['chance']:.3f}): " + "; ".join(parts)
        accs = "  ".join(f"k={k}: {acc:.4f}" for k, acc in result["accuracy"].items())
        if "accuracy_uncalibrated" in result:
            uncal = "  ".join(f"k={k}: {acc:.4f}" for k, acc in result["accuracy_uncalibrated"].items())
            accs = f"calibrated {accs}; uncalibrated {uncal}"
        return f"ICL intent accuracy (mean over {len(result['per_locale'])} locales; chance {result['chance']:.4f}): {accs}"

    return run_common(args, "icl", flags, evaluate, summary)
