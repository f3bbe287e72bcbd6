"""Counterfactual role reversal: lexicons, sigma, CDA and teacher-prediction perturbation."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.counterfactual import (
    CATEGORIES,
    LexiconError,
    TokenSwapMap,
    augment,
    available_languages,
    build_token_map,
    guess_language,
    lexicon_language,
    load_lexicon,
    perturb_probs,
    read_lexicon_file,
    swap,
    swap_words,
)

# ----------------------------------------------------------------------------- lexicons


def test_at_least_eight_languages_with_every_category():
    langs = available_languages()
    assert len(langs) >= 8
    for lang in langs:
        lexicon = load_lexicon(lang)
        assert len(lexicon.entries) >= 40, lang
        cats = {e.category for e in lexicon.entries}
        assert {"pronoun", "kinship", "title", "role"} <= cats, (lang, cats)
        assert cats <= set(CATEGORIES)


def test_locale_mapping():
    assert lexicon_language("en-US") == "en"
    assert lexicon_language("de-DE") == "de"
    assert lexicon_language("pt-PT") == "pt"
    assert lexicon_language("nb-NO") == "nb"
    assert lexicon_language("sv") == "sv"
    assert lexicon_language("ja-JP") is None
    assert swap("彼は医者です", "ja-JP") == "彼は医者です"  # no lexicon: identity


def test_malformed_lexicon_names_file_and_line(tmp_path):
    bad = tmp_path / "xx.tsv"
    bad.write_text("male\tfemale\tcategory\tdirection\tnotes\nhe\tshe\tpronoun\t\t\nking\tqueen\troyalty\t\t\n")
    with pytest.raises(LexiconError, match=r"xx.tsv:3: category 'royalty' is not allowed; allowed values: pronoun"):
        read_lexicon_file(bad)
    bad.write_text("male\tfemale\tcategory\nhe\tshe\tpronoun\tsideways\n")
    with pytest.raises(LexiconError, match=r"xx.tsv:2: direction 'sideways'.*allowed values: both, to_female, to_male"):
        read_lexicon_file(bad)
    bad.write_text("a\tb\n")
    with pytest.raises(LexiconError, match=r"xx.tsv:1: header"):
        read_lexicon_file(bad)


# ----------------------------------------------------------------------------- sigma

CASES = {
    "en": [
        ("he said that she is his sister", "she said that he is her brother"),
        ("The man thanked the woman.", "The woman thanked the man."),
        ("HE IS THE KING", "SHE IS THE QUEEN"),
        ("Her father called him", "His mother called her"),
        ("hello there, the theme is hers", "hello there, the theme is his"),
        ("my grandpa's father-in-law is a waiter", "my grandma's mother-in-law is a waitress"),
        ("call mom and tell dad", "call dad and tell mom"),
    ],
    "de": [
        ("Er ist mein Vater.", "Sie ist mein Mutter."),  # "mein" is not repaired (agreement rule 5)
        ("Der junge Mann und sein Sohn", "Der junge Frau und sein Tochter"),
        ("ruf meine frau an", "ruf meine mann an"),
        ("Sie kommt morgen", "Sie kommt morgen"),  # sie is ambiguous: never swapped back
        ("Der König sprach mit seiner Tochter", "Der Königin sprach mit ihrer Sohn"),
    ],
    "fr": [
        ("Il est le frère de mon père.", "Elle est le sœur de mon mère."),
        ("l'acteur parle à sa grand-mère", "l'actrice parle à sa grand-père"),
        ("Mon petit ami est serveur", "Mon petite amie est serveuse"),
        ("appelle maman", "appelle papa"),
    ],
    "es": [
        ("él es mi padre", "ella es mi madre"),
        ("el rey y su hijo", "el reina y su hija"),  # 'el' (article) untouched
        ("Mi novia es profesora", "Mi novio es profesor"),
        ("llama a mi hermano", "llama a mi hermana"),
    ],
    "it": [
        ("lui è mio padre", "lei è mio madre"),
        ("La ragazza e suo fratello", "La ragazzo e suo sorella"),
        ("chiama la mamma", "chiama la papà"),
        ("Il re e la regina", "Il regina e la re"),
    ],
    "pt": [
        ("ele é o meu pai", "ela é o meu mãe"),
        ("Liga ao meu irmão e à minha irmã", "Liga ao meu irmã e à minha irmão"),
        ("o livro dele", "o livro dela"),
        ("O Rei falou com o filho", "O Rainha falou com o filha"),
    ],
    "nl": [
        ("Hij is mijn vader", "Zij is mijn moeder"),
        ("bel mijn broer en mijn zus", "bel mijn zus en mijn broer"),
        ("De koning en zijn zoon", "De koningin en zijn dochter"),
        ("ik zag hem", "ik zag haar"),
    ],
    "sv": [
        ("Han är min bror", "Hon är min syster"),
        ("ring mamma och pappa", "ring pappa och mamma"),
        ("Hon gav honom hans bok", "Han gav henne hennes bok"),
        ("man kan inte veta", "man kan inte veta"),  # generic pronoun 'man' is not a source word
        ("kvinnan", "kvinnan"),  # inflected forms are other words
    ],
    "da": [
        ("Han er min bror", "Hun er min søster"),
        ("ring til min mor", "ring til min far"),
        ("hans kone", "hendes mand"),
    ],
    "nb": [
        ("Hun er min datter", "Han er min sønn"),
        ("ring til pappa", "ring til mamma"),
        ("hans søster og hennes bror", "hennes bror og hans søster"),
    ],
}


@pytest.mark.parametrize("lang", sorted(CASES))
def test_swap_sentences(lang):
    for text, expected in CASES[lang]:
        assert swap(text, lang) == expected, (lang, text)


def test_word_boundaries_are_respected():
    text = "the theme: hello, they shelter Heather; otherwise ahem"
    assert swap(text, "en") == text
    assert swap("he-he", "en") == "she-she"
    assert swap("he's here", "en") == "she's here"
    assert swap("über ihn", "de") == "über sie"


def test_case_is_preserved():
    assert swap("he He HE", "en") == "she She SHE"
    assert swap("father Father FATHER", "en") == "mother Mother MOTHER"
    assert swap("Mann MANN", "de") == "Frau FRAU"


def test_ambiguity_rule_first_row_wins():
    # her -> his (possessive reading), him -> her, his -> her, hers -> his.
    assert swap("her", "en") == "his"
    assert swap("him", "en") == "her"
    assert swap("his", "en") == "her"
    assert swap("hers", "en") == "his"


def test_involution_on_unambiguous_words():
    lex = load_lexicon("en")
    for male, female in [("he", "she"), ("father", "mother"), ("king", "queen"), ("actor", "actress")]:
        assert lex.counterpart(male) == female
        assert lex.counterpart(female) == male
        text = f"the {male} met a friend"
        assert swap(swap(text, "en"), "en") == text


def test_swap_words_keeps_word_count():
    words = ["tell", "my", "petit", "ami", "to", "call", "his", "mom"]
    out = swap_words(words, "fr")
    assert len(out) == len(words)
    en = swap_words(["call", "my", "mom", "and", "his", "brother"], "en-US")
    assert en == ["call", "my", "dad", "and", "her", "sister"]


def test_guess_language_and_auto_swap():
    assert guess_language("der Mann ist nicht hier und die Frau auch") == "de"
    assert guess_language("the man is not here and the woman is") == "en"
    assert guess_language("12345") is None
    assert swap("Il est le père de la fille", "auto") == "Elle est le mère de la garçon"


# ----------------------------------------------------------------------------- CDA


def test_augment_modes():
    texts = ["he is my brother", "open the door", "she is a nurse"]
    none = augment(texts, mode="none")
    assert [i.text for i in none] == texts
    assert [i.counterfactual for i in none] == ["she is my sister", "open the door", "he is a nurse"]

    two = augment(texts, mode="two_sided", lang="en")
    assert [i.text for i in two] == [
        "he is my brother", "she is my sister", "open the door", "she is a nurse", "he is a nurse",
    ]
    assert [i.swapped for i in two] == [False, True, False, False, True]
    assert [i.source_index for i in two] == [0, 0, 1, 2, 2]
    assert two[1].counterfactual == "he is my brother"

    always = augment(texts, mode="one_sided", p=1.0, rng=random.Random(0), lang="en")
    assert [i.text for i in always] == ["she is my sister", "open the door", "he is a nurse"]
    never = augment(texts, mode="one_sided", p=0.0, rng=random.Random(0), lang="en")
    assert [i.text for i in never] == texts


def test_one_sided_rate_follows_p():
    texts = ["he is here"] * 2000
    items = augment(texts, mode="one_sided", p=0.3, rng=random.Random(1), lang="en")
    rate = sum(i.swapped for i in items) / len(items)
    assert 0.26 < rate < 0.34


def test_augment_rejects_bad_mode():
    with pytest.raises(ValueError, match="allowed values: none, one_sided, two_sided"):
        augment(["x"], mode="both")


# ----------------------------------------------------------------------------- token map


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")))


def test_token_map_single_and_multi_token_pairs():
    tok = _word_tokenizer(["▁he", "▁she", "He", "She", "▁king", "▁queen", "▁actor", "▁wait", "ress"])
    token_map = build_token_map(tok, ["en"])
    vocab = tok.get_vocab()
    mapping = token_map.as_dict()
    assert mapping[vocab["▁he"]] == vocab["▁she"] and mapping[vocab["▁she"]] == vocab["▁he"]
    assert mapping[vocab["He"]] == vocab["She"]  # Title form without the space marker
    assert mapping[vocab["▁king"]] == vocab["▁queen"]
    assert vocab["▁actor"] not in mapping  # "actress" is not a single token: skipped
    stats = token_map.stats["en"]
    assert stats["single_token"] == 2  # he/she and king/queen rows
    assert stats["multi_token"] == stats["pairs"] - 2
    assert len(set(token_map.src_ids)) == len(token_map.src_ids)


def test_token_map_on_trained_tokenizer(tiny_tokenizer_dir):
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    token_map = build_token_map(tok, ["en", "de", "fr"])
    # A 2000-piece vocabulary for ten languages keeps few whole gendered words ("she" is "▁ s he"):
    # the counts must add up and every mapped pair must be a lexicon pair.
    for stats in token_map.stats.values():
        assert stats["single_token"] + stats["multi_token"] == stats["pairs"]
    assert len(token_map) == sum(s["token_pairs"] for s in token_map.stats.values())
    lexicon_words = {w.lower() for lang in ("en", "de", "fr") for pair in load_lexicon(lang).pairs() for w in pair}
    for src, dst in zip(token_map.src_ids, token_map.dst_ids):
        a = tok.convert_ids_to_tokens(src).lstrip("▁").lower()
        b = tok.convert_ids_to_tokens(dst).lstrip("▁").lower()
        assert a in lexicon_words and b in lexicon_words and a != b


# ----------------------------------------------------------------------------- perturbation properties

VOCAB = 12
PAIRS = [(0, 1), (2, 3), (4, 5)]  # an involution on tokens 0..5; 6..11 are not gendered
TOKEN_MAP = TokenSwapMap(
    src_ids=[a for a, b in PAIRS] + [b for a, b in PAIRS],
    dst_ids=[b for a, b in PAIRS] + [a for a, b in PAIRS],
    stats={},
)
SIGMA = list(range(VOCAB))
for _a, _b in PAIRS:
    SIGMA[_a], SIGMA[_b] = _b, _a

logits_strategy = st.lists(
    st.floats(min_value=-8, max_value=8, allow_nan=False), min_size=3 * VOCAB, max_size=3 * VOCAB
)


def _probs(values: list[float]) -> torch.Tensor:
    return torch.softmax(torch.tensor(values, dtype=torch.float64).view(1, 3, VOCAB), dim=-1)


@settings(max_examples=60, deadline=None)
@given(logits_strategy, logits_strategy, st.sampled_from(["max", "mean"]))
def test_perturbed_is_a_distribution(x_logits, cf_logits, mode):
    p_hat = perturb_probs(_probs(x_logits), _probs(cf_logits), TOKEN_MAP, mode)
    assert torch.all(p_hat >= 0)
    assert torch.allclose(p_hat.sum(-1), torch.ones(1, 3, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(logits_strategy, st.sampled_from(["max", "mean"]))
def test_gender_symmetric_teacher_is_unchanged(x_logits, mode):
    p = _probs(x_logits)
    # A symmetric teacher predicts sigma(w) on x~ exactly as it predicts w on x.
    p_cf = p[..., SIGMA]
    p_hat = perturb_probs(p, p_cf, TOKEN_MAP, mode)
    assert torch.allclose(p_hat, p, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(logits_strategy, st.sampled_from(["max", "mean"]))
def test_pair_mass_is_equalised_when_context_is_ignored(x_logits, mode):
    # A teacher whose prediction ignores the swap in its input (p(.|x~) = p(.|x)) prefers one gender
    # regardless of context: p^ gives both members of every pair the same probability.
    p = _probs(x_logits)
    p_hat = perturb_probs(p, p.clone(), TOKEN_MAP, mode)
    for a, b in PAIRS:
        assert torch.allclose(p_hat[..., a], p_hat[..., b], atol=1e-12)
    # Non-gendered tokens keep their relative probabilities.
    ratio = p_hat[..., 6:] / p[..., 6:]
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-9)


def test_perturb_max_hand_case_and_invalid_rows():
    p = torch.tensor([[[0.6, 0.1, 0.3]]])
    p_cf = torch.tensor([[[0.2, 0.5, 0.3]]])
    token_map = TokenSwapMap([0, 1], [1, 0], {})
    # p^(0) = max(0.6, p_cf(1)=0.5) = 0.6; p^(1) = max(0.1, p_cf(0)=0.2) = 0.2; p^(2) = 0.3; sum 1.1
    expected = torch.tensor([[[0.6, 0.2, 0.3]]]) / 1.1
    assert torch.allclose(perturb_probs(p, p_cf, token_map, "max"), expected)
    mean = perturb_probs(p, p_cf, token_map, "mean")
    assert torch.allclose(mean, torch.tensor([[[0.55, 0.15, 0.3]]]))
    kept = perturb_probs(p, p_cf, token_map, "max", valid=torch.tensor([False]))
    assert torch.equal(kept, p)
    assert perturb_probs(p, p_cf, token_map, "none") is p
