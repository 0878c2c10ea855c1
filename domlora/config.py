"""Typed configuration from plain dicts: one validator for params.yaml sections and CLI overrides.

Every configuration object of domlora is a frozen dataclass whose fields carry their types and a
docstring; `from_dict` builds one from a mapping (a params.yaml section, a method's overrides,
`--set key=value` flags) and checks, before any work starts, that every key exists (an unknown
key is named with its closest matches and the allowed keys), that every value has the field's
type, and that closed choices (`Literal[...]`) hold one of their values. Nested dataclass fields
are sub-sections, validated the same way. Range checks stay in each class's `__post_init__`.

    cfg = from_dict(TrainConfig, {"rank": 8, "lr": 1e-3}, where="train")
    from_dict(TrainConfig, {"rnak": 8}, where="train")
    # ConfigError: unknown key `train.rnak` (did you mean rank?); allowed keys: ...

Plain dataclasses, not pydantic: the library must import with its core dependencies only
(pydantic arrives with the pipeline extra, through Prefect), the classes stay readable as plain
Python with attribute docstrings (STYLE: litgpt's `args.py`), and the validation we need is
the small set of types used here.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union

from domlora.errors import ConfigError

__all__ = ["ModelSpec", "check_fields", "check_keys", "close_matches", "field_docs", "flatten", "from_dict",
           "replace"]


def close_matches(word: str, options: Iterable[str]) -> str:
    """` (did you mean a, b?)` for the options close to `word`, else an empty string."""
    near = difflib.get_close_matches(str(word), [str(o) for o in options], n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def check_keys(where: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise a ConfigError naming the first key of `given` that is not `allowed`."""
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise ConfigError(f"unknown key `{where}.{key}`{close_matches(key, allowed)}; "
                              f"allowed keys: {', '.join(sorted(allowed))}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, where: str):
    """`value` checked against (and, for lists/tuples/dataclasses, converted to) the type `tp`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(value, opt, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"`{where}` must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"`{where}` is {value!r}{close_matches(str(value), map(str, allowed))}; "
                              f"allowed values: {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None or value is True:  # `grpo: {}` may be written `grpo: true`
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{where}` must be a mapping of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{where}` must be a list, got {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{where}` must be a mapping, got {value!r}")
        kt, vt = (typing.get_args(tp) + (Any, Any))[:2]
        return {_convert(k, kt, f"{where} key"): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{where}` must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{where}` must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{where}` must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{where}` must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"`{where}` must be {_type_name(tp)}, got {value!r}")
    return value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, data: Mapping | None, *, where: str):
    """Build the dataclass `cls` from `data`, checking keys and types (see the module docstring).

    Raises:
        ConfigError: an unknown key (with its closest matches and the allowed keys), a value of the
            wrong type, a value outside a closed choice, or the class's own range checks.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"`{where}` must be a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(where, data, fields)
    hints = _hints(cls)
    kwargs = {k: _convert(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"`{where}` lacks the required key(s) {', '.join(missing)}") from None
        raise


def check_fields(obj, *, where: str) -> None:
    """Check every field of a dataclass instance against its type (for instances built directly)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        _convert(getattr(obj, f.name), hints.get(f.name, Any), f"{where}.{f.name}")


def replace(obj, *, where: str = "config", **changes):
    """`dataclasses.replace` with the same key and type checks as `from_dict`."""
    fields = {f.name for f in dataclasses.fields(obj) if f.init}
    check_keys(where, changes, fields)
    hints = _hints(type(obj))
    return dataclasses.replace(obj, **{k: _convert(v, hints.get(k, Any), f"{where}.{k}") for k, v in changes.items()})


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def field_docs(cls) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal right after the field)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # pragma: no cover - classes defined in a REPL
        return {}
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The base model, loaded the same way by every stage (probe, train, evaluate)."""

    id: str = "embedded"
    """`embedded`, a Hugging Face hub id or a local checkpoint folder"""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """weights' dtype; auto = bfloat16 on GPU (with TF32 matmuls), float32 on CPU"""
    trust_remote_code: bool = False
    """allow the model's own Python code from the hub"""
    label: str | None = None
    """its name in reports (default: the id)"""

    @classmethod
    def of(cls, model: ModelSpec | str) -> ModelSpec:
        """A spec from a spec or a bare id."""
        return model if isinstance(model, ModelSpec) else cls(id=str(model))
