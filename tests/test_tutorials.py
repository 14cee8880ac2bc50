"""The tutorials: every notebook runs top to bottom (quick mode) and matches its Python source.

Each notebook is executed by nbclient in a fresh kernel of *this* interpreter (a kernelspec named
``python3`` written to a temporary JUPYTER_PATH entry, which Jupyter searches first), with
``NPMASK_TUTORIAL_QUICK=1`` so the data and epochs shrink. Any exception in a cell, including a
failed ``assert`` of the notebook's own checks, fails the test. One test per notebook, so
``pytest -n 2`` runs two kernels side by side.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def _load_builder():
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_builder()
SOURCES = build.sources()
NAMES = [p.stem for p in SOURCES]


def test_there_are_five_tutorials():
    assert len(NAMES) == 5, NAMES
    for src in SOURCES:
        assert build.notebook_path(src).is_file(), f"{src.stem}.ipynb not built: run tutorials/_build.py --execute"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_source_and_was_executed(name):
    """The committed cells are exactly the source's, and the committed outputs are error-free."""
    src = SOURCES[NAMES.index(name)]
    committed = nbformat.read(str(build.notebook_path(src)), as_version=4)
    expected = build.build(src)
    got = [(c.cell_type, c.source) for c in committed.cells]
    want = [(c.cell_type, c.source) for c in expected.cells]
    assert got == want, f"{name}.ipynb differs from src/{name}.py: run tutorials/_build.py --execute {name[:2]}"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}.ipynb was committed unexecuted"
    for c in code:
        for out in c.get("outputs", []):
            assert out.output_type != "error", f"{name}.ipynb has an error output:\n{out.get('evalue')}"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A ``python3`` kernelspec that runs this interpreter, first on JUPYTER_PATH."""
    jpath = tmp_path_factory.mktemp("jupyter")
    kdir = jpath / "kernels" / build.KERNEL
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (npmask tests)", "language": "python"}))
    return {
        "JUPYTER_PATH": os.pathsep.join([str(jpath)] + [p for p in [os.environ.get("JUPYTER_PATH")] if p]),
        # npmask from this checkout even when it is not installed; installed copies are the same code
        "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        # one BLAS thread per kernel: pytest -n 2 runs two kernels on two cores
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        build.QUICK_ENV: "1",
    }


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_quick_mode(name, kernel_env, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    for k, v in kernel_env.items():
        monkeypatch.setenv(k, v)
    spec = KernelSpecManager().get_kernel_spec(build.KERNEL)
    assert spec.argv[0] == sys.executable, f"kernel {build.KERNEL!r} would run {spec.argv[0]}"
    nb = build.build(SOURCES[NAMES.index(name)])
    # the kernel runs in tmp_path, so no file the notebook writes lands in the checkout (notebooks 3
    # and 4 keep theirs in a TemporaryDirectory that goes when the kernel exits)
    nbclient.NotebookClient(nb, timeout=300, kernel_name=build.KERNEL,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
