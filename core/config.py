"""Typed dataclass configs, YAML presets and dotted command-line overrides.

Every stage has one dataclass config (nested dataclasses allowed). A field is documented by the
string literal right below it (an attribute docstring); `field_docs` reads those from the source so
that `--help` and `polyteacher config` can print them.

A preset is a set of YAML overrides, one section per stage (`data`, `pretrain`, ...): the directory
`launch/presets/<name>/` with one `<section>.yaml` per stage, or a path to such a directory or to a
single YAML file whose top-level keys are the sections. Command-line overrides are `dotted.key=value`
relative to the stage's config (`tokenizer.vocab_size=16000`); values are parsed as YAML scalars.
Unknown keys and wrong types raise `ConfigError` naming the key and the allowed keys/values, before
any work starts.

Precedence, the same in every command (`load_config`): dataclass defaults < preset section <
trailing dotted overrides < explicit flags (`--out`, `--model`, `--max-examples`, ...). A flag is
the more specific spelling of a config key, so it wins; a flag that was not given (None) changes
nothing, which is why no command repeats a config default as an argparse default.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "launch" / "presets"
"""The YAML presets (shipped with the `launch` package: the top of the program chooses them)."""


class ConfigError(ValueError):
    """A config key, value or preset is invalid; raised before any work starts."""


# ----------------------------------------------------------------------------- data root


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Where the shared data lives (MASSIVE, corpora).

    Order: an explicit value, then the environment variable POLYTEACHER_DATA, then `../shared`
    relative to the repository root when it exists, then `./shared`.
    """
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("POLYTEACHER_DATA")
    if env:
        return Path(env).expanduser().resolve()
    for candidate in (REPO_ROOT.parent / "shared", Path.cwd() / "shared", Path.cwd().parent / "shared"):
        if candidate.is_dir():
            return candidate.resolve()
    return (REPO_ROOT.parent / "shared").resolve()


def describe_data_root(explicit: str | os.PathLike | None = None) -> str:
    """The data root and where it came from, for messages: `/x (from POLYTEACHER_DATA)`."""
    origin = ("given explicitly" if explicit else "from POLYTEACHER_DATA" if os.environ.get("POLYTEACHER_DATA")
              else "the default; set POLYTEACHER_DATA to change it")
    return f"{data_root(explicit)} ({origin})"


def resolve_data_path(value: str, root: str | os.PathLike | None = None) -> Path:
    """Resolve a config path that may start with `@data/` (meaning: under the data root)."""
    if value.startswith("@data/"):
        return data_root(root) / value[len("@data/") :]
    return Path(value).expanduser()


# ----------------------------------------------------------------------------- field docs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal below the field}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{_type_name(args[0]) if args else 'any'}]"
    if origin is dict:
        return "dict"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- conversion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value against a type annotation; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        items = [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return items if (origin or tp) is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot use {value!r} as {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a dataclass from a mapping, strictly: unknown keys and wrong types raise ConfigError."""
    cfg = merge(cls(), data, prefix=prefix)
    return validate(cfg) if not prefix else cfg


def merge(cfg: T, data: dict[str, Any] | None, prefix: str = "") -> T:
    """Return a copy of `cfg` with the (nested) mapping `data` applied on top."""
    if not data:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key {prefix}{key!s}; allowed keys under {prefix.rstrip('.') or type(cfg).__name__}: "
                + ", ".join(names)
            )
        tp = hints[key]
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, tp, f"{prefix}{key}")
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def validate(cfg: Any) -> Any:
    """Run `validate()` of every nested config section, innermost first; return cfg."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (YAML-safe) of a dataclass config."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=3", "c=x"]` -> `{"a": {"b": 3}, "c": "x"}`; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        node[parts[-1]] = value
    return out


def given_flags(**values: Any) -> dict[str, Any]:
    """The explicit CLI flags that were given (None = not given), as `load_config(flags=...)`:
    `given_flags(out=args.out)`."""
    return {key: value for key, value in values.items() if value is not None}


def read_preset(preset: str | os.PathLike | None) -> dict[str, Any]:
    """Load a preset as {section: overrides}; {} for None.

    A name resolves to the directory `launch/presets/NAME/`, one `<section>.yaml` per stage
    (data.yaml, pretrain.yaml, ...). A path names either such a directory or a single YAML file
    whose top-level keys are the sections.
    """
    if preset is None or preset == "":
        return {}
    path = Path(preset)
    if not path.exists() and not path.suffix:
        path = PRESET_DIR / str(preset)
    if not path.exists():
        available = sorted(p.name for p in PRESET_DIR.iterdir() if p.is_dir())
        raise ConfigError(f"preset {preset!s} not found ({path}); available presets: {', '.join(available)}")
    if path.is_dir():
        files = sorted(path.glob("*.yaml"))
        if not files:
            raise ConfigError(f"--preset {preset!s}: the directory {path} holds no <section>.yaml file, so it is not a "
                              "preset; give a preset name (" + ", ".join(sorted(p.name for p in PRESET_DIR.iterdir()
                                                                             if p.is_dir()))
                              + ") or a directory with data.yaml, pretrain.yaml, ...")
        return {f.stem: _read_yaml_mapping(f) for f in files}
    return _read_yaml_mapping(path)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping")
    return data


def load_config(
    cls: type[T],
    section: str | None = None,
    preset: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> T:
    """Defaults <- preset[section] (or the whole preset when section is None) <- dotted overrides <-
    flags (a nested dict of the explicit command-line flags that were given; see the module doc).

    A section listed in SECTION_BASES starts from its base section of the same preset: defaults <-
    preset[base] <- preset[section] <- overrides <- flags.
    """
    preset_data = read_preset(preset)
    if section is not None:
        unknown_sections = [k for k in preset_data if k not in KNOWN_SECTIONS]
        if unknown_sections:
            raise ConfigError(
                f"preset {preset}: unknown section(s) {', '.join(unknown_sections)}; "
                f"allowed sections: {', '.join(KNOWN_SECTIONS)}"
            )
        parent = SECTION_BASES.get(section)
        layers = [preset_data.get(parent) or {}] if parent else []
        layers.append(preset_data.get(section) or {})
    else:
        layers = [preset_data]
    cfg = cls()
    if section is not None and "crosslingual" in {f.name for f in dataclasses.fields(cls)}:
        # The one place that names source and target locales: the preset's `crosslingual` section,
        # under every stage that reads MASSIVE (core.crosslingual); the stage's own section and
        # overrides come after it.
        layers.insert(0, {"crosslingual": preset_data.get("crosslingual") or {}})
    for layer in layers:
        cfg = merge(cfg, layer)
    cfg = merge(cfg, parse_overrides(list(overrides)))
    cfg = merge(cfg, flags or {})
    return validate(cfg)


# MASSIVE locale names: ll-CC (the release also has sl-SL and zh-TW; all fit this shape).
LOCALE_RE = re.compile(r"^[a-z]{2,3}-[A-Z]{2}$")
# Locales written without spaces between words: tokenizer fertility is per character there, and
# translation BLEU is computed on characters (word-level BLEU means nothing for them).
NO_SPACE_LOCALES = frozenset({"ja-JP", "zh-CN", "zh-TW", "th-TH", "my-MM", "km-KH"})


# Sections a preset may hold: one per stage config, plus the pipeline's own settings.
KNOWN_SECTIONS = ("data", "pretrain", "indomain", "icl", "distill", "taskdistill", "finetune", "nlu", "export",
                  "evaluate", "pipeline", "crosslingual")
# Sections that hold only what differs from another section: the encoder NLU fine-tuning (`finetune
# --section nlu`) is the MASSIVE fine-tuning with its own steps and regularisation.
SECTION_BASES = {"nlu": "finetune"}


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    from core.fsutil import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def save_stage_config(cfg: Any, run_dir: str | os.PathLike, stage: str, name: str | None = None) -> Path:
    """Write a stage's resolved config twice: RUN_DIR/configs/<stage>[-<name>].yaml, kept for every
    stage that ran (a later stage never overwrites it), and RUN_DIR/config.yaml, the latest stage's.
    Returns the per-stage file. Refuses (core.fsutil.OutputPathError) a directory that is not a run
    directory but holds files polyteacher did not write: config.yaml would replace the user's own."""
    from core.fsutil import check_run_dir, mark_run_dir

    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    mark_run_dir(run_dir)
    own = save_config(cfg, run_dir / "configs" / (f"{stage}-{name}.yaml" if name and name != stage else f"{stage}.yaml"))
    save_config(cfg, run_dir / "config.yaml")
    return own


def load_saved_config(cls: type[T], path: str | os.PathLike) -> T:
    """Read a config written by save_config back into its dataclass (strictly)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return from_dict(cls, data)


def config_help(cls: type, prefix: str = "") -> str:
    """One line per dotted key: type, default and the field's docstring."""
    lines: list[str] = []
    cfg = cls()
    hints = _type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(config_help(type(value), prefix=key + "."))
            continue
        doc = docs.get(f.name, "")
        lines.append(f"  {key} ({_type_name(hints[f.name])}, default {value!r})\n      {doc}".rstrip())
    return "\n".join(line for line in lines if line)
