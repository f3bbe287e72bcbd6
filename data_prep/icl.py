"""In-context prompts over MASSIVE intents: the held-out intents, and the prompts of in-context training.

Held-out intents. `HELDOUT_SCENARIOS` (default of `icl.heldout_scenarios` in both the `pretrain`
config, section icl, and the `evaluate` config) holds out four whole scenarios, 11 of MASSIVE's 60
intents:

    alarm:    alarm_query, alarm_remove, alarm_set
    audio:    audio_volume_down, audio_volume_mute, audio_volume_other, audio_volume_up
    cooking:  cooking_query, cooking_recipe
    takeaway: takeaway_order, takeaway_query

They never appear in an in-context training prompt (`IclPromptSampler` drops them from its pools),
and they are what `evaluate icl --protocol heldout` asks about. `exclude_heldout(examples)` filters
any stream of MASSIVE examples (anything with `.scenario`), so that fine-tuning can leave them out
as well. (cooking_query has 4 train utterances: with k = 5 it is shown with the 4 there are.)

In-context training prompts (MetaICL, Min et al. 2022; in-context tuning, Chen et al. 2022). Prompt
i is drawn from a generator seeded by (seed, i): a query utterance of a random locale, an N-way
label set (N uniform in [min_way, max_way], the query's intent plus N - 1 other intents), k
demonstrations per label (k uniform over `shots`), each demonstration in the query's locale, in en-US
or in another locale (probabilities `p_same`, `p_en`, the rest), in a shuffled order, in the text
format the evaluation uses. With probability `p_rename` the labels' texts are permuted among the
label set (alarm_set's demonstrations and the query are labelled "weather query", and so on), so the
answer can only be read off the demonstrations; k = 0 prompts are never renamed. The target is the
query's (possibly renamed) label text.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

from core.config import ConfigError
from core.locales import DEFAULT_LOCALES
from massive.format import label_text

HELDOUT_SCENARIOS: tuple[str, ...] = ("alarm", "audio", "cooking", "takeaway")
"""Scenarios held out of in-context training (and offered to fine-tuning): 11 of the 60 intents."""

PROMPT_TEMPLATE = "{demos}Utterance: {utt} Intent:"
DEMO_TEMPLATE = "Utterance: {utt} Intent: {label}\n"


def is_heldout(example: Any, scenarios: Sequence[str] = HELDOUT_SCENARIOS) -> bool:
    """Whether a MASSIVE example (anything with `.scenario`) belongs to a held-out scenario."""
    return example.scenario in scenarios


def exclude_heldout(examples: Iterable[Any], scenarios: Sequence[str] = HELDOUT_SCENARIOS) -> Iterator[Any]:
    """The examples of `examples` outside the held-out scenarios, in order (a lazy filter)."""
    held = frozenset(scenarios)
    return (ex for ex in examples if ex.scenario not in held)


def heldout_intents(examples: Iterable[Any], scenarios: Sequence[str] = HELDOUT_SCENARIOS) -> list[str]:
    """The sorted intents of the held-out scenarios that occur in `examples`."""
    held = frozenset(scenarios)
    return sorted({ex.intent for ex in examples if ex.scenario in held})


def format_prompt(utt: str, demos: Sequence[tuple[str, str]], prompt_template: str = PROMPT_TEMPLATE,
                  demo_template: str = DEMO_TEMPLATE) -> str:
    """The prompt text: demos are (utterance, label text) pairs, then the query."""
    text = "".join(demo_template.format(utt=u, label=lab) for u, lab in demos)
    return prompt_template.format(demos=text, utt=utt)


@dataclasses.dataclass
class IclTrainConfig:
    """In-context training prompts from MASSIVE train (`pretrain --section icl`)."""

    enabled: bool = False
    """Train on in-context prompts instead of the packed data (`data`/heldout); set by the icl section."""
    massive: str = "@data/massive/data"
    """MASSIVE source (directory of <locale>.jsonl[.gz], release tarball, or "hub")."""
    locales: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LOCALES))
    """Locales of queries and demonstrations (en-US is always loaded: it is a demonstration language)."""
    heldout_scenarios: list[str] = dataclasses.field(default_factory=lambda: list(HELDOUT_SCENARIOS))
    """Scenarios never shown in a prompt (see the module doc); must equal the evaluation's."""
    num_prompts: int = 20000
    """Prompts per epoch (each one drawn afresh from (seed, position))."""
    num_heldout_prompts: int = 256
    """Held-out prompts for the eval loss, from the dev partition (intents outside the held-out ones)."""
    min_way: int = 2
    """Smallest label set of a prompt."""
    max_way: int = 8
    """Largest label set of a prompt."""
    shots: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    """Demonstrations per label, drawn uniformly from this list for each prompt."""
    p_same: float = 0.4
    """Probability that a demonstration is in the query's locale."""
    p_en: float = 0.3
    """Probability that a demonstration is in en-US (the rest: another configured locale)."""
    p_rename: float = 0.5
    """Probability that a prompt's label texts are permuted among its labels (k >= 1 prompts only)."""
    p_query_demo: float = 0.0
    """Probability that one demonstration of the query's label is the query itself (k >= 1 prompts
    only): a copying curriculum. Reading a label off an identical demonstration is the easiest case
    of reading it off a similar one; evaluation never shows the query (its demonstrations are train
    utterances, its queries dev or test)."""
    prompt_template: str = PROMPT_TEMPLATE
    """As evaluate's icl.prompt_template: training and evaluation prompts must look alike."""
    demo_template: str = DEMO_TEMPLATE
    """As evaluate's icl.demo_template."""
    clm_prompt: bool = True
    """Prefix the prompt with [CLM], as `evaluate icl` does by default."""
    max_prompt_tokens: int = 512
    """Longer prompts lose their oldest tokens (the query is kept), as in evaluation."""
    seed: int = 0
    """Seed of the prompts (prompt i of epoch e is drawn from (seed, e, i))."""

    def validate(self) -> None:
        if not 1 <= self.min_way <= self.max_way:
            raise ConfigError(f"icl.min_way/max_way must satisfy 1 <= min_way <= max_way, got {self.min_way}, {self.max_way}")
        if not self.shots or any(k < 0 for k in self.shots):
            raise ConfigError(f"icl.shots must be a non-empty list of k >= 0, got {self.shots}")
        for name in ("p_same", "p_en", "p_rename", "p_query_demo"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"icl.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.p_same + self.p_en > 1.0:
            raise ConfigError(f"icl.p_same + icl.p_en must be <= 1, got {self.p_same + self.p_en}")
        if self.num_prompts < 1 or self.num_heldout_prompts < 1 or self.max_prompt_tokens < 8:
            raise ConfigError("icl.num_prompts and icl.num_heldout_prompts must be >= 1, icl.max_prompt_tokens >= 8")
        if not self.locales:
            raise ConfigError("icl.locales must name at least one locale")


@dataclasses.dataclass(frozen=True)
class IclPrompt:
    """One prompt: its text, target label text, and what it was drawn from (for tests and logs)."""

    text: str
    target: str
    query_locale: str
    intents: tuple[str, ...]
    labels: tuple[str, ...]
    shots: int
    demo_locales: tuple[str, ...]
    demo_intents: tuple[str, ...]


class IclPromptSampler:
    """Draws in-context prompts from `pools` ({locale: [MassiveExample]}), held-out scenarios removed."""

    def __init__(self, pools: Mapping[str, Sequence[Any]], cfg: IclTrainConfig, seed: Optional[int] = None) -> None:
        self.cfg = cfg
        self.seed = cfg.seed if seed is None else seed
        # {locale: {intent: [utterance]}}; sorted so that a seed means the same prompts every run.
        self.by_intent: dict[str, dict[str, list[str]]] = {}
        for loc in sorted(pools):
            table: dict[str, list[str]] = {}
            for ex in exclude_heldout(pools[loc], cfg.heldout_scenarios):
                table.setdefault(ex.intent, []).append(ex.utt)
            if table:
                self.by_intent[loc] = table
        if not self.by_intent:
            raise ConfigError("icl: no MASSIVE example outside the held-out scenarios in the configured locales")
        self.locales = sorted(self.by_intent)
        self.query_locales = [loc for loc in self.locales if loc in cfg.locales] or self.locales

    def prompt(self, index: int) -> IclPrompt:
        cfg = self.cfg
        rng = random.Random(f"icl:{self.seed}:{index}")
        qloc = rng.choice(self.query_locales)
        table = self.by_intent[qloc]
        intents = sorted(table)
        q_intent = rng.choice(intents)
        query = rng.choice(table[q_intent])
        way = min(rng.randint(cfg.min_way, cfg.max_way), len(intents))
        chosen = [q_intent] + rng.sample([i for i in intents if i != q_intent], way - 1)
        rng.shuffle(chosen)
        texts = [label_text(i) for i in chosen]
        k = rng.choice(cfg.shots)
        if k > 0 and len(chosen) > 1 and rng.random() < cfg.p_rename:
            rng.shuffle(texts)
        label_of = dict(zip(chosen, texts))
        # Drawn only when the option is on, so that prompts of runs without it stay as they were.
        copy_query = k > 0 and cfg.p_query_demo > 0 and rng.random() < cfg.p_query_demo
        demos: list[tuple[str, str]] = []
        demo_locales: list[str] = []
        demo_intents: list[str] = []
        others = [loc for loc in self.locales if loc not in (qloc, "en-US")]
        for intent in chosen:
            for _ in range(k):
                r = rng.random()
                loc = qloc if r < cfg.p_same else "en-US" if r < cfg.p_same + cfg.p_en else (rng.choice(others) if others else qloc)
                pool = self.by_intent.get(loc, {}).get(intent) or table[intent]
                utt = rng.choice(pool)
                if utt == query and len(pool) > 1:
                    utt = rng.choice([u for u in pool if u != query])
                if copy_query and intent == q_intent:
                    utt, loc, copy_query = query, qloc, False
                demos.append((utt, label_of[intent]))
                demo_locales.append(loc)
                demo_intents.append(intent)
        order = list(range(len(demos)))
        rng.shuffle(order)
        demos = [demos[i] for i in order]
        return IclPrompt(
            text=format_prompt(query, demos, cfg.prompt_template, cfg.demo_template),
            target=label_of[q_intent],
            query_locale=qloc,
            intents=tuple(chosen),
            labels=tuple(texts),
            shots=k,
            demo_locales=tuple(demo_locales[i] for i in order),
            demo_intents=tuple(demo_intents[i] for i in order),
        )


def load_icl_pools(cfg: IclTrainConfig, partition: str) -> dict[str, list[Any]]:
    """{locale: examples of `partition`} for the configured locales plus en-US."""
    from core.config import resolve_data_path
    from massive.loader import load_massive

    locales = sorted(set(cfg.locales) | {"en-US"})
    data = load_massive(str(resolve_data_path(cfg.massive)), locales=locales, partitions=(partition,))
    return {loc: data.examples(locale=loc, partition=partition) for loc in locales}
