"""The package's shape: each layer imports only the layers above it, and no module imports another in a
cycle, counting imports inside functions and type-checking-only imports. Read from the source with ast, so
an import hidden in a function body counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sana_cli"

# Lowest first: a module may import its own layer and those before it, never one after it.
LAYERS = ("base", "models", "inputs", "planning", "storage", "reporting", "engine", "server", "api", "cli")
BASE = {"errors", "version", "cache", "terminal", "safeio"}
TORCH_FREE = ("base", "models", "inputs", "planning", "reporting")  # no torch at module level


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _from_module(package: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative ones resolved against the importing package."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of this package's modules."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(package, node)
            subs = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [module, *subs]
        else:
            continue
        for target in targets:
            if target in MODULES and target != name:
                found.append((target, node.lineno, id(node) in top))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "base"  # the package itself: its lazy attributes reach the API, checked below
    if parts[1] in BASE:
        return "base"
    if parts[1] in ("__main__",):
        return "cli"
    return parts[1]


def test_every_module_sits_in_a_known_layer():
    assert {layer_of(name) for name in MODULES} <= set(LAYERS)


def test_no_module_imports_a_later_layer():
    wrong = []
    for name, imports in GRAPH.items():
        if name == "sana_cli":
            continue  # `sana_cli.generate` and friends are the API, imported lazily on attribute access
        for target, line, _ in imports:
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(name)):
                wrong.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} ({layer_of(name)}) imports "
                             f"{target} ({layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, cycles


def test_the_torch_free_layers_never_import_torch_at_module_level():
    wrong = []
    for name, path in MODULES.items():
        if layer_of(name) not in TORCH_FREE:
            continue
        for node in ast.parse(path.read_text()).body:
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong += [f"{name}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in ("torch", "diffusers", "transformers", "accelerate", "safetensors")]
    assert not wrong, wrong


def test_the_checks_see_an_import_inside_a_function(tmp_path):
    """The checker itself: an engine import planted inside a planning function is found, and is a later layer."""
    planted = tmp_path / "planted.py"
    planted.write_text("def later():\n    from ..engine import runner\n    return runner\n")
    imports = _imports("sana_cli.planning.planted", planted)
    assert imports == [("sana_cli.engine.runner", 2, False)]
    assert LAYERS.index(layer_of(imports[0][0])) > LAYERS.index(layer_of("sana_cli.planning.planted"))


def _unresolved(name: str, path: Path) -> list[str]:
    """Imports of this package (relative, or absolute from sana_cli) that name no module or package of it,
    nor a name a module of it defines: they fail only when the line runs, which for an import inside a
    function can be the first time a user takes that path."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    wrong = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _from_module(package, node)
            if not module.startswith("sana_cli"):
                continue
            if module not in MODULES:
                wrong.append(f"{name}:{node.lineno} imports {module}")
                continue
            defined = _defined(MODULES[module])
            wrong += [f"{name}:{node.lineno} imports {alias.name} from {module}" for alias in node.names
                      if f"{module}.{alias.name}" not in MODULES and alias.name not in defined]
        elif isinstance(node, ast.Import):
            wrong += [f"{name}:{node.lineno} imports {alias.name}" for alias in node.names
                      if alias.name.startswith("sana_cli") and alias.name not in MODULES]
    return wrong


def _defined(path: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def test_every_import_of_the_package_names_something_that_exists():
    wrong = [problem for name, path in MODULES.items() for problem in _unresolved(name, path)]
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_an_import_of_a_module_that_does_not_exist(tmp_path):
    """The checker itself: the import a package move leaves behind inside a function is found."""
    planted = tmp_path / "planted.py"
    planted.write_text("def later():\n    from .inputs import prepare\n    from ..inputs.images import nothing\n")
    assert _unresolved("sana_cli.engine.planted", planted) == [
        "sana_cli.engine.planted:2 imports sana_cli.engine.inputs",
        "sana_cli.engine.planted:3 imports nothing from sana_cli.inputs.images"]
