"""The package's folders are its layers and imports point one way (README, "Layout").

Parsed from the source, not imported: every ``import`` of a ``lightning_peft`` module, at any depth. The rules:

* a module imports only modules of its own layer or of layers below it: core < methods < formats < integrations <
  app < the package root (it re-exports the public API) < testing (it checks methods through that public API, as a
  user's test would);
* inside the package there are no import cycles;
* no function imports a ``lightning_peft`` module: every dependency is visible at the top of its file.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_peft"
LAYERS = ["core", "methods", "formats", "integrations", "app", "testing"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> float:
    """Index in LAYERS; the package root sits between the app and testing."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else LAYERS.index("app") + 0.5


def imported_modules(path: Path, *, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(module, line, inside_a_function)`` for every import of a package module in ``path``."""
    tree = ast.parse(path.read_text())
    local = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for sub in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use lightning_peft.... paths)"
            base = node.module or ""
            # `from lightning_peft.core import contract` imports the submodule `lightning_peft.core.contract`.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            if name == "lightning_peft" or name.startswith("lightning_peft."):
                found.append((name, node.lineno, id(node) in local))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
KNOWN = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imported_modules(p, known=KNOWN) for p in FILES}


def test_every_module_lives_in_a_layer() -> None:
    strays = [m for m in KNOWN if m != "lightning_peft" and m.split(".")[1] not in LAYERS]
    assert not strays, f"modules outside the layers {LAYERS}: {strays}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    upward = [f"line {line}: {target}" for target, line, _ in GRAPH[module] if layer(target) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports a layer above it: {upward}"


def test_no_function_imports_a_package_module() -> None:
    hidden = [f"{m} line {line}: {t}" for m, imports in GRAPH.items() for t, line, local in imports if local]
    assert not hidden, f"imports hidden inside functions: {hidden}"


def test_no_import_cycles() -> None:
    edges = {m: {t for t, _, _ in imports if t in KNOWN and t != m} for m, imports in GRAPH.items()}
    # A package's __init__ runs before its submodules; "lightning_peft.methods.lora" importing
    # "lightning_peft.methods.lora.lora" is the package exporting its member, not a cycle.
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_core_knows_no_method_and_integrations_no_single_method() -> None:
    core = {m: [t for t, _, _ in GRAPH[m]] for m in GRAPH if layer(m) == 0}
    assert all(not t.startswith("lightning_peft.methods") for ts in core.values() for t in ts)
    for module in (m for m in GRAPH if m.startswith("lightning_peft.integrations")):
        singles = [t for t, _, _ in GRAPH[module] if t.startswith("lightning_peft.methods.")]
        assert not singles, f"{module} imports single methods: {singles}"


def test_lazy_imports_are_declared_at_the_top() -> None:
    """What is imported on first use (the package root's API, the command's subcommands) is named by an import
    under TYPE_CHECKING at the top of the same file, so the rules above check it like any other import."""
    import lightning_peft
    from lightning_peft.app import commands

    assert set(lightning_peft._EXPORTS.values()) == {t for t, _, _ in GRAPH["lightning_peft"]}
    for name, module in lightning_peft._EXPORTS.items():
        assert getattr(lightning_peft, name) is getattr(importlib.import_module(module), name), name
    assert sorted(lightning_peft.__all__) == sorted(lightning_peft._EXPORTS)
    assert set(lightning_peft.__all__) <= set(dir(lightning_peft))
    with pytest.raises(AttributeError, match="no attribute 'injct'"):
        lightning_peft.injct  # noqa: B018
    subcommands = {*commands.SUBCOMMANDS.values(), commands.LIGHTNING_CLI}
    assert subcommands == {t for t, _, _ in GRAPH["lightning_peft.app.commands"]}


def test_the_command_overview_imports_no_framework() -> None:
    """``lightning-peft --help`` starts in a blink: neither torch, transformers nor Lightning is imported."""
    code = (
        "import sys; from lightning_peft.app import commands; commands.main(['--help']); "
        "print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: lightning-peft {fit,validate,test,predict,export,generate}")
    assert out.splitlines()[-1] == "[]"
