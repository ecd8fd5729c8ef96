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
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
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


def test_every_import_of_the_package_names_a_module_that_exists():
    """An import inside a function runs only when that function does: one that names no module (a relative
    import left pointing at a module's old place) would pass every import-time check and fail a user."""
    wrong = []
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sana_cli":
                module = node.module
            else:
                continue
            if module not in MODULES:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {module}, which does not exist")
    assert not wrong, "\n".join(wrong)
