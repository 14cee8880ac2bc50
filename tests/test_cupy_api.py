"""Every CuPy function npmask reaches through its array-module variable exists in the installed CuPy.

Code in npmask gets its array module from its inputs (``xp = get_array_module(x)``) and then calls
``xp.<name>``; on a machine without a GPU the CuPy path never runs, so a NumPy-only function (or one
spelled differently in CuPy) would only fail on the first GPU run. This test reads every .py file
under npmask/ with the ``ast`` module (so new code is covered automatically), collects each
``alias.<name>`` and ``alias.<mod>.<name>`` chain, where an alias is ``xp`` or any name bound to the
dispatched module (``= get_array_module(...)``, ``= get_backend(...)``, ``import cupy [as cp]``, or
copied from another alias), and checks that the chain resolves in ``cupy`` by ``getattr``.
"""
import ast
import importlib.util
import pathlib

import pytest

import npmask

PACKAGE_DIR = pathlib.Path(npmask.__file__).parent
ALWAYS_ALIASES = {"xp", "cp"}   # cp: the CuPy module passed around by the graph step
DISPATCH_CALLS = {"get_array_module", "get_backend", "_import_cupy"}


def _call_name(node):
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name):
            return f.id
        if isinstance(f, ast.Attribute):
            return f.attr
    return None


def _aliases(tree) -> set:
    """Names in this module bound to the dispatched array module (fixed point over assignments)."""
    aliases = set(ALWAYS_ALIASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "cupy":
                    aliases.add(a.asname or "cupy")
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            is_module = _call_name(value) in DISPATCH_CALLS or (
                isinstance(value, ast.Name) and value.id in aliases)
            if not is_module:
                continue
            for t in targets:
                if isinstance(t, ast.Name) and t.id not in aliases:
                    aliases.add(t.id)
                    changed = True
    return aliases


def _chain(node):
    """``xp.linalg.norm`` -> ("xp", "linalg", "norm"); None when the root is not a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return (node.id, *reversed(parts))


def collect_names(source: str) -> set:
    """Dotted names (without the alias) reached through the array-module aliases of ``source``."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _chain(node)
            if chain and chain[0] in aliases:
                names.add(".".join(chain[1:]))
    return names


def collect_package_names() -> dict:
    """``{dotted_name: [files using it]}`` over every .py file of the npmask package."""
    used = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for name in collect_names(path.read_text(encoding="utf-8")):
            used.setdefault(name, []).append(str(path.relative_to(PACKAGE_DIR.parent)))
    return used


def missing_names(module, names) -> list:
    """The dotted names that do not resolve on ``module`` by a chain of getattr, sorted."""
    missing = []
    for name in sorted(names):
        obj = module
        for part in name.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                missing.append(name)
                break
    return missing


def test_missing_names_reports_unknown_chains():
    import numpy
    assert missing_names(numpy, {"zeros", "linalg.norm", "linalg.nope", "not_a_function"}) == [
        "linalg.nope", "not_a_function"]


def test_collector_finds_aliases_and_chains():
    src = (
        "import cupy as cp\n"
        "def f(x):\n"
        "    xp = get_array_module(x)\n"
        "    a = xp.zeros(3)\n"
        "    b = xp.linalg.norm(a)\n"
        "    return a.sum() + b\n"
        "def g(name):\n"
        "    mod = backend.get_backend(name)\n"
        "    other = mod\n"
        "    return other.cuda.runtime.getDeviceCount() + cp.asarray(1) + np.exp(1)\n"
    )
    names = collect_names(src)
    assert {"zeros", "linalg", "linalg.norm", "cuda", "cuda.runtime", "cuda.runtime.getDeviceCount",
            "asarray"} <= names
    assert "exp" not in names and "sum" not in names  # np.<...> and array methods are not dispatched


def test_every_xp_name_exists_in_cupy():
    used = collect_package_names()
    assert used, "no xp.<name> found under npmask/: the collector is broken"
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not importable here; install cupy-cuda12x (it imports without a GPU)")
    try:
        import cupy
    except Exception as err:  # installed but broken at import
        pytest.skip(f"cupy is installed but cannot be imported: {type(err).__name__}: {err}")
    missing = [f"cupy.{name}  (used in {', '.join(used[name])})" for name in missing_names(cupy, used)]
    checked = "\n  ".join(sorted(used))
    assert not missing, ("names used through xp that the installed cupy lacks:\n  " + "\n  ".join(missing)
                         + f"\nall {len(used)} names checked:\n  {checked}")
