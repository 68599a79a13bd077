"""Strict YAML -> dataclass loading, dotted CLI overrides, and field documentation.

    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "model.hidden_size=128"])

Values are converted by the field's annotation: `int` rejects `true` and `1.5`, `float` accepts
integers but not NaN or infinity, `Literal[...]` checks membership, `X | None` accepts null, tuples
and lists check their items. Unknown keys, wrong types and missing sections are `ConfigError`s
naming the dotted key and the file (or "override") they came from. A key written twice in one
mapping (a repeated section included) is an error naming it and its line, never a silent merge.
Messages quote values through `pretrain.errors.clip`, so a huge value (a YAML alias bomb) gives
a short message, fast.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from pretrain.config.schema import Config
from pretrain.errors import ConfigError, clip

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 integers (as YAML 1.2 does), so that a Slurm time
    limit written `time: 12:00:00` stays the string it looks like instead of becoming 43200."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (
            tag,
            re.compile(
                r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
            ),
        )
        if tag == "tag:yaml.org,2002:int"
        else (tag, regexp)
        for tag, regexp in resolvers
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _check_unique_keys(root: yaml.Node, source: str) -> None:
    """Raise naming the first key that a mapping repeats (merge keys `<<` excepted). Each node
    is visited once, so aliases (shared nodes) cost nothing however often they are used."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, prefix = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    stack.append((value_node, prefix))
                    continue
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                line = key_node.start_mark.line + 1
                if key in lines and isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError(
                        f"{source}: line {line}: duplicate key '{clip(prefix + key, 120, False)}' "
                        f"(first at line {lines[key]}); write each key once"
                    )
                lines[key] = line
                stack.append((value_node, f"{prefix}{key}."))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, prefix) for item in node.value)


def _load_yaml(text: str, source: str = "override"):
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml_text(text: str, source: str) -> dict[str, Any]:
    """Parse a config document strictly (see the module docstring); it must be a mapping."""
    try:
        data = _load_yaml(text, source) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{source}: not valid YAML ({clip(first, 200, False)})") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path` (or the defaults when None), apply `key.sub=value` overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (UnicodeDecodeError, IsADirectoryError) as exc:
            raise ConfigError(f"{path}: not a readable text file ({type(exc).__name__})") from None
        data = load_yaml_text(text, source)
    # Convert the file first so that its errors name the file, then apply each override.
    cfg = from_dict(Config, data, source=source)
    for item in overrides:
        cfg = apply_override(cfg, item)
    cfg.validate()
    return cfg


def apply_override(cfg: Config, item: str) -> Config:
    """Copy of `cfg` with one `dotted.key=value` override applied (the value parsed as YAML)."""
    where = f"override {clip(item, 120)}"
    if "=" not in item:
        raise ConfigError(f"{where}: expected key=value, e.g. train.steps=50")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = _load_yaml(raw, where) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw
    data = to_dict(cfg)
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(
                f"{where}: unknown key '{clip('.'.join(parts[: depth + 1]), 120, False)}'"
                f" (valid: {_valid_keys(node)})"
            )
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(
            f"{where}: unknown key '{clip(key, 120, False)}' (valid: {_valid_keys(node)})"
        )
    node[parts[-1]] = value
    return from_dict(Config, data, source="override")


def to_dict(obj: Any) -> Any:
    """Plain nested dict/list form of a config (tuples become lists, as YAML writes them)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """`{"model.hidden_size": 256, ...}`: the form logged as MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node

    walk("", to_dict(cfg))
    return out


def from_dict(cls: type, data: Any, *, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly."""
    where = prefix[:-1] if prefix else "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key '{clip(f'{prefix}{key}', 120, False)}' "
                f"(valid keys: {', '.join(fields)})"
            )
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default is missing
        raise ConfigError(f"{source}: {where}: {exc}") from None


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, source, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        allowed = get_args(tp)
        # `True == 1` in Python: a bool only matches a Literal that lists bools.
        is_bool = isinstance(value, bool)
        if value not in allowed or is_bool != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(
                f"{source}: {key}: expected one of {list(allowed)}, got {_describe(value)}"
            )
        return value
    if origin is tuple:
        items = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(
                f"{source}: {key}: expected a list of {len(items)} items, got {_describe(value)}"
            )
        return tuple(
            _convert(t, v, source, f"{key}[{i}]")
            for i, (t, v) in enumerate(zip(items, value, strict=True))
        )
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        return [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true/false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads `3e-4` as a string; a plain number written so is still a number.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {clip(value)}" if value is not None else "null"


def _valid_keys(node: Any) -> str:
    return ", ".join(node) if isinstance(node, dict) else "(not a section)"


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field, read from the attribute docstrings."""
    docs = _attribute_docstrings(cls)
    hints = typing.get_type_hints(cls)
    rows: list[tuple[str, str, str]] = []
    instance = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_docs(hints[f.name], f"{prefix}{f.name}."))
        else:
            default = yaml.safe_dump(to_dict(getattr(instance, f.name)), default_flow_style=True)
            rows.append((f"{prefix}{f.name}", default.replace("...", "").strip(), docs[f.name]))
    return rows


def _attribute_docstrings(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
