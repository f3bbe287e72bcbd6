"""1-shot FLORES-200 translation (en->xx and xx->en) by prompting, scored with chrF++ and spBLEU.

Data: `<translation.data>/<locale>.txt.gz`, FLORES-200 dev, 997 sentences line-aligned across
languages, named by MASSIVE locale. The first `num_demo_lines` lines are the demonstration pool; the
evaluated sentences are the next `max_examples` lines, so a demonstration is never an evaluated
sentence. Each evaluated line i gets one demonstration pair, line j drawn from the pool with a seed
derived from (seed, i); the same j serves both directions. The prompt is
`demo_template` + `prompt_template` with English language names (`[CLM]`-prefixed when
`clm_prompt`), decoded greedily (one beam) for at most min(max_new_tokens, 2 x source tokens + 16)
tokens; the hypothesis is the first line of the decoded text.

Metrics (sacrebleu, corpus level): chrF++ = CHRF(word_order=2); spBLEU = BLEU(tokenize="flores200")
(or "flores101", `spbleu_tokenize`). sacrebleu downloads that SentencePiece model on first use; with
no network we use it only when it is already in sacrebleu's cache, otherwise spBLEU is null and
`spbleu_note` says why. `bleu` is a supplementary BLEU that needs no download (tokenize "char" for
ja, zh, th, my, km; "13a" otherwise); it is not spBLEU and is labelled with its tokenizer.

Output of `evaluate translation --out DIR [--name NAME]` (NAME defaults to "translation"):
- `DIR/NAME.json`:
  {"kind": "translation", "model": str, "clm_prompt": bool, "num_demo_lines": int,
   "spbleu_tokenize": str, "spbleu_available": bool, "spbleu_note": str | null,
   "chrf++": {"en-xx": float, "xx-en": float},       # unweighted mean over languages
   "spbleu": {"en-xx": float | null, "xx-en": float | null},
   "per_language": {locale: {"en-xx": {"chrf++": float, "spbleu": float | null, "bleu": float,
                                        "bleu_tokenize": str, "n": int,
                                        "samples": [{"line", "src", "ref", "hyp"}] (first 3)},
                             "xx-en": {...}}},
   "example_prompt": str, "elapsed_s": float, "config": {...}}
- `DIR/NAME.md`: chrF++ / spBLEU / BLEU per language and direction; `DIR/NAME.png`: chrF++ per
  language, one bar per direction.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.config import NO_SPACE_LOCALES

PIVOT = "en-US"
FLORES_DEV_LINES = 997

# English names used in prompts ("German: ..."), for every MASSIVE locale.
LANGUAGE_NAMES = {
    "af-ZA": "Afrikaans", "am-ET": "Amharic", "ar-SA": "Arabic", "az-AZ": "Azerbaijani", "bn-BD": "Bengali",
    "ca-ES": "Catalan", "cy-GB": "Welsh", "da-DK": "Danish", "de-DE": "German", "el-GR": "Greek",
    "en-US": "English", "es-ES": "Spanish", "fa-IR": "Persian", "fi-FI": "Finnish", "fr-FR": "French",
    "he-IL": "Hebrew", "hi-IN": "Hindi", "hu-HU": "Hungarian", "hy-AM": "Armenian", "id-ID": "Indonesian",
    "is-IS": "Icelandic", "it-IT": "Italian", "ja-JP": "Japanese", "jv-ID": "Javanese", "ka-GE": "Georgian",
    "km-KH": "Khmer", "kn-IN": "Kannada", "ko-KR": "Korean", "lv-LV": "Latvian", "ml-IN": "Malayalam",
    "mn-MN": "Mongolian", "ms-MY": "Malay", "my-MM": "Burmese", "nb-NO": "Norwegian", "nl-NL": "Dutch",
    "pl-PL": "Polish", "pt-PT": "Portuguese", "ro-RO": "Romanian", "ru-RU": "Russian", "sl-SL": "Slovenian",
    "sq-AL": "Albanian", "sv-SE": "Swedish", "sw-KE": "Swahili", "ta-IN": "Tamil", "te-IN": "Telugu",
    "th-TH": "Thai", "tl-PH": "Tagalog", "tr-TR": "Turkish", "ur-PK": "Urdu", "vi-VN": "Vietnamese",
    "zh-CN": "Chinese", "zh-TW": "Chinese",
}  # fmt: skip



def read_flores(directory: str | os.PathLike, locale: str) -> list[str]:
    """The dev sentences of one locale, in order (exactly FLORES_DEV_LINES non-empty lines)."""
    path = Path(directory) / f"{locale}.txt.gz"
    if not path.is_file():
        available = sorted(p.name.split(".")[0] for p in Path(directory).glob("*.txt.gz"))
        raise FileNotFoundError(f"{path}: no FLORES-200 dev file for {locale}; available: {', '.join(available)}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}:{number}: empty line (FLORES-200 dev lines are line-aligned sentences)")
    if len(lines) != FLORES_DEV_LINES:
        raise ValueError(f"{path}: {len(lines)} lines, expected {FLORES_DEV_LINES} line-aligned FLORES-200 dev sentences")
    return lines


def language_name(locale: str) -> str:
    if locale not in LANGUAGE_NAMES:
        raise KeyError(f"no language name for locale {locale}; known: {', '.join(sorted(LANGUAGE_NAMES))}")
    return LANGUAGE_NAMES[locale]


def demo_line(line: int, num_demo_lines: int, seed: int) -> int:
    """The demonstration line (in [0, num_demo_lines)) for evaluated line `line`, deterministic."""
    return random.Random(f"{seed}:{line}").randrange(num_demo_lines)


def build_translation_prompt(
    src: str, src_lang: str, tgt_lang: str, demo_src: str, demo_tgt: str, prompt_template: str, demo_template: str
) -> str:
    demo = demo_template.format(src_lang=src_lang, tgt_lang=tgt_lang, src=demo_src, tgt=demo_tgt)
    return prompt_template.format(demo=demo, src_lang=src_lang, tgt_lang=tgt_lang, src=src)


def spbleu_model_path(tokenize: str) -> Path:
    """Where sacrebleu caches the SentencePiece model of `tokenize` ("flores200" or "flores101")."""
    from sacrebleu.tokenizers.tokenizer_spm import SPM_MODELS
    from sacrebleu.utils import SACREBLEU_DIR

    return Path(SACREBLEU_DIR) / "models" / os.path.basename(SPM_MODELS[tokenize]["url"])


def spbleu_status(tokenize: str) -> tuple[bool, str | None]:
    """(available, note): spBLEU is computed only from an already cached SentencePiece model."""
    path = spbleu_model_path(tokenize)
    if path.is_file():
        return True, None
    return False, (
        f"spBLEU not computed: sacrebleu's {tokenize} SentencePiece model is not cached at {path} and "
        "cannot be downloaded here; put the model file there (or set $SACREBLEU) to get spBLEU"
    )


def corpus_metrics(hyps: Sequence[str], refs: Sequence[str], tgt_locale: str, spbleu_tokenize: str | None) -> dict[str, Any]:
    """chrF++, spBLEU (None when `spbleu_tokenize` is None) and the supplementary BLEU of one direction."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu_tokenize = "char" if tgt_locale in NO_SPACE_LOCALES else "13a"
    out: dict[str, Any] = {
        "chrf++": CHRF(word_order=2).corpus_score(list(hyps), [list(refs)]).score,
        "spbleu": None,
        "bleu": BLEU(tokenize=bleu_tokenize).corpus_score(list(hyps), [list(refs)]).score,
        "bleu_tokenize": bleu_tokenize,
        "n": len(hyps),
    }
    if spbleu_tokenize is not None:
        out["spbleu"] = BLEU(tokenize=spbleu_tokenize).corpus_score(list(hyps), [list(refs)]).score
    return out


def generate(
    model, tokenizer, prompts: Sequence[str], *, clm_id: int | None, max_prompt_tokens: int, max_new_tokens: int, batch_size: int, desc: str
) -> list[str]:
    """Greedy continuations of `prompts` (first line of each decoded text), in order."""
    import torch
    from tqdm.auto import tqdm

    from core.bigmodel import input_device
    from evaluation.icl import encode_prompt
    from evaluation.massive import pad_right

    pad_id = tokenizer.pad_token_id
    encoded = [encode_prompt(tokenizer, p, clm_id, max_prompt_tokens) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", file=sys.stderr):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = pad_right([encoded[i] for i in idx], pad_id)
        with torch.inference_mode():
            generated = model.generate(
                input_ids=input_ids.to(input_device(model)),
                attention_mask=attention_mask.to(input_device(model)),
                max_new_tokens=max_new_tokens,
                num_beams=1,
                do_sample=False,
            )
        for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            outputs[i] = text.strip().split("\n", 1)[0].strip()
    return outputs


def evaluate_translation(cfg, model_dir: str | Path, out_dir: str | Path, name: str = "translation") -> dict[str, Any]:
    """1-shot translation per language and direction; writes NAME.json, NAME.md, NAME.png."""
    from core.config import resolve_data_path
    from data_prep.tokenizer import special_ids
    from evaluation.config import section_dict
    from student import load_text_to_text

    tcfg = cfg.translation
    started = time.perf_counter()
    source = resolve_data_path(tcfg.data)
    locales = []
    for loc in tcfg.locales:
        if loc == PIVOT:
            continue
        if (source / f"{loc}.txt.gz").is_file():
            locales.append(loc)
        else:
            warnings.warn(f"{source}: no FLORES-200 dev file for {loc}; skipping it", stacklevel=2)
    if not locales:
        raise FileNotFoundError(f"{source}: none of the locales {', '.join(tcfg.locales)} has a FLORES-200 dev file")
    if tcfg.num_demo_lines >= FLORES_DEV_LINES:
        from core.config import ConfigError

        raise ConfigError(f"translation.num_demo_lines={tcfg.num_demo_lines} leaves no sentence to evaluate (dev has {FLORES_DEV_LINES})")
    english = read_flores(source, PIVOT)
    eval_lines = list(range(tcfg.num_demo_lines, FLORES_DEV_LINES))[: tcfg.max_examples or None]

    spbleu_ok, spbleu_note = spbleu_status(tcfg.spbleu_tokenize)
    model, tokenizer = load_text_to_text(model_dir, cfg.device, cfg.dtype, cfg.load)
    clm_id = special_ids(tokenizer).clm if tcfg.clm_prompt else None

    per_language: dict[str, Any] = {}
    example_prompt = ""
    for loc in locales:
        other = read_flores(source, loc)
        per_language[loc] = {}
        for direction in tcfg.directions:
            src_loc, tgt_loc = (PIVOT, loc) if direction == "en-xx" else (loc, PIVOT)
            src_text, tgt_text = (english, other) if direction == "en-xx" else (other, english)
            prompts = []
            for i in eval_lines:
                j = demo_line(i, tcfg.num_demo_lines, tcfg.seed)
                prompts.append(
                    build_translation_prompt(
                        src_text[i], language_name(src_loc), language_name(tgt_loc), src_text[j], tgt_text[j],
                        tcfg.prompt_template, tcfg.demo_template,
                    )
                )  # fmt: skip
            example_prompt = example_prompt or prompts[0]
            longest_source = max(len(tokenizer(src_text[i])["input_ids"]) for i in eval_lines)
            hyps = generate(
                model,
                tokenizer,
                prompts,
                clm_id=clm_id,
                max_prompt_tokens=tcfg.max_prompt_tokens,
                max_new_tokens=min(tcfg.max_new_tokens, 2 * longest_source + 16),
                batch_size=tcfg.batch_size,
                desc=f"translate {src_loc}->{tgt_loc}",
            )
            refs = [tgt_text[i] for i in eval_lines]
            metrics = corpus_metrics(hyps, refs, tgt_loc, tcfg.spbleu_tokenize if spbleu_ok else None)
            metrics["samples"] = [
                {"line": i + 1, "src": src_text[i], "ref": tgt_text[i], "hyp": h} for i, h in list(zip(eval_lines, hyps))[:3]
            ]
            per_language[loc][direction] = metrics

    def mean_over(metric: str, direction: str) -> float | None:
        values = [d[direction][metric] for d in per_language.values() if direction in d]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)

    result = {
        "kind": "translation",
        "model": str(model_dir),
        "clm_prompt": tcfg.clm_prompt,
        "num_demo_lines": tcfg.num_demo_lines,
        "spbleu_tokenize": tcfg.spbleu_tokenize,
        "spbleu_available": spbleu_ok,
        "spbleu_note": spbleu_note,
        "chrf++": {d: mean_over("chrf++", d) for d in tcfg.directions},
        "spbleu": {d: mean_over("spbleu", d) for d in tcfg.directions},
        "per_language": per_language,
        "example_prompt": example_prompt,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "config": section_dict(cfg, "translation"),
    }
    write_translation_outputs(result, Path(out_dir), name)
    return result


def translation_markdown(result: dict[str, Any]) -> str:
    from core.tables import markdown_table

    rows = []
    for loc, directions in sorted(result["per_language"].items()):
        for direction, m in directions.items():
            pair = f"en-US->{loc}" if direction == "en-xx" else f"{loc}->en-US"
            rows.append([pair, m["n"], m["chrf++"], m["spbleu"], m["bleu"], m["bleu_tokenize"]])
    for direction, value in result["chrf++"].items():
        rows.append([f"**mean {direction}**", "", value, result["spbleu"][direction], "", ""])
    note = f"\n{result['spbleu_note']}\n" if result["spbleu_note"] else ""
    title = (
        f"# 1-shot FLORES-200 dev translation: {result['model']}\n\n"
        f"Greedy decoding; [CLM] prompt: {result['clm_prompt']}; demos from the first "
        f"{result['num_demo_lines']} dev lines. BLEU (last columns) is a supplementary score, not spBLEU.\n{note}\n"
    )
    return title + markdown_table(["direction", "n", "chrF++", "spBLEU", "BLEU", "BLEU tokenize"], rows, floatfmt=".2f")


def write_translation_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from core.fsutil import atomic_write_json, atomic_write_text
    from evaluation.plots import grouped_bar_chart

    groups = {loc: {d: m["chrf++"] for d, m in directions.items()} for loc, directions in result["per_language"].items()}
    return [
        atomic_write_json(out_dir / f"{name}.json", result),
        atomic_write_text(out_dir / f"{name}.md", translation_markdown(result)),
        grouped_bar_chart(
            groups,
            out_dir / f"{name}.png",
            title=f"1-shot FLORES-200 chrF++: {Path(result['model']).name}",
            ylabel="chrF++",
            series_order=list(result["chrf++"]),
        ),
    ]


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    from evaluation.cli import add_common_arguments

    p = sub.add_parser(
        "translation",
        help="1-shot FLORES-200 translation en->xx and xx->en (chrF++, spBLEU)",
        description="Prompt the model with one demonstration pair and a FLORES-200 dev sentence, decode "
        "greedily, score chrF++ and spBLEU (spBLEU only when sacrebleu's SentencePiece model is "
        "cached). Writes NAME.json, NAME.md and NAME.png into --out.",
    )
    add_common_arguments(p, default_name="translation")
    p.add_argument("--locales", nargs="+", default=None, help="languages paired with en-US (default: translation.locales)")
    p.add_argument("--directions", nargs="+", choices=["en-xx", "xx-en"], default=None, help="directions (default both)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluated sentences per direction (default 100)")
    p.add_argument("--batch-size", type=int, default=None, help="sentences per generate call (default 8)")
    p.add_argument("--no-clm", action="store_true", help="plain prompt without the [CLM] prefix")
    p.set_defaults(func=run_translation)


def run_translation(args: argparse.Namespace) -> int:
    from evaluation.cli import run_common

    flags = {
        "locales": args.locales,
        "directions": args.directions,
        "max_examples": args.max_examples,
        "batch_size": args.batch_size,
        "clm_prompt": False if args.no_clm else None,
    }

    def summary(result: dict[str, Any]) -> str:
        chrf = "  ".join(f"{d}: {v:.2f}" for d, v in result["chrf++"].items())
        lines = [f"1-shot FLORES-200 chrF++ (mean over {len(result['per_language'])} languages): {chrf}"]
        if result["spbleu_note"]:
            lines.append(result["spbleu_note"])
        return "\n".join(lines)

    return run_common(args, "translation", flags, evaluate_translation, summary)
