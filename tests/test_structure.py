"""The package's structure: no import cycle, layers import downward only, short files.

Every import is collected with ``ast`` from every module of npmask, at module level and inside
functions alike (an import inside a function still ties the two modules together; it only hides
the tie until the function runs).
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "npmask"
MAX_LINES = 420

# Bottom to top. A module may import modules of its own layer or of a layer below, never above;
# the commands (the top layer) import none of one another.
LAYERS = [
    {"npmask", "npmask.backend", "npmask.io"},                  # the version, arrays, atomic files
    {"npmask.config", "npmask.nn"},                             # settings, layers with backward
    {"npmask.models", "npmask.masking", "npmask.data", "npmask.optim", "npmask.gradcheck",
     "npmask.inference"},                                        # image files -> normalised arrays
    {"npmask.multidomain", "npmask.storage", "npmask.metrics", "npmask.pretrained",
     "npmask.model_folder"},
    {"npmask.training"},                                        # the machinery of the commands
    {"npmask.train", "npmask.pretrain", "npmask.compare",       # the commands
     "npmask.convert", "npmask.export", "npmask.predict"},
]
COMMANDS = LAYERS[-1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path):
    """(imported npmask module, line, inside a function?) for every import in the module."""
    return _imports_in(name, path.name == "__init__.py", path.read_text(encoding="utf-8"))


def _imports_in(name: str, is_package: bool, source: str):
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module
                for a in child.names:  # "from pkg import submodule" imports the submodule
                    sub = f"{module}.{a.name}"
                    found.append((sub if sub in MODULES else module, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return [(m, line, inside) for m, line, inside in found
            if m == "npmask" or m.startswith("npmask.")]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    best, found = -1, None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module} has no place in LAYERS (tests/test_structure.py): add it"
    return found


def _cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    edges = {m: sorted({t for t, _, _ in imports if t in graph and t != m})
             for m, imports in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_collector_sees_imports_inside_functions():
    assert len(MODULES) > 40 and "npmask.masking.cuda" in MODULES
    source = ("import numpy as np\nfrom ..backend import to_numpy\nfrom . import transform\n\n\n"
              "def f():\n    import matplotlib\n    from ..training.cli import parser\n")
    assert _imports_in("npmask.masking.cuda", False, source) == [
        ("npmask.backend", 2, False), ("npmask.masking.transform", 3, False),
        ("npmask.training.cli", 8, True)]
    fake = {"npmask.a": [("npmask.b", 1, False)], "npmask.b": [("npmask.a", 9, True)]}
    assert _cycle(fake) == ["npmask.a", "npmask.b", "npmask.a"]


def test_no_import_cycle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    own = _layer(module)
    for target, line, inside in GRAPH[module]:
        where = f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}"
        assert _layer(target) <= own, (f"{where} imports {target}, a higher layer "
                                       f"({'inside a function' if inside else 'at module level'})")
        if module in COMMANDS:
            assert _layer(target) < own, (f"{where}: the command {module} imports the command "
                                          f"{target}; move what they share into npmask.training")


def test_the_named_rules_hold():
    """The rules the layers stand for, spelled out."""
    low = ("npmask.pretrained", "npmask.nn", "npmask.masking", "npmask.models", "npmask.data",
           "npmask.io", "npmask.backend", "npmask.config")
    high = ("npmask.training", "npmask.train", "npmask.compare", "npmask.pretrain")
    for module, imports in GRAPH.items():
        targets = {t for t, _, _ in imports}
        if module.startswith(low):
            assert not {t for t in targets if t.startswith(high)}, module
    assert not {t for t, _, _ in GRAPH["npmask.compare"] if t == "npmask.train"}


def _function_imports_without_reason(path: Path) -> list[int]:
    """Lines of imports inside functions with no comment on the line or on the line above."""
    lines = path.read_text(encoding="utf-8").splitlines()
    bare = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    here, above = lines[inner.lineno - 1], lines[inner.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        bare.append(inner.lineno)
    return sorted(set(bare))


def _param(path: Path):
    return pytest.param(path, id=str(path.relative_to(PACKAGE.parent)))


@pytest.mark.parametrize("path", [_param(p) for p in sorted(PACKAGE.rglob("*.py"))])
def test_imports_inside_functions_say_why(path):
    """An import inside a function is for an optional dependency or a heavy one most paths skip,
    and a comment says which; everything else is imported at the top of the module."""
    assert _function_imports_without_reason(path) == []


@pytest.mark.parametrize("path", [_param(p) for p in sorted(PACKAGE.rglob("*.py"))])
def test_no_file_is_too_long(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {n} lines (at most {MAX_LINES})"
