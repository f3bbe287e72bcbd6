"""`CrossLingualConfig`: which locales have labels, named once for every stage.

A preset's `crosslingual.yaml` (or `crosslingual.*` overrides of any stage command) says which
MASSIVE locales are sources and which are targets, and under which setting the targets are reached:

- `zero-shot`: labels and MASSIVE text come from the source locales only; the targets are seen only
  in the generic corpora (the MASSIVE paper's setting).
- `teacher-labelled`: target-locale MASSIVE train utterances may be used without their labels
  (stage 2, and the fine-tuned teacher's predictions for distillation); no gold label of a target.
- `supervised`: gold labels in every locale (the reference).

Every stage config that reads MASSIVE holds a `crosslingual` field. `core.config.load_config` fills
it from the preset's `crosslingual` section before the stage's own section, so one file sets it for
all of them; each stage then calls `check_gold` / `check_text` on the locales it is about to read
and fails at start-up when a config would leak a target's labels or text.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from core.config import LOCALE_RE, ConfigError
from core.locales import SOURCE_LOCALES

SETTINGS = ("zero-shot", "teacher-labelled", "supervised")


@dataclasses.dataclass
class CrossLingualConfig:
    setting: Literal["zero-shot", "teacher-labelled", "supervised"] = "supervised"
    """zero-shot: labels and MASSIVE text of the source locales only; teacher-labelled: target-locale
    MASSIVE train utterances without their labels as well; supervised: gold labels everywhere."""
    source_locales: list[str] = dataclasses.field(default_factory=lambda: list(SOURCE_LOCALES))
    """Locales whose gold labels every setting may use."""
    target_locales: list[str] = dataclasses.field(default_factory=list)
    """Locales the transfer is measured on (their mean is the headline); empty = none named, the
    setting then constrains nothing (a plain multilingual run)."""

    def validate(self) -> None:
        for key in ("source_locales", "target_locales"):
            values = getattr(self, key)
            bad = [loc for loc in values if not LOCALE_RE.match(loc)]
            if bad:
                raise ConfigError(f"crosslingual.{key}: {bad} are not locale names like en-US")
            if len(set(values)) != len(values):
                raise ConfigError(f"crosslingual.{key}: a locale is listed twice in {values}")
        both = sorted(set(self.source_locales) & set(self.target_locales))
        if both:
            raise ConfigError(f"crosslingual: {', '.join(both)} is both a source and a target locale; "
                              "a locale is one or the other")
        if self.setting != "supervised" and not self.source_locales:
            raise ConfigError(f"crosslingual.source_locales: empty; setting {self.setting} needs the locales "
                              "whose labels it may use (e.g. [en-US])")

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(self.target_locales)

    def gold_locales(self, locales: list[str]) -> list[str]:
        """Of `locales`, those whose gold labels this setting allows."""
        if self.setting == "supervised":
            return list(locales)
        return [loc for loc in locales if loc not in self.targets]

    def unlabelled_locales(self) -> list[str]:
        """Target locales whose MASSIVE utterances may be read without labels (teacher-labelled only)."""
        return list(self.target_locales) if self.setting == "teacher-labelled" else []

    def check_gold(self, key: str, locales: list[str]) -> None:
        """ConfigError when the gold labels of `locales` (config key `key`) include a target's
        under a setting that forbids them. Empty `locales` means every locale of the data."""
        if self.setting == "supervised" or not self.target_locales:
            return
        if not locales:
            raise ConfigError(f"{key}: empty means every locale, which reads the gold labels of the target locales "
                              f"{', '.join(self.target_locales)} under crosslingual.setting={self.setting}; "
                              f"list the source locales, e.g. {key}=[{','.join(self.source_locales)}]")
        leak = [loc for loc in locales if loc in self.targets]
        if leak:
            raise ConfigError(f"{key}: {', '.join(leak)} is a target locale, and crosslingual.setting={self.setting} "
                              f"forbids its gold labels; train on the sources ({', '.join(self.source_locales)}) or "
                              "set crosslingual.setting=supervised")

    def check_text(self, key: str, locales: list[str]) -> None:
        """ConfigError when unlabelled MASSIVE text of `locales` includes a target's under zero-shot."""
        if self.setting != "zero-shot" or not self.target_locales:
            return
        if not locales:
            raise ConfigError(f"{key}: empty means every locale, which reads the MASSIVE text of the target locales "
                              f"under crosslingual.setting=zero-shot; list the source locales")
        leak = [loc for loc in locales if loc in self.targets]
        if leak:
            raise ConfigError(f"{key}: {', '.join(leak)} is a target locale, and crosslingual.setting=zero-shot "
                              "forbids its MASSIVE text; use setting teacher-labelled or leave it out")

    def role(self, locale: str) -> str:
        """"source", "target" or "other" (neither list names it)."""
        if locale in self.targets:
            return "target"
        return "source" if locale in self.source_locales else "other"
