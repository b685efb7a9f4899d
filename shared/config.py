"""Run configuration as typed data: one dataclass tree, four views of it.

A run is described once, by dataclasses whose fields carry their help text
(`option(...)`). From that tree come
- the Flower run config (flat, kebab-case keys: `to_flat` / `from_flat`), which the
  ServerApp reads and pyproject's `[tool.flwr.app.config]` mirrors;
- command-line flags (`add_flags` / `apply_flags`) of `fedmoe simulate` and
  `fedmoe coordinator start`;
- JSON (`to_json` / `from_json`): `simulate.json`, from which `--resume` restarts.
Adding an option is one field: every view picks it up.

Nested dataclasses are flattened in the flat and flag views, so leaf names must be
unique across the tree (checked). TOML and Flower's run config cannot hold `None`: the
flat view writes an unset optional field as "" and reads "" back as `None`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from fedmoe.shared.errors import FedmoeError

SCALARS = (bool, int, float, str)


def option(default: Any = dataclasses.MISSING, *, help: str, key: str | None = None, choices=None,
           flag: bool = True, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text; `key` overrides the kebab-case name used in
    the run config and as a flag; `flag=False` keeps it off the command line."""
    meta = {"help": help, "key": key, "choices": tuple(choices) if choices else None, "flag": flag}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def key_of(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name.replace("_", "-")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(cls, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(attribute path, field, type) of every scalar field in the tree, depth first."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp):
            out.extend(leaves(tp, path + (f.name,)))
        else:
            out.append((path + (f.name,), f, tp))
    keys = [key_of(f) for _, f, _ in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise TypeError(f"{cls.__name__}: run-config key {dup[0]!r} appears twice in the tree")
    return out


def _base_type(tp):
    """int for `int`, float for `float | None`, tuple for `tuple[int, ...]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def coerce(value, tp, where: str):
    """`value` (from TOML, JSON, argparse or a Flower ConfigRecord) as the field's type."""
    if value is None or (value == "" and _optional(tp)):
        if _optional(tp):
            return None
        raise FedmoeError(f"{where}: a value is required")
    base = _base_type(tp)
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is tuple:
            items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            inner = next(a for a in typing.get_args(tp) or (tp,) if a is not type(None))  # unwrap X | None
            (item_type, *_) = typing.get_args(inner) or (str,)
            return tuple(coerce(v, item_type, where) for v in items)
        return str(value)
    except (TypeError, ValueError):
        raise FedmoeError(f"{where}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None


def _get(obj, path):
    for name in path:
        obj = getattr(obj, name)
    return obj


def to_flat(obj) -> dict[str, Any]:
    """The flat view: {kebab-key: scalar}; tuples as comma-joined strings, None as ""."""
    out = {}
    for path, f, _ in leaves(type(obj)):
        value = _get(obj, path)
        if value is None:
            value = ""
        out[key_of(f)] = ",".join(str(v) for v in value) if isinstance(value, tuple) else value
    return out


def _build(cls, values: dict[tuple[str, ...], Any], path: tuple[str, ...] = ()):
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        tp, here = hints[f.name], path + (f.name,)
        if _is_config(tp):
            kwargs[f.name] = _build(tp, values, here)
        elif here in values:
            kwargs[f.name] = values[here]
    return cls(**kwargs)


def from_flat(cls, flat: dict[str, Any], where: str = "run config", strict: bool = True):
    """Build `cls` from a flat view; absent keys take their defaults. Unknown keys are an
    error when `strict` (a mistyped key must not be silently ignored)."""
    by_key = {key_of(f): (path, f, tp) for path, f, tp in leaves(cls)}
    unknown = sorted(set(flat) - set(by_key))
    if strict and unknown:
        raise FedmoeError(f"{where}: unknown key {unknown[0]!r}: choose from {', '.join(sorted(by_key))}")
    values = {}
    for key, value in flat.items():
        if key in by_key:
            path, f, tp = by_key[key]
            values[path] = coerce(value, tp, f"{where} {key}")
    return _build(cls, values)


def to_json(obj) -> dict:
    return dataclasses.asdict(obj)


def from_json(cls, data: dict, where: str = "config"):
    values = {}

    def walk(c, d, path):
        hints = _hints(c)
        for f in dataclasses.fields(c):
            if f.name not in d:
                continue
            tp = hints[f.name]
            if _is_config(tp):
                walk(tp, d[f.name] or {}, path + (f.name,))
            else:
                values[path + (f.name,)] = coerce(d[f.name], tp, f"{where} {'.'.join(path + (f.name,))}")

    walk(cls, data, ())
    return _build(cls, values)


def replace_path(obj, path: tuple[str, ...], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: replace_path(getattr(obj, path[0]), path[1:], value)})


DEST = "cfg__"


def add_flags(parser: argparse.ArgumentParser, cls, skip=frozenset(), shown: dict[str, str] | None = None) -> None:
    """One `--key` flag per field (not `flag=False`, not in `skip`), its help from the field
    and its default shown from the class (or `shown[key]`, e.g. "the preset's"). Flags not
    given stay unset, so `apply_flags` changes only what the user asked for."""
    for path, f, tp in leaves(cls):
        key = key_of(f)
        if not f.metadata.get("flag", True) or key in skip:
            continue
        help_text = f.metadata.get("help", "")
        if shown and key in shown:
            help_text = f"{help_text} (default: {shown[key]})"
        elif f.default is not dataclasses.MISSING and f.default is not None:
            d = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            help_text = f"{help_text} (default {d})"
        dest = DEST + "__".join(path)
        base = _base_type(tp)
        if base is bool:
            parser.add_argument(f"--{key}", dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(f"--{key}", dest=dest, default=argparse.SUPPRESS, help=help_text,
                                choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else key.upper().replace("-", "_"),
                                type=_flag_type(tp, key) if base is not str else str)


def _flag_type(tp, key: str):
    def parse(text: str):
        try:
            return coerce(text, tp, f"--{key}")
        except FedmoeError as exc:  # argparse reports it with the usage line, exit 2
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    return parse


def apply_flags(obj, args: argparse.Namespace):
    """`obj` with the flags the user gave (by `add_flags`) applied; dataclass checks rerun."""
    for dest, value in sorted(vars(args).items()):
        if dest.startswith(DEST):
            obj = replace_path(obj, tuple(dest[len(DEST):].split("__")), value)
    return obj


def given_flags(args: argparse.Namespace) -> set[str]:
    """Attribute paths (dotted) the user set on the command line."""
    return {dest[len(DEST):].replace("__", ".") for dest in vars(args) if dest.startswith(DEST)}
