from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from core.config import (
    ConfigError,
    config_help,
    field_docs,
    load_config,
    load_saved_config,
    parse_overrides,
    save_config,
    to_dict,
)
from core.fsutil import UnsafePathError, atomic_dir, atomic_write_text, read_jsonl, safe_path


@dataclasses.dataclass
class Inner:
    vocab_size: int = 8000
    """Number of tokens in the vocabulary."""
    alpha: float = 0.3
    """Sampling exponent."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""

    def validate(self) -> None:
        if self.vocab_size <= 0:
            raise ConfigError("tokenizer.vocab_size must be positive")


@dataclasses.dataclass
class Outer:
    name: str = "x"
    """Run name."""
    tokenizer: Inner = dataclasses.field(default_factory=Inner)
    """Tokenizer settings."""
    locales: list[str] = dataclasses.field(default_factory=lambda: ["en-US"])
    """Locales."""
    limit: Optional[int] = None
    """Optional cap."""


def test_field_docs_read_attribute_docstrings():
    assert field_docs(Inner)["vocab_size"] == "Number of tokens in the vocabulary."
    assert "tokenizer.alpha" in config_help(Outer)


def test_dotted_overrides_apply_with_types():
    cfg = load_config(Outer, overrides=["tokenizer.vocab_size=16000", "tokenizer.alpha=0.5", "locales=[de-DE, fr-FR]", "limit=3"])
    assert cfg.tokenizer.vocab_size == 16000 and cfg.tokenizer.alpha == 0.5
    assert cfg.locales == ["de-DE", "fr-FR"] and cfg.limit == 3
    assert load_config(Outer, overrides=["limit=null"]).limit is None
    # ints are accepted where floats are expected
    assert load_config(Outer, overrides=["tokenizer.alpha=1"]).tokenizer.alpha == 1.0


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config(Outer, overrides=["tokenizer.vocab=3"])
    assert "tokenizer.vocab" in str(e.value) and "vocab_size" in str(e.value) and "alpha" in str(e.value)


@pytest.mark.parametrize(
    "override, fragment",
    [("tokenizer.vocab_size=abc", "expected an integer"), ("tokenizer.mode=c", "allowed values"),
     ("locales=en", "expected a list"), ("tokenizer=3", "expected a mapping"), ("novalue", "dotted.key=value")],
)
def test_wrong_types_fail(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(Outer, overrides=[override])


def test_validate_runs_after_all_overrides():
    with pytest.raises(ConfigError, match="positive"):
        load_config(Outer, overrides=["tokenizer.vocab_size=0"])


def test_preset_section_and_roundtrip(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"data": {"name": "from-preset", "tokenizer": {"alpha": 0.4}}}))
    cfg = load_config(Outer, section="data", preset=preset, overrides=["name=cli"])
    assert cfg.name == "cli" and cfg.tokenizer.alpha == 0.4
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_saved_config(Outer, out) == cfg
    assert to_dict(cfg)["tokenizer"]["alpha"] == 0.4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dta": {}}))
    with pytest.raises(ConfigError, match="allowed sections"):
        load_config(Outer, section="data", preset=bad)
    with pytest.raises(ConfigError, match="available presets"):
        load_config(Outer, section="data", preset="no-such-preset")


def test_nlu_section_starts_from_the_finetune_section(tmp_path):
    from student.config import FinetuneConfig

    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({
        "finetune": {"dropout": 0.0, "intent_first": True, "train": {"max_steps": 100, "lr": 0.01}},
        "nlu": {"head": "encoder", "dropout": 0.1, "train": {"max_steps": 3000}},
    }))
    nlu = load_config(FinetuneConfig, section="nlu", preset=preset, overrides=["train.lr=0.02"])
    # nlu's own keys win, finetune's others carry over, overrides come last.
    assert (nlu.head, nlu.dropout, nlu.train.max_steps) == ("encoder", 0.1, 3000)
    assert nlu.intent_first is True and nlu.train.lr == 0.02
    ft = load_config(FinetuneConfig, section="finetune", preset=preset)
    assert (ft.head, ft.dropout, ft.train.max_steps) == ("seq2seq", 0.0, 100)
    # The demo preset's nlu section resolves the same way.
    tiny = load_config(FinetuneConfig, section="nlu", preset="tiny")
    assert tiny.head == "encoder" and tiny.locales == load_config(FinetuneConfig, section="finetune", preset="tiny").locales


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_safe_path_refuses_escapes(tmp_path):
    assert safe_path(tmp_path, "a/b.txt") == (tmp_path / "a" / "b.txt").resolve()
    for bad in ["../x", "/etc/passwd", "a/../../x"]:
        with pytest.raises(UnsafePathError):
            safe_path(tmp_path, bad)


def test_atomic_dir_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("full")
    assert (target / "weights").read_text() == "full"


def test_read_jsonl_ignores_partial_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    atomic_write_text(tmp_path / "t.txt", "ok")
    assert (tmp_path / "t.txt").read_text() == "ok"


def test_atomic_artifacts_get_umask_modes(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "w").write_text("y")
    finally:
        os.umask(mask)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_float_literals_without_a_dot_are_numbers():
    assert load_config(Outer, overrides=["tokenizer.alpha=3e-4"]).tokenizer.alpha == 3e-4
    assert load_config(Outer, overrides=["tokenizer.alpha=1e30"]).tokenizer.alpha == 1e30
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(Outer, overrides=["tokenizer.alpha=fast"])


def test_each_stage_keeps_its_own_config(tmp_path):
    # Issue 14, case 11: each stage overwrote config.yaml, so the data stage's config was lost.
    from core.config import load_saved_config, save_stage_config

    first = save_stage_config(Outer(), tmp_path, "data")
    second = save_stage_config(load_config(Outer, overrides=["tokenizer.alpha=0.5"]), tmp_path, "pretrain", "teacher")
    assert first == tmp_path / "configs" / "data.yaml" and second == tmp_path / "configs" / "pretrain-teacher.yaml"
    assert load_saved_config(Outer, first) == Outer()
    assert load_saved_config(Outer, tmp_path / "config.yaml").tokenizer.alpha == 0.5  # the latest stage's


def _literal_locale_lists(tree) -> list[int]:
    """Line numbers of a list or tuple of locale-name string literals (e.g. ["en-US", "de-DE"])."""
    import ast

    from core.config import LOCALE_RE

    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, (ast.List, ast.Tuple)) and node.elts
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) and LOCALE_RE.match(e.value)
                    for e in node.elts)]


def test_no_config_field_defaults_to_a_literal_locale_list_outside_core_locales():
    """Every locale list default comes from core.locales: a field default (`= field(default_factory=...)`
    or a plain default) or an argparse default that spells out locale names is refused elsewhere."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for package in ("core", "massive", "data_prep", "teacher", "distill", "student", "evaluation", "launch", "runtime"):
        for path in sorted((root / package).rglob("*.py")):
            if path == root / "core" / "locales.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            defaults = []
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):  # dataclass fields (module constants are names, not defaults)
                    defaults += [f.value for f in node.body if isinstance(f, ast.AnnAssign) and f.value is not None]
                if isinstance(node, ast.Call):  # field(default_factory=...), add_argument(default=...)
                    defaults += [kw.value for kw in node.keywords if kw.arg in ("default", "default_factory")]
            offenders += [f"{path.relative_to(root)}:{line}" for value in defaults
                          for line in _literal_locale_lists(value)]
    assert not offenders, f"literal locale list defaults (use core.locales): {', '.join(offenders)}"
    # The check sees a literal when there is one.
    assert _literal_locale_lists(ast.parse('x: list = field(default_factory=lambda: ["en-US", "de-DE"])')) == [1]


def test_default_locale_lists_name_known_locales_and_the_lexicons():
    from core import locales
    from data_prep.counterfactual import LOCALE_TO_LANGUAGE, available_languages
    from massive.format import MASSIVE_LOCALES

    for name in ("PROVIDED_LOCALES", "DEFAULT_LOCALES", "ZERO_SHOT_LOCALES", "LEXICON_LOCALES", "FAIRNESS_LOCALES",
                 "TRANSLATION_LOCALES", "SOURCE_LOCALES", "LATENCY_LOCALES"):
        values = getattr(locales, name)
        assert values and set(values) <= set(MASSIVE_LOCALES), name
    assert len(locales.PROVIDED_LOCALES) == 48
    # One locale per lexicon file, and counterfactual augmentation maps exactly those.
    assert sorted(loc.split("-")[0] for loc in locales.LEXICON_LOCALES) == sorted(available_languages())
    assert set(LOCALE_TO_LANGUAGE) == set(locales.LEXICON_LOCALES)
    assert locales.FAIRNESS_LOCALES == ("en-US", "de-DE") and locales.TRANSLATION_LOCALES == ("de-DE", "ja-JP")
    assert not set(locales.ZERO_SHOT_LOCALES) & set(locales.DEFAULT_LOCALES)
