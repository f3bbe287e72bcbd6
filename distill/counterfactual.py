"""Counterfactual role reversal: gendered-word swaps (sigma), CDA and teacher-prediction perturbation.

Lexicons
--------
`distill/lexicons/<lang>.tsv`, one per language (en de fr es it pt nl sv da nb), a header line and the
columns `male  female  category  direction  notes`:

- category: pronoun | kinship | title | role | person (generic person nouns: man/woman, boy/girl);
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
   the ambiguity rule: English "her" is listed first against "his", so "her" -> "his" always (the
   possessive reading; "I saw her" -> "I saw his" is the accepted error), "him" -> "her",
   "his" -> "her", "hers" -> "his". French/Spanish/Portuguese "femme"/"mujer"/"mulher" -> "homme"/
   "hombre"/"homem" also where they mean "wife".
4. Entries written capitalised (German nouns: "Junge", "Mann") match only capitalised or UPPER words
   in cased text, so the adjective "junge" is not swapped; in all-lowercase text (MASSIVE utterances
   are lowercased) every entry matches regardless of case.
5. Grammatical agreement (articles, adjectives: French "ma fille" -> "ma garçon") is NOT repaired:
   sigma swaps only lexicon words. Ambiguous function words are left out rather than mis-swapped:
   French/Italian unstressed "lui"/"gli"/"le" (to him/to her), German bare "sein" (also "to be"),
   Dutch "zijn" (also "to be"), Swedish "man" (also the pronoun "one") as a source word.

Teacher perturbation (`TokenSwapMap`, `perturb_probs`)
-------------------------------------------------------
A lexicon pair (a, b) becomes a token pair when both words are single tokens of the tokenizer, checked
in the forms lower/Title/UPPER, each with and without the leading-space marker "▁": every form in
which both sides are single tokens adds the token pair (both directions, whatever the text direction;
the first pair that claims a source token wins). Words that are several tokens are SKIPPED (their first
pieces are usually shared stems, e.g. "▁wait"+"ress"/"er", so perturbing them would move mass between
unrelated continuations); `TokenSwapMap.stats` counts them per language.

For target position t, p^(w) = f(p(w | x), p(sigma(w) | x~)) for every w with a token pair, the other
tokens keep p(w | x), and p^ is renormalised. Positions are aligned by the TARGET sequence: the teacher
is teacher-forced on y for x and on y~ = sigma(y) for x~, and position t of one is position t of the
other. That holds exactly when y~ has as many tokens as y (every swapped word has as many tokens as
its counterpart, and for MASSIVE text-to-text the target of x~ is y itself); rows where the lengths
differ fall back to p (no perturbation) and are counted by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    import torch

LEXICON_DIR = Path(__file__).parent / "lexicons"
CATEGORIES = ("pronoun", "kinship", "title", "role", "person")
DIRECTIONS = ("both", "to_female", "to_male")
HEADER = ("male", "female", "category", "direction", "notes")
CDAMode = Literal["none", "one_sided", "two_sided"]
CDA_MODES = ("none", "one_sided", "two_sided")
PerturbMode = Literal["none", "max", "mean"]
PERTURB_MODES = ("none", "max", "mean")

# MASSIVE locale -> lexicon language; other locales have no lexicon (counterfactuals are identities).
LOCALE_TO_LANGUAGE = {
    "en-US": "en", "de-DE": "de", "fr-FR": "fr", "es-ES": "es", "it-IT": "it", "pt-PT": "pt",
    "nl-NL": "nl", "sv-SE": "sv", "da-DK": "da", "nb-NO": "nb",
}

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


class Lexicon:
    """The gendered word pairs of one language and the swap sigma built from them."""

    def __init__(self, lang: str, entries: Sequence[LexiconEntry], path: Path | None = None) -> None:
        self.lang = lang
        self.path = path
        self.entries = list(entries)
        # casefolded source word -> (target in lexicon spelling, source written capitalised)
        self._map: dict[str, tuple[str, bool]] = {}
        for e in self.entries:
            if e.direction in ("both", "to_female"):
                self._map.setdefault(e.male.casefold(), (e.female, e.male[:1].isupper()))
            if e.direction in ("both", "to_male"):
                self._map.setdefault(e.female.casefold(), (e.male, e.female[:1].isupper()))
        words = sorted({w for e in self.entries for w in (e.male, e.female)}, key=lambda w: (-len(w), w))
        words = [w for w in words if w.casefold() in self._map]
        alternation = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words)
        self._regex = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)

    def __repr__(self) -> str:
        return f"Lexicon({self.lang!r}, {len(self.entries)} pairs)"

    def pairs(self, categories: Sequence[str] = CATEGORIES) -> list[tuple[str, str]]:
        """(male, female) of every row in the given categories, whatever its direction."""
        return [(e.male, e.female) for e in self.entries if e.category in categories]

    def counterpart(self, word: str) -> str | None:
        """sigma(word) for a single lexicon word (case kept), else None."""
        hit = self._map.get(" ".join(word.split()).casefold())
        return _match_case(word, hit[0]) if hit else None

    def swap_with_count(self, text: str) -> tuple[str, int]:
        """(sigma(text), number of words replaced)."""
        cased = any(c.isupper() for c in text)
        count = 0

        def replace(match: re.Match[str]) -> str:
            nonlocal count
            word = match.group(0)
            target, capitalised_only = self._map[" ".join(word.split()).casefold()]
            if capitalised_only and cased and not word[:1].isupper():
                return word
            count += 1
            return _match_case(word, target)

        return self._regex.sub(replace, text), count

    def swap(self, text: str) -> str:
        """sigma(text): every gendered word replaced by its counterpart (rules in the module doc)."""
        return self.swap_with_count(text)[0]

    def contains(self, text: str) -> bool:
        """Whether sigma changes `text`."""
        return self.swap_with_count(text)[1] > 0


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


def swap_words(words: Sequence[str], lang: str) -> list[str]:
    """sigma over a word list, keeping the number of words (so per-word slot labels stay aligned).

    Multi-word lexicon entries apply only when the swapped sentence keeps its word count; otherwise
    each word is swapped on its own.
    """
    joined = swap(" ".join(words), lang)
    out = joined.split(" ")
    if len(out) == len(words):
        return out
    return [swap(w, lang) for w in words]


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
              p: float = 0.5, rng: Any = None) -> list[CDAItem]:
    """CDA over precomputed counterfactuals (x_i, x~_i); an item counts as changed when x~ != x.

    - "none": every x as is;
    - "one_sided": x replaced by x~ with probability p (unchanged items stay);
    - "two_sided": x and, when it changed, x~ too (right after x; unchanged items are not doubled).

    `rng` has `.random()` (random.Random or numpy Generator); required for one_sided.
    """
    if mode not in CDA_MODES:
        raise ValueError(f"cda mode {mode!r} is not allowed; allowed values: {', '.join(CDA_MODES)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cda probability {p} must be in [0, 1]")
    if len(originals) != len(counterfactuals):
        raise ValueError(f"{len(originals)} originals but {len(counterfactuals)} counterfactuals")
    if mode == "one_sided" and rng is None:
        raise ValueError("one_sided CDA needs an rng")
    out: list[CDAItem] = []
    for i, (x, cf) in enumerate(zip(originals, counterfactuals)):
        changed = bool(cf != x) if not hasattr(cf, "shape") else not _array_equal(cf, x)
        if mode == "one_sided" and changed and rng.random() < p:
            out.append(CDAItem(cf, x, True, i))
            continue
        out.append(CDAItem(x, cf, False, i))
        if mode == "two_sided" and changed:
            out.append(CDAItem(cf, x, True, i))
    return out


def _array_equal(a: Any, b: Any) -> bool:
    return tuple(a.shape) == tuple(b.shape) and bool((a == b).all())


def augment(
    texts: Sequence[str],
    mode: str = "two_sided",
    p: float = 0.5,
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


# ----------------------------------------------------------------------------- teacher perturbation


@dataclasses.dataclass
class TokenSwapMap:
    """sigma on the vocabulary: source token ids and their counterparts' ids (sources unique)."""

    src_ids: list[int]
    dst_ids: list[int]
    stats: dict[str, dict[str, int]]
    """Per language: pairs (lexicon rows), single_token (rows with at least one single-token form pair),
    multi_token (rows skipped: a side is several tokens in every form), token_pairs (id pairs added),
    conflicts (form pairs whose source token was already claimed)."""

    def __len__(self) -> int:
        return len(self.src_ids)

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.src_ids, self.dst_ids))


def build_token_map(tokenizer: Any, languages: Sequence[str] | None = None) -> TokenSwapMap:
    """The token-level sigma for `languages` (default: every lexicon), see the module doc."""
    vocab = tokenizer.get_vocab()
    src: list[int] = []
    dst: list[int] = []
    claimed: set[int] = set()
    stats: dict[str, dict[str, int]] = {}
    for lang in languages or available_languages():
        lexicon = load_lexicon(lang)
        s = {"pairs": 0, "single_token": 0, "multi_token": 0, "token_pairs": 0, "conflicts": 0}
        for male, female in lexicon.pairs():
            s["pairs"] += 1
            found = False
            for a, b in _case_forms(male, female):
                for prefix in ("▁", ""):
                    ia, ib = vocab.get(prefix + a), vocab.get(prefix + b)
                    if ia is None or ib is None or ia == ib:
                        continue
                    found = True
                    for x, y in ((ia, ib), (ib, ia)):
                        if x in claimed:
                            s["conflicts"] += 1
                            continue
                        claimed.add(x)
                        src.append(x)
                        dst.append(y)
                        s["token_pairs"] += 1
            s["single_token" if found else "multi_token"] += 1
        stats[lexicon.lang] = s
    return TokenSwapMap(src, dst, stats)


def _case_forms(male: str, female: str) -> list[tuple[str, str]]:
    forms = []
    for fn in (str.lower, lambda w: w[:1].upper() + w[1:].lower(), str.upper):
        pair = (fn(male).replace(" ", "▁"), fn(female).replace(" ", "▁"))
        if pair not in forms:
            forms.append(pair)
    return forms


def perturb_probs(
    probs: torch.Tensor,
    counterfactual_probs: torch.Tensor,
    token_map: TokenSwapMap,
    mode: str = "max",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """p^ from the teacher's distributions on x (`probs`) and x~ (`counterfactual_probs`), aligned by
    target position: both [..., V] (e.g. [batch, target_len, V]).

    p^(w) = f(p(w | x), p(sigma(w) | x~)) for the map's source tokens w, p(w | x) elsewhere,
    renormalised over V. f = max or mean; mode "none" returns `probs`. `valid` ([batch] bool, optional)
    marks the rows whose positions align; the others keep `probs`.
    """
    import torch

    if mode == "none" or len(token_map) == 0:
        return probs
    if mode not in PERTURB_MODES:
        raise ValueError(f"perturb mode {mode!r} is not allowed; allowed values: {', '.join(PERTURB_MODES)}")
    if probs.shape != counterfactual_probs.shape:
        raise ValueError(f"probability shapes differ: {tuple(probs.shape)} vs {tuple(counterfactual_probs.shape)}")
    src = torch.as_tensor(token_map.src_ids, device=probs.device, dtype=torch.long)
    dst = torch.as_tensor(token_map.dst_ids, device=probs.device, dtype=torch.long)
    own = probs.index_select(-1, src)
    other = counterfactual_probs.index_select(-1, dst)
    combined = torch.maximum(own, other) if mode == "max" else 0.5 * (own + other)
    out = probs.clone()
    out[..., src] = combined
    out = out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    if valid is not None:
        shape = (valid.shape[0],) + (1,) * (probs.dim() - 1)
        out = torch.where(valid.view(shape).to(probs.device), out, probs)
    return out
