"""``params.yaml`` parsed into typed, validated config objects.

Every section is a frozen dataclass; :func:`parse` walks the type hints, so an unknown key, a
missing required key or a value of the wrong type is a one-line :class:`ConfigError` naming the
key path, before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from lib.errors import ConfigError

T = TypeVar("T")
PARAMS_FILE = "params.yaml"


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading exponent floats without a dot (``5e-05``) as floats, as YAML 1.2
    and DVC do: ``dvc exp run -S lr=5e-5`` writes ``5e-05``, which YAML 1.1 takes for a string."""


def _unique_mapping(loader: ParamsLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: PyYAML keeps the last of two equal keys silently, DVC refuses them."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on line "
                f"{seen[key] + 1}); expected every key once", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


ParamsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root)")
    try:
        data = yaml.load(path.read_text(), Loader=ParamsLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def section(params: dict, key: str, cls: type[T]) -> T:
    """Parse ``params[key]`` (a dotted path is allowed) as ``cls``."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params: missing section '{key}'")
        node = node[part]
    return parse(cls, node, key)


def merged(base: Any, override: Any) -> Any:
    """``base`` with ``override`` applied recursively (mappings merge, anything else replaces)."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in override.items()}}
    return override


def parse(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the type ``tp`` and build dataclasses recursively."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"params: {where} = {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        present = [o for o in options if o is not type(None)]
        if value is None and len(present) < len(options):
            return None
        if len(present) == 1:      # X | None: X's own error names the key and what was expected
            return parse(present[0], value, where)
        for option in options:
            try:
                return parse(option, value, where)
            except ConfigError:
                continue
        names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
        raise ConfigError(f"params: {where} must be {names}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"params: {where} must be empty (null), got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"params: {where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"params: {where} must be a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): parse(item, v, f"{where}.{k}") for k, v in value.items()}
    return _parse_scalar(tp, value, where)


def _parse_scalar(tp: type, value: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"params: {where} must be a number, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"params: {where} must be of type {tp.__name__}, got {value!r}")
    return value


def _parse_dataclass(cls: type[T], value: Any, where: str) -> T:
    if not isinstance(value, dict):
        raise ConfigError(f"params: {where} must be a mapping, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"params: unknown key '{where}.{unknown[0]}' "
                          f"(known keys: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = parse(hints[name], value[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"params: missing key '{where}.{name}'")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def positive(value: int | float, where: str, allow_zero: bool = False) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"params: {where} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"params: {where} must be {bound}, got {value}")


def positive_pair(value, where: str) -> None:
    """A (height, width)-like pair of positive numbers, or None (the option is off)."""
    if value is not None and (len(value) != 2 or min(value) <= 0):
        raise ConfigError(f"params: {where} must be two positive numbers, got {list(value)}")
