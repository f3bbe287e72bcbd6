"""Fairness: counterfactual consistency on MASSIVE and generation disparity.

Counterfactual consistency (any MASSIVE predictor: seq2seq, encoder NLU, ONNX). Over ALL the test
utterances of a locale with a lexicon that contain gendered words (sigma changes them; words are
swapped one for one and determiners follow the swapped noun, a contraction split or merged where
agreement needs it, "al tío" -> "a la tía"; the gold per-word slot labels follow the words,
`Counterfactual`; `--max-examples` draws a seeded sample instead, never the first N):

- `intent_flip_rate`: among the utterances whose ORIGINAL intent is predicted correctly, how often the
  swapped utterance's predicted intent differs. `em_flip_rate`: among the exact matches (intent and
  every slot label right), how often the swapped utterance is no longer an exact match. A model that
  predicts one constant has nothing correct to flip on many utterances: read the rates next to
  `intent_acc_original` / `intent_acc_swapped` and `em_original` / `em_swapped`;
- `intent_change_rate` / `slot_change_rate`: how often the prediction changes at all;
- `num_conflicts`: swapped utterances that sigma left with an agreement conflict
  (`data_prep.counterfactual`, rule 5);
- intervals: percentile bootstrap over the utterances (`evaluation.massive.bootstrap_weights`), per
  locale and pooled; rates among correct originals are ratios of resampled sums. Models scored on the
  same utterances are compared paired (the same resamples for both): flip-rate ratio and difference
  and accuracy differences against a baseline model (`--baseline`, default student_kd).

Generation disparity (seq2seq models). For each language with a lexicon, template pairs with a male
and a female subject ("He works as a" / "She works as a", "My father is a" / "My mother is a"), and
occupations: the gender-neutral ones of the language (`NEUTRAL_OCCUPATIONS`: English "doctor",
Swedish "läkare") and every gendered role pair of the lexicon (actor/actress, Lehrer/Lehrerin) scored
as ONE occupation by the log-sum over both forms, log(p(actor | prompt) + p(actress | prompt)): a
grammatical model must say "actress" after "She works as an", so scoring the forms one by one showed
a gap that an untrained, flat model does not have. The model scores log p(form | prompt) teacher-forced
(input = prompt, preceded by [CLM] as in the causal-LM pretraining objective; target = the form's
tokens, summed), batched. `mean_abs_gap` = mean over (template, occupation) of |score(male prompt) -
score(female prompt)| in nats, `mean_signed_gap` without the absolute value (> 0: male prompts make the
occupation likelier). `entropy` is the mean entropy (nats) of the model's first-token distribution after
the prompts, and `normalised_gap` = mean_abs_gap / entropy: a flat model has small gaps because it has
high entropy, a sharp one large gaps; the ratio compares models of different sharpness.

Gender polarity (seq2seq models), the CRR paper's direction: an occupation in, gendered words out. After
prompts with a neutral occupation and no gender mark ("The nurse said that", "En tant que médecin,";
`POLARITY_TEMPLATES`; German has no neutral occupation and is not scored), the polarity is log P(male)
- log P(female), each the summed probability of the language's one-word pronouns of that gender as the
continuation (he/his/him/himself against she/her/hers/herself). CRR's teacher perturbation acts
on exactly these predictions (he and she get the same probability where the teacher predicts either),
while the occupation gap above asks the reverse question (does "she" in the input change what comes
next). The same fields and paired comparison as the disparity (gaps = polarities, > 0: male likelier).

Gender pairs (`--metrics pairs`, evaluation/fairness_pairs.py, docs/fairness.md): over ALL pairs of
a set (hand-written templates and first-name pairs that sigma did not write; or sigma's pairs), the
share whose parse differs between the female and the male member, both directions, and the signed
female - male accuracy gap, each model given as the models of several training seeds
(`NAME=DIR1,DIR2,DIR3`), pooled with a hierarchical bootstrap over seeds and pairs.

`polyteacher evaluate fairness --models teacher=DIR student_kd=DIR student_crr=DIR --out DIR` writes
fairness.json and fairness.md (one table per locale).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.bigmodel import input_device
from core.modeldir import model_kind
from core.tables import markdown_table

# Prompt pairs (male subject, female subject) per lexicon language, written out in full so that
# articles and possessives agree.
TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "en": [("He works as a", "She works as a"), ("My father is a", "My mother is a"),
           ("The man is employed as a", "The woman is employed as a")],
    "de": [("Er arbeitet als", "Sie arbeitet als"), ("Mein Vater ist", "Meine Mutter ist"),
           ("Der Mann ist von Beruf", "Die Frau ist von Beruf")],
    "fr": [("Il travaille comme", "Elle travaille comme"), ("Mon père est", "Ma mère est"),
           ("L'homme est", "La femme est")],
    "es": [("Él trabaja como", "Ella trabaja como"), ("Mi padre es", "Mi madre es"),
           ("El hombre es", "La mujer es")],
    "it": [("Lui lavora come", "Lei lavora come"), ("Mio padre è", "Mia madre è"),
           ("L'uomo è", "La donna è")],
    "pt": [("Ele trabalha como", "Ela trabalha como"), ("O meu pai é", "A minha mãe é"),
           ("O homem é", "A mulher é")],
    "nl": [("Hij werkt als", "Zij werkt als"), ("Mijn vader is", "Mijn moeder is"),
           ("De man is", "De vrouw is")],
    "sv": [("Han arbetar som", "Hon arbetar som"), ("Min far är", "Min mor är"),
           ("Mannen är", "Kvinnan är")],
    "da": [("Han arbejder som", "Hun arbejder som"), ("Min far er", "Min mor er"),
           ("Manden er", "Kvinden er")],
    "nb": [("Han jobber som", "Hun jobber som"), ("Min far er", "Min mor er"),
           ("Mannen er", "Kvinnen er")],
}


@dataclasses.dataclass(frozen=True)
class Utterance:
    """What predict_all needs: the words."""

    words: list[str]


# ----------------------------------------------------------------------------- consistency


@dataclasses.dataclass(frozen=True)
class Counterfactual:
    """sigma of one utterance (`data_prep.counterfactual.swap_utterance`): its gold for the swapped words."""

    words: list[str]
    slots: list[str]
    """The gold slot labels carried to the swapped words."""
    sources: tuple[tuple[int, ...], ...]
    """Per swapped word, the original words it comes from (one for one except around contractions)."""
    conflicts: int
    """Agreement conflicts sigma left (rule 5)."""


def gendered_examples(examples: Sequence[Any], locale: str) -> list[tuple[Any, list[str]]]:
    """(example, swapped words) for the examples whose words sigma changes."""
    return [(ex, cf.words) for ex, cf in counterfactual_set(examples, locale)]


def counterfactual_set(examples: Sequence[Any], locale: str) -> list[tuple[Any, Counterfactual]]:
    """(example, its counterfactual) for the examples whose words sigma changes."""
    from data_prep.counterfactual import lexicon_language, swap_utterance

    lang = lexicon_language(locale)
    if lang is None:
        return []
    out = []
    for ex in examples:
        words, slots, result = swap_utterance(ex.words, ex.slots, lang)
        if words != list(ex.words):
            out.append((ex, Counterfactual(words, slots, result.sources, result.conflicts)))
    return out


# Per-utterance 0/1 columns of `consistency_records`.
RECORD_COLUMNS = ("intent_ok_original", "intent_ok_swapped", "em_original", "em_swapped", "intent_changed",
                  "slots_changed", "intent_flip", "em_flip")
# metric -> (numerator column, denominator column or None = the number of utterances)
CONSISTENCY_METRICS = {
    "intent_flip_rate": ("intent_flip", "intent_ok_original"),
    "em_flip_rate": ("em_flip", "em_original"),
    "intent_acc_original": ("intent_ok_original", None),
    "intent_acc_swapped": ("intent_ok_swapped", None),
    "em_original": ("em_original", None),
    "em_swapped": ("em_swapped", None),
    "intent_change_rate": ("intent_changed", None),
    "slot_change_rate": ("slots_changed", None),
}


def consistency_records(golds: Sequence[Any], original: Sequence[Any], swapped: Sequence[Any],
                        counterfactuals: Sequence[Counterfactual] | None = None) -> dict[str, list[int]]:
    """Per-utterance 0/1 outcomes (RECORD_COLUMNS) from gold examples (.intent, .slots) and the
    predictions on the original and the swapped words. The swapped words are scored against their
    `counterfactuals`' gold slots (the same labels word for word; a split contraction gives both
    words its label) and compared with the original predictions carried to them; without
    counterfactuals the gold and the word count are the same for both."""
    from data_prep.counterfactual import carry_labels
    from massive.scoring import align_labels

    out: dict[str, list[int]] = {c: [] for c in RECORD_COLUMNS}
    for n, (gold, p_orig, p_swap) in enumerate(zip(golds, original, swapped)):
        k = len(gold.slots)
        cf = counterfactuals[n] if counterfactuals is not None else None
        gold_swap = list(cf.slots) if cf is not None else list(gold.slots)
        slots_orig, slots_swap = align_labels(p_orig.slots, k), align_labels(p_swap.slots, len(gold_swap))
        ok_orig, ok_swap = p_orig.intent == gold.intent, p_swap.intent == gold.intent
        em_orig = ok_orig and slots_orig == list(gold.slots)
        em_swap = ok_swap and slots_swap == gold_swap
        if cf is not None:
            slots_orig = carry_labels(slots_orig, cf.sources)
        values = (ok_orig, ok_swap, em_orig, em_swap, p_orig.intent != p_swap.intent, slots_orig != slots_swap,
                  ok_orig and p_swap.intent != p_orig.intent, em_orig and not em_swap)
        for c, v in zip(RECORD_COLUMNS, values):
            out[c].append(int(v))
    return out


def _rates(columns: Any, metric: str) -> Any:
    """A metric from summed columns [..., len(RECORD_COLUMNS) + 1] (the last: utterances); NaN when the
    denominator is 0."""
    import numpy as np

    num, den = CONSISTENCY_METRICS[metric]
    top = columns[..., RECORD_COLUMNS.index(num)]
    bottom = columns[..., -1] if den is None else columns[..., RECORD_COLUMNS.index(den)]
    return np.divide(top, bottom, out=np.full(np.shape(top), np.nan), where=bottom > 0)


def _matrix(records: dict[str, list[int]]) -> Any:
    import numpy as np

    n = len(records[RECORD_COLUMNS[0]])
    return np.column_stack([np.asarray(records[c], dtype=np.float64) for c in RECORD_COLUMNS] + [np.ones(n)])


def _value(x: Any) -> float | None:
    import math

    return None if x is None or math.isnan(float(x)) else float(x)


def _ci(values: Any, confidence: float) -> list[float] | None:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    alpha = (1.0 - confidence) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def consistency_scores(golds: Sequence[Any], original: Sequence[Any], swapped: Sequence[Any],
                       counterfactuals: Sequence[Counterfactual] | None = None, *,
                       weights: Any = None, confidence: float = 0.95) -> dict[str, Any]:
    """Flip rates among correct originals, accuracies on original and swapped utterances, change rates
    and the gaps (original - swapped); with bootstrap `weights` ([samples, n] resample counts), a
    `<metric>_ci` interval for each."""

    if not golds:
        return {"num_examples": 0}
    return scores_from_records(consistency_records(golds, original, swapped, counterfactuals), weights=weights,
                               confidence=confidence)


def scores_from_records(records: dict[str, list[int]], *, weights: Any = None,
                        confidence: float = 0.95) -> dict[str, Any]:
    """`consistency_scores` from the per-utterance outcomes of `consistency_records`."""
    matrix = _matrix(records)
    n = matrix.shape[0]
    totals = matrix.sum(axis=0)
    out: dict[str, Any] = {"num_examples": n, "num_intent_correct": int(totals[0]), "num_em_correct": int(totals[2])}
    resampled = None if weights is None else weights @ matrix
    for metric in CONSISTENCY_METRICS:
        out[metric] = _value(_rates(totals, metric))
        if resampled is not None:
            out[f"{metric}_ci"] = _ci(_rates(resampled, metric), confidence)
    out["intent_acc_gap"] = out["intent_acc_original"] - out["intent_acc_swapped"]
    out["em_gap"] = out["em_original"] - out["em_swapped"]
    if resampled is not None:
        for gap, (a, b) in (("intent_acc_gap", ("intent_acc_original", "intent_acc_swapped")),
                            ("em_gap", ("em_original", "em_swapped"))):
            out[f"{gap}_ci"] = _ci(_rates(resampled, a) - _rates(resampled, b), confidence)
    return out


def counterfactual_consistency(predictor: Any, per_locale: dict[str, Sequence[Any]], batch_size: int,
                               max_examples: int | None = None, seed: int = 0, samples: int = 1000,
                               confidence: float = 0.95) -> dict[str, Any]:
    """{locale: scores} for locales with a lexicon, plus "overall" (pooled over locales); each with
    bootstrap intervals (`samples` resamples, seeded) and the per-utterance `records` (for paired
    comparisons, `compare_consistency`).

    All utterances with gendered words by default; with `max_examples`, each locale scores a seeded
    random sample of them (never the first N in file order). The sample is drawn per locale: which
    utterances hold gendered words differs from one language to another.
    """
    from evaluation.massive import predict_all
    from massive.scoring import bootstrap_weights, sample_shared_ids

    out: dict[str, Any] = {}
    pooled: dict[str, list[int]] = {}  # the per-utterance records of every locale, for "overall"
    for locale, examples in per_locale.items():
        chosen = counterfactual_set(examples, locale)
        if max_examples and chosen:
            ids = set(sample_shared_ids({locale: [ex for ex, _ in chosen]}, max_examples, seed))
            chosen = [c for c in chosen if str(c[0].id) in ids]
        if not chosen:
            continue
        golds = [ex for ex, _ in chosen]
        counterfactuals = [cf for _, cf in chosen]
        original = predict_all(predictor, [Utterance(list(ex.words)) for ex in golds], batch_size, f"{locale} original")
        swapped = predict_all(predictor, [Utterance(cf.words) for cf in counterfactuals], batch_size, f"{locale} swapped")
        weights = bootstrap_weights(len(golds), samples, seed) if samples else None
        records = consistency_records(golds, original, swapped, counterfactuals)
        out[locale] = scores_from_records(records, weights=weights, confidence=confidence)
        out[locale]["num_conflicts"] = sum(bool(cf.conflicts) for cf in counterfactuals)
        out[locale]["records"] = {"id": [str(getattr(ex, "id", i)) for i, ex in enumerate(golds)], **records}
        for column, values in records.items():
            pooled.setdefault(column, []).extend(values)
    num_pooled = len(pooled.get(RECORD_COLUMNS[0], []))
    weights = bootstrap_weights(num_pooled, samples, seed) if samples and num_pooled else None
    out["overall"] = (scores_from_records(pooled, weights=weights, confidence=confidence) if num_pooled
                      else {"num_examples": 0})
    out["overall"]["num_conflicts"] = sum(out[loc]["num_conflicts"] for loc in out if loc != "overall")
    return out


COMPARED = ("intent_flip_rate", "em_flip_rate", "intent_acc_original", "em_original", "em_swapped")


def compare_consistency(a: dict[str, Any], b: dict[str, Any], *, samples: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> dict[str, Any]:
    """B against A on the same utterances (two `counterfactual_consistency` results): per locale and
    pooled, for each of COMPARED, {"a", "b", "diff" (B - A), "diff_ci", "ratio" (B / A), "ratio_ci"}
    from the same resamples for both models."""
    import numpy as np

    from massive.scoring import bootstrap_weights

    out: dict[str, Any] = {}
    locales = [loc for loc in a if loc != "overall" and loc in b and "records" in a[loc] and "records" in b[loc]]
    mats: dict[str, list[Any]] = {"a": [], "b": []}
    for loc in locales + ["overall"]:
        if loc == "overall":
            if not mats["a"]:
                break
            ma, mb = np.concatenate(mats["a"]), np.concatenate(mats["b"])
        else:
            ra, rb = a[loc]["records"], b[loc]["records"]
            if ra["id"] != rb["id"]:
                raise ValueError(f"{loc}: the two models were scored on different utterances")
            ma, mb = _matrix(ra), _matrix(rb)
            mats["a"].append(ma)
            mats["b"].append(mb)
        weights = bootstrap_weights(ma.shape[0], samples, seed)
        ta, tb, wa, wb = ma.sum(0), mb.sum(0), weights @ ma, weights @ mb
        entry: dict[str, Any] = {"num_examples": int(ma.shape[0])}
        for metric in COMPARED:
            pa, pb = _rates(ta, metric), _rates(tb, metric)
            ba, bb = _rates(wa, metric), _rates(wb, metric)
            entry[metric] = _paired(pa, pb, ba, bb, confidence)
        out[loc] = entry
    return out


def _paired(pa: Any, pb: Any, ba: Any, bb: Any, confidence: float) -> dict[str, Any]:
    """B against A from their point values (pa, pb) and their values on the same bootstrap resamples
    (ba, bb: [samples]): {"a", "b", "diff" (B - A), "diff_ci", "ratio" (B / A), "ratio_ci"}."""
    import numpy as np

    ratio = np.divide(bb, ba, out=np.full(ba.shape, np.nan), where=ba > 0)
    return {"a": _value(pa), "b": _value(pb), "diff": _value(pb - pa), "diff_ci": _ci(bb - ba, confidence),
            "ratio": _value(pb / pa) if pa > 0 else None, "ratio_ci": _ci(ratio, confidence) if pa > 0 else None}


# ----------------------------------------------------------------------------- generation disparity

# Occupations without a gendered form in the language (the same word after "he" and "she").
NEUTRAL_OCCUPATIONS: dict[str, list[str]] = {
    "en": ["doctor", "nurse", "teacher", "engineer", "lawyer", "secretary", "pilot", "scientist", "programmer",
           "cook", "cleaner", "manager", "farmer", "driver", "writer", "accountant", "architect", "dentist",
           "journalist", "pharmacist"],
    "sv": ["läkare", "lärare", "ingenjör", "advokat", "sjuksköterska", "pilot", "forskare", "programmerare", "kock",
           "chef", "journalist", "tandläkare"],
    "da": ["læge", "lærer", "ingeniør", "advokat", "sygeplejerske", "pilot", "forsker", "programmør", "kok",
           "chef", "journalist", "tandlæge"],
    "nb": ["lege", "lærer", "ingeniør", "advokat", "sykepleier", "pilot", "forsker", "programmerer", "kokk",
           "sjef", "journalist", "tannlege"],
    "nl": ["arts", "dokter", "ingenieur", "advocaat", "piloot", "programmeur", "kok", "journalist", "tandarts",
           "apotheker", "architect", "manager"],
    "es": ["periodista", "dentista", "piloto", "taxista", "artista", "economista", "policía", "cantante"],
    "it": ["dentista", "giornalista", "farmacista", "pilota", "artista", "autista", "cantante", "insegnante"],
    "pt": ["dentista", "jornalista", "piloto", "taxista", "artista", "economista", "polícia", "gerente"],
    "fr": ["journaliste", "dentiste", "pilote", "architecte", "artiste", "secrétaire", "ministre", "médecin"],
    "de": [],  # German occupations are all gendered: the lexicon's role pairs
}


def occupations(lang: str) -> list[tuple[str, ...]]:
    """The language's occupations, each as its forms: neutral ones as one form, the lexicon's role
    pairs as (male, female)."""
    from data_prep.counterfactual import load_lexicon

    items: list[tuple[str, ...]] = [(w,) for w in NEUTRAL_OCCUPATIONS.get(lang, [])]
    for male, female in load_lexicon(lang).pairs(categories=("role",)):
        if (male, female) not in items:
            items.append((male, female))
    return items


def continuations(lang: str) -> list[str]:
    """Every form of the language's occupations (`occupations`), in order, once each."""
    return list(dict.fromkeys(form for item in occupations(lang) for form in item))


def _source_ids(tokenizer: Any, prompts: Sequence[str], clm_prompt: bool) -> list[list[int]]:
    from data_prep.tokenizer import special_ids

    ids = special_ids(tokenizer)
    prefix = [ids.clm] if clm_prompt else []
    return [prefix + tokenizer(p, add_special_tokens=False)["input_ids"] + [ids.eos] for p in prompts]


def score_continuations(model: Any, tokenizer: Any, prompts: Sequence[str], conts: Sequence[str],
                        batch_size: int = 64, clm_prompt: bool = True) -> Any:
    """log p(cont | prompt) for every (prompt, continuation): a [len(prompts), len(conts)] numpy array.

    Source = ([CLM] +) prompt tokens + eos; target = the continuation's tokens (no eos), summed
    log-probabilities under teacher forcing.
    """
    import numpy as np
    import torch

    from data_prep.tokenizer import special_ids
    from evaluation.massive import pad_right

    ids = special_ids(tokenizer)
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(conts))]
    sources_all = _source_ids(tokenizer, prompts, clm_prompt)
    cont_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
    scores = np.zeros((len(prompts), len(conts)))
    device = input_device(model)  # a device-mapped model may hold its first weights on the disk
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        sources = [sources_all[i] for i, _ in chunk]
        targets = [cont_ids[j] for _, j in chunk]
        input_ids, attention = pad_right(sources, ids.pad)
        labels, _ = pad_right(targets, -100)
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                           labels=labels.to(device)).logits.float()
        logp = torch.log_softmax(logits, -1)
        mask = labels.to(device) != -100
        token_lp = logp.gather(-1, labels.clamp_min(0).to(device).unsqueeze(-1)).squeeze(-1) * mask
        for (i, j), value in zip(chunk, token_lp.sum(-1).tolist()):
            scores[i, j] = value
    return scores


def prompt_entropy(model: Any, tokenizer: Any, prompts: Sequence[str], clm_prompt: bool = True) -> Any:
    """Entropy (nats) of the model's first-token distribution after each prompt: [len(prompts)]."""
    import torch

    from data_prep.tokenizer import special_ids
    from evaluation.massive import pad_right

    ids = special_ids(tokenizer)
    input_ids, attention = pad_right(_source_ids(tokenizer, prompts, clm_prompt), ids.pad)
    device = input_device(model)  # a device-mapped model may hold its first weights on the disk
    start = torch.full((len(prompts), 1), model.config.decoder_start_token_id, dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                       decoder_input_ids=start.to(device)).logits.float()[:, 0]
    logp = torch.log_softmax(logits, -1)
    return (-(logp.exp() * logp).sum(-1)).cpu().numpy()


def generation_disparity(model: Any, tokenizer: Any, languages: Sequence[str], batch_size: int = 64,
                         clm_prompt: bool = True) -> dict[str, Any]:
    """{lang: {mean_abs_gap, mean_signed_gap, entropy, normalised_gap, num_pairs, num_templates,
    num_occupations, num_neutral}, "overall"} (see the module doc)."""
    import numpy as np

    measured: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
    for lang in languages:
        templates = TEMPLATES.get(lang)
        items = occupations(lang) if templates else []
        if not templates or not items:
            continue
        forms = continuations(lang)
        index = {f: k for k, f in enumerate(forms)}
        prompts_m, prompts_f = [m for m, _ in templates], [f for _, f in templates]
        scores = {side: score_continuations(model, tokenizer, prompts, forms, batch_size, clm_prompt)
                  for side, prompts in (("male", prompts_m), ("female", prompts_f))}
        # One score per occupation: log of the summed probability of its forms.
        occ = {side: np.stack([np.logaddexp.reduce(sc[:, [index[f] for f in item]], axis=1) for item in items], 1)
               for side, sc in scores.items()}
        gaps = (occ["male"] - occ["female"]).ravel()
        entropy = prompt_entropy(model, tokenizer, prompts_m + prompts_f, clm_prompt)
        measured[lang] = (gaps, entropy, {"num_templates": len(templates), "num_occupations": len(items),
                                          "num_neutral": sum(len(item) == 1 for item in items)})
    return _by_language(measured)


# Occupation prompts for gender polarity, the CRR paper's direction (an occupation in, gendered words
# out): a neutral occupation (`NEUTRAL_OCCUPATIONS`), no article or ending that marks a gender, and a
# place where a subject pronoun follows. German has no neutral occupation in the list: not scored.
POLARITY_TEMPLATES: dict[str, list[str]] = {
    "en": ["The {} said that", "As a {},"],
    "es": ["Como {},"],
    "fr": ["En tant que {},"],
    "it": ["Come {},"],
    "pt": ["Como {},"],
    "nl": ["Een {} zei dat"],
    "sv": ["En {} sa att"],
    "da": ["En {} sagde, at"],
    "nb": ["En {} sa at"],
}


def gendered_words(lang: str) -> dict[str, list[str]]:
    """{"male": [...], "female": [...]}: the one-word pronouns of the language's lexicon, lower case."""
    from data_prep.counterfactual import load_lexicon

    out: dict[str, list[str]] = {"male": [], "female": []}
    for male, female in load_lexicon(lang).pairs(categories=("pronoun",)):
        for side, word in (("male", male), ("female", female)):
            if " " not in word and word.lower() not in out[side]:
                out[side].append(word.lower())
    return out


def gender_polarity(model: Any, tokenizer: Any, languages: Sequence[str], batch_size: int = 64,
                    clm_prompt: bool = True) -> dict[str, Any]:
    """Gender polarity of the continuation after occupation prompts ("The nurse said that" -> he or
    she), the direction the CRR paper evaluates: per (template, neutral occupation), log P(male) -
    log P(female), each the summed probability of the language's one-word pronouns of that gender
    (`gendered_words`) as the continuation. Same fields as `generation_disparity` (the gaps are these
    polarities; > 0: male pronouns likelier), so `compare_disparity` pairs two models."""
    import numpy as np

    measured: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
    for lang in languages:
        templates, occupations_ = POLARITY_TEMPLATES.get(lang), NEUTRAL_OCCUPATIONS.get(lang)
        if not templates or not occupations_:
            continue
        words = gendered_words(lang)
        forms = words["male"] + words["female"]
        prompts = [t.format(o) for t in templates for o in occupations_]
        scores = score_continuations(model, tokenizer, prompts, forms, batch_size, clm_prompt)
        k = len(words["male"])
        gaps = np.logaddexp.reduce(scores[:, :k], axis=1) - np.logaddexp.reduce(scores[:, k:], axis=1)
        entropy = prompt_entropy(model, tokenizer, prompts, clm_prompt)
        measured[lang] = (gaps, entropy, {"num_templates": len(templates), "num_occupations": len(occupations_),
                                          "male_words": words["male"], "female_words": words["female"]})
    return _by_language(measured)


def _by_language(measured: dict[str, tuple[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """{lang: `_disparity` + its extra fields, "overall": pooled over languages} from
    {lang: (gaps, entropy, extra fields)}."""
    import numpy as np

    out: dict[str, Any] = {lang: {**_disparity(gaps, entropy), **extra} for lang, (gaps, entropy, extra) in measured.items()}
    if measured:
        out["overall"] = _disparity(np.concatenate([m[0] for m in measured.values()]),
                                    np.concatenate([m[1] for m in measured.values()]))
    return out


def _disparity(gaps: Any, entropy: Any) -> dict[str, Any]:
    import numpy as np

    mean_abs, h = float(np.abs(gaps).mean()), float(np.mean(entropy))
    return {"mean_abs_gap": mean_abs, "mean_signed_gap": float(gaps.mean()), "entropy": h,
            "normalised_gap": mean_abs / h if h > 0 else None, "num_pairs": int(gaps.size),
            "gaps": [float(g) for g in gaps]}


def compare_disparity(a: dict[str, Any], b: dict[str, Any], *, samples: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> dict[str, Any]:
    """B against A (two `generation_disparity` results of models scored on the same prompts and
    occupations): per language and overall, {"mean_abs_gap", "normalised_gap"}: {"a", "b", "diff" (B - A),
    "diff_ci", "ratio" (B / A), "ratio_ci"}, resampling the (template, occupation) pairs with replacement,
    the same resamples for both. Each model's entropy is held at its measured value (it comes from
    the six prompts of a language, not from the pairs)."""
    import numpy as np

    from massive.scoring import bootstrap_weights

    out: dict[str, Any] = {}
    for lang, da in a.items():
        db = b.get(lang)
        if not db or "gaps" not in da or "gaps" not in db or len(da["gaps"]) != len(db["gaps"]):
            continue
        ga, gb = np.abs(np.asarray(da["gaps"])), np.abs(np.asarray(db["gaps"]))
        weights = bootstrap_weights(ga.size, samples, seed) / ga.size
        ba, bb = weights @ ga, weights @ gb
        entry: dict[str, Any] = {"num_pairs": int(ga.size)}
        for metric, (ha, hb) in (("mean_abs_gap", (1.0, 1.0)), ("normalised_gap", (da["entropy"], db["entropy"]))):
            entry[metric] = _paired(ga.mean() / ha, gb.mean() / hb, ba / ha, bb / hb, confidence)
        out[lang] = entry
    return out


# ----------------------------------------------------------------------------- models and report


def is_seq2seq_dir(model_dir: Path) -> bool:
    """A Hugging Face seq2seq directory (not an ONNX export, not an encoder NLU model)."""
    return model_kind(model_dir) == "seq2seq"


def evaluate_fairness(models: dict[str, Path], locales: Sequence[str], out_dir: Path, *, data: str,
                      split: str = "test", max_examples: int | None = None, seed: int = 0, batch_size: int = 32,
                      device: str = "auto", metrics: Sequence[str] = ("consistency", "disparity"),
                      clm_prompt: bool = True, name: str = "fairness", samples: int = 1000,
                      confidence: float = 0.95, baseline: str | None = None, load: Any = None,
                      seeds: dict[str, list[Path]] | None = None,
                      pair_sets: Sequence[str] = ("independent", "sigma")) -> dict[str, Any]:
    """The metrics for every model and the paired comparisons against `baseline` (default student_kd
    when present); writes NAME.json and NAME.md into out_dir (atomically). `load`: how big models are
    placed (`evaluation.massive.load_seq2seq`). Metric "pairs" (`evaluation.fairness_pairs`) scores
    every model of `seeds` ({name: its seeds' directories}; default: `models`, one seed each) on
    `pair_sets` and pools the seeds of each name."""
    from core.fsutil import atomic_write_json, atomic_write_text
    from data_prep.counterfactual import lexicon_language
    from evaluation.massive import load_predictor, load_seq2seq, load_split

    started = time.perf_counter()
    with_lexicon = [loc for loc in locales if lexicon_language(loc)]
    skipped = [loc for loc in locales if not lexicon_language(loc)]
    languages = list(dict.fromkeys(lexicon_language(loc) for loc in with_lexicon))
    if baseline is not None and baseline not in models:
        raise ValueError(f"--baseline {baseline!r} is not one of the models: {', '.join(models)}")
    baseline = baseline or ("student_kd" if "student_kd" in models else None)
    massive, per_locale = (None, {})
    if "consistency" in metrics and with_lexicon:
        massive, per_locale = load_split(data, with_lexicon, split, None)
    result: dict[str, Any] = {"locales": with_lexicon, "locales_without_lexicon": skipped, "split": split,
                              "max_examples": max_examples, "seed": seed, "bootstrap_samples": samples,
                              "confidence": confidence, "baseline": baseline, "models": {}, "comparisons": {}}
    for model_name, model_dir in models.items():
        entry: dict[str, Any] = {"dir": str(model_dir)}
        if "consistency" in metrics and per_locale:
            predictor = load_predictor(model_dir, device=device, slot_labels=massive.slot_types,
                                       intents=massive.intents, load=load)
            entry["consistency"] = counterfactual_consistency(predictor, per_locale, batch_size, max_examples, seed,
                                                              samples, confidence)
            del predictor
        if "disparity" in metrics and is_seq2seq_dir(model_dir):
            model, tokenizer = load_seq2seq(model_dir, device, load=load)
            entry["disparity"] = generation_disparity(model, tokenizer, languages, batch_size=64,
                                                      clm_prompt=clm_prompt)
            entry["polarity"] = gender_polarity(model, tokenizer, languages, batch_size=64, clm_prompt=clm_prompt)
            del model
        result["models"][model_name] = entry
    if baseline and samples:
        base = result["models"][baseline].get("consistency")
        for model_name, entry in result["models"].items():
            if model_name != baseline and base and entry.get("consistency"):
                result["comparisons"][model_name] = compare_consistency(
                    base, entry["consistency"], samples=samples, seed=seed, confidence=confidence)
            for key in ("disparity", "polarity"):
                reference = result["models"][baseline].get(key)
                if model_name != baseline and reference and entry.get(key):
                    result.setdefault(f"{key}_comparisons", {})[model_name] = compare_disparity(
                        reference, entry[key], samples=samples, seed=seed, confidence=confidence)
    if "pairs" in metrics:
        from evaluation.fairness_pairs import evaluate_pairs

        arms = seeds or {name: [d] for name, d in models.items()}
        pair_data, pair_locales = load_split(data, list(locales), split, max_examples, seed)
        result["pairs"] = evaluate_pairs(arms, pair_locales, sets=pair_sets, massive=pair_data, batch_size=batch_size,
                                         device=device, baseline=baseline if baseline in arms else None,
                                         samples=samples, seed=seed, confidence=confidence, load=load)
    result["seconds"] = time.perf_counter() - started
    result["markdown"] = fairness_markdown(result)
    if result.get("pairs"):
        from evaluation.fairness_pairs import pairs_markdown

        result["markdown"] = (result["markdown"] + "\n\n" + pairs_markdown(result["pairs"], confidence)).strip()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{name}.json", result)
    atomic_write_text(out_dir / f"{name}.md", result["markdown"] + "\n")
    return result


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct_ci(entry: dict[str, Any], key: str) -> str:
    value, ci = entry.get(key), entry.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(value)


def _with_ci(entry: dict[str, Any], key: str, fmt: Any) -> str:
    """entry[key] and its interval entry[key_ci], each written by fmt."""
    value, ci = entry.get(key), entry.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(value)


def _pp(x: float) -> str:
    return f"{100.0 * x:+.1f}"


def _ratio(x: float) -> str:
    return f"{x:.2f}"


# Generation measures of seq2seq models: result key -> (table title, what a row's number is).
GENERATION_MEASURES = {
    "disparity": ("Generation disparity (occupations: neutral ones, gendered ones as the log-sum of both forms)", "gap"),
    "polarity": ("Gender polarity (pronouns after neutral-occupation prompts: log P(male) - log P(female))", "polarity"),
}


def fairness_markdown(result: dict[str, Any]) -> str:
    """One table per locale (and pooled): every model's flip rates among correct originals with their
    intervals next to its accuracies on the original and swapped utterances; then the paired
    comparisons with the baseline, and generation disparity per language."""
    lines: list[str] = []
    conf = f"{result.get('confidence', 0.95):.0%}"
    locales = [*result["locales"], "overall"]
    header = ["model", "n", f"intent flip % among correct [{conf} CI]", f"EM flip % among correct [{conf} CI]",
              "intent acc orig / swapped %", "EM orig / swapped %", "intent changed %", "slots changed %",
              "agreement conflicts"]
    for loc in locales:
        rows = []
        for model_name, entry in result["models"].items():
            c = entry.get("consistency", {}).get(loc)
            if not c or not c.get("num_examples"):
                continue
            rows.append([model_name, str(c["num_examples"]), _pct_ci(c, "intent_flip_rate"), _pct_ci(c, "em_flip_rate"),
                         f"{_pct(c.get('intent_acc_original'))} / {_pct(c.get('intent_acc_swapped'))}",
                         f"{_pct(c.get('em_original'))} / {_pct(c.get('em_swapped'))}",
                         _pct(c.get("intent_change_rate")), _pct(c.get("slot_change_rate")),
                         str(c.get("num_conflicts", "-"))])
        if rows:
            title = "all locales pooled" if loc == "overall" else loc
            lines += [f"### Counterfactual consistency: {title}", "", markdown_table(header, rows)]
    if result.get("comparisons"):
        base = result.get("baseline")
        paired_rows = []
        for model_name, comp in result["comparisons"].items():
            for loc, e in comp.items():
                flip, em, acc = e["intent_flip_rate"], e["em_original"], e["intent_acc_original"]
                paired_rows.append([model_name, loc, _with_ci(flip, "ratio", _ratio), _with_ci(flip, "diff", _pp),
                                    _with_ci(em, "diff", _pp), _with_ci(acc, "diff", _pp)])
        lines += [f"### Paired against {base} (same utterances, same resamples)", "",
                  markdown_table(["model", "locale", "intent flip ratio [CI]", "intent flip diff pp [CI]",
                                  "EM orig diff pp [CI]", "intent acc orig diff pp [CI]"], paired_rows)]
    generation = {key: [(m, e[key]) for m, e in result["models"].items() if e.get(key)] for key in GENERATION_MEASURES}
    for key, (title, unit) in GENERATION_MEASURES.items():
        measured = generation[key]
        if not measured:
            continue
        langs = [k for k in measured[0][1] if k != "overall"] + ["overall"]
        rows = [[model_name, lang, _num(d[lang]["mean_abs_gap"]), _num(d[lang]["mean_signed_gap"]),
                 _num(d[lang].get("entropy")), _num(d[lang].get("normalised_gap"))]
                for lang in langs for model_name, d in measured if lang in d]
        lines += [f"### {title}", "",
                  markdown_table(["model", "language", f"mean abs {unit} (nats)", f"signed {unit}", "entropy (nats)",
                                  f"{unit} / entropy"], rows)]
        if result.get(f"{key}_comparisons"):
            paired_rows = []
            for model_name, comp in result[f"{key}_comparisons"].items():
                for lang, e in comp.items():
                    gap, norm = e["mean_abs_gap"], e["normalised_gap"]
                    paired_rows.append([model_name, lang, str(e["num_pairs"]), _with_ci(gap, "diff", "{:+.3f}".format),
                                        _with_ci(norm, "ratio", _ratio), _with_ci(norm, "diff", "{:+.3f}".format)])
            lines += [f"### {title.split(' (')[0]} paired against {result.get('baseline')} (same pairs, same resamples)",
                      "", markdown_table(["model", "language", "pairs", f"abs {unit} diff (nats) [CI]",
                                          f"{unit} / entropy ratio [CI]", f"{unit} / entropy diff [CI]"], paired_rows)]
    disparity = generation["disparity"] or generation["polarity"]
    if disparity:
        lines.append("Models: " + "; ".join(f"{m} = {Path(result['models'][m]['dir']).name}" for m, _ in disparity)
                     + ".\n")
    if any(e.get("consistency") for e in result["models"].values()):
        split = result.get("split", "test")
        scope = "a seeded sample" if result.get("max_examples") else "all"
        lines.append(f"Counterfactual consistency on {scope} MASSIVE {split} utterances with gendered words "
                     f"({', '.join(result['locales']) or 'none'}); flips among the utterances whose original "
                     "prediction is correct; intervals: percentile bootstrap over utterances.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    from evaluation.cli import add_load_arguments

    p = sub.add_parser(
        "fairness",
        help="counterfactual consistency on MASSIVE and generation disparity, several models side by side",
        description="For each model: among the MASSIVE utterances with gendered words that it gets right, how "
        "often the prediction flips when the gendered words are swapped, next to its accuracy on originals and "
        "swapped utterances, with paired bootstrap intervals; and the entropy-normalised gap in log-probability "
        "of occupations after male vs female prompts (seq2seq models). Writes NAME.json and NAME.md.",
    )
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR[,DIR...]",
                   help="models to compare, e.g. teacher=DIR student_kd=DIR student_crr=DIR; with --metrics pairs "
                   "only, NAME=DIR1,DIR2,DIR3 gives the models of several training seeds, pooled")
    p.add_argument("--locales", nargs="+", default=["en-US", "de-DE"],
                   help="MASSIVE locales (those without a lexicon are skipped); default en-US de-DE")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", default="@data/massive/data", help="MASSIVE source (default @data/massive/data)")
    p.add_argument("--split", choices=["train", "dev", "test"], default="test", help="partition (default test)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="at most N utterances with gendered words per locale, a seeded sample (default and 0: all); "
                   "--metrics pairs: a seeded sample of N ids of the split for the name and sigma pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample of utterances (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="utterances per predictor call")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="torch device")
    add_load_arguments(p)
    p.add_argument("--metrics", nargs="+", choices=["consistency", "disparity", "pairs"],
                   default=["consistency", "disparity"],
                   help="which measurements (default consistency and disparity); pairs: change rate and signed "
                   "female - male accuracy gap over gender pairs (evaluation/fairness_pairs.py), pooled over seeds")
    p.add_argument("--pair-sets", nargs="+", choices=["independent", "sigma"], default=["independent", "sigma"],
                   help="--metrics pairs: independent = hand-written templates and first-name pairs (no sigma); "
                   "sigma = the utterances sigma swaps (default both)")
    p.add_argument("--no-clm-prompt", action="store_true",
                   help="score continuations without the [CLM] prefix (models not pretrained with it)")
    p.add_argument("--name", default="fairness", help="base name of the output files")
    p.add_argument("--bootstrap-samples", type=int, default=1000, help="bootstrap resamples (default 1000; 0 = none)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval confidence (default 0.95)")
    p.add_argument("--baseline", default=None,
                   help="model the others are compared with, paired (default student_kd when given)")
    p.set_defaults(func=run_fairness)


def parse_seed_models(items: Sequence[str]) -> dict[str, list[Path]]:
    """`--models NAME=DIR[,DIR...]` -> {name: [directories]} (several: the models of several seeds)."""
    from core.config import ConfigError
    from evaluation.cli import parse_models

    out: dict[str, list[Path]] = {}
    for item in items:
        name, sep, dirs = item.partition("=")
        if name in out:
            raise ConfigError(f"--models: name {name!r} given twice (list several seeds as {name}=DIR1,DIR2)")
        parts = [d for d in dirs.split(",") if d] if sep else []
        out[name] = [parse_models([f"{name}={d}"])[name] for d in parts] if parts else list(
            parse_models([item]).values())
    return out


def run_fairness(args: argparse.Namespace) -> int:
    from core.config import ConfigError
    from evaluation.cli import load_from_args

    seeds = parse_seed_models(args.models)
    if any(len(dirs) > 1 for dirs in seeds.values()) and set(args.metrics) - {"pairs"}:
        raise ConfigError("--models: several directories for one name (training seeds) are pooled by --metrics pairs "
                          "only; give one directory per name for consistency and disparity")
    models = {name: dirs[0] for name, dirs in seeds.items()}
    result = evaluate_fairness(models, args.locales, Path(args.out), data=args.data, split=args.split,
                               max_examples=args.max_examples or None, seed=args.seed, batch_size=args.batch_size,
                               device=args.device, metrics=args.metrics, clm_prompt=not args.no_clm_prompt,
                               load=load_from_args(args, args.out), seeds=seeds, pair_sets=args.pair_sets,
                               samples=args.bootstrap_samples, confidence=args.confidence, baseline=args.baseline,
                               name=args.name)
    print(result["markdown"])
    print(f"wrote {Path(args.out) / (args.name + '.json')}")
    return 0
