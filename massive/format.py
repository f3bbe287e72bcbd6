"""The MASSIVE task contract: records, `annot_utt` parsing, and the official text-to-text format.

What every stage that reads or writes MASSIVE predictions agrees on: the locales, the word split
(`split_words`, `parse_annot_utt`), the text-to-text pair (`to_text_to_text`: `"Annotate: w1 w2 ..."`
-> `"s1 s2 ... intent"`, optionally intent first, label tokens, word sentinels or slot spans), the model
config keys that say which variant a model was trained on (INTENT_FIRST_KEY, SENTINELS_KEY, SPANS_KEY), and the way a
generated target is read back (`parse_target`, `parse_generated`, `parse_generations`) into an
`NLUPrediction`.

Words and slots follow the official baseline (alexa/massive, scripts/create_hf_dataset.py): one
slot label per whitespace-separated word, `Other` outside spans. ja-JP, zh-CN and zh-TW are split
into characters, whitespace dropped; as in the baseline, a whitespace-separated chunk that is all
ASCII (code-switched Latin words, digits) stays one word. A word that is glued to a span without a
space (`l'[city : paris]`) takes the span's label. One deliberate difference: after an ASCII chunk
that closes a span (`[music_genre : jazz] playlist を再生`) the baseline keeps the span's label for
the rest of the utterance (1,041 ja/zh rows); here the span ends at its `]`. On all other rows of the
48 locales the words and labels are the baseline's.

Loading the files is massive/loader.py; scoring is massive/scoring.py. No heavy imports here.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MASSIVE_LOCALES: tuple[str, ...] = (
    "af-ZA", "am-ET", "ar-SA", "az-AZ", "bn-BD", "ca-ES", "cy-GB", "da-DK", "de-DE", "el-GR",
    "en-US", "es-ES", "fa-IR", "fi-FI", "fr-FR", "he-IL", "hi-IN", "hu-HU", "hy-AM", "id-ID",
    "is-IS", "it-IT", "ja-JP", "jv-ID", "ka-GE", "km-KH", "kn-IN", "ko-KR", "lv-LV", "ml-IN",
    "mn-MN", "ms-MY", "my-MM", "nb-NO", "nl-NL", "pl-PL", "pt-PT", "ro-RO", "ru-RU", "sl-SL",
    "sq-AL", "sv-SE", "sw-KE", "ta-IN", "te-IN", "th-TH", "tl-PH", "tr-TR", "ur-PK", "vi-VN",
    "zh-CN", "zh-TW",
)  # fmt: skip
"""All 52 locales of the MASSIVE 1.1 release."""

CHAR_SPLIT_LOCALES = frozenset({"ja-JP", "zh-CN", "zh-TW"})
"""Locales written without spaces between words: split into characters, as the official baseline."""

PARTITIONS: tuple[str, ...] = ("train", "dev", "test")
OTHER = "Other"
"""The slot label of a word outside every span."""
T2T_PREFIX = "Annotate: "
"""Input prefix of the official text-to-text baseline."""
INTENT_FIRST_KEY = "massive_intent_first"
"""Model config attribute (and export manifest `model_config` key) saying that the model was
fine-tuned on targets with the intent first; absent or false means the official order."""
SENTINELS_KEY = "massive_sentinels"
"""Model config key: the number of word sentinels of the model's text-to-text format (finetune.sentinels);
absent or 0 means plain words."""
SPANS_KEY = "massive_spans"
"""Model config key: the model's targets are slot spans (`<intent><slot> value words...`,
finetune.spans) instead of one label per word; absent or false means one label per word."""



class MassiveError(ValueError):
    """Base class of this module's errors."""


class AnnotationError(MassiveError):
    """`parse_annot_utt` could not parse an annotation."""



@dataclass(frozen=True, slots=True)
class MassiveExample:
    id: str
    locale: str
    partition: str
    scenario: str
    intent: str
    utt: str
    annot_utt: str
    words: tuple[str, ...]
    """One entry per word (per character for CHAR_SPLIT_LOCALES)."""
    slots: tuple[str, ...]
    """One slot label per word; OTHER outside spans."""


@dataclass(frozen=True)
class GenerationCheck:
    """How well-formed one generated text-to-text target is, before `parse_target` repairs it."""

    stopped: bool
    """Generation emitted the end-of-sequence token within its token budget."""
    label_count_ok: bool
    """The target holds exactly one label per word plus the intent; for span targets: every span's
    value is found among the utterance's words (the target's slots can be placed)."""
    known_intent: bool
    """The intent position (first with intent-first, else last) holds a known intent name."""


@dataclass(frozen=True)
class NLUPrediction:
    """An intent and one slot label per word: what every MASSIVE predictor returns."""

    intent: str
    slots: list[str]
    generation: GenerationCheck | None = None
    """For generated predictions: how well-formed the raw target was (None for classifiers)."""


# `[slot : value]` spans. re.split with the group gives [outside, inner, outside, inner, ..., outside];
# nesting and stray brackets show up as brackets in an outside piece.
_SPAN = re.compile(r"\[([^\[\]]*)\]")


def _annotation_error(annot_utt: str) -> AnnotationError:
    """The error for a malformed annotation, with the column of the first problem (slow path)."""
    pos = 0
    for m in _SPAN.finditer(annot_utt):
        outside = annot_utt[pos : m.start()]
        if "[" in outside or "]" in outside:
            col = pos + min(i for i in (outside.find("["), outside.find("]")) if i >= 0) + 1
            return AnnotationError(f"unbalanced or nested bracket at column {col} in {annot_utt!r}")
        label, colon, value = m.group(1).partition(":")
        if not colon or not label.strip() or not value.strip() or len(label.split()) != 1:
            return AnnotationError(
                f"malformed span {m.group(0)!r} at column {m.start() + 1} in {annot_utt!r} "
                "(expected [slot_type : value], slot_type without spaces, value not empty)"
            )
        pos = m.end()
    tail = annot_utt[pos:]
    if "[" in tail or "]" in tail:
        col = pos + min(i for i in (tail.find("["), tail.find("]")) if i >= 0) + 1
        return AnnotationError(f"unbalanced bracket at column {col} in {annot_utt!r}")
    return AnnotationError(f"no words in {annot_utt!r}")


def _segments(annot_utt: str) -> list[tuple[str, str]]:
    """`annot_utt` as (text, label) pieces in order: text outside spans has label OTHER."""
    if "[" not in annot_utt and "]" not in annot_utt:
        return [(annot_utt, OTHER)]
    parts = _SPAN.split(annot_utt)
    pieces: list[tuple[str, str]] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if "[" in part or "]" in part:
                raise _annotation_error(annot_utt)
            if part:
                pieces.append((part, OTHER))
            continue
        label, colon, value = part.partition(":")
        label, value = label.strip(), value.strip()
        if not colon or not label or not value or len(label.split()) != 1:
            raise _annotation_error(annot_utt)
        # The markup's own spaces (after `:` and before `]`) are not part of the text.
        pieces.append((value, label))
    return pieces


def _chunks(pieces: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Whitespace-separated chunks of the slot-free text, each as its (text, label) parts.

    A chunk has several parts only where a span touches other text without a space between them.
    """
    chunks: list[list[tuple[str, str]]] = []
    glue = False  # the previous piece ended inside a chunk (no whitespace at its end)
    for text, label in pieces:
        parts = text.split()
        if not parts:
            glue = False
            continue
        first = 0
        if glue and not text[0].isspace():
            chunks[-1].append((parts[0], label))
            first = 1
        chunks.extend([(part, label)] for part in parts[first:])
        glue = not text[-1].isspace()
    return chunks


def _words_and_slots(pieces: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Space-separated words: a word glued to a span takes the span's label (the first one)."""
    words: list[str] = []
    slots: list[str] = []
    glue = False
    for text, label in pieces:
        parts = text.split()
        if not parts:
            glue = False
            continue
        if glue and not text[0].isspace():
            words[-1] += parts[0]
            if slots[-1] == OTHER:
                slots[-1] = label
            del parts[0]
        words.extend(parts)
        slots.extend([label] * len(parts))
        glue = not text[-1].isspace()
    return words, slots


def _char_words_and_slots(pieces: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """One word per character of each non-ASCII chunk; an all-ASCII chunk stays one word."""
    words: list[str] = []
    slots: list[str] = []
    for parts in _chunks(pieces):
        word = "".join(text for text, _ in parts)
        if word.isascii():
            words.append(word)
            slots.append(next((label for _, label in parts if label != OTHER), OTHER))
        else:
            for text, label in parts:
                words.extend(text)
                slots.extend([label] * len(text))
    return words, slots


def split_words(utterance: str, locale: str | None = None) -> list[str]:
    """MASSIVE words of a plain utterance (no slot markup), by the same rule as parse_annot_utt."""
    if locale not in CHAR_SPLIT_LOCALES:
        return utterance.split()
    if not utterance.strip():
        return []
    return _char_words_and_slots([(utterance, OTHER)])[0]


def parse_annot_utt(annot_utt: str, locale: str) -> tuple[list[str], list[str]]:
    """`[slot : value]` markup -> (words, one slot label per word, OTHER outside spans).

    Words are the whitespace-separated words of the slot-free text; for CHAR_SPLIT_LOCALES every
    character of a non-ASCII chunk is a word (whitespace dropped), an all-ASCII chunk stays one word,
    as the official baseline does. Raises AnnotationError for malformed markup or an empty text.
    """
    pieces = _segments(annot_utt)
    if locale in CHAR_SPLIT_LOCALES:
        words, slots = _char_words_and_slots(pieces)
    else:
        words, slots = _words_and_slots(pieces)
    if not words:
        raise _annotation_error(annot_utt)
    return words, slots


def _same_text(words: list[str], utt: str, locale: str) -> bool:
    if locale in CHAR_SPLIT_LOCALES:
        # annot_utt puts spaces around spans that utt does not have.
        return "".join(words) == "".join(utt.split())
    return words == utt.split()



def label_token(label: str) -> str:
    """The whole vocabulary token of a MASSIVE label (`<alarm_set>`, `<date>`, `<Other>`).

    The angle brackets keep it from ever matching utterance text ("date" in an utterance stays
    text); `parse_target` reads labels back from either spelling.
    """
    return f"<{label}>"


def label_text(label: str) -> str:
    """The words of a MASSIVE label: "alarm_set" -> "alarm set" (ICL scores intents by these words;
    fine-tuning starts a label token's embedding from them)."""
    return label.replace("_", " ")


_LABEL_TOKEN_RE = re.compile(r"<([^<>\s]+)>")


def has_label_tokens(tokenizer: Any) -> bool:
    """Whether `tokenizer` holds the whole label tokens (data prep's tokenizer.label_tokens)."""
    return label_token(OTHER) in tokenizer.get_vocab()


def word_sentinel(index: int, num_sentinels: int) -> str:
    """The sentinel that marks word `index` (`<extra_id_i>`, cycling when words outnumber sentinels)."""
    return f"<extra_id_{index % num_sentinels}>"


def t2t_source(words: Sequence[str], sentinels: int = 0) -> str:
    """The text-to-text input of an utterance: `"Annotate: w1 w2 ..."` (what predictors feed the model);
    with `sentinels` (the number the tokenizer has), `"Annotate: <extra_id_0> w1 <extra_id_1> w2 ..."`."""
    if sentinels:
        return T2T_PREFIX + " ".join(f"{word_sentinel(i, sentinels)} {w}" for i, w in enumerate(words))
    return T2T_PREFIX + " ".join(words)


def to_text_to_text(
    words: Sequence[str], slots: Sequence[str], intent: str, intent_first: bool = False, label_tokens: bool = False,
    sentinels: int = 0, spans: bool = False,
) -> tuple[str, str]:
    """The official text-to-text pair: (`"Annotate: w1 w2 ..."`, `"s1 s2 ... intent"`).

    `intent_first` puts the intent before the slot labels (`"intent s1 s2 ..."`), the MASSIVE
    repository's `intent_first` option: a small decoder then decides the intent before it has to
    count words, so a model that has not yet learnt the word count still predicts intents.
    `label_tokens` spells each label as its whole token (`"<Other><time><alarm_set>"`, no spaces, so
    a tokenizer with those tokens encodes one id per label and nothing between them).
    `sentinels` > 0 (the MASSIVE repository's sentinel option) marks each source word and its label
    in the target with the same sentinel (`"<extra_id_0><Other><extra_id_1><time>"`): the decoder
    finds the word it labels by matching the sentinel it just wrote, instead of counting words.
    Sentinels are special tokens, so decoding with skip_special_tokens leaves the plain target.
    `spans` writes the intent first and then only the slot spans, each as its label token and its
    words (`"<alarm_set><time>five am"`; `place_spans` puts them back on the words): it needs the
    label tokens (they delimit the values) and excludes sentinels.
    """
    if len(words) != len(slots):
        raise ValueError(f"{len(words)} words but {len(slots)} slot labels: {list(words)} / {list(slots)}")
    if spans:
        if not label_tokens or sentinels:
            raise ValueError("span targets need whole label tokens and no word sentinels")
        return t2t_source(words), _span_target(words, slots, intent)
    source = t2t_source(words, sentinels)
    spell = label_token if label_tokens else str
    slot_items = [spell(x) for x in slots]
    if sentinels:
        glue = "" if label_tokens else " "
        slot_items = [f"{word_sentinel(i, sentinels)}{glue}{x}" for i, x in enumerate(slot_items)]
    items = slot_items if not intent else [spell(intent), *slot_items] if intent_first else [*slot_items, spell(intent)]
    return source, ("" if label_tokens else " ").join(items)


def slot_runs(slots: Sequence[str]) -> list[tuple[str, int, int]]:
    """Each maximal run of words with one slot label other than Other: (label, start, end), end exclusive."""
    runs = []
    i = 0
    while i < len(slots):
        if slots[i] == OTHER:
            i += 1
            continue
        j = i
        while j < len(slots) and slots[j] == slots[i]:
            j += 1
        runs.append((slots[i], i, j))
        i = j
    return runs


def _span_target(words: Sequence[str], slots: Sequence[str], intent: str) -> str:
    """`<intent><slot_a>w1 w2<slot_b>w3`: the intent, then each run of words with one slot label
    (not Other) as its label token followed by the words. Words outside spans are not written: the
    decoder copies slot values from its source instead of counting words, and targets are short."""
    # No space after a label token: the tokenizer starts the value's first word with its own
    # word-start marker, and a space would cost a lone marker piece.
    head = label_token(intent) if intent else ""
    return head + "".join(f"{label_token(label)}{' '.join(words[i:j])}" for label, i, j in slot_runs(slots))


def _norm(word: str) -> str:
    # What a tokenizer's normalizer may change (compatibility forms, case) must not break a match.
    return unicodedata.normalize("NFKC", word).casefold()


def place_spans(words: Sequence[str], spans: Sequence[tuple[str, str]]) -> tuple[list[str], bool]:
    """Per-word slot labels from (label, value text) spans, and whether every span was placed.

    Each span's value words are matched (NFKC, case-folded) to the first run of still unlabelled
    words at or after the end of the previous span, else anywhere; a span that matches nowhere is
    dropped. Words no span covers are Other.
    """
    labels = [OTHER] * len(words)
    normed = [_norm(w) for w in words]
    cursor, all_placed = 0, True
    for label, value in spans:
        wanted = [_norm(w) for w in value.split()]
        if not wanted or label == OTHER:
            all_placed = all_placed and bool(wanted)
            continue
        n = len(wanted)
        free = [i for i in range(len(words) - n + 1)
                if normed[i : i + n] == wanted and all(x == OTHER for x in labels[i : i + n])]
        start = next((i for i in free if i >= cursor), free[0] if free else None)
        if start is None:
            all_placed = False
            continue
        labels[start : start + n] = [label] * n
        cursor = start + n
    return labels, all_placed


def _read_spans(text: str) -> list[tuple[str, str]]:
    """`"<a> x<b> y z"` -> [("a", "x"), ("b", "y z")]: each label token and the text up to the next."""
    marks = list(_LABEL_TOKEN_RE.finditer(text))
    return [(m.group(1), text[m.end() : marks[k + 1].start() if k + 1 < len(marks) else len(text)].strip())
            for k, m in enumerate(marks)]


def _config_value(config: Any, key: str) -> Any:
    # A model's HF config object, or a config dict such as an export manifest's `model_config`.
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def model_sentinels(config: Any) -> int:
    """How many word sentinels a model's MASSIVE format uses (SENTINELS_KEY of its HF config object or
    of a config dict such as an export manifest's `model_config`); 0 = none."""
    return int(_config_value(config, SENTINELS_KEY) or 0)


def model_intent_first(config: Any) -> bool:
    """Whether a model (its HF config object, or a config dict such as an export manifest's
    `model_config`) was fine-tuned on intent-first targets."""
    return bool(_config_value(config, INTENT_FIRST_KEY))


def model_spans(config: Any) -> bool:
    """Whether a model (HF config object, or a config dict such as an export manifest's
    `model_config`) was fine-tuned on slot-span targets (SPANS_KEY)."""
    return bool(_config_value(config, SPANS_KEY))


FORMAT_KEYS: tuple[str, ...] = (INTENT_FIRST_KEY, SENTINELS_KEY, SPANS_KEY)
"""The model config keys that record a model's text-to-text variant (copied into export manifests)."""


@dataclass(frozen=True)
class TargetFormat:
    """The text-to-text variant a model was trained on: what `to_text_to_text` writes and what its
    config records (FORMAT_KEYS), read back by every predictor and passed from a teacher to its
    task-distilled student."""

    intent_first: bool = False
    sentinels: int = 0
    spans: bool = False

    @classmethod
    def of(cls, config: Any) -> TargetFormat:
        """The format a model's config (object or dict) records; absent keys are the official format."""
        return cls(model_intent_first(config), model_sentinels(config), model_spans(config))

    def record(self, config: Any) -> None:
        """Write this format onto a model's config, which saves it in config.json."""
        setattr(config, INTENT_FIRST_KEY, self.intent_first)
        setattr(config, SENTINELS_KEY, self.sentinels)
        setattr(config, SPANS_KEY, self.spans)

    def pair(self, words: Sequence[str], slots: Sequence[str], intent: str, label_tokens: bool) -> tuple[str, str]:
        """`to_text_to_text` in this format."""
        return to_text_to_text(words, slots, intent, self.intent_first, label_tokens, self.sentinels, self.spans)


def parse_target(
    text: str, num_words: int, intents: Iterable[str] | None = None, intent_first: bool = False,
    words: Sequence[str] | None = None,
) -> NLUPrediction:
    """A generated target back into an NLUPrediction with exactly `num_words` slot labels.

    The last whitespace-separated token is the intent and the ones before it the slot labels, as
    in the official baseline (the first token with `intent_first`). Tolerant of garbage: empty text
    gives intent "" and all OTHER; an intent-position token that is OTHER (or, when `intents` is
    given, not one of them) is taken as a slot label and the intent is ""; too few labels are padded
    with OTHER, too many truncated; any whitespace (spaces, tabs, newlines, repeats) separates tokens.
    Text holding whole label tokens (`"<time><alarm_set>"`) is read as those labels alone.
    `words` (the utterance's words) reads a span target instead (`"<alarm_set><time>five am"`, see
    `to_text_to_text`): the first label token is the intent, the spans go back on the words by
    `place_spans`.
    """
    if num_words < 0:
        raise ValueError(f"num_words must be >= 0, got {num_words}")
    if words is not None:
        if len(words) != num_words:
            raise ValueError(f"num_words is {num_words} but {len(words)} words were given")
        spans = _read_spans(text)
        known = None if intents is None else set(intents)
        intent = ""
        if spans and spans[0][0] != OTHER and (known is None or spans[0][0] in known):
            intent, spans = spans[0][0], spans[1:]
        return NLUPrediction(intent=intent, slots=place_spans(words, spans)[0])
    tokens = target_tokens(text)
    intent = ""
    if tokens:
        known = None if intents is None else set(intents)
        position = 0 if intent_first else -1
        candidate = tokens[position]
        if candidate != OTHER and (known is None or candidate in known):
            intent = candidate
            tokens = tokens[1:] if intent_first else tokens[:-1]
    slots = tokens[:num_words] + [OTHER] * max(0, num_words - len(tokens))
    return NLUPrediction(intent=intent, slots=slots)


def target_tokens(text: str) -> list[str]:
    """The labels of a generated target: its whole `<label>` tokens, else its whitespace-separated words."""
    return (_LABEL_TOKEN_RE.findall(text) or text.split()) if text else []


def check_generation(
    text: str, num_words: int, intents: Iterable[str], *, intent_first: bool = False, stopped: bool = True,
    words: Sequence[str] | None = None,
) -> GenerationCheck:
    """Whether a generated target is well-formed: it stopped, it has `num_words` slot labels plus one
    intent, and its intent position holds one of `intents` (read as `parse_target` reads it). With
    `words` (a span target): it stopped, its first label is a known intent and every span is placed."""
    if words is not None:
        spans = _read_spans(text)
        placed = place_spans(words, spans[1:])[1]
        return GenerationCheck(stopped=bool(stopped), label_count_ok=bool(spans) and placed,
                               known_intent=bool(spans) and spans[0][0] in set(intents))
    tokens = target_tokens(text)
    candidate = tokens[0 if intent_first else -1] if tokens else ""
    return GenerationCheck(
        stopped=bool(stopped), label_count_ok=len(tokens) == num_words + 1, known_intent=candidate in set(intents)
    )


def parse_generated(
    text: str, num_words: int, intents: Iterable[str], *, intent_first: bool = False, stopped: bool = True,
    words: Sequence[str] | None = None,
) -> NLUPrediction:
    """`parse_target` (unchanged scoring) with the target's `GenerationCheck` attached."""
    pred = parse_target(text, num_words, intent_first=intent_first, words=words)
    check = check_generation(text, num_words, intents, intent_first=intent_first, stopped=stopped, words=words)
    return NLUPrediction(intent=pred.intent, slots=pred.slots, generation=check)


def parse_generations(
    output: Any, tokenizer: Any, batch_words: Sequence[Sequence[str]], intents: Sequence[str], intent_first: bool,
    spans: bool = False,
) -> list[Any]:
    """Generated ids ([B, L], decoder start first) for utterances `batch_words` -> NLUPredictions, each
    with its GenerationCheck (did it emit eos, label count, known intent) when `intents` is given.
    `spans`: the model writes span targets (SPANS_KEY)."""
    # Span values are compared with the utterance's words: no clean-up may move their spaces.
    texts = tokenizer.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    span_words = list(batch_words) if spans else [None] * len(batch_words)
    if not intents:  # nothing to check the intent against
        return [parse_target(text, len(w), intent_first=intent_first, words=sw)
                for text, w, sw in zip(texts, batch_words, span_words)]
    stopped = (output[:, 1:] == tokenizer.eos_token_id).any(dim=-1).tolist()
    return [parse_generated(text, len(w), intents, intent_first=intent_first, stopped=done, words=sw)
            for text, w, sw, done in zip(texts, batch_words, span_words, stopped)]
