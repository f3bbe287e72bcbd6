"""The default locale lists, named once.

Every config field that holds MASSIVE locales takes its default from here
(`field(default_factory=lambda: list(X))`); presets set their own lists, so these defaults are what a
command run without a preset (or a preset that leaves the field out) gets. tests/test_config.py checks
by AST that no other product module declares a literal locale list as a field default.

Lists are tuples so that no caller can change a default in place; each field copies it into a list.
"""

from __future__ import annotations

ENGLISH = "en-US"
"""The pivot: the cross-lingual source by default, the side every translation direction pairs with,
the language of cross-language in-context demonstrations and the utterances latency is timed on."""

PROVIDED_LOCALES: tuple[str, ...] = (
    "af-ZA", "am-ET", "ar-SA", "az-AZ", "bn-BD", "ca-ES", "da-DK", "de-DE", "el-GR", "en-US",
    "es-ES", "fa-IR", "fi-FI", "fr-FR", "he-IL", "hi-IN", "hu-HU", "hy-AM", "id-ID", "is-IS",
    "it-IT", "ja-JP", "jv-ID", "kn-IN", "ko-KR", "lv-LV", "ml-IN", "mn-MN", "ms-MY", "my-MM",
    "nb-NO", "nl-NL", "pl-PL", "pt-PT", "ro-RO", "ru-RU", "sl-SL", "sq-AL", "sv-SE", "ta-IN",
    "te-IN", "th-TH", "tl-PH", "tr-TR", "ur-PK", "vi-VN", "zh-CN", "zh-TW",
)  # fmt: skip
"""The 48 MASSIVE locales provided under the data root (MASSIVE 1.1 has 52; cy-GB, ka-GE, km-KH and
sw-KE are not provided): what data prep reads by default. Any MASSIVE locale name is accepted."""

DEFAULT_LOCALES: tuple[str, ...] = ("en-US", "de-DE", "ja-JP")
"""The MASSIVE default of every labelled stage: task distillation, int8 calibration, the pipeline's
fine-tuning, in-context training and evaluation. Three locales in two scripts (Latin, Japanese): the
smallest set on which a multilingual model shows both a shared and an unshared script (the `tiny`
demo's locales)."""

ZERO_SHOT_LOCALES: tuple[str, ...] = ("es-ES", "fr-FR", "sv-SE")
"""The pipeline's default zero-shot targets: three locales outside DEFAULT_LOCALES, so no default
model ever saw their labels, in the Latin script shared with the sources (transfer through shared
pieces is what a small teacher can show)."""

LEXICON_LOCALES: tuple[str, ...] = (
    "en-US", "de-DE", "fr-FR", "es-ES", "it-IT", "pt-PT", "nl-NL", "sv-SE", "da-DK", "nb-NO",
)
"""The MASSIVE locales whose language has a gender lexicon in data_prep/lexicons/<lang>.tsv: the
only ones counterfactual augmentation and the fairness measures can swap (tests check the files)."""

FAIRNESS_LOCALES: tuple[str, ...] = tuple(loc for loc in DEFAULT_LOCALES if loc in LEXICON_LOCALES)
"""The fairness evaluation's default: the default locales that have a lexicon (en-US, de-DE)."""

TRANSLATION_LOCALES: tuple[str, ...] = tuple(loc for loc in DEFAULT_LOCALES if loc != ENGLISH)
"""The FLORES-200 translation default: the default locales other than English, each paired with
ENGLISH in both directions (de-DE, ja-JP)."""

SOURCE_LOCALES: tuple[str, ...] = (ENGLISH,)
"""The cross-lingual default source (crosslingual.source_locales): the language with labels."""

LATENCY_LOCALES: tuple[str, ...] = (ENGLISH,)
"""The utterances latency is timed on: one language, as the timing measures the model, not the mix."""
