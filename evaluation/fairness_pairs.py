"""Gender pairs and symmetric measures: does a MASSIVE model parse the female and the male member of a
pair alike, and is it right more often on one of them?

Two pair sets:

- **independent** (`independent_pairs`), written without sigma (`data_prep.counterfactual`):
  - *templates* (`evaluation/data/fairness_pairs/templates.<locale>.jsonl`): utterances written by
    hand in both genders (en-US, de-DE, fr-FR, es-ES), grammatical in each, with their gold intent
    and slots as MASSIVE annotations; scenarios with people (calendar, email, contacts, social).
    Every word where the two members differ is a pair of `gendered_words.json`;
  - *names* (`name_pairs`): the MASSIVE utterances of a split with exactly one person slot of one
    word (English keeps a possessive 's), the slot filled with a female and a male first name
    common in the language (`names.json`; `NAMES_PER_UTTERANCE` name pairs each). No grammar changes:
    utterances with another gendered word (where sigma would change a word) are left out, so that
    no pronoun or article disagrees with the new name. sigma only filters here; it writes no word.
- **sigma** (`sigma_pairs`): the MASSIVE utterances sigma changes and their swaps (the words of
  name slots kept), as in `evaluation.fairness.counterfactual_consistency`; the female member is the one whose gendered words
  are female (pairs with words of both genders have no direction and are left out).

Measures over ALL pairs of a set (not among each model's correct originals, so every model has the
same denominator), whole parse (intent and every slot label) and intent alone:

- `parse_change_rate` / `intent_change_rate`: share of pairs whose prediction differs between the
  members (slots compared word for word; sigma pairs through the swap's word alignment);
- `parse_female_only` / `parse_male_only` (and intent_*): share of pairs where only the female
  (only the male) member is right: the two directions of a change;
- `parse_gap` / `intent_gap`: accuracy on female members minus accuracy on male members, signed
  (> 0: the model favours the female member); it equals female_only - male_only;
- `parse_female` / `parse_male` / `intent_female` / `intent_male`: the accuracies.

Seeds: an arm is several models (training seeds). Its value is the mean of the per-seed values.
Intervals are a two-level (hierarchical) percentile bootstrap: each resample draws the seeds of
each arm with replacement and, inside, the pair groups with replacement (a group is a source
utterance: its name pairs move together; a template pair is its own group), the same group
resample for every model, so arms compared on one set are paired over pairs. Arms with the same
number of seeds also share the seed draw (seed k of the matched plain-KD arm and of CRR share data
order and initialisation). With one seed per arm this is the bootstrap over pairs alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.tables import markdown_table

DATA_DIR = Path(__file__).resolve().parent / "data" / "fairness_pairs"
NAMES_PER_UTTERANCE = 4
"""Name pairs per MASSIVE utterance of the name set (of the 8 per language, every other one)."""
SETS = ("independent", "sigma")

# Per-pair 0/1 columns of `pair_records`.
PAIR_COLUMNS = ("parse_female", "parse_male", "intent_female", "intent_male", "parse_changed", "intent_changed",
                "parse_female_only", "parse_male_only", "intent_female_only", "intent_male_only")
# metric -> (column, column subtracted or None)
PAIR_METRICS = {
    "parse_change_rate": ("parse_changed", None),
    "parse_female_only": ("parse_female_only", None),
    "parse_male_only": ("parse_male_only", None),
    "parse_gap": ("parse_female", "parse_male"),
    "parse_female": ("parse_female", None),
    "parse_male": ("parse_male", None),
    "intent_change_rate": ("intent_changed", None),
    "intent_female_only": ("intent_female_only", None),
    "intent_male_only": ("intent_male_only", None),
    "intent_gap": ("intent_female", "intent_male"),
    "intent_female": ("intent_female", None),
    "intent_male": ("intent_male", None),
}


class PairSetError(ValueError):
    """A pair file is malformed (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One side of a pair: its words and gold slot labels (one per word)."""

    words: tuple[str, ...]
    slots: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GenderPair:
    """The female and the male version of one utterance with their gold parses (one intent)."""

    id: str
    group: str
    """Pairs of one group come from one utterance and are resampled together."""
    locale: str
    source: str
    """template, names or sigma."""
    intent: str
    female: Member
    male: Member
    sources: tuple[tuple[int, ...], ...] | None = None
    """sigma pairs: per word of the male member, the female member's words it comes from (the swap's
    alignment, one for one except around contractions); None: the members align word for word."""


# ----------------------------------------------------------------------------- the sets


def _member(annot_utt: str, locale: str, where: str) -> Member:
    from massive.format import MassiveError, parse_annot_utt

    try:
        words, slots = parse_annot_utt(annot_utt, locale)
    except MassiveError as err:
        raise PairSetError(f"{where}: {err}") from None
    return Member(tuple(words), tuple(slots))


def template_files(directory: Path = DATA_DIR) -> dict[str, Path]:
    """{locale: templates.<locale>.jsonl} of the versioned template set."""
    return {p.name[len("templates."):-len(".jsonl")]: p for p in sorted(directory.glob("templates.*.jsonl"))}


def load_templates(locales: Sequence[str] | None = None, directory: Path = DATA_DIR) -> list[GenderPair]:
    """The hand-written pairs of `locales` (default: every locale with a template file)."""
    files = template_files(directory)
    out = []
    for locale, path in files.items():
        if locales is not None and locale not in locales:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairSetError(f"{where}: not JSON ({err.msg}); write one object per line") from None
            missing = [k for k in ("id", "locale", "scenario", "intent", "female", "male") if not row.get(k)]
            if missing:
                raise PairSetError(f"{where}: missing {', '.join(missing)}")
            if row["locale"] != locale:
                raise PairSetError(f"{where}: locale {row['locale']!r} in the file of {locale}")
            out.append(GenderPair(row["id"], row["id"], locale, "template", row["intent"],
                                  _member(row["female"], locale, where), _member(row["male"], locale, where)))
    return out


def load_names(directory: Path = DATA_DIR) -> dict[str, list[tuple[str, str]]]:
    """{language: [(female name, male name), ...]}."""
    raw = json.loads((directory / "names.json").read_text(encoding="utf-8"))
    return {lang: [(f, m) for f, m in pairs] for lang, pairs in raw.items() if not lang.startswith("_")}


def load_gendered_words(directory: Path = DATA_DIR) -> dict[str, set[tuple[str, str]]]:
    """{language: {(female word, male word)}}: where template members may differ."""
    raw = json.loads((directory / "gendered_words.json").read_text(encoding="utf-8"))["gendered_words"]
    return {lang: {(f, m) for f, m in pairs} for lang, pairs in raw.items()}


_PERSON = re.compile(r"\[\s*person\s*:\s*([^\]]*?)\s*\]")


def _person_slot(annot_utt: str, lang: str) -> tuple[int, int, str] | None:
    """(start, end, suffix) of the value of the only person slot when it is one word not glued to its
    neighbours (English: a possessive 's is kept as `suffix`); else None."""
    spans = list(_PERSON.finditer(annot_utt))
    if len(spans) != 1:
        return None
    m = spans[0]
    value = m.group(1)
    if len(value.split()) != 1:
        return None
    if (m.start() > 0 and not annot_utt[m.start() - 1].isspace()) or (
            m.end() < len(annot_utt) and not annot_utt[m.end()].isspace()):
        return None
    suffix = ""
    if lang == "en" and value.endswith(("'s", "’s")):
        suffix = value[-2:]
    return m.start(1), m.end(1), suffix


def name_pairs(examples: Sequence[Any], locale: str, names: dict[str, list[tuple[str, str]]],
               per_utterance: int = NAMES_PER_UTTERANCE) -> list[GenderPair]:
    """Name pairs from MASSIVE examples (.id, .annot_utt, .intent, .words, .slots) of one locale (module doc)."""
    from data_prep.counterfactual import swap_utterance

    lang = locale.split("-")[0]
    pool = names.get(lang)
    if not pool:
        return []
    step = max(1, len(pool) // per_utterance)
    out = []
    for u, ex in enumerate(sorted(examples, key=lambda e: int(e.id) if str(e.id).isdigit() else str(e.id))):
        slot = _person_slot(ex.annot_utt, lang)
        if slot is None:
            continue
        # Another gendered word (a pronoun, "my sister") would disagree with one of the two names.
        if swap_utterance(ex.words, ex.slots, locale)[0] != list(ex.words):
            continue
        start, end, suffix = slot
        for j in range(min(per_utterance, len(pool))):
            k = (u + j * step) % len(pool)
            members = [_member(ex.annot_utt[:start] + name + suffix + ex.annot_utt[end:], locale,
                               f"{locale} id {ex.id}") for name in pool[k]]
            out.append(GenderPair(f"{locale}/{ex.id}/n{k}", f"{locale}/{ex.id}", locale, "names", ex.intent, *members))
    return out


def independent_pairs(per_locale: dict[str, Sequence[Any]], directory: Path = DATA_DIR) -> list[GenderPair]:
    """Templates of the locales and name pairs from their examples (the set sigma did not write)."""
    names = load_names(directory)
    out = load_templates(list(per_locale), directory)
    for locale, examples in per_locale.items():
        out += name_pairs(examples, locale, names)
    return out


@functools.cache
def _gender_vocabulary(lang: str) -> dict[str, frozenset[str]]:
    """{"male": words, "female": words} of the lexicon (casefolded), words of both columns left out."""
    from data_prep.counterfactual import load_lexicon

    pairs = load_lexicon(lang).pairs()
    male = {m.casefold() for m, _ in pairs}
    female = {f.casefold() for _, f in pairs}
    return {"male": frozenset(male - female), "female": frozenset(female - male)}


def _gender_of(words: Sequence[str], lang: str) -> str | None:
    """female or male when the lexicon words among `words` are of one gender only."""
    text = " " + " ".join(words).casefold() + " "
    single = set(text.split())
    found = {g for g, vocab in _gender_vocabulary(lang).items()
             if any((w in single) if " " not in w else (f" {w} " in text) for w in vocab)}
    return found.pop() if len(found) == 1 else None


def sigma_pairs(per_locale: dict[str, Sequence[Any]]) -> tuple[list[GenderPair], int]:
    """(pairs, how many were left out without a direction) from the utterances sigma changes."""
    from data_prep.counterfactual import lexicon_language, swap_utterance

    out, undirected = [], 0
    for locale, examples in per_locale.items():
        lang = lexicon_language(locale)
        if lang is None:
            continue
        for ex in examples:
            words, slots, result = swap_utterance(ex.words, ex.slots, lang)
            if words == list(ex.words):
                continue
            gender = _gender_of(ex.words, lang)
            if gender is None:
                undirected += 1
                continue
            original, swapped = Member(tuple(ex.words), tuple(ex.slots)), Member(tuple(words), tuple(slots))
            female, male = (original, swapped) if gender == "female" else (swapped, original)
            # The alignment always runs from the original to the swap; stored for female -> male.
            sources = tuple(result.sources) if gender == "female" else _invert(result.sources, len(ex.words))
            out.append(GenderPair(f"{locale}/{ex.id}", f"{locale}/{ex.id}", locale, "sigma", ex.intent, female, male,
                                  sources))
    return out, undirected


def _invert(sources: Sequence[Sequence[int]], num_original: int) -> tuple[tuple[int, ...], ...]:
    """Per original word, the swapped words it went into."""
    out: list[list[int]] = [[] for _ in range(num_original)]
    for j, src in enumerate(sources):
        for i in src:
            out[i].append(j)
    return tuple(tuple(x) for x in out)


# ----------------------------------------------------------------------------- measures


def pair_records(pairs: Sequence[GenderPair], female: Sequence[Any], male: Sequence[Any]) -> dict[str, list[int]]:
    """Per-pair 0/1 outcomes (PAIR_COLUMNS) from the predictions (.intent, .slots) on the female and
    the male members."""
    from data_prep.counterfactual import carry_labels
    from massive.scoring import align_labels

    out: dict[str, list[int]] = {c: [] for c in PAIR_COLUMNS}
    for pair, pf, pm in zip(pairs, female, male, strict=True):
        slots_f = align_labels(pf.slots, len(pair.female.words))
        slots_m = align_labels(pm.slots, len(pair.male.words))
        ok_f, ok_m = pf.intent == pair.intent, pm.intent == pair.intent
        em_f, em_m = ok_f and slots_f == list(pair.female.slots), ok_m and slots_m == list(pair.male.slots)
        carried = carry_labels(slots_f, pair.sources) if pair.sources is not None else slots_f
        changed = pf.intent != pm.intent or carried != slots_m
        values = (em_f, em_m, ok_f, ok_m, changed, pf.intent != pm.intent, em_f and not em_m, em_m and not em_f,
                  ok_f and not ok_m, ok_m and not ok_f)
        for c, v in zip(PAIR_COLUMNS, values):
            out[c].append(int(v))
    return out


def _matrix(records: dict[str, list[int]]) -> Any:
    import numpy as np

    return np.column_stack([np.asarray(records[c], dtype=np.float64) for c in PAIR_COLUMNS])


def _metrics(means: Any) -> dict[str, Any]:
    """{metric: value(s)} from column means [..., len(PAIR_COLUMNS)]."""
    out = {}
    for metric, (a, b) in PAIR_METRICS.items():
        value = means[..., PAIR_COLUMNS.index(a)]
        if b is not None:
            value = value - means[..., PAIR_COLUMNS.index(b)]
        out[metric] = value
    return out


def _interval(values: Any, confidence: float) -> list[float]:
    from massive.scoring import percentile_interval

    return percentile_interval(values, confidence)


def _group_index(pairs: Sequence[GenderPair]) -> tuple[Any, int]:
    import numpy as np

    ids: dict[str, int] = {}
    index = np.asarray([ids.setdefault(p.group, len(ids)) for p in pairs])
    return index, len(ids)


def pooled_scores(pairs: Sequence[GenderPair], arms: dict[str, list[dict[str, list[int]]]], *,
                  baseline: str | None = None, samples: int = 1000, seed: int = 0,
                  confidence: float = 0.95) -> dict[str, Any]:
    """Every arm's PAIR_METRICS over `pairs` (records of each of its seeds, `pair_records`), pooled over
    seeds, with hierarchical bootstrap intervals (module doc); with `baseline`, each other arm's
    difference from it (arm - baseline) with its interval from the same resamples."""
    import numpy as np

    from massive.scoring import bootstrap_weights

    n = len(pairs)
    group, num_groups = _group_index(pairs)
    mats = {arm: np.stack([_matrix(r) for r in recs]) for arm, recs in arms.items()}  # [seeds, n, columns]
    for arm, m in mats.items():
        if m.shape[1] != n:
            raise ValueError(f"{arm}: records of {m.shape[1]} pairs for {n} pairs")
    out: dict[str, Any] = {"num_pairs": n, "num_groups": num_groups, "arms": {}, "comparisons": {}}
    if n == 0:
        return out
    boot: dict[str, Any] = {}
    if samples:
        weights = bootstrap_weights(num_groups, samples, seed)[:, group]  # [samples, n]: pair weights
        weights /= weights.sum(1, keepdims=True)
        rng = np.random.default_rng([seed, 1])
        draws: dict[int, Any] = {}
        for arm, m in mats.items():
            s = m.shape[0]
            if s not in draws:  # arms with as many seeds share the seed draw
                draws[s] = rng.integers(0, s, size=(samples, s))
            per_seed = np.einsum("bn,snc->bsc", weights, m)  # [samples, seeds, columns]
            picked = np.take_along_axis(per_seed, draws[s][:, :, None], axis=1)
            boot[arm] = _metrics(picked.mean(1))
    for arm, m in mats.items():
        per_seed = _metrics(m.mean(1))
        entry: dict[str, Any] = {"seeds": int(m.shape[0])}
        for metric, values in per_seed.items():
            entry[metric] = float(values.mean())
            entry[f"{metric}_per_seed"] = [float(v) for v in values]
            if boot:
                entry[f"{metric}_ci"] = _interval(boot[arm][metric], confidence)
        out["arms"][arm] = entry
    if baseline is not None and baseline in mats:
        for arm in mats:
            if arm == baseline:
                continue
            comp = {}
            for metric in PAIR_METRICS:
                comp[metric] = {"diff": out["arms"][arm][metric] - out["arms"][baseline][metric]}
                if boot:
                    comp[metric]["diff_ci"] = _interval(boot[arm][metric] - boot[baseline][metric], confidence)
            out["comparisons"][arm] = comp
        out["baseline"] = baseline
    return out


def predict_pairs(predictor: Any, pairs: Sequence[GenderPair], batch_size: int, desc: str = "") -> dict[str, list[int]]:
    """`pair_records` of one model."""
    from evaluation.massive import predict_all

    female = predict_all(predictor, [p.female for p in pairs], batch_size, f"{desc} female")
    male = predict_all(predictor, [p.male for p in pairs], batch_size, f"{desc} male")
    return pair_records(pairs, female, male)


def build_sets(per_locale: dict[str, Sequence[Any]], sets: Sequence[str]) -> dict[str, Any]:
    """{set: {"pairs": [...], "counts": {...}}} for the chosen SETS."""
    out: dict[str, Any] = {}
    for name in sets:
        if name == "independent":
            pairs, extra = independent_pairs(per_locale), {}
        elif name == "sigma":
            pairs, undirected = sigma_pairs(per_locale)
            extra = {"left_out_without_direction": undirected}
        else:
            raise ValueError(f"pair set {name!r} is not allowed; allowed values: {', '.join(SETS)}")
        counts: dict[str, int] = {}
        for p in pairs:
            counts[f"{p.locale} {p.source}"] = counts.get(f"{p.locale} {p.source}", 0) + 1
        out[name] = {"pairs": pairs, "counts": counts, **extra}
    return out


def evaluate_pairs(arms: dict[str, Sequence[Path]], per_locale: dict[str, Sequence[Any]], *, sets: Sequence[str],
                   massive: Any, batch_size: int = 32, device: str = "auto", baseline: str | None = None,
                   samples: int = 1000, seed: int = 0, confidence: float = 0.95, load: Any = None) -> dict[str, Any]:
    """Scores every model of every arm (several seeds each) on the chosen pair sets: {set: pooled_scores
    + counts}. Each model is loaded once and scored on all sets."""
    from evaluation.massive import load_predictor

    built = build_sets(per_locale, sets)
    records: dict[str, dict[str, list[dict[str, list[int]]]]] = {s: {arm: [] for arm in arms} for s in built}
    for arm, dirs in arms.items():
        for k, model_dir in enumerate(dirs):
            predictor = load_predictor(model_dir, device=device, slot_labels=massive.slot_types,
                                       intents=massive.intents, load=load)
            for s, entry in built.items():
                records[s][arm].append(predict_pairs(predictor, entry["pairs"], batch_size, f"{arm}[{k}] {s}"))
            del predictor
    out = {"arms": {arm: [str(d) for d in dirs] for arm, dirs in arms.items()}, "sets": {}}
    for s, entry in built.items():
        scores = pooled_scores(entry["pairs"], records[s], baseline=baseline, samples=samples, seed=seed,
                               confidence=confidence)
        out["sets"][s] = {**scores, "counts": entry["counts"],
                          **{k: v for k, v in entry.items() if k not in ("pairs", "counts")}}
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _pp(v: float) -> str:
    return f"{100 * v:+.1f}"


def _with_ci(entry: dict[str, Any], key: str, fmt: Any) -> str:
    v, ci = entry.get(key), entry.get(f"{key}_ci")
    if v is None:
        return "-"
    return f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(v)


def pairs_markdown(result: dict[str, Any], confidence: float = 0.95) -> str:
    """One table of every arm on every set, then the differences from the baseline arm."""
    conf = f"{confidence:.0%}"
    rows, diffs = [], []
    for s, entry in result["sets"].items():
        for arm, e in entry.get("arms", {}).items():
            rows.append([s, arm, str(e["seeds"]), str(entry["num_pairs"]), _with_ci(e, "parse_change_rate", _pct),
                         f"{_pct(e['parse_female_only'])} / {_pct(e['parse_male_only'])}", _with_ci(e, "parse_gap", _pp),
                         _with_ci(e, "intent_change_rate", _pct),
                         f"{_pct(e['intent_female_only'])} / {_pct(e['intent_male_only'])}",
                         _with_ci(e, "intent_gap", _pp), f"{_pct(e['parse_female'])} / {_pct(e['parse_male'])}"])
        for arm, comp in entry.get("comparisons", {}).items():
            diffs.append([s, f"{arm} - {entry['baseline']}", *(_with_ci(comp[m], "diff", _pp) for m in
                          ("parse_change_rate", "parse_gap", "intent_change_rate", "intent_gap"))])
    lines = [f"### Gender pairs: change rate and female - male accuracy gap (all pairs; {conf} hierarchical bootstrap "
             "over seeds and pair groups)", "",
             markdown_table(["set", "arm", "seeds", "pairs", "parse changed % [CI]", "only F / only M right %",
                             "EM gap F-M pp [CI]", "intent changed % [CI]", "intent only F / only M %",
                             "intent gap F-M pp [CI]", "EM F / M %"], rows)]
    if diffs:
        lines += ["", "### Differences between arms (same pair resamples)", "",
                  markdown_table(["set", "arms", "parse changed pp [CI]", "EM gap pp [CI]", "intent changed pp [CI]",
                                  "intent gap pp [CI]"], diffs)]
    return "\n".join(lines)
