"""Word <-> sub-word alignment for the encoder NLU head, shared by training (student/nlu.py) and
the torch-free onnxruntime predictor (student/runtime.py). No torch import here.

A MASSIVE utterance is a list of words; the model sees the text `" ".join(words)`. Each word's slot
label is read at its first sub-word. SentencePiece often emits a bare "▁" piece (the word boundary
alone) before a word's first character — for CJK character "words" almost always, since a single
character is rarely merged with the boundary. That bare piece carries no information about the
word, so it is never chosen as the word's first sub-word while the word has another piece.
"""

from __future__ import annotations

import bisect

WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁"


def word_char_spans(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text `" ".join(words)` and each word's character span [start, end) in it."""
    spans = []
    pos = 0
    for i, word in enumerate(words):
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"word {i} ({word!r}) is empty or contains whitespace; words: {words!r}")
        spans.append((pos, pos + len(word)))
        pos += len(word) + 1
    return " ".join(words), spans


def first_subword_indices(
    offsets: list[tuple[int, int]], spans: list[tuple[int, int]], tokens: list[str] | None = None
) -> list[int]:
    """Token index of each word's first sub-word, -1 for words with no token (truncated away).

    A token belongs to the first word that does not end before the token starts, so a bare "▁"
    (whose offsets cover the space before a word) lands on the word it opens. With `tokens` given,
    a bare "▁" is used only when the word has no other piece. Special tokens (empty offsets)
    belong to no word.
    """
    ends = [end for _, end in spans]
    starts = [-1] * len(spans)
    boundary_only = [-1] * len(spans)
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        w = bisect.bisect_right(ends, s)
        if w >= len(spans):
            continue
        if tokens is not None and tokens[t] == WORD_BOUNDARY:
            if boundary_only[w] == -1:
                boundary_only[w] = t
            continue
        if starts[w] == -1:
            starts[w] = t
    return [s if s != -1 else b for s, b in zip(starts, boundary_only)]
