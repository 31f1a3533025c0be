"""Every method's hyperparameters hold the types their annotations name, however the method was built.

jsonargparse checks YAML against the annotations, but a config read from an ``adapter_config.json`` or written
in Python is not checked by anyone else, and Python coerces quietly: ``bool("false")`` is ``True``, ``None``
scales nothing, ``"16"`` compares unequal to 16. A value that does not match its annotation is an error naming
the field, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

_SEQUENCES = (list, tuple, set, frozenset)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in _SEQUENCES or hint in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_matches(item, args[0]) for item in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not model: left to the method's own validate()


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # a user's method with unresolvable annotations: nothing to check against
        return {}


def check_field_types(method: Any) -> None:
    """Raise ``TypeError`` naming the first field of the dataclass ``method`` whose value its type refuses
    (``ValueError`` for a string outside a ``Literal``'s choices)."""
    hints = _hints(type(method))
    for field in dataclasses.fields(method):
        hint = hints.get(field.name)
        value = getattr(method, field.name)
        if hint is None or _matches(value, hint):
            continue
        choices = _literal_choices(hint)
        if choices and isinstance(value, str):
            raise ValueError(f"{type(method).__name__} {field.name}={value!r} must be one of {choices}.")
        raise TypeError(
            f"{type(method).__name__}.{field.name} must be {_describe(hint)}, got {value!r} "
            f"({type(value).__name__}). Write it as that type (JSON: true/false, numbers unquoted)."
        )


def _literal_choices(hint: Any) -> list[Any]:
    if get_origin(hint) is Literal:
        return list(get_args(hint))
    if get_origin(hint) in (Union, types.UnionType):
        return [c for arg in get_args(hint) for c in _literal_choices(arg)]
    return []


def _describe(hint: Any) -> str:
    text = str(hint) if get_origin(hint) is not None or not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "")
