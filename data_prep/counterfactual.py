"""Counterfactual role reversal, word level: gendered-word swaps (sigma) per language, CDA, and MASSIVE
counterfactuals with their slot labels carried. Used by data preparation, distillation, fine-tuning
and the fairness evaluation alike.

Lexicons
--------
`data_prep/lexicons/<lang>.tsv`, one per language (en de fr es it pt nl sv da nb), a header line and the
columns `male  female  category  direction  notes`:

- category: pronoun | kinship | title | role | person (generic person nouns: man/woman, boy/girl) |
  agreement (determiners and possessives that follow a swapped noun, rule 5);
- direction (optional, empty = both): `both` swaps either way; `to_female` only male -> female,
  `to_male` only female -> male. One-way rows exist for words that are ambiguous in one direction
  (German "sie" is also "they" and formal "Sie", so "er" -> "sie" but "sie" is left alone);
- notes: free text (why a row is one-way, known mis-swaps).

Rules of sigma (`Lexicon.swap`), stated once here:

1. Whole words only: a lexicon word matches where it is neither preceded nor followed by a Unicode
   word character (`\\w`), so "he" never matches inside "the" or "hello"; "he's" -> "she's",
   "l'acteur" -> "l'actrice", "step-father" -> "step-mother". Multi-word entries ("petit ami") and
   hyphenated ones ("grand-père") match as a whole, longest entry first.
2. Case is kept: lower -> lower, Title -> Title, UPPER -> UPPER (mixed case -> the lexicon's form).
3. A word listed in several rows maps to the counterpart of its FIRST row (per direction). This is
   the ambiguity rule: English "her" is listed first against "his", so "her" -> "his" (the possessive
   reading), "him" -> "her", "his" -> "her", "hers" -> "his". One exception (`_OBJECT_READING`):
   "her" at the end or before a word that cannot be the noun it would determine (a preposition,
   conjunction, determiner, pronoun, adverb, a few verbs: "let her know", "ask her if", "call her")
   is the object "him". "I saw her dog" -> "I saw his dog" stays right, "send her flowers" -> "send
   his flowers" is the accepted error. French/Spanish/Portuguese "femme"/"mujer"/"mulher" ->
   "homme"/"hombre"/"homem" also where they mean "wife".
4. Entries written capitalised (German nouns: "Junge", "Mann") match only capitalised or UPPER words
   in cased text, so the adjective "junge" is not swapped; in all-lowercase text (MASSIVE utterances
   are lowercased) every entry matches regardless of case.
5. Grammatical agreement: rows of category `agreement` (determiners and possessive adjectives:
   French le/la, mon/ma; German ein/eine, mein/meine, dem/der; Spanish, Italian, Portuguese) are never
   swapped on their own. When sigma swaps a noun (not a pronoun), up to two agreement words right
   before it follow the noun's new gender ("ma fille" -> "mon garçon", "la mia ragazza" -> "il mio
   ragazzo"), in the row's direction only: German is one-way (mein -> meine, but meine -> mein/meinen
   depends on the case). Contractions of a preposition and an article are agreement rows too: Spanish
   del/de la, al/a la, French du/de la, au/à la, German zum/zur, vom/von der, im/in der ("de la madre"
   -> "del padre"); the word list of a MASSIVE utterance then changes length, and
   `swap_words_result` says which input words each output word comes from, so slot labels follow
   (`carry_labels`). French elision and euphony follow the new noun's first sound (`_BEFORE_VOWEL`,
   `_FULL_ARTICLE`): "la tante" -> "l'oncle", "de la femme" -> "de l'homme", "l'oncle" -> "la tante",
   "mon ami" -> "mon amie", "cette actrice" -> "cet acteur". German feminine determiners after a
   preposition take the masculine form of the case the preposition and their ending show: "für meine
   Schwester" -> "für meinen Bruder", "mit meiner Mutter" -> "mit meinem Vater". What cannot be
   repaired is counted (`SwapResult.conflicts`): a determiner of the other gender left in place
   ("meine Vater" without a preposition: nominative "mein" or accusative "meinen"), an Italian article
   that should elide ("la amica"). German plural "meine Brüder" -> "meine Schwestern" is right, but
   the reverse counts a conflict too (the lexicon does not know number). Bare German "der"
   (masculine nominative or feminine dative) and the Dutch/Scandinavian articles are left out.
   Ambiguous function words are left out rather than mis-swapped: French/Italian unstressed "lui"/"gli"/
   "le" (to him/to her), German bare "sein" (also "to be"), Dutch "zijn" (also "to be"), Swedish "man"
   (also the pronoun "one") as a source word.
6. Fixed expressions: `<lang>.fixed` beside the lexicon lists expressions, one per line, inside which
   nothing is swapped: the impersonal French "il" (il fait beau, quel temps fait-il, il y a, il faut,
   s'il vous plait), whose "elle" would be ungrammatical. MASSIVE words inside name slots
   (`*_name`: "burger king" as business_name, a song title) are kept too (`swap_words_result(keep=)`,
   `name_slot_mask`): an entity's name has no gender to reverse.
7. French subject pronouns joined to their verb by a hyphen are kept (`_INVERSION_KEPT`): inversion
   mostly resumes a noun subject and takes its grammatical gender ("le temps sera-t-il", "les stocks
   étaient-ils", "céline dion est-elle née", whose name rule 6 keeps) or is impersonal ("y a-t-il").

The token-level side (teacher-prediction perturbation) is `distill/perturb.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.locales import LEXICON_LOCALES
from massive.format import OTHER, MassiveExample

if TYPE_CHECKING:  # pragma: no cover
    pass

LEXICON_DIR = Path(__file__).parent / "lexicons"
CATEGORIES = ("pronoun", "kinship", "title", "role", "person", "agreement")
# Categories of the words sigma swaps on their own; "agreement" rows are determiners and possessive
# adjectives, changed only in front of a swapped noun (rule 5).
WORD_CATEGORIES = ("pronoun", "kinship", "title", "role", "person")
# Languages whose articles elide before a vowel (l'homme): rule 5's elision check, and the
# determiners that should have elided ("la amica", "du oncle" for "de l'oncle", "della amica").
_ELIDING = ("fr", "it")
_ELIDED_BEFORE_VOWEL = frozenset(("le", "la", "du", "au", "de la", "à la", "il", "lo", "del", "al", "dal", "nel",
                                  "sul", "della", "alla", "dalla", "nella", "sulla"))
# Rule 5 repairs before a vowel-initial swapped noun, per language: determiner -> its elided or euphonic
# form; a form ending in an apostrophe joins the noun ("la" + "amie" -> "l'amie", "du" + "homme" ->
# "de l'homme"), the others stay words ("ma amie" -> "mon amie", "ce acteur" -> "cet acteur").
_BEFORE_VOWEL = {
    "fr": {"le": "l'", "la": "l'", "du": "de l'", "de la": "de l'", "au": "à l'", "à la": "à l'", "ma": "mon",
           "ta": "ton", "sa": "son", "ce": "cet", "cette": "cet"},
}
# ... and an elided l' before a swapped noun that starts with a consonant: the full article of its gender
# ("l'oncle" -> "la tante").
_FULL_ARTICLE = {"fr": {"male": "le", "female": "la"}}
# German determiners of a swapped feminine noun after a preposition, which fixes their case: feminine
# accusative (meine, eine, diese) -> masculine accusative (meinen, einen, diesen); feminine dative
# (meiner, einer) -> masculine dative (meinem, einem). Without a preposition "meine" is nominative or
# accusative and stays a counted conflict.
_GERMAN_PREPOSITIONS = frozenset(
    "für durch gegen ohne um bis an auf in über unter vor hinter neben zwischen mit von zu bei nach aus seit "
    "gegenüber außer".split())
_GERMAN_STEMS = frozenset("mein dein sein ihr ein kein unser eur dies jed".split())
# Rule 3's exception, per language: (word, its object reading, the next words that mark it): English
# "her" is the object "him", not the possessive "his", before these words (prepositions, conjunctions,
# determiners, pronouns, adverbs, a few verbs: none can be the noun "her" would determine) and at the end.
_OBJECT_READING = {
    "en": ("her", "him", frozenset(
        "to at on about after for from with in into of by up back out off over down around and or but if that "
        "how what when where why who whether a an the my your his our their this these those some any i we you "
        "he she they it me him them today tomorrow tonight now later again yesterday soon please not know see "
        "be go come get have do make take call ask tell feel think sleep stay happy".split())),
}
# Languages whose subject pronouns joined to the verb by a hyphen are kept (rule 7): French inversion
# ("sera-t-il", "étaient-ils", "est-elle") mostly resumes a noun subject and takes its grammatical gender
# ("le temps sera-t-il", "céline dion est-elle née", a kept name) or is impersonal ("y a-t-il").
_INVERSION_KEPT = ("fr",)
DIRECTIONS = ("both", "to_female", "to_male")
HEADER = ("male", "female", "category", "direction", "notes")
CDA_MODES = ("none", "one_sided", "two_sided", "repeat")

# MASSIVE locale -> lexicon language; other locales have no lexicon (counterfactuals are identities).
LOCALE_TO_LANGUAGE = {loc: loc.split("-")[0] for loc in LEXICON_LOCALES}

# A few frequent function words per language for `guess_language` (documents in the packed
# pretraining mixture carry no language tag). Words shared by languages count for each of them.
_FUNCTION_WORDS = {
    "en": "the and is of to in that it you was for with this are not".split(),
    "de": "der die und ist nicht das ich ein zu den mit sich auch eine".split(),
    "fr": "le la les et est une des pas que je dans pour vous avec".split(),
    "es": "el los las y es una que del por con para pero muy está".split(),
    "it": "il di che è non una gli per con della sono anche molto".split(),
    "pt": "o os que não uma do da em com para são mas muito está".split(),
    "nl": "de het een en is niet van dat ik op zijn met ook".split(),
    "sv": "och är att det inte en jag på för som med har vad".split(),
    "da": "og er at det ikke en jeg på af som med har hvad mig".split(),
    "nb": "og er at det ikke en jeg på av som med har hva meg".split(),
}


class LexiconError(ValueError):
    """A lexicon file is malformed (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class LexiconEntry:
    male: str
    female: str
    category: str
    direction: str
    notes: str
    line: int
    """Line number in the TSV file (1 = header)."""


def available_languages() -> tuple[str, ...]:
    """Languages with a lexicon file, sorted."""
    return tuple(sorted(p.stem for p in LEXICON_DIR.glob("*.tsv")))


def lexicon_language(locale: str) -> str | None:
    """The lexicon language of a MASSIVE locale ("en-US" -> "en"), a bare language code, or None."""
    if locale in LOCALE_TO_LANGUAGE:
        return LOCALE_TO_LANGUAGE[locale]
    lang = locale.split("-")[0].split("_")[0].lower()
    if lang == "no":
        lang = "nb"
    return lang if lang in available_languages() else None


def read_lexicon_file(path: str | Path) -> list[LexiconEntry]:
    """Parse a lexicon TSV strictly; errors name the file, line and allowed values."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or tuple(c.strip() for c in lines[0].split("\t"))[:3] != HEADER[:3]:
        raise LexiconError(f"{path}:1: header must be {' <TAB> '.join(HEADER)} (direction and notes optional)")
    entries = []
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        cols = [c.strip() for c in raw.split("\t")]
        if len(cols) < 3 or len(cols) > 5:
            raise LexiconError(f"{path}:{number}: expected 3 to 5 tab-separated columns, got {len(cols)}: {raw!r}")
        cols += [""] * (5 - len(cols))
        male, female, category, direction, notes = cols
        if not male or not female:
            raise LexiconError(f"{path}:{number}: empty male or female word")
        if male.casefold() == female.casefold():
            raise LexiconError(f"{path}:{number}: male and female words are the same ({male!r})")
        if category not in CATEGORIES:
            raise LexiconError(
                f"{path}:{number}: category {category!r} is not allowed; allowed values: {', '.join(CATEGORIES)}"
            )
        direction = direction or "both"
        if direction not in DIRECTIONS:
            raise LexiconError(
                f"{path}:{number}: direction {direction!r} is not allowed; allowed values: {', '.join(DIRECTIONS)}"
            )
        entries.append(LexiconEntry(male, female, category, direction, notes, number))
    if not entries:
        raise LexiconError(f"{path}: no entries")
    return entries


@dataclasses.dataclass(frozen=True)
class SwapResult:
    """sigma(text) with what it did."""

    text: str
    count: int
    """Lexicon words replaced."""
    repaired: int
    """Determiners and possessives changed to agree with a swapped noun (rule 5)."""
    conflicts: int
    """Places left without agreement: a determiner of the other gender, or an elision (l') or full
    article that no longer fits the swapped noun's first sound (rule 5)."""
    edits: tuple[tuple[int, int, str], ...] = ()
    """(start, end, replacement) in the input text, in order: each swapped word and each changed
    determiner on its own (a contraction may become two words: Spanish "del" -> "de la")."""
    sources: tuple[tuple[int, ...], ...] = ()
    """`swap_words_result` only: per output word, the input words it comes from (one for one, except
    around contractions: "al" -> "a la" gives both words the source of "al", "de la" -> "del" one word
    with two sources), so per-word labels follow (`carry_labels`)."""


class Lexicon:
    """The gendered word pairs of one language and the swap sigma built from them."""

    def __init__(self, lang: str, entries: Sequence[LexiconEntry], path: Path | None = None) -> None:
        self.lang = lang
        self.path = path
        self.entries = list(entries)
        words = [e for e in self.entries if e.category != "agreement"]
        # casefolded source word -> (target in lexicon spelling, source written capitalised,
        # gender of the target, the row's category)
        self._map: dict[str, tuple[str, bool, str, str]] = {}
        for e in words:
            if e.direction in ("both", "to_female"):
                self._map.setdefault(e.male.casefold(), (e.female, e.male[:1].isupper(), "female", e.category))
            if e.direction in ("both", "to_male"):
                self._map.setdefault(e.female.casefold(), (e.male, e.female[:1].isupper(), "male", e.category))
        # Agreement (rule 5): new gender -> {casefolded determiner: counterpart}; a determiner's own gender
        # where it belongs to one column only.
        self._agree: dict[str, dict[str, str]] = {"female": {}, "male": {}}
        columns: dict[str, set[str]] = {}
        for e in self.entries:
            if e.category != "agreement":
                continue
            if e.direction in ("both", "to_female"):
                self._agree["female"].setdefault(e.male.casefold(), e.female)
            if e.direction in ("both", "to_male"):
                self._agree["male"].setdefault(e.female.casefold(), e.male)
            columns.setdefault(e.male.casefold(), set()).add("male")
            columns.setdefault(e.female.casefold(), set()).add("female")
        self._det_gender = {w: g.pop() for w, g in columns.items() if len(g) == 1}
        self.has_agreement = bool(columns)
        alternation = _alternation(w for w in {x for e in words for x in (e.male, e.female)}
                                   if w.casefold() in self._map)
        determiners = _alternation({x for e in self.entries if e.category == "agreement" for x in (e.male, e.female)})
        prefix = ""
        if determiners:
            prefix = rf"(?:(?P<d1>{determiners})(?P<s1>\s+))?(?:(?P<d2>{determiners})(?P<s2>\s+))?"
        elision = r"(?P<el>[lL]['’])?" if lang in _ELIDING else ""
        self._regex = re.compile(rf"(?<!\w){prefix}{elision}(?P<w>{alternation})(?!\w)", re.IGNORECASE)
        self.fixed = read_fixed_expressions(path.with_suffix(".fixed")) if path is not None else []
        # Apostrophes written either way; an expression matches as whole words.
        fixed = "|".join(re.escape(e).replace("'", "['’]") for e in sorted(self.fixed, key=len, reverse=True))
        self._fixed_regex = re.compile(rf"(?<!\w)(?:{fixed})(?!\w)", re.IGNORECASE) if fixed else None

    def __repr__(self) -> str:
        return f"Lexicon({self.lang!r}, {len(self.entries)} pairs)"

    def pairs(self, categories: Sequence[str] = WORD_CATEGORIES) -> list[tuple[str, str]]:
        """(male, female) of every row in the given categories, whatever its direction."""
        return [(e.male, e.female) for e in self.entries if e.category in categories]

    def counterpart(self, word: str) -> str | None:
        """sigma(word) for a single lexicon word (case kept), else None."""
        hit = self._map.get(" ".join(word.split()).casefold())
        return _match_case(word, hit[0]) if hit else None

    def swap_result(self, text: str, protected: Sequence[tuple[int, int]] = ()) -> SwapResult:
        """sigma(text) and its counts (rules in the module doc). `protected`: character spans of `text`
        left as they are (rule 6: name slots); a gendered word inside one is not swapped, a determiner
        inside one is not changed."""
        cased = any(c.isupper() for c in text)
        counts = {"count": 0, "repaired": 0, "conflicts": 0}
        fixed = [m.span() for m in self._fixed_regex.finditer(text)] if self._fixed_regex else []
        edits: list[tuple[int, int, str]] = []

        def inside(spans: Sequence[tuple[int, int]], start: int, end: int) -> bool:
            return any(a < end and start < b for a, b in spans)

        def replace(match: re.Match[str]) -> str:
            word = match.group("w")
            if any(start <= match.start("w") < end for start, end in fixed) or inside(protected, *match.span("w")):
                return match.group(0)
            target, capitalised_only, gender, category = self._map[" ".join(word.split()).casefold()]
            if capitalised_only and cased and not word[:1].isupper():
                return match.group(0)
            if category == "pronoun" and self.lang in _INVERSION_KEPT and text[match.start("w") - 1:match.start("w")] == "-":
                return match.group(0)
            counts["count"] += 1
            target = self._object_reading(word, text[match.end("w"):]) or target
            new = _match_case(word, target)
            before = re.search(r"(\w+)\s+$", text[:match.start()])
            # (start, end, text) of each determiner in front of the noun, after agreement
            dets: list[tuple[int, int, str]] = []
            for d in ("d1", "d2"):
                det = match.groupdict().get(d)
                if det is None:
                    continue
                if category != "pronoun" and not inside(protected, *match.span(d)):
                    det = self._agree_determiner(det, gender, counts, before.group(1) if before and not dets else None)
                dets.append((*match.span(d), det))
            elided = match.groupdict().get("el")  # the l' of "l'oncle"
            start = match.start("el") if elided else match.start("w")
            if elided and _vowel_initial(new):
                new = elided + new
            elif elided and self.lang in _FULL_ARTICLE:
                # "l'oncle" -> "la tante": the elided article becomes a word again.
                counts["repaired"] += 1
                new = f"{_match_case(elided[:1], _FULL_ARTICLE[self.lang][gender])} {new}"
            elif elided:
                counts["conflicts"] += 1
                new = elided + new
            elif dets and category != "pronoun" and _vowel_initial(new):
                d_start, d_end, det = dets[-1]
                repaired = _BEFORE_VOWEL.get(self.lang, {}).get(det.casefold())
                if repaired is not None:
                    counts["repaired"] += 1
                    repaired = _match_case(det, repaired)
                    if repaired.endswith("'"):  # "la" + "amie" -> "l'amie": one word from here on
                        dets.pop()
                        new, start = repaired + new, d_start
                    else:
                        dets[-1] = (d_start, d_end, repaired)
                elif self.lang in _ELIDING and det.casefold() in _ELIDED_BEFORE_VOWEL:
                    counts["conflicts"] += 1  # "la amica", "del amico": the article should elide
            out, pos = [], match.start()
            for d_start, d_end, det in dets:
                if det != text[d_start:d_end]:
                    edits.append((d_start, d_end, det))
                out += [text[pos:d_start], det]
                pos = d_end
            out.append(text[pos:start])
            edits.append((start, match.end("w"), new))
            return "".join(out) + new

        swapped = self._regex.sub(replace, text)
        return SwapResult(swapped, counts["count"], counts["repaired"], counts["conflicts"], tuple(edits))

    def _agree_determiner(self, det: str, gender: str, counts: dict[str, int], before: str | None = None) -> str:
        """The determiner `det` agreeing with a noun of the new `gender`; `before`: the word in front of it
        (German: a preposition fixes the case)."""
        key = det.casefold()
        if key in self._agree[gender]:
            counts["repaired"] += 1
            return _match_case(det, self._agree[gender][key])
        if self._det_gender.get(key, gender) != gender:
            cased = _german_masculine(key) if self.lang == "de" and gender == "male" and before is not None \
                and before.casefold() in _GERMAN_PREPOSITIONS else None
            if cased is not None:
                counts["repaired"] += 1
                return _match_case(det, cased)
            counts["conflicts"] += 1
        return det

    def _object_reading(self, word: str, rest: str) -> str | None:
        """Rule 3's exception: the object reading of `word` when the text after it (`rest`) marks one."""
        reading = _OBJECT_READING.get(self.lang)
        if reading is None or word.casefold() != reading[0]:
            return None
        after = re.match(r"\s*(\w+)", rest)
        return reading[1] if after is None or after.group(1).casefold() in reading[2] else None

    def swap(self, text: str) -> str:
        """sigma(text): every gendered word replaced by its counterpart (rules in the module doc)."""
        return self.swap_result(text).text


def _german_masculine(det: str) -> str | None:
    """The masculine form of a feminine German determiner in the case its ending shows: accusative
    -e -> -en ("meine" -> "meinen"), dative -er -> -em ("meiner" -> "meinem"); None if it is not one."""
    for ending, masculine in (("e", "en"), ("er", "em")):
        if det.endswith(ending) and det[: -len(ending)] in _GERMAN_STEMS:
            return det[: -len(ending)] + masculine
    return None


def _alternation(words: Any) -> str:
    ordered = sorted(set(words), key=lambda w: (-len(w), w))
    return "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in ordered)


def _vowel_initial(word: str) -> bool:
    return word[:1].casefold() in "aeiouhàâäéèêëîïôöùûüœæ"


def _match_case(source: str, target: str) -> str:
    if len(source) > 1 and source.isupper():
        return target.upper()
    if source[:1].isupper():
        return target[:1].upper() + target[1:].lower() if target[1:].islower() or not target[1:] else target
    if source.islower():
        return target.lower()
    return target


@functools.cache
def load_lexicon(lang: str) -> Lexicon:
    """The lexicon of a language code ("en") or MASSIVE locale ("en-US"); a .tsv path also works."""
    path = Path(lang)
    if path.suffix == ".tsv":
        return Lexicon(path.stem, read_lexicon_file(path), path)
    code = lexicon_language(lang)
    if code is None:
        raise LexiconError(
            f"no lexicon for language {lang!r}; available: {', '.join(available_languages())} "
            f"(files in {LEXICON_DIR})"
        )
    path = LEXICON_DIR / f"{code}.tsv"
    return Lexicon(code, read_lexicon_file(path), path)


def guess_language(text: str) -> str | None:
    """The lexicon language whose function words occur most often in `text` (None if none occur)."""
    tokens = re.findall(r"\w+", text.lower())
    if not tokens:
        return None
    best, best_score = None, 0
    for lang in available_languages():
        vocab = set(_FUNCTION_WORDS.get(lang, ()))
        score = sum(t in vocab for t in tokens)
        if score > best_score:
            best, best_score = lang, score
    return best


def swap(text: str, lang: str) -> str:
    """sigma(text) in language `lang` (a code or MASSIVE locale); "auto" guesses the language;
    a language without a lexicon leaves the text unchanged."""
    code = guess_language(text) if lang == "auto" else lexicon_language(lang)
    return load_lexicon(code).swap(text) if code else text


def swap_words_result(words: Sequence[str], lang: str, keep: Sequence[bool] | None = None
                      ) -> tuple[list[str], SwapResult]:
    """sigma over a word list and what it did (words replaced, determiners repaired, agreement
    conflicts), with `SwapResult.sources`: the input words behind each output word. The words are
    swapped one for one, except a contraction that agreement splits or merges (Spanish "al tío" ->
    "a la tía", "de la madre" -> "del padre"; French "du", "au"). `keep`: one flag per word; flagged
    words stay as they are (e.g. `name_slot_mask`)."""
    if keep is not None and len(keep) != len(words):
        raise ValueError(f"keep has {len(keep)} flags for {len(words)} words")
    code = lexicon_language(lang)
    joined = " ".join(words)
    starts = [0]
    for w in words[:-1]:
        starts.append(starts[-1] + len(w) + 1)
    identity = tuple((i,) for i in range(len(words)))
    if code is None:
        return list(words), SwapResult(joined, 0, 0, 0, (), identity)
    protected = [(starts[i], starts[i] + len(w)) for i, w in enumerate(words) if keep is not None and keep[i]]
    result = load_lexicon(code).swap_result(joined, protected)
    if not result.edits:
        return list(words), dataclasses.replace(result, sources=identity)
    out, sources = _apply_word_edits(joined, starts, result.edits)
    return out, dataclasses.replace(result, text=" ".join(out), sources=tuple(sources))


def _apply_word_edits(text: str, starts: list[int], edits: Sequence[tuple[int, int, str]]
                      ) -> tuple[list[str], list[tuple[int, ...]]]:
    """The words of `text` (words joined by single spaces, starting at `starts`) after `edits`
    ((start, end, replacement), in order) and, per output word, the input words it comes from. A
    replacement of n words over m input words maps one for one when n == m; a split (n > m) gives the
    extra words the last input word, a merge (n < m) gives the last output word the remaining input
    words."""
    import bisect

    def word_at(offset: int) -> int:
        return bisect.bisect_right(starts, offset) - 1

    chars: list[str] = []
    owners: list[tuple[int, ...] | None] = []  # per output character; None = a separating space

    def copy(a: int, b: int) -> None:
        for k in range(a, b):
            chars.append(text[k])
            owners.append(None if text[k] == " " else (word_at(k),))

    pos = 0
    for start, end, new in edits:
        copy(pos, start)
        covered = list(range(word_at(start), word_at(max(start, end - 1)) + 1))
        parts = new.split(" ")
        for n, part in enumerate(parts):
            if n:
                chars.append(" ")
                owners.append(None)
            if len(parts) >= len(covered):
                owner = (covered[min(n, len(covered) - 1)],)
            else:
                owner = tuple(covered[n:]) if n == len(parts) - 1 else (covered[n],)
            chars.extend(part)
            owners.extend([owner] * len(part))
        pos = end
    copy(pos, len(text))
    out, sources, current, current_sources = [], [], [], []
    for ch, owner in [*zip(chars, owners), (" ", None)]:
        if owner is None:
            if current:
                out.append("".join(current))
                sources.append(tuple(dict.fromkeys(current_sources)))
            current, current_sources = [], []
        else:
            current.append(ch)
            current_sources.extend(owner)
    return out, sources


def carry_labels(labels: Sequence[str], sources: Sequence[Sequence[int]]) -> list[str]:
    """Per-word labels (MASSIVE slots) carried to the swapped words (`SwapResult.sources`): each output
    word takes the label of its source word; a word merged from several takes their first label that
    is not Other ("de [relation: la madre]" -> "[relation: del padre]")."""
    out = []
    for src in sources:
        named = [labels[i] for i in src if labels[i] != OTHER]
        out.append(named[0] if named else OTHER)
    return out


def swap_utterance(words: Sequence[str], slots: Sequence[str], locale: str
                   ) -> tuple[list[str], list[str], SwapResult]:
    """sigma of a MASSIVE utterance: (swapped words, their slot labels, what sigma did). The words inside
    name slots are kept (rule 6); the labels follow the words (`carry_labels`), so a gendered word inside
    a slot value keeps its label. The one swap of CDA, task distillation and the fairness set."""
    out, result = swap_words_result(list(words), locale, keep=name_slot_mask(slots))
    return out, carry_labels(slots, result.sources), result


def name_slot_mask(slots: Sequence[str]) -> list[bool]:
    """Per word: inside a MASSIVE name slot (business_name, song_name, place_name, ...), where sigma
    keeps the words ("burger king" is a restaurant, not a king)."""
    return [slot.endswith("_name") for slot in slots]


def read_fixed_expressions(path: Path) -> list[str]:
    """The fixed expressions of a lexicon (rule 6): one per line, # comments; none when the file is absent."""
    if not path.exists():
        return []
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = " ".join(raw.split("#", 1)[0].split())
        if line:
            out.append(line)
    return out


@dataclasses.dataclass(frozen=True)
class CDAItem:
    """One training item of counterfactual data augmentation and its counterfactual partner."""

    text: Any
    """What the student trains on (a string, or whatever `cda_items` was given: e.g. token rows)."""
    counterfactual: Any
    """sigma(text): the teacher's x~ for perturbation (for a swapped item, the original x)."""
    swapped: bool
    """`text` is the counterfactual of an original input."""
    source_index: int
    """Index of the original in the input list."""


def cda_items(originals: Sequence[Any], counterfactuals: Sequence[Any], mode: str = "two_sided",
              p: float = 1.0, rng: Any = None) -> list[CDAItem]:
    """CDA over precomputed counterfactuals (x_i, x~_i); an item counts as changed when x~ != x.

    - "none": every x as is;
    - "one_sided": x replaced by x~ with probability p (1.0, the default: counterfactual only, the
      paper's one-sided variant; unchanged items stay);
    - "two_sided": x and, when it changed, x~ too (right after x; unchanged items are not doubled);
    - "repeat": two_sided's items without the swap: x and, when it changed, x again where two_sided puts
      x~ (the partner stays x~). The matched reference of two_sided: the same items per batch, the same
      order and lengths, every gendered x seen as often as two_sided shows it as x or x~.

    `rng` has `.random()` (random.Random or numpy Generator); required for one_sided with p < 1.
    """
    if mode not in CDA_MODES:
        raise ValueError(f"cda mode {mode!r} is not allowed; allowed values: {', '.join(CDA_MODES)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cda probability {p} must be in [0, 1]")
    if len(originals) != len(counterfactuals):
        raise ValueError(f"{len(originals)} originals but {len(counterfactuals)} counterfactuals")
    if mode == "one_sided" and rng is None and p < 1.0:
        raise ValueError("one_sided CDA needs an rng")
    out: list[CDAItem] = []
    for i, (x, cf) in enumerate(zip(originals, counterfactuals)):
        changed = bool(cf != x) if not hasattr(cf, "shape") else not _array_equal(cf, x)
        if mode == "one_sided" and changed and (p >= 1.0 or rng.random() < p):
            out.append(CDAItem(cf, x, True, i))
            continue
        out.append(CDAItem(x, cf, False, i))
        if mode == "two_sided" and changed:
            out.append(CDAItem(cf, x, True, i))
        elif mode == "repeat" and changed:
            out.append(CDAItem(x, cf, False, i))
    return out


def _array_equal(a: Any, b: Any) -> bool:
    return tuple(a.shape) == tuple(b.shape) and bool((a == b).all())


def augment(
    texts: Sequence[str],
    mode: str = "two_sided",
    p: float = 1.0,
    rng: Any = None,
    lang: str | Sequence[str] = "auto",
) -> list[CDAItem]:
    """Counterfactual data augmentation of texts (see `cda_items` for the modes).

    `lang` is one language/locale for all texts, one per text, or "auto" (guessed per text).
    """
    langs = [lang] * len(texts) if isinstance(lang, str) else list(lang)
    if len(langs) != len(texts):
        raise ValueError(f"{len(langs)} languages for {len(texts)} texts")
    counterfactuals = [swap(text, text_lang) for text, text_lang in zip(texts, langs)]
    return cda_items(texts, counterfactuals, mode, p, rng)


# ----------------------------------------------------------------------------- MASSIVE counterfactuals


def counterfactual_example(example: MassiveExample) -> MassiveExample | None:
    """The gender-swapped example (data_prep.counterfactual's sigma in the example's locale), or None when
    the locale has no lexicon or the utterance no gendered word. The slot labels follow the words
    (`swap_utterance`: a gendered word inside a slot value keeps its label, "call [person: mom]" ->
    "call [person: dad]"; a split contraction gives both words its label); the intent is unchanged;
    the id gets a "~" suffix."""
    from dataclasses import replace

    if lexicon_language(example.locale) is None:
        return None
    words, slots, _ = swap_utterance(example.words, example.slots, example.locale)
    if words == list(example.words):
        return None
    spans, i = [], 0
    while i < len(words):  # annot_utt rebuilt from the swapped words and their labels
        j = i
        while j + 1 < len(words) and slots[j + 1] == slots[i] != OTHER:
            j += 1
        text = " ".join(words[i : j + 1])
        spans.append(text if slots[i] == OTHER else f"[{slots[i]} : {text}]")
        i = j + 1
    return replace(example, id=f"{example.id}~", utt=" ".join(words), annot_utt=" ".join(spans),
                   words=tuple(words), slots=tuple(slots))


def cda_examples(examples: Sequence[MassiveExample], mode: str, p: float = 1.0, seed: int = 0) -> list[MassiveExample]:
    """Counterfactual data augmentation of MASSIVE examples (`data_prep.counterfactual.cda_items`):
    none (as is), one_sided (each gendered example replaced by its counterfactual with probability p;
    1.0 = counterfactual only, the paper's variant), two_sided (both) or repeat (each gendered example
    twice, unswapped)."""
    import random

    counterfactuals = [counterfactual_example(ex) or ex for ex in examples]
    items = cda_items(list(examples), counterfactuals, mode, p, random.Random(seed))
    return [item.text for item in items]
