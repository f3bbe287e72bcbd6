"""Generation disparity and gender polarity of seq2seq models (task-agnostic and MASSIVE students),
the measures of the CRR paper; `polyteacher evaluate fairness` reports them (evaluation/fairness.py).

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.bigmodel import input_device

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
