"""The package's structure as code: stages that import only downwards, no cycle, no private
names across modules, and no lifecycle module that names a concrete constraint class.

Read from the source with ``ast`` (nothing is imported), so a violation names the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import maskparam as mp

PACKAGE = Path(mp.__file__).resolve().parent

# The stages, bottom up: a module may import from its own stage and the ones before it.
STAGES = [
    "errors", "core", "masks", "constraints", "constrain", "prune", "checkpoint", "export",
    "integrations",
]  # fmt: skip
# The package's front (its __init__, the demo, a compatibility shim) stands above every stage.
FRONT = {
    "maskparam",
    "maskparam.__main__",
    "maskparam._demo",
    "maskparam._load_guard",
    "maskparam._sparse",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(encoding="utf-8"))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _imports(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import of maskparam (those for type
    checking only too: a stage's types come from below it as well)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskparam"):
            names = [alias.name for alias in node.names]
            for name in names:  # `from maskparam.masks import generators` imports a module
                found.append((node.lineno, node.module, [name]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("maskparam"):
                    found.append((node.lineno, alias.name, []))
    return found


def _stage(module: str) -> int | None:
    if module in FRONT:
        return None
    part = module.split(".")[1]
    return STAGES.index(part)


MODULES = _modules()


def _resolved(target: str, names: list[str]) -> str:
    """``from maskparam.masks import generators`` imports the module ``maskparam.masks.generators``."""
    if names and f"{target}.{names[0]}" in MODULES:
        return f"{target}.{names[0]}"
    return target


def test_every_module_belongs_to_a_stage():
    unknown = [m for m in MODULES if m not in FRONT and m.split(".")[1] not in STAGES]
    assert unknown == []


def test_stages_import_only_downwards():
    upward = []
    for module, tree in MODULES.items():
        here = _stage(module)
        for line, target, names in _imports(tree):
            there = _stage(_resolved(target, names))
            if here is not None and (there is None or there > here):
                upward.append(f"{module}:{line} imports {target}")
    assert upward == []


def test_the_import_graph_has_no_cycle():
    graph = {
        module: {_resolved(t, n) for _, t, n in _imports(tree) if _resolved(t, n) in MODULES}
        for module, tree in MODULES.items()
    }
    # A stage's __init__ runs before its submodules: importing a submodule imports it too. (The
    # root's __init__ imports every stage and is what starts the import of each: left out.)
    for module in list(graph):
        for target in list(graph[module]):
            owner = target.rpartition(".")[0]
            inside = owner == module or module.startswith(owner + ".")
            if owner in graph and owner != "maskparam" and not inside:
                graph[module].add(owner)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend([*path[path.index(nxt) :], nxt])
                return True
            if nxt not in state and visit(nxt, [*path, nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if start not in state and visit(start, [start]):
            break
    assert cycle == []


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{module}:{line} imports {target}.{name}"
        for module, tree in MODULES.items()
        for line, target, names in _imports(tree)
        for name in names
        if name.startswith("_") and target != module
    ]
    assert private == []


def _concrete_constraints() -> set[str]:
    """The classes defined in constraints/ that are constraints (or their coordinates)."""
    names = set()
    for module, tree in MODULES.items():
        if not module.startswith("maskparam.constraints."):
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(base) in ("Constraint", "FixedTensors") for base in node.bases
            ):
                names.add(node.name)
    return names


def test_constraint_classes_follow_one_naming_rule():
    # <Spec>Constraint, with what it stores where one spec builds two; the compact layout of
    # every selection is CompactConstraint. Helpers that are not constraints keep plain names.
    constraints = {name for name in _concrete_constraints() if name not in ("SubspaceCoordinates",)}
    constraints -= {n for n in constraints if n.endswith("Projection")}
    assert len(constraints) >= 7
    assert [name for name in constraints if not name.endswith("Constraint")] == []


@pytest.mark.parametrize(
    "module", [m for m in MODULES if not m.startswith("maskparam.constraints")]
)
def test_lifecycle_modules_name_no_concrete_constraint(module):
    source = (PACKAGE.parent / (module.replace(".", "/"))).with_suffix(".py")
    if not source.exists():
        source = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    text = source.read_text(encoding="utf-8")
    named = sorted(name for name in _concrete_constraints() if name in text)
    assert named == []
