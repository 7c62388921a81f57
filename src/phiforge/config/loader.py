"""The one config loader: a TOML file (or a built-in recipe name) plus ``section.key=value`` overrides, into a
dataclass of sections, every key and type checked.

Train, SFT/DPO/PTS, synth, topics, curate, run recipes and studies all load through here, so a typo is always an
error that lists every unknown key with the valid ones and names the file, before anything is built. Values in
overrides are parsed as TOML values (``optim.betas=[0.9,0.95]``, ``run.precision=bf16``); a value that is not
valid TOML is taken as a string.

A field without a default must be given; a section left out or partly given keeps its field's default values. A
field's ``metadata={"config_keys": (...)}`` limits the keys its section accepts (a shared type such as
``SamplingParams`` exposing only what the stage honours). A section dataclass may set
``CONFIG_EXTRA = (field, OtherDataclass)``: keys that are fields of ``OtherDataclass`` (typed by it) are collected
into ``field`` (a dict). ``metadata={"key": "from"}`` gives a field a TOML key that is no Python name.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from phiforge.errors import ConfigError

T = TypeVar("T")


def resolve_recipe(path: str | Path, folder: Path, error: type[Exception] = ConfigError) -> Path:
    """A TOML file, or the name of a built-in recipe in ``folder``."""
    file = Path(path)
    if file.is_file():
        return file
    builtin = folder / f"{path}.toml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in folder.glob("*.toml"))
    raise error(f"{path}: no such recipe file, and not a built-in recipe ({', '.join(names)})")


def read_recipe(name: str | Path, folder: Path, error: type[Exception]) -> tuple[Path, str, dict[str, Any]]:
    """A recipe file (a path or a built-in name in ``folder``): its path, text and parsed TOML; a syntax error
    is ``error`` naming the file."""
    path = resolve_recipe(name, folder, error)
    text = path.read_text(encoding="utf-8")
    try:
        return path, text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML ({err})") from None


def read_toml(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """The parsed file; a missing file or a syntax error is ``error`` naming the file."""
    file = Path(path)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{file}: no such config file (TOML)") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{file}: not valid TOML ({err})") from None


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None, *,
                recipes: Path | None = None, error: type[Exception] = ConfigError) -> T:
    """``cls`` from a TOML file (or, with ``recipes``, a built-in recipe name) plus overrides; errors name the file."""
    file = resolve_recipe(path, recipes, error) if recipes is not None else Path(path)
    return build_config(cls, read_toml(file, error), overrides, error=error, source=file)


def build_config(cls: type[T], raw: dict[str, Any], overrides: list[str] | None = None, *,
                 error: type[Exception] = ConfigError, source: str | Path | None = None, section: str = "") -> T:
    """``cls`` (a dataclass of sections) from a raw TOML dict plus ``section.key=value`` overrides, every key
    and type checked, then ``cls.validate()`` when it has one. Errors are ``error``, prefixed with ``source``;
    ``section`` names ``raw`` when it is one section of a larger file (``[tokenizer]`` of a run recipe)."""
    try:
        raw = copy.deepcopy(raw)
        for item in overrides or []:
            apply_override(raw, item)
        unknown: list[str] = []
        config = _build(cls, raw, f"{section}." if section else "", unknown)
        if unknown:
            raise ConfigError("; ".join(unknown))
        if hasattr(config, "validate"):
            config.validate()
    except ConfigError as err:
        message = f"{source}: {err}" if source is not None else str(err)
        if isinstance(err, error) and source is None:
            raise
        raise (type(err) if isinstance(err, error) else error)(message) from None
    return config


# ---- overrides ---------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the raw TOML dict; list entries are picked by name or index."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_entry(node, part, where)
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
    if isinstance(node, list):
        raise ConfigError(f"override {item!r}: pick an entry of {'.'.join(parts[:-1])} by name or index")
    node[parts[-1]] = parse_value(value.strip())


def _list_entry(entries: list[Any], part: str, where: str) -> Any:
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == part:
            return entry
    if part.isdigit() and int(part) < len(entries):
        return entries[int(part)]
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    raise ConfigError(f"{where}: no entry named {part!r}; entries are {names}")


# ---- dict -> dataclasses, with exact key and type checks --------------------------------------------------
def _build(cls: type, table: Any, prefix: str, unknown: list[str], base: Any = None,
           only: tuple[str, ...] | None = None) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    specs = {f.metadata.get("key", f.name): f for f in fields(cls)}
    extra_field, extra_cls = getattr(cls, "CONFIG_EXTRA", (None, None))
    extra_hints = typing.get_type_hints(extra_cls) if extra_cls is not None else {}
    extra_names = {f.name for f in fields(extra_cls)} - {"name"} if extra_cls is not None else set()
    known = list(only) if only is not None else [k for k, f in specs.items() if f.name != extra_field]
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    bad: list[str] = []
    for key, value in table.items():
        if key in known:
            spec = specs[key]
            hint = hints[spec.name]
            if dataclasses.is_dataclass(hint):  # a section: over its field's default, limited to its keys
                default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None
                values[spec.name] = _build(hint, value, f"{prefix}{key}.", unknown, default,
                                           spec.metadata.get("config_keys"))
            else:
                values[spec.name] = _convert(hint, value, f"{prefix}{key}", unknown)
        elif key in extra_names:
            extra[key] = _convert(extra_hints[key], value, f"{prefix}{key}", unknown)
        else:
            bad.append(f"'{prefix}{key}'")
    if bad:  # every unknown key of the table at once, with the valid ones
        valid = ", ".join(known)
        if extra_cls is not None:
            valid += f", or any {extra_cls.__name__} field (" + ", ".join(sorted(extra_names)) + ")"
        unknown.append(f"unknown key{'s' if len(bad) > 1 else ''} {', '.join(bad)} in [{where}]; valid keys: {valid}")
    if extra_field is not None:
        values[extra_field] = extra
    if base is None:
        missing = [f.name for f in fields(cls) if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            optional = [f.name for f in fields(cls) if f.name not in missing]
            also = f" (and optionally {', '.join(optional)})" if optional else ""
            raise ConfigError(f"{where}: needs {missing}{also}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError as err:  # the section's own checks (e.g. SamplingParams' ranges): name the section
        raise ConfigError(f"{where}.{err}" if prefix else str(err)) from None


def _convert(hint: Any, value: Any, key: str, unknown: list[str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", unknown)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list (an array of tables), got {value!r}")
        return [_convert(args[0], v, f"{key}.{i}", unknown) for i, v in enumerate(value)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: a list of any length
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{key}.{i}", unknown) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(a, v, f"{key}.{i}", unknown) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. int | None: the first arm that accepts the value
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(arm, value, key, unknown)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}
    if not ok.get(hint, True):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    return float(value) if hint is float else value


def config_dict(config: Any) -> dict[str, Any]:
    """A loaded config as plain data, sections limited to the keys they accept (so it reads back the same)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value, name = getattr(config, f.name), f.metadata.get("key", f.name)
        keys = f.metadata.get("config_keys")
        if keys is not None:
            out[name] = value.pick(keys) if hasattr(value, "pick") else {k: getattr(value, k) for k in keys}
        elif dataclasses.is_dataclass(value):
            out[name] = config_dict(value)
        else:
            out[name] = copy.deepcopy(value) if not isinstance(value, list) else [
                config_dict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v) for v in value]
    return out


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)
