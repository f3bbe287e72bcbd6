"""Cross-lingual transfer over every MASSIVE locale: one table, one paired comparison per model, and
the five weakest locales with a measured cause each.

Input: `evaluate massive --locales all` results (NAME.json, with per-utterance records) of several
models scored on the same ids, under one setting, e.g.

    polyteacher evaluate massive --model runs/xl/teacher-ft --locales all --setting zero-shot \\
        --max-examples 500 --out runs/xl/eval/xl --name teacher
    (the same for scratch-ft, onnx/int8, student-nlu ...)
    .venv/bin/python benchmarks/crosslingual.py --reference scratch \\
        --results teacher=runs/xl/eval/xl/teacher.json scratch=runs/xl/eval/xl/scratch.json \\
                  student_int8=runs/xl/eval/xl/student_int8.json --tokenizer runs/xl/tokenizer

Prints:
- per locale (source / target) the EM of every model, the means over the target locales with their
  intervals, the parameter counts and the MASSIVE paper's zero-shot and supervised lines;
- each model minus `--reference` on the mean over the target locales, paired on the shared ids
  (the same resampled ids for both), EM / intent accuracy / slot F1;
- the five weakest target locales of the first model with tokenizer fertility (tokens per word on
  the scored test utterances, with the source locales' for scale), the size of the locale's generic
  corpora (corpora/languages.tsv: Tatoeba sentences + NTREX lines) and its script.

Writes the same as JSON (benchmarks/results/crosslingual.json, or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)

METRICS = ("em", "intent_acc", "slot_f1")


def script_of(words: list[str]) -> str:
    """The most frequent Unicode script name (first word of the character's name) among letters."""
    counts: Counter[str] = Counter()
    for word in words:
        for ch in word:
            if ch.isalpha():
                counts[unicodedata.name(ch, "UNKNOWN").split(" ")[0]] += 1
    return counts.most_common(1)[0][0] if counts else "UNKNOWN"


def corpus_sizes(data_root: Path) -> dict[str, int]:
    """{locale: Tatoeba sentences + NTREX lines} from corpora/languages.tsv (empty when absent)."""
    path = data_root / "corpora" / "languages.tsv"
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t")))
        # "-": the source has nothing for the locale.
        out[row["locale"]] = sum(int(v) for k in ("tatoeba_sentences", "ntrex_lines")
                                 if (v := (row.get(k) or "").strip()).isdigit())
    return out


def weakest_locales(result: dict[str, Any], targets: list[str], sources: list[str], tokenizer_dir: str | None,
                    data: str, data_root: Path, n: int = 5) -> list[dict[str, Any]]:
    """The n target locales with the lowest EM, each with fertility, corpus size and script."""
    from massive.loader import load_massive

    per_locale = result["per_locale"]
    weakest = sorted(targets, key=lambda loc: (per_locale[loc]["em"], loc))[:n]
    wanted = sorted(set(weakest) | set(sources))
    massive = load_massive(data, locales=wanted, partitions=("test",), progress=False)
    tokenizer = None
    if tokenizer_dir:
        from data_prep.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    corpora = corpus_sizes(data_root)

    def fertility(locale: str) -> float | None:
        ids = set(result["records"][locale]["id"])
        words = [list(ex.words) for ex in massive.examples(locale=locale, partition="test") if ex.id in ids]
        if tokenizer is None or not words:
            return None
        tokens = sum(len(tokenizer(" ".join(w), add_special_tokens=False)["input_ids"]) for w in words)
        return tokens / sum(len(w) for w in words)

    rows = []
    for loc in weakest:
        words = [w for ex in massive.examples(locale=loc, partition="test")[:200] for w in ex.words]
        rows.append({"locale": loc, **{m: per_locale[loc][m] for m in METRICS}, "fertility": fertility(loc),
                     "corpus_lines": corpora.get(loc), "script": script_of(words)})
    source_fertility = [f for f in (fertility(loc) for loc in sources) if f is not None]
    for row in rows:
        row["source_fertility"] = sum(source_fertility) / len(source_fertility) if source_fertility else None
    return rows


def paired_target_mean(a: dict[str, Any], b: dict[str, Any], targets: list[str], samples: int, seed: int) -> dict[str, Any]:
    """B - A on the mean over the target locales, paired on the shared ids."""
    from massive.scoring import paired_difference

    paired = paired_difference({loc: a["records"][loc] for loc in targets}, {loc: b["records"][loc] for loc in targets},
                               samples=samples, seed=seed)
    return {m: {k: paired["metrics"][m][k] for k in ("a", "b", "diff", "diff_ci")} for m in METRICS
            if m in paired["metrics"]}


def run(results: dict[str, Path], reference: str | None, tokenizer: str | None, data: str, data_root: Path,
        samples: int, seed: int) -> dict[str, Any]:
    loaded = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in results.items()}
    first = next(iter(loaded.values()))
    xl = first.get("crosslingual") or {}
    targets, sources = list(xl.get("target_locales", [])), list(xl.get("source_locales", []))
    for name, result in loaded.items():
        if set(result["per_locale"]) != set(first["per_locale"]):
            raise SystemExit(f"{results[name]}: scored on other locales than {next(iter(results.values()))}; "
                             "score every model with the same --locales, --max-examples and --seed")
    out: dict[str, Any] = {
        "setting": xl.get("setting"), "source_locales": sources, "target_locales": targets,
        "models": {name: {"parameters": r.get("parameters"), "target_mean": (r.get("crosslingual") or {}).get("target_mean"),
                          "per_locale": {loc: {m: s[m] for m in METRICS} for loc, s in r["per_locale"].items()}}
                   for name, r in loaded.items()},
        "references": xl.get("references", []),
    }
    if reference:
        if reference not in loaded:
            raise SystemExit(f"--reference {reference}: not one of --results ({', '.join(loaded)})")
        out["paired_vs_reference"] = {name: paired_target_mean(loaded[reference], r, targets, samples, seed)
                                      for name, r in loaded.items() if name != reference}
    out["weakest"] = weakest_locales(first, targets, sources, tokenizer, data, data_root) if targets else []
    return out


def render(out: dict[str, Any]) -> str:
    from core.tables import markdown_table

    models = list(out["models"])
    pct = lambda v: None if v is None else round(100 * v, 1)  # noqa: E731
    lines = [f"# MASSIVE cross-lingual transfer, setting: {out['setting']} (sources: {', '.join(out['source_locales'])}; "
             f"{len(out['target_locales'])} target locales)\n"]
    first = out["models"][models[0]]["per_locale"]
    role = {loc: "target" if loc in out["target_locales"] else "source" if loc in out["source_locales"] else "other"
            for loc in first}
    rows = [[loc, role[loc], *(pct(out["models"][m]["per_locale"][loc]["em"]) for m in models)]
            for loc in sorted(first, key=lambda loc: (role[loc] != "source", loc))]
    for metric, title in (("em", "EM"), ("intent_acc", "intent acc"), ("slot_f1", "slot F1")):
        cells = []
        for m in models:
            tm = out["models"][m]["target_mean"]
            cells.append(None if not tm else f"{100 * tm[metric]:.1f} [{100 * tm[metric + '_ci'][0]:.1f}, "
                                             f"{100 * tm[metric + '_ci'][1]:.1f}]")
        rows.append([f"**target mean, {title}**", "target", *cells])
    rows.append(["parameters (M)", "", *(None if not out["models"][m]["parameters"] else
                                          round(out["models"][m]["parameters"] / 1e6, 2) for m in models)])
    lines.append(markdown_table(["locale", "role", *(f"{m} EM %" for m in models)], rows))
    refs = [[r["model"], r["setting"], pct(r["em"]), pct(r["intent_acc"]), pct(r["slot_f1"])] for r in out["references"]]
    lines.append("\n## Reference lines (MASSIVE paper, means over its locales)\n")
    lines.append(markdown_table(["model", "setting", "EM %", "intent %", "slot F1 %"], refs))
    if out.get("paired_vs_reference"):
        lines.append("\n## Each model minus the reference on the target mean (paired, 95% interval)\n")
        rows = [[name, metric, pct(d["a"]), pct(d["b"]), pct(d["diff"]), f"[{100 * d['diff_ci'][0]:+.1f}, "
                 f"{100 * d['diff_ci'][1]:+.1f}]", "yes" if d["diff_ci"][0] > 0 or d["diff_ci"][1] < 0 else "no"]
                for name, diffs in out["paired_vs_reference"].items() for metric, d in diffs.items()]
        lines.append(markdown_table(["model", "metric", "reference %", "model %", "diff", "CI", "excludes 0"], rows))
    if out["weakest"]:
        lines.append(f"\n## Five weakest target locales of {models[0]}\n")
        rows = [[w["locale"], pct(w["em"]), None if w["fertility"] is None else round(w["fertility"], 2),
                 None if w["source_fertility"] is None else round(w["source_fertility"], 2), w["corpus_lines"],
                 w["script"]] for w in out["weakest"]]
        lines.append(markdown_table(["locale", "EM %", "tokens / word", "sources' tokens / word",
                                     "generic corpus lines", "script"], rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="+", required=True, metavar="NAME=JSON",
                   help="`evaluate massive --locales all` results, the first is the model the weakest locales are of")
    p.add_argument("--reference", default=None, help="NAME of the reference every other model is paired against (scratch)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for the fertility column")
    p.add_argument("--data", default=None, help="MASSIVE directory the results were scored on (default: their config)")
    p.add_argument("--data-root", default=None, help="data root holding corpora/languages.tsv (default: the configured one)")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples of the paired intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "crosslingual.json"))
    args = p.parse_args(argv)

    from core.config import data_root, resolve_data_path
    from core.fsutil import atomic_write_json, atomic_write_text

    results = {}
    for item in args.results:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"--results: {item!r} is not NAME=JSON of an existing file")
        results[name] = Path(path)
    first = json.loads(next(iter(results.values())).read_text(encoding="utf-8"))
    data = args.data or str(resolve_data_path(first["config"]["massive"]["data"]))
    out = run(results, args.reference, args.tokenizer, data, Path(args.data_root) if args.data_root else data_root(),
              args.samples, args.seed)
    text = render(out)
    print(text)
    atomic_write_json(Path(args.out), out)
    atomic_write_text(Path(args.out).with_suffix(".md"), text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
