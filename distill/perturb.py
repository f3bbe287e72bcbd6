"""Counterfactual role reversal, token level: teacher-prediction perturbation.

Teacher perturbation (`build_token_map`, `plan_row`, `perturb_rows`)
---------------------------------------------------------------------
The token-level sigma is built per language (`TokenSigma`) and a row uses only its own language's
(MASSIVE: the locale; packed rows: the guessed language of the swapped documents), so German "er"
never touches Danish "er" (is), French "il" never the Italian article. For every direction that text
sigma takes (first row wins, `direction` honoured: German "sie" is never a source), in the forms
lower/Title/UPPER and, for French/Italian nouns, the elisions l'/L', both words are encoded as words
(the word-start piece "▁" first) and compared piece by piece: the pair is the first pair of pieces
where they diverge, after their shared pieces (the context: "▁wait" for waiter/waitress, "▁l" "'"
"act" for l'acteur/l'actrice). Skipped and counted (`TokenMap.stats`): one word is the other plus
pieces (Lehrer/Lehrerin: there is no piece to swap), a side diverges at the bare "▁", an <unk>.
Pieces never come from inside a word: a pair starts at a word-start piece or after its context.

A pair of one-piece words (▁he/▁she) holds at every aligned position, as in the paper. Any other
pair's source piece also starts or continues other words ("▁wo" of woman, "er" of H|er), so it holds
only at a position where the two teacher-forced targets really diverge with it.

Positions: the teacher is forced on y for x and on y~ for x~, and a token diff of y and y~
(`align_positions`) pairs their positions: equal runs one to one, a replaced run at its first piece
(the diverging piece), inserted pieces with nothing. At an aligned position t ~ t',
p^(w) = f(p(w | x, y<t), p(sigma(w) | x~, y~<t')) for the pairs that hold there (every token with
tokens="all", sigma extended by the identity: for MASSIVE targets, which hold labels only), the other
tokens keep p(w | x, y<t), and p^ is renormalised; other positions keep p. Target tokens copied from
a visible source span (`copied_positions`: MASSIVE word sentinels) are left alone: the teacher does not
predict them.

The word-level sigma, its lexicons and CDA are `data_prep/counterfactual.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from data_prep.counterfactual import (
    _ELIDING,
    _vowel_initial,
    available_languages,
    lexicon_language,
    load_lexicon,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

PERTURB_MODES = ("none", "max", "mean")
PERTURB_TOKENS = ("gendered", "all")


# ----------------------------------------------------------------------------- teacher perturbation


@dataclasses.dataclass(frozen=True)
class TokenPair:
    """One entry of the token-level sigma: after `context`, piece `src` stands for piece `dst`."""

    context: tuple[int, ...]
    """Pieces both words share before they diverge (the first one starts the word); () = word-initial."""
    src: int
    dst: int
    word: str
    """The source word form the pair comes from (diagnostics)."""
    counterpart: str
    """sigma(word), the form `dst` comes from."""
    whole: bool
    """Both words are one piece each: the pair holds at every aligned position (the paper's vocabulary
    pairs). Otherwise a piece ("▁wo" of "woman", "er" of "H|er") also starts or continues other words,
    and the pair holds only where the two targets diverge with it."""


_SIGMA_STATS = ("pairs", "rows_mapped", "single_piece", "multi_piece", "prefix", "bare_marker", "unknown",
                "shadowed", "conflicts", "token_pairs")


class TokenSigma:
    """sigma on the vocabulary for one language (see "Teacher perturbation" in the module doc)."""

    def __init__(self, lang: str, pairs: Sequence[TokenPair], stats: dict[str, int]) -> None:
        self.lang = lang
        self.pairs = list(pairs)
        self.stats = stats
        self._whole: dict[tuple[int, ...], dict[int, int]] = {}
        self._any: dict[tuple[tuple[int, ...], int], int] = {}
        for pair in self.pairs:
            self._any[(pair.context, pair.src)] = pair.dst
            if pair.whole:
                self._whole.setdefault(pair.context, {})[pair.src] = pair.dst
        self._context_lengths = sorted({len(c) for c in self._whole if c})
        self._any_lengths = sorted({len(c) for c, _ in self._any})

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"TokenSigma({self.lang!r}, {len(self.pairs)} token pairs)"

    def at(self, prefix: Sequence[int]) -> dict[int, int]:
        """src -> dst of the whole-word pairs for the prediction that follows the teacher-forced `prefix`:
        the word-initial ones, and those whose shared context is the end of `prefix`."""
        out = dict(self._whole.get((), {}))
        for k in self._context_lengths:
            if k <= len(prefix):
                hit = self._whole.get(tuple(int(i) for i in prefix[len(prefix) - k:]))
                if hit:
                    out.update(hit)
        return out

    def lookup(self, prefix: Sequence[int], src: int) -> int | None:
        """sigma(src) after `prefix` over every pair (whole or not), or None."""
        src = int(src)
        for k in self._any_lengths:
            if k <= len(prefix):
                dst = self._any.get((tuple(int(i) for i in prefix[len(prefix) - k:]), src))
                if dst is not None:
                    return dst
        return None

    def fires(self, ids: Sequence[int]) -> list[tuple[int, int, int]]:
        """(position, src, dst) for each token of `ids` that is the source of any pair (whole or not)
        where it stands: the places sigma could touch in a target."""
        return [(t, int(ids[t]), dst) for t in range(len(ids)) if (dst := self.lookup(ids[:t], ids[t])) is not None]


@dataclasses.dataclass
class TokenMap:
    """The token-level sigma of every configured language; a row uses its own language's only."""

    languages: dict[str, TokenSigma]

    def __len__(self) -> int:
        return sum(len(sigma) for sigma in self.languages.values())

    def get(self, lang: str | None) -> TokenSigma | None:
        code = lexicon_language(lang) if lang else None
        return self.languages.get(code) if code else None

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per language: pairs (lexicon rows), rows_mapped (rows with at least one token pair),
        single_piece / multi_piece (token pairs whose words are one piece each / that diverge after or
        within several pieces), prefix (forms skipped: one word is the other plus pieces, "Lehrer" /
        "Lehrer"+"in"), bare_marker (skipped: a side diverges at the bare word-start piece), unknown
        (skipped: a form encodes to <unk>), shadowed (directions left out because an earlier row claims
        the source word, as in text sigma), conflicts (token pairs whose (context, src) was claimed),
        token_pairs."""
        return {lang: sigma.stats for lang, sigma in self.languages.items()}


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_token_sigma(tokenizer: Any, lang: str) -> TokenSigma:
    """The token-level sigma of one language (rules in the module doc)."""
    lexicon = load_lexicon(lang)
    unk = getattr(tokenizer, "unk_token_id", None)
    stats = dict.fromkeys(_SIGMA_STATS, 0)
    pairs: list[TokenPair] = []
    claimed: set[tuple[tuple[int, ...], int]] = set()

    def piece(i: int) -> str:
        return tokenizer.convert_ids_to_tokens(i)

    for e in lexicon.entries:
        if e.category == "agreement":
            continue
        stats["pairs"] += 1
        mapped = False
        directions = [(e.male, e.female)] * (e.direction in ("both", "to_female"))
        directions += [(e.female, e.male)] * (e.direction in ("both", "to_male"))
        for source, target in directions:
            if (lexicon.counterpart(source) or "").casefold() != target.casefold():
                stats["shadowed"] += 1
                continue
            for a, b in _case_forms(source, target) + _elided_forms(lexicon.lang, e.category, source, target):
                ia, ib = _encode(tokenizer, a), _encode(tokenizer, b)
                if not ia or not ib or unk in ia or unk in ib:
                    stats["unknown"] += 1
                    continue
                if not piece(ia[0]).startswith("▁") or not piece(ib[0]).startswith("▁"):
                    stats["unknown"] += 1  # not encoded as a word start: no safe position
                    continue
                k = 0
                while k < min(len(ia), len(ib)) and ia[k] == ib[k]:
                    k += 1
                if k == len(ia) or k == len(ib):
                    stats["prefix"] += 1
                    continue
                if piece(ia[k]) == "▁" or piece(ib[k]) == "▁":
                    stats["bare_marker"] += 1
                    continue
                key = (tuple(ia[:k]), ia[k])
                if key in claimed:
                    stats["conflicts"] += 1
                    continue
                claimed.add(key)
                pairs.append(TokenPair(tuple(ia[:k]), ia[k], ib[k], a, b, len(ia) == len(ib) == 1))
                stats["single_piece" if len(ia) == len(ib) == 1 else "multi_piece"] += 1
                mapped = True
        stats["rows_mapped"] += mapped
    stats["token_pairs"] = len(pairs)
    return TokenSigma(lexicon.lang, pairs, stats)


def build_token_map(tokenizer: Any, languages: Sequence[str] | None = None) -> TokenMap:
    """The token-level sigma of each of `languages` (default: every lexicon)."""
    return TokenMap({load_lexicon(lang).lang: build_token_sigma(tokenizer, lang)
                     for lang in (languages or available_languages())})


def _case_forms(source: str, target: str) -> list[tuple[str, str]]:
    forms = []
    for fn in (str.lower, lambda w: w[:1].upper() + w[1:].lower(), str.upper):
        pair = (fn(source), fn(target))
        if pair not in forms:
            forms.append(pair)
    return forms


def _elided_forms(lang: str, category: str, source: str, target: str) -> list[tuple[str, str]]:
    """l'acteur / l'actrice: the explicit elisions of French and Italian, for nouns that both take them."""
    if lang not in _ELIDING or category == "pronoun" or not (_vowel_initial(source) and _vowel_initial(target)) or " " in source:
        return []
    return [(f"{article}{source.lower()}", f"{article}{target.lower()}") for article in ("l'", "L'")]


def align_positions(target: Sequence[int], cf_target: Sequence[int]) -> list[int]:
    """For each position of `target`, the position of `cf_target` it corresponds to, or -1.

    A token diff: positions in equal runs correspond one to one; a replaced run corresponds at its
    first position only (the piece where the two words diverge); inserted or deleted pieces and the
    rest of a replaced run correspond to nothing.
    """
    import difflib

    out = [-1] * len(target)
    matcher = difflib.SequenceMatcher(None, [int(i) for i in target], [int(i) for i in cf_target], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            out[i1:i2] = range(j1, j2)
        elif tag == "replace":
            out[i1] = j1
    return out


def copied_positions(source: Sequence[int], target: Sequence[int], min_run: int = 1,
                     never: Sequence[int] = ()) -> set[int]:
    """Target positions inside a run of at least `min_run` tokens that also occurs contiguously in the
    source: tokens the model copies from what it sees. Tokens in `never` (eos, pad) never count."""
    if min_run < 1:
        return set()
    src, tgt, skip = [int(i) for i in source], [int(i) for i in target], {int(i) for i in never}
    if min_run == 1:
        visible = set(src)
        return {t for t, tok in enumerate(tgt) if tok in visible and tok not in skip}
    # back[t][s] / fwd[t][s]: lengths of the common runs ending / starting at (t, s).
    n, m = len(tgt), len(src)
    back = [[0] * (m + 1) for _ in range(n + 1)]
    fwd = [[0] * (m + 1) for _ in range(n + 1)]
    for t in range(n):
        for j in range(m):
            if tgt[t] == src[j] and tgt[t] not in skip:
                back[t + 1][j + 1] = back[t][j] + 1
    for t in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            if tgt[t] == src[j] and tgt[t] not in skip:
                fwd[t][j] = fwd[t + 1][j + 1] + 1
    return {t for t in range(n) if any(back[t + 1][j + 1] + fwd[t][j] - 1 >= min_run for j in range(m))}


@dataclasses.dataclass
class RowPlan:
    """Where one row's teacher distribution is perturbed, and with which token pairs."""

    positions: list[int]
    """Target positions t of the training item."""
    cf_positions: list[int]
    """The corresponding positions t' of the partner's target."""
    src: list[list[int]]
    """Per position: the token ids w with a counterpart there."""
    dst: list[list[int]]
    """Per position: sigma(w)."""
    copied: int = 0
    """Aligned positions left alone because the target copies them from the source."""
    unaligned: int = 0
    """Positions with no counterpart in the partner's target."""

    @property
    def num_swapped_positions(self) -> int:
        return sum(bool(s) for s in self.src)


def plan_row(target: Sequence[int], cf_target: Sequence[int], sigma: TokenSigma | None, tokens: str = "gendered",
             source: Sequence[int] = (), copy_min_run: int = 0, never_copied: Sequence[int] = ()) -> RowPlan:
    """The perturbation plan of one row: the training item's target, its partner's, the row language's
    sigma (None: no gendered pairs), which tokens to perturb ("gendered": sigma's sources only;
    "all": every token, sigma extended by the identity), and the copy rule (`copied_positions`)."""
    if tokens not in PERTURB_TOKENS:
        raise ValueError(f"perturb tokens {tokens!r} is not allowed; allowed values: {', '.join(PERTURB_TOKENS)}")
    align = align_positions(target, cf_target)
    copied = copied_positions(source, target, copy_min_run, never_copied) if copy_min_run else set()
    plan = RowPlan([], [], [], [])
    for t, t2 in enumerate(align):
        if t2 < 0:
            plan.unaligned += 1
            continue
        if t in copied:
            plan.copied += 1
            continue
        pairs = sigma.at(target[:t]) if sigma is not None else {}
        a, b = int(target[t]), int(cf_target[t2])
        if sigma is not None and a != b:
            # The two words diverge here: the pair (and its way back, if sigma has it) holds here.
            for x, y in ((a, b), (b, a)):
                if sigma.lookup(target[:t], x) == y:
                    pairs[x] = y
        if not pairs and tokens == "gendered":
            continue
        plan.positions.append(t)
        plan.cf_positions.append(t2)
        plan.src.append(list(pairs))
        plan.dst.append(list(pairs.values()))
    return plan


def _combine(own: torch.Tensor, other: torch.Tensor, mode: str) -> torch.Tensor:
    import torch

    return torch.maximum(own, other) if mode == "max" else 0.5 * (own + other)


def _check_mode(mode: str) -> None:
    if mode not in PERTURB_MODES:
        raise ValueError(f"perturb mode {mode!r} is not allowed; allowed values: {', '.join(PERTURB_MODES)}")


def perturb_rows(probs: torch.Tensor, counterfactual_probs: torch.Tensor, plans: Sequence[RowPlan | None],
                 mode: str = "max", tokens: str = "gendered") -> torch.Tensor:
    """p^ of each row from its plan: probs [B, T, V] (teacher on the training items), counterfactual_probs
    [B, T', V] (on their partners, T' >= every cf position). At a planned position t with partner
    position t': p^(w) = f(p(w | x, y<t), p(sigma(w) | x~, y~<t')) for the planned w (every w when
    tokens="all", sigma = identity outside the pairs), p(w | x, y<t) elsewhere, renormalised. Other
    positions, and rows whose plan is None, keep probs."""
    import torch

    _check_mode(mode)
    if mode == "none":
        return probs
    out = probs.clone()
    vocab = probs.shape[-1]
    for row, plan in enumerate(plans):
        if plan is None or not plan.positions:
            continue
        pos = torch.as_tensor(plan.positions, device=probs.device)
        cf_pos = torch.as_tensor(plan.cf_positions, device=probs.device)
        own = probs[row, pos]
        index = torch.arange(vocab, device=probs.device).repeat(len(plan.positions), 1)
        mask = torch.full_like(own, tokens == "all", dtype=torch.bool)
        for i, (src, dst) in enumerate(zip(plan.src, plan.dst)):
            if src:
                s = torch.as_tensor(src, device=probs.device)
                index[i, s] = torch.as_tensor(dst, device=probs.device)
                mask[i, s] = True
        other = counterfactual_probs[row, cf_pos].gather(-1, index)
        new = torch.where(mask, _combine(own, other, mode), own)
        out[row, pos] = new / new.sum(-1, keepdim=True).clamp_min(torch.finfo(new.dtype).tiny)
    return out
