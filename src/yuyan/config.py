"""Typed dataclass configs: TOML files plus `--section.key value` overrides, no exec, no globals.

`load_config(Cls, path, overrides)` fills a (possibly nested) dataclass from a TOML file, then applies
command-line overrides such as `--train.lr 3e-4 --model.n_layer 6`. Values are converted to the field's
type (a list from "0.9,0.95", a table from a JSON object); an unknown section or key is a clear error
naming the known ones.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from yuyan.errors import UserError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML value or a command-line string to type tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _to_optional(value, tp, where)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        return _to_bool(value, where)
    if tp in (int, float):
        return _to_number(value, tp, where)
    if tp is str:
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):  # "0.9,0.95" or a JSON list
            value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_convert(v, inner, where) for v in value]
    if origin is dict or tp is dict:
        return _to_table(value, where)
    return value


def _to_optional(value: Any, tp: Any, where: str) -> Any:
    """A union such as `int | None`: None (or "none"/"null" on the command line), else the first type that
    reads the value."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    for a in typing.get_args(tp):
        if a is type(None):
            continue
        try:
            return _convert(value, a, where)
        except (UserError, ValueError, TypeError):
            continue
    raise UserError(f"{where}: cannot read {value!r} as {tp}")


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise UserError(f"{where}: expected true or false, got {value!r}")


def _to_number(value: Any, tp: type, where: str) -> int | float:
    try:
        if tp is int and isinstance(value, str):
            return int(float(value)) if "e" in value.lower() else int(value)
        return tp(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}") from None


def _to_table(value: Any, where: str) -> dict:
    """A TOML table, or on the command line a JSON object: --model.rope_scaling '{"factor": 8.0}'."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UserError(f"{where}: expected a JSON object, got {value!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a table, got {value!r}")
    return dict(value)


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(types_)}")
    kwargs = {k: _convert(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(obj: T, overrides: dict[str, str]) -> T:
    """Return a copy of dataclass `obj` with dotted-key overrides applied ({"train.lr": "3e-4"})."""
    data = to_dict(obj)
    types_root = type(obj)
    for key, raw in overrides.items():
        parts = key.split(".")
        cls, node = types_root, data
        for i, part in enumerate(parts):
            ftypes = _field_types(cls)
            if part not in ftypes:
                where = ".".join(parts[:i]) or "top level"
                raise UserError(f"unknown setting --{key}: {where} has {sorted(ftypes)}")
            tp = ftypes[part]
            if i == len(parts) - 1:
                node[part] = _convert(raw, tp, f"--{key}")
            else:
                # a section, or Optional[section]: descend into the dataclass
                inner = [a for a in (tp, *typing.get_args(tp)) if _is_dataclass_type(a)]
                if not inner:
                    raise UserError(
                        f"unknown setting --{key}: {'.'.join(parts[: i + 1])} is a value, not a section"
                    )
                cls = inner[0]
                if node.get(part) is None:
                    node[part] = to_dict(cls())
                node = node[part]
    return from_dict(types_root, data)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--train.lr', '3e-4', '--model.n_layer=6'] -> {'train.lr': '3e-4', 'model.n_layer': '6'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise UserError(f"unexpected argument {a!r}: overrides look like --section.key value")
        key = a[2:].replace("-", "_")
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            val = args[i + 1]
            i += 2
        else:
            val = "true"  # a bare flag
            i += 1
        out[key] = val
    return out


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {p} not found; see configs/ for examples")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p} is not valid TOML: {e}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, str] | None = None) -> T:
    obj = from_dict(cls, load_toml(path), str(path)) if path else cls()
    return apply_overrides(obj, overrides or {})
