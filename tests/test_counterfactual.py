"""Counterfactual role reversal: lexicons, sigma, CDA and teacher-prediction perturbation."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.counterfactual import (
    CATEGORIES,
    LexiconError,
    augment,
    available_languages,
    guess_language,
    lexicon_language,
    load_lexicon,
    read_lexicon_file,
    swap,
    swap_words_result,
)
from distill.perturb import (
    RowPlan,
    TokenPair,
    TokenSigma,
    align_positions,
    build_token_map,
    copied_positions,
    perturb_rows,
    plan_row,
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
        ("Er ist mein Vater.", "Sie ist meine Mutter."),  # mein -> meine before the swapped noun (rule 5)
        ("Der junge Mann und sein Sohn", "Der junge Frau und sein Tochter"),
        ("ruf meine frau an", "ruf meine mann an"),
        ("Sie kommt morgen", "Sie kommt morgen"),  # sie is ambiguous: never swapped back
        ("Der König sprach mit seiner Tochter", "Der Königin sprach mit ihrer Sohn"),
    ],
    "fr": [
        ("Il est le frère de mon père.", "Elle est la sœur de ma mère."),
        ("l'acteur parle à sa grand-mère", "l'actrice parle à son grand-père"),
        ("Mon petit ami est serveur", "Ma petite amie est serveuse"),
        ("appelle maman", "appelle papa"),
    ],
    "es": [
        ("él es mi padre", "ella es mi madre"),
        ("el rey y su hijo", "la reina y su hija"),  # the article agrees; 'él' is the pronoun
        ("Mi novia es profesora", "Mi novio es profesor"),
        ("llama a mi hermano", "llama a mi hermana"),
    ],
    "it": [
        ("lui è mio padre", "lei è mia madre"),
        ("La ragazza e suo fratello", "Il ragazzo e sua sorella"),
        ("chiama la mamma", "chiama il papà"),
        ("Il re e la regina", "La regina e il re"),
    ],
    "pt": [
        ("ele é o meu pai", "ela é a minha mãe"),
        ("Liga ao meu irmão e à minha irmã", "Liga à minha irmã e ao meu irmão"),
        ("o livro dele", "o livro dela"),
        ("O Rei falou com o filho", "A Rainha falou com a filha"),
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
    # her -> his (possessive reading) before a noun, him (object) at the end or before a word that
    # cannot be its noun; him -> her, his -> her, hers -> his.
    assert swap("her car", "en") == "his car"
    assert swap("call her", "en") == "call him"
    assert swap("let her know that her dog is here", "en") == "let him know that his dog is here"
    assert swap("ask her if dean turned in his homework", "en") == "ask him if dean turned in her homework"
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
    out = swap_words_result(words, "fr")[0]
    assert len(out) == len(words)
    en = swap_words_result(["call", "my", "mom", "and", "his", "brother"], "en-US")[0]
    assert en == ["call", "my", "dad", "and", "her", "sister"]


def test_guess_language_and_auto_swap():
    assert guess_language("der Mann ist nicht hier und die Frau auch") == "de"
    assert guess_language("the man is not here and the woman is") == "en"
    assert guess_language("12345") is None
    assert swap("Il est le père de la fille", "auto") == "Elle est la mère du garçon" or \
        swap("Il est le père de la fille", "auto") == "Elle est la mère de le garçon"


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


# ----------------------------------------------------------------------------- agreement (rule 5)


def test_agreement_repairs_determiners_and_counts_conflicts():
    fr = load_lexicon("fr")
    r = fr.swap_result("Mon père et le frère")
    assert (r.text, r.count, r.repaired, r.conflicts) == ("Ma mère et la sœur", 2, 2, 0)
    # Elision and euphony follow the new noun's first sound, both ways.
    for text, swapped in (("appelle l'oncle", "appelle la tante"), ("L'oncle", "La tante"), ("la tante", "l'oncle"),
                          ("de la femme", "de l'homme"), ("à la tante", "à l'oncle"), ("mon ami", "mon amie"),
                          ("cette actrice", "cet acteur"), ("l'actrice", "l'acteur")):
        r = fr.swap_result(text)
        assert (r.text, r.conflicts) == (swapped, 0), text
    words, result = swap_words_result("la journée de la femme".split(), "fr-FR")
    assert words == "la journée de l'homme".split() and result.sources == ((0,), (1,), (2,), (3, 4))
    words, result = swap_words_result("appelle l'oncle".split(), "fr-FR")
    assert words == "appelle la tante".split() and result.sources == ((0,), (1,), (1,))
    de = load_lexicon("de")
    r = de.swap_result("Mein Vater und ein Sohn")
    assert (r.text, r.repaired, r.conflicts) == ("Meine Mutter und eine Tochter", 2, 0)
    r = de.swap_result("meine Mutter")  # meine -> mein/meinen depends on the case: one-way, counted
    assert (r.text, r.repaired, r.conflicts) == ("meine Vater", 0, 1)
    # After a preposition the case is known: accusative -e -> -en, dative -er -> -em.
    for text, swapped in (("für meine Schwester", "für meinen Bruder"), ("mit meiner Mutter", "mit meinem Vater"),
                          ("an eine Freundin", "an einen Freund"), ("Mit Meiner Mutter", "Mit Meinem Vater")):
        r = de.swap_result(text)
        assert (r.text, r.repaired, r.conflicts) == (swapped, 1, 0), text
    it = load_lexicon("it")
    assert it.swap("la mia ragazza") == "il mio ragazzo"  # two agreeing words before the noun
    pt = load_lexicon("pt")
    assert pt.swap("falei a ele") == "falei a ela"  # pronouns never move a determiner
    assert pt.swap("o meu pai") == "a minha mãe"
    words, result = swap_words_result(["liga", "ao", "meu", "irmão"], "pt-PT")
    assert words == ["liga", "à", "minha", "irmã"] and result.conflicts == 0
    # Agreement words are never swapped on their own.
    assert swap("le chat et la maison", "fr") == "le chat et la maison"
    assert all(e.category != "agreement" for e in load_lexicon("fr").entries if (e.male, e.female) in
               load_lexicon("fr").pairs())


# ----------------------------------------------------------------------------- token-level sigma

LANGS = ("da", "de", "en", "es", "fr", "it", "nb", "nl", "pt", "sv")


@pytest.fixture(scope="module")
def tok(multilingual_tokenizer_dir):
    from data_prep.tokenizer import load_tokenizer

    return load_tokenizer(multilingual_tokenizer_dir)


@pytest.fixture(scope="module")
def token_map(tok):
    return build_token_map(tok)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_lexicon_language_has_a_token_sigma(token_map):
    assert set(token_map.languages) == set(LANGS) == set(available_languages())
    for lang, stats in token_map.stats.items():
        assert stats["rows_mapped"] > 0 and stats["token_pairs"] == len(token_map.get(lang)), lang
        assert stats["multi_piece"] > 0, lang
    assert token_map.get("da-DK") is token_map.get("da") and token_map.get("ja-JP") is None


@pytest.mark.parametrize("lang", LANGS)
def test_token_pairs_start_at_word_starts(tok, token_map, lang):
    sigma = token_map.get(lang)
    for pair in sigma.pairs:
        first = pair.context[0] if pair.context else pair.src
        assert tok.convert_ids_to_tokens(first).startswith("▁"), (lang, pair)
        if not pair.context:
            assert tok.convert_ids_to_tokens(pair.dst).startswith("▁"), (lang, pair)


@pytest.mark.parametrize("lang", LANGS)
def test_no_word_internal_swap(tok, token_map, lang):
    # Every source word of the lexicon inside a longer word (digits start no lexicon word): sigma
    # touches none of its pieces.
    sigma = token_map.get(lang)
    lexicon = load_lexicon(lang)
    sources = {w for pair in lexicon.pairs() for w in pair if lexicon.counterpart(w) and " " not in w}
    for word in sorted(sources):
        for text in (f"7{word.lower()}7", f"42{word}"):
            assert sigma.fires(_ids(tok, text)) == [], (lang, text)


def test_known_word_internal_cases(tok, token_map):
    # weat|her, Ger|man, avr|il, nouv|elle: the inner pieces never fire; a word-initial piece of a
    # multi-piece word ("▁G" of "Girl" at the start of "Germany") is a source only where two targets
    # diverge with it (`plan_row`), never inside a word.
    for lang, text in [("en", "the weather in Germany"), ("en", "Sherlock and Hermione"),
                       ("de", "Germanistik"), ("fr", "avril et la nouvelle"), ("it", "aprile e il profilo")]:
        ids = _ids(tok, text)
        for t, src, _ in token_map.get(lang).fires(ids):
            pair = next(p for p in token_map.get(lang).pairs if p.src == src and
                        tuple(ids[t - len(p.context):t]) == p.context)
            start = pair.context[0] if pair.context else src
            assert tok.convert_ids_to_tokens(start).startswith("▁"), (lang, text, pair)
            assert not pair.whole, (lang, text, pair)
    fired = token_map.get("en").fires(_ids(tok, "tell her"))
    assert [tok.convert_ids_to_tokens(src) for _, src, _ in fired] == ["▁her"]  # the positive control


@pytest.mark.parametrize("lang,text", [
    ("da", "jeg er her i dag"), ("nb", "jeg er her nå"), ("nl", "er is niets hier"),
    ("it", "il treno parte alle otto"), ("de", "man kann es nicht wissen"),
])
def test_no_swap_fires_on_other_languages_words(tok, token_map, lang, text):
    # da/nb "er" (is) and "her" (here), nl "er" (there), it "il" (the), de "man" (one): the text swap
    # leaves them alone, and the teacher's distribution is never changed on their tokens, at any position
    # of the row. (Danish "▁her" does start "her|re" (gentleman), a pair that holds only where two
    # targets diverge with "▁her" / "▁da": never here.)
    ids = _ids(tok, text)
    assert swap(text, lang) == text
    words = {"er", "her", "il", "man"}
    word_ids = {i for w in words for i in _ids(tok, w)[:1]} | {i for w in words for i in _ids(tok, w.title())[:1]}
    plan = plan_row(ids + [1], ids + [1], token_map.get(lang), "gendered")
    assert not word_ids & {s for src in plan.src for s in src}, (lang, text)
    assert not [p for p in token_map.get(lang).pairs if p.whole and p.src in word_ids]


@pytest.mark.parametrize("lang", LANGS)
def test_one_way_pairs_stay_one_way(token_map, lang):
    lexicon = load_lexicon(lang)
    for pair in token_map.get(lang).pairs:
        # Every token pair follows text sigma: its source word is swapped, and to this counterpart.
        word, counterpart = pair.word.split("'")[-1], pair.counterpart.split("'")[-1]  # l'acteur
        assert (lexicon.counterpart(word) or "").casefold() == counterpart.casefold(), (lang, pair)
    never = {"de": {"sie", "ihr", "ihre"}, "nl": {"zij", "haar"}, "sv": {"man"}}.get(lang, set())
    assert not [p for p in token_map.get(lang).pairs if p.word.lower().removeprefix("l'") in never]


@pytest.mark.parametrize("lang", LANGS)
def test_multi_piece_pairs_perturbed_at_the_diverging_piece(tok, token_map, lang):
    sigma = token_map.get(lang)
    multi = [p for p in sigma.pairs if p.context]
    assert multi, lang
    for pair in multi:
        a, b = _ids(tok, pair.word), _ids(tok, pair.counterpart)
        k = len(pair.context)
        assert a[:k] == b[:k] == list(pair.context) and (a[k], b[k]) == (pair.src, pair.dst), (lang, pair)
    pair = multi[0]
    target, cf_target = _ids(tok, f"{pair.word} ok"), _ids(tok, f"{pair.counterpart} ok")
    k = len(pair.context)
    plan = plan_row(target, cf_target, sigma, "gendered")
    at = dict(zip(plan.positions, zip(plan.cf_positions, plan.src, plan.dst)))
    assert k in at and at[k][0] == k and pair.src in at[k][1]
    assert at[k][2][at[k][1].index(pair.src)] == pair.dst
    # Before the divergence only whole-word pairs apply (none of which is the word's own piece).
    for t in range(k):
        assert t not in at or target[t] not in at[t][1]
    # The teacher's mass moves there: x puts it on src, x~ on dst.
    vocab = len(tok)
    probs = torch.full((1, len(target), vocab), 1.0 / vocab, dtype=torch.float64)
    cf = torch.full((1, len(cf_target), vocab), 1.0 / vocab, dtype=torch.float64)
    cf[0, k, pair.dst] = 10.0
    cf = cf / cf.sum(-1, keepdim=True)
    out = perturb_rows(probs, cf, [plan], "max")
    assert out[0, k, pair.src] > 5 * probs[0, k, pair.src]
    assert torch.allclose(out.sum(-1), torch.ones(1, len(target), dtype=torch.float64))
    untouched = [t for t in range(len(target)) if t not in at]
    assert torch.equal(out[0, untouched], probs[0, untouched])


def test_alignment_and_copy_rule():
    assert align_positions([1, 2, 3, 4], [1, 2, 3, 4]) == [0, 1, 2, 3]
    assert align_positions([1, 5, 3, 4], [1, 6, 7, 3, 4]) == [0, 1, 3, 4]  # replaced run: its first piece
    assert align_positions([1, 5, 4], [1, 5, 9, 4]) == [0, 1, 3]  # inserted piece: nothing maps to it
    assert copied_positions([7, 8, 9, 1], [8, 9, 2, 1], 1, never=[1]) == {0, 1}
    assert copied_positions([7, 8, 9, 1], [8, 9, 2, 8], 2) == {0, 1}
    assert copied_positions([7, 8], [8], 0) == set()
    sigma = TokenSigma("xx", [TokenPair((), 8, 9, "a", "b", True)], {})
    plan = plan_row([8, 8, 2], [9, 8, 2], sigma, "gendered", source=[5, 8], copy_min_run=1)
    assert plan.copied == 2 and plan.positions == [2] and plan.src == [[8]]
    with pytest.raises(ValueError, match="allowed values: gendered, all"):
        plan_row([1], [1], sigma, "some")


def test_perturb_all_tokens_symmetrises_label_distributions():
    # tokens="all": sigma is the identity outside the pairs, so with mean p^ is the average of the
    # teacher's distributions on x and x~ at aligned positions (labels are gender-neutral).
    p = torch.softmax(torch.randn(1, 3, 6, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(1, 3, 6, dtype=torch.float64), -1)
    plan = plan_row([1, 2, 3], [1, 2, 3], None, "all")
    out = perturb_rows(p, q, [plan], "mean", "all")
    assert torch.allclose(out, 0.5 * (p + q))
    assert torch.equal(perturb_rows(p, q, [None], "mean", "all"), p)
    assert perturb_rows(p, q, [plan], "none") is p


# ----------------------------------------------------------------------------- perturbation properties

VOCAB = 12
PAIRS = [(0, 1), (2, 3), (4, 5)]  # an involution on tokens 0..5; 6..11 are not gendered
SRC = [a for a, b in PAIRS] + [b for a, b in PAIRS]
DST = [b for a, b in PAIRS] + [a for a, b in PAIRS]
# Every pair at each of the 3 positions, partner position = own position (training's perturb_rows).
EVERYWHERE = RowPlan(positions=[0, 1, 2], cf_positions=[0, 1, 2], src=[SRC] * 3, dst=[DST] * 3)
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
    p_hat = perturb_rows(_probs(x_logits), _probs(cf_logits), [EVERYWHERE], mode)
    assert torch.all(p_hat >= 0)
    assert torch.allclose(p_hat.sum(-1), torch.ones(1, 3, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(logits_strategy, st.sampled_from(["max", "mean"]))
def test_gender_symmetric_teacher_is_unchanged(x_logits, mode):
    p = _probs(x_logits)
    # A symmetric teacher predicts sigma(w) on x~ exactly as it predicts w on x.
    p_cf = p[..., SIGMA]
    p_hat = perturb_rows(p, p_cf, [EVERYWHERE], mode)
    assert torch.allclose(p_hat, p, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(logits_strategy, st.sampled_from(["max", "mean"]))
def test_pair_mass_is_equalised_when_context_is_ignored(x_logits, mode):
    # A teacher whose prediction ignores the swap in its input (p(.|x~) = p(.|x)) prefers one gender
    # regardless of context: p^ gives both members of every pair the same probability.
    p = _probs(x_logits)
    p_hat = perturb_rows(p, p.clone(), [EVERYWHERE], mode)
    for a, b in PAIRS:
        assert torch.allclose(p_hat[..., a], p_hat[..., b], atol=1e-12)
    # Non-gendered tokens keep their relative probabilities.
    ratio = p_hat[..., 6:] / p[..., 6:]
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-9)


def test_perturb_max_hand_case_and_rows_without_a_plan():
    p = torch.tensor([[[0.6, 0.1, 0.3]]])
    p_cf = torch.tensor([[[0.2, 0.5, 0.3]]])
    plan = RowPlan(positions=[0], cf_positions=[0], src=[[0, 1]], dst=[[1, 0]])
    # p^(0) = max(0.6, p_cf(1)=0.5) = 0.6; p^(1) = max(0.1, p_cf(0)=0.2) = 0.2; p^(2) = 0.3; sum 1.1
    expected = torch.tensor([[[0.6, 0.2, 0.3]]]) / 1.1
    assert torch.allclose(perturb_rows(p, p_cf, [plan], "max"), expected)
    mean = perturb_rows(p, p_cf, [plan], "mean")
    assert torch.allclose(mean, torch.tensor([[[0.55, 0.15, 0.3]]]))
    assert torch.equal(perturb_rows(p, p_cf, [None], "max"), p)
    assert perturb_rows(p, p_cf, [plan], "none") is p


# ----------------------------------------------------------------------------- CDA on MASSIVE


def test_massive_counterfactual_carries_slot_labels_word_by_word():
    from data_prep.counterfactual import cda_examples, counterfactual_example
    from massive.format import MassiveExample

    ex = MassiveExample("7", "de-DE", "train", "calendar", "calendar_set", "", "",
                        ("erinnere", "meinen", "vater", "an", "sein", "treffen"),
                        ("Other", "person", "person", "Other", "Other", "event_name"))
    cf = counterfactual_example(ex)
    # The slot value "meinen vater" is swapped inside the span, determiner included; labels stay.
    assert cf.words == ("erinnere", "meine", "mutter", "an", "sein", "treffen")
    assert cf.slots == ex.slots and cf.intent == ex.intent and cf.id == "7~"
    assert cf.annot_utt == "erinnere [person : meine mutter] an sein [event_name : treffen]"
    plain = MassiveExample("8", "de-DE", "train", "alarm", "alarm_set", "", "", ("weck", "mich"), ("Other", "Other"))
    assert counterfactual_example(plain) is None
    assert counterfactual_example(MassiveExample("9", "ja-JP", "train", "a", "b", "", "", ("彼",), ("Other",))) is None
    assert [e.id for e in cda_examples([ex, plain], "two_sided")] == ["7", "7~", "8"]
    assert [e.id for e in cda_examples([ex, plain], "one_sided")] == ["7~", "8"]  # counterfactual only
    assert [e.id for e in cda_examples([ex, plain], "none")] == ["7", "8"]
    # repeat: two_sided's places, x again where two_sided has x~ (CRR's matched plain-KD data)
    assert [e.id for e in cda_examples([ex, plain], "repeat")] == ["7", "7", "8"]


@pytest.mark.parametrize("text", [
    "il fait nuageux aujourd'hui", "quel temps fait-il à paris", "il est temps de partir",
    "une voiture s'il vous plaît", "s’il te plaît", "est-ce qu'il y a du vent", "il faut acheter du pain",
    "quelle heure est-il", "Il Pleut",
])
def test_impersonal_french_il_is_never_swapped(text):
    from data_prep.counterfactual import swap_words_result

    words, result = swap_words_result(text.split(), "fr-FR")
    assert words == text.split() and result.count == 0


def test_personal_french_il_is_still_swapped_next_to_a_fixed_expression():
    from data_prep.counterfactual import swap_words_result

    assert swap_words_result("il mange et il pleut".split(), "fr-FR")[0] == "elle mange et il pleut".split()
    # Rule 7: inverted pronouns resume a noun subject (its grammatical gender) or are impersonal.
    for text in ("le temps sera-t-il beau", "les stocks étaient-ils en hausse", "céline dion est-elle née",
                 "il y a t-il quelque chose", "pour qu'il n'y ait pas de retard"):
        assert swap_words_result(text.split(), "fr-FR")[1].count == 0, text
    words, result = swap_words_result("dis à mon père qu'il y a un problème".split(), "fr-FR")
    assert words == "dis à ma mère qu'il y a un problème".split() and result.count == 1


def test_words_in_name_slots_are_kept_in_cda_and_in_the_fairness_set():
    from data_prep.counterfactual import counterfactual_example, name_slot_mask, swap_words_result
    from evaluation.fairness import counterfactual_set
    from massive.format import MassiveExample

    slots = ("Other", "Other", "Other", "business_name", "business_name", "Other", "Other", "relation")
    words = ("tweet", "complaint", "to", "burger", "king", "for", "my", "son")
    assert name_slot_mask(slots) == [False, False, False, True, True, False, False, False]
    swapped, result = swap_words_result(list(words), "en-US", keep=name_slot_mask(slots))
    assert swapped == ["tweet", "complaint", "to", "burger", "king", "for", "my", "daughter"] and result.count == 1
    ex = MassiveExample("3", "en-US", "test", "social", "social_post", "", "", words, slots)
    assert counterfactual_example(ex).words == tuple(swapped)
    assert counterfactual_set([ex], "en-US")[0][1].words == swapped
    from distill.data import Swapper  # task distillation's CDA swaps the same way

    assert Swapper(["en"]).utterance(ex) == (swapped, list(slots), 0)
    only_name = MassiveExample("4", "en-US", "test", "social", "social_post", "", "", words[:5], slots[:5])
    assert counterfactual_example(only_name) is None and counterfactual_set([only_name], "en-US") == []
    with pytest.raises(ValueError, match="flags"):
        swap_words_result(list(words), "en-US", keep=[True])


def test_packed_row_language_is_that_of_its_swapped_documents():
    from distill.data import row_language

    assert row_language([("en", 40, False), ("da", 10, True), ("de", 12, True)]) == "de"
    assert row_language([("en", 40, False), ("da", 10, False)]) == "en"  # none swapped: the longest
    assert row_language([(None, 40, False)]) is None


def test_massive_distill_pairs_carry_language_and_plan(massive_dir, tiny_tokenizer_dir):
    from data_prep.tokenizer import load_tokenizer
    from distill.config import DistillConfig
    from distill.data import MassiveDistillData

    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = DistillConfig(task="massive", massive_data=str(massive_dir), locales=["de-DE"], num_train_examples=400,
                        num_eval_examples=4, cda="two_sided")
    data = MassiveDistillData(cfg, tok)
    pairs = data.pairs(list(range(400)), 0)
    swapped = [p for p in pairs if p.swapped]
    assert swapped and all(p.lang == "de" and p.changed for p in swapped)
    assert len(pairs) == 400 + len(swapped)  # two-sided: each gendered utterance once more, swapped
    token_map = build_token_map(tok, ["de"])
    for p in swapped:
        # MASSIVE targets are labels: the counterfactual's target is the original's, so every position
        # aligns, and with tokens="all" each one is perturbed (none is copied from the source here).
        assert list(p.train.target) == list(p.partner.target)
        plan = plan_row(p.train.target, p.partner.target, token_map.get(p.lang), "all", p.train.source,
                        data.copy_min_run, [tok.eos_token_id, tok.pad_token_id])
        assert plan.positions == [t for t in range(len(p.train.target)) if t not in
                                  copied_positions(p.train.source, p.train.target, 1, [tok.eos_token_id])]


def test_contractions_follow_the_swapped_noun_and_carry_the_slot_labels():
    from data_prep.counterfactual import carry_labels, counterfactual_example, swap_utterance
    from massive.format import MassiveExample

    # Spanish "al" = a + el splits, "de la" merges; each output word knows the words it came from.
    words = "envía un correo al tío jose".split()
    slots = ["Other", "Other", "Other", "Other", "relation", "person"]
    out, out_slots, result = swap_utterance(words, slots, "es-ES")
    assert out == "envía un correo a la tía jose".split() and result.repaired == 1 and result.conflicts == 0
    assert result.sources == ((0,), (1,), (2,), (3,), (3,), (4,), (5,))
    assert out_slots == ["Other", "Other", "Other", "Other", "Other", "relation", "person"]
    out, out_slots, result = swap_utterance("lo último de la mujer".split(), ["Other"] + ["news_topic"] * 4, "es-ES")
    assert out == "lo último del hombre".split() and result.sources == ((0,), (1,), (2, 3), (4,))
    assert out_slots == ["Other", "news_topic", "news_topic", "news_topic"]
    # French du / au, German zum / zur, both ways.
    assert swap_utterance("appelle la sœur de la mère".split(), ["Other"] * 6, "fr-FR")[0] == \
        "appelle le frère du père".split()
    assert swap_utterance("parle au père".split(), ["Other"] * 3, "fr-FR")[0] == "parle à la mère".split()
    assert swap_utterance("bring das buch zur mutter".split(), ["Other"] * 5, "de-DE")[0] == \
        "bring das buch zum vater".split()
    # Before a vowel the contraction elides: "à la tante" -> "à l'oncle", not "au oncle".
    out, out_slots, result = swap_utterance("dis à la tante bonjour".split(), ["Other", "Other", "relation", "relation",
                                                                           "Other"], "fr-FR")
    assert out == "dis à l'oncle bonjour".split() and out_slots == ["Other", "Other", "relation", "Other"]
    assert result.conflicts == 0
    # What cannot be repaired is counted: Italian elision is not written ("il uomo" for "l'uomo").
    it = load_lexicon("it")
    assert [it.swap_result(t).conflicts for t in ("la donna", "della donna", "l'uomo", "la zia")] == [1, 1, 1, 0]
    # A merged word takes the first label that is not Other.
    assert carry_labels(["Other", "relation", "x"], ((0, 1), (2,))) == ["relation", "x"]
    # CDA rebuilds the example from the carried labels.
    ex = MassiveExample("5", "es-ES", "train", "email", "email_sendemail", "", "", tuple(words), tuple(slots))
    cf = counterfactual_example(ex)
    assert cf.words == tuple("envía un correo a la tía jose".split()) and len(cf.slots) == 7
    assert cf.annot_utt == "envía un correo a la [relation : tía] [person : jose]"

