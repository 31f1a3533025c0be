"""Finding the modules a method adapts, and swapping them in place.

Every method resolves ``target_modules`` through :func:`find_targets`, so the
matching rules (the same as Hugging Face ``peft``'s) live here once:

* a list of names: a module matches when its full name equals an entry or ends
  with ``"." + entry``;
* a string: a regular expression that must match the full module name;
* ``"all-linear"``: every linear layer except the model's output head.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer

try:  # the regex parser of the standard library (3.11+ names it re._parser)
    import re._constants as _sre_constants
    import re._parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_REPEATS = {_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT} | (
    {_sre_constants.POSSESSIVE_REPEAT} if hasattr(_sre_constants, "POSSESSIVE_REPEAT") else set()
)

ALL_LINEAR = "all-linear"

TargetSpec = str | Sequence[str] | None


MAX_PATTERN_LENGTH = 500
_MAX_OPEN_REPEATS = 6


def check_pattern(pattern: str, where: str) -> None:
    """Refuse a regular expression that could take exponential time on a module name (a repetition holding
    another repetition or an alternation, e.g. ``(.|.)*Z``), an overlong or invalid one; ``where`` names its
    source. Patterns from files must pass before anything matches them."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"{where}: the pattern is {len(pattern)} characters (at most {MAX_PATTERN_LENGTH}).")
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as error:
        raise ValueError(f"{where}: {pattern!r} is not a valid regular expression ({error}).") from None
    open_repeats = _count_open_repeats(parsed.data)
    if _nested_repetition(parsed.data, inside=False) or open_repeats > _MAX_OPEN_REPEATS:
        raise ValueError(
            f"{where}: {pattern!r} repeats a group that itself repeats or alternates (or has more than "
            f"{_MAX_OPEN_REPEATS} open repetitions): matching it can take exponential time. Use a list of module "
            "names, or a pattern such as '.*\\.(q_proj|v_proj)'."
        )


def _children(av: object) -> Iterable[list]:
    """The sub-patterns inside one parsed node's argument."""
    if isinstance(av, _sre_parse.SubPattern):
        yield av.data
    elif isinstance(av, (tuple, list)):
        for item in av:
            yield from _children(item)


def _is_open_repeat(op: object, av: object) -> bool:
    return op in _REPEATS and (av[1] is _sre_constants.MAXREPEAT or av[1] > 1)  # type: ignore[index]


def _nested_repetition(nodes: list, inside: bool) -> bool:
    for op, av in nodes:
        repeat = _is_open_repeat(op, av)
        if inside and (repeat or op is _sre_constants.BRANCH):
            return True
        if any(_nested_repetition(child, inside or repeat) for child in _children(av)):
            return True
    return False


def _count_open_repeats(nodes: list) -> int:
    return sum(
        _is_open_repeat(op, av) + sum(_count_open_repeats(c) for c in _children(av)) for op, av in nodes
    )


def name_matches(name: str, spec: str | Sequence[str]) -> bool:
    """Whether a module's full dotted ``name`` is selected by ``spec`` (list/suffix or full-match regex)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def pattern_value(name: str, patterns: dict[str, int | float], default: int | float) -> int | float:
    """Per-module override (``rank_pattern``/``alpha_pattern``): first key whose regex matches the name's tail."""
    for key, value in patterns.items():
        # The key is grouped so that an alternation ("q_proj|k_proj") applies to the whole tail, as in peft.
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def default_targets(
    model: nn.Module,
    table: dict[str, list[str] | str],
    *,
    method: str,
    fix: str,
    option: str = "target_modules",
    separator: str = ";",
) -> list[str] | str:
    """A method's default modules for ``model`` (``option`` was not given): ``table[model.config.model_type]``, a
    list of names or a full-match regex.

    Raises:
        ValueError: no entry for the model's type; the message names the option to pass and, in ``fix``, how.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise ValueError(
            f"{method}: {option} is required for this model (no default for model_type={model_type!r}){separator} {fix}"
        )
    return table[model_type]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s), which ``"all-linear"`` leaves alone (as peft does)."""
    heads: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        if head is not None:
            heads.update(name for name, module in model.named_modules() if module is head)
    if not heads:
        # A plain nn.Module: by convention the last linear layer is the head (adapters' own layers don't count).
        wrappers = _adapter_layer_names(model)
        linears = [
            name
            for name, module in model.named_modules()
            if isinstance(getattr(module, "base_layer", module), nn.Linear) and not _inside(name, wrappers)
        ]
        if linears:
            heads.add(linears[-1])
    return heads


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    *,
    supported: tuple[type[nn.Module], ...],
    exclude_modules: TargetSpec = None,
    skip: Iterable[str] = (),
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    method: str = "method",
) -> list[tuple[str, nn.Module]]:
    """Resolve ``target_modules`` to ``(name, module)`` pairs, raising clear errors.

    Args:
        model: The model to search.
        target_modules: Names, a regex, or ``"all-linear"``.
        supported: Module types the method can adapt; a match of another type is an error.
        exclude_modules: Same syntax as ``target_modules``; matches are dropped.
        skip: Names never to target (e.g. modules already wrapped for ``modules_to_save``).
        linear_types: What counts as "linear" for ``"all-linear"``.
        method: Method name used in error messages.

    Raises:
        ValueError: nothing matches (close candidates are named).
        TypeError: a match has an unsupported type (the supported types are named).
    """
    if target_modules is None:
        raise ValueError(f"{method}: target_modules is required, e.g. ['q_proj', 'v_proj'] or 'all-linear'.")
    skip = list(skip)
    # Never descend into an adapter wrapper (its base layer, or another adapter's lora_A/lora_B): a second
    # adapter on the same module extends the wrapper itself.
    wrappers = _adapter_layer_names(model)
    if target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        candidates = [
            (name, module)
            for name, module in model.named_modules()
            if name not in heads
            and (
                isinstance(module, linear_types)
                or (
                    isinstance(module, supported)
                    and isinstance(getattr(module, "base_layer", None), linear_types)
                )
            )
        ]
    else:
        candidates = [
            (name, module)
            for name, module in model.named_modules()
            if name and name_matches(name, target_modules)
        ]
    candidates = [
        (name, module)
        for name, module in candidates
        if not _inside(name, wrappers)
        # `skip` uses the list syntax (suffix match), and covers the skipped modules' children too.
        and not (skip and any(name_matches(n, skip) for n in (name, *_ancestors(name))))
        and not (exclude_modules is not None and name_matches(name, exclude_modules))
    ]
    if not candidates:
        raise ValueError(_nothing_matched(model, target_modules, supported, method))
    unsupported = [(n, type(m).__name__) for n, m in candidates if not isinstance(m, supported)]
    if unsupported:
        shown = ", ".join(f"{n} ({t})" for n, t in unsupported[:5])
        kinds = ", ".join(sorted({t.__module__.split(".")[0] + "." + t.__name__ for t in supported}))
        raise TypeError(
            f"{method}: target_modules={target_modules!r} selects modules of an unsupported type: {shown}. "
            f"Supported layer types: {kinds}. Target their linear/conv children instead, or use exclude_modules."
        )
    return candidates


def _adapter_layer_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _inside(name: str, wrappers: set[str]) -> bool:
    return any(ancestor in wrappers for ancestor in _ancestors(name))


def _nothing_matched(
    model: nn.Module, target_modules: TargetSpec, supported: tuple[type[nn.Module], ...], method: str
) -> str:
    supported_names = [
        name for name, module in model.named_modules() if name and isinstance(module, supported)
    ]
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    close: list[str] = []
    pool = sorted({n.rsplit(".", 1)[-1] for n in supported_names}) + supported_names
    for entry in wanted:
        close += [c for c in difflib.get_close_matches(str(entry), pool, n=3, cutoff=0.5) if c not in close]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    examples = ", ".join(supported_names[:6]) or "none"
    return (
        f"{method}: target_modules={target_modules!r} matched no module.{hint} "
        f"Adaptable modules include: {examples}."
    )


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new_module`` (the old object is not copied)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)
