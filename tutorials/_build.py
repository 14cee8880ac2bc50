r"""Build the tutorial notebooks from their reviewable Python sources, and optionally run them.

Every notebook ``tutorials/NN_name.ipynb`` is generated from ``tutorials/src/NN_name.py``, a plain
Python file in the "percent" cell format::

    # %% [markdown]
    r'''
    # A title, prose and $\LaTeX$
    '''

    # %%
    import numpy as np          # a code cell

A markdown cell is the text inside the triple-quoted string that follows its marker, so each
source file is also a runnable script (``python tutorials/src/01_backprop_by_hand.py``).

Usage (from the repository root)::

    python tutorials/_build.py             # regenerate every .ipynb (no outputs)
    python tutorials/_build.py --execute   # regenerate and run them in full mode, keeping outputs
    python tutorials/_build.py --execute 03 04   # only the notebooks whose names start so

The committed notebooks are the ``--execute`` ones: run it after any edit of a source so the
outputs shown on GitHub come from the code shown beside them. ``tests/test_tutorials.py`` checks
that every notebook's cells equal its source and executes each one in quick mode
(``NPMASK_TUTORIAL_QUICK=1``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
QUICK_ENV = "NPMASK_TUTORIAL_QUICK"
KERNEL = "python3"
CELL_TIMEOUT = 600

_MARKER = re.compile(r"^# %%( \[markdown\])?\s*$")


def sources() -> list[Path]:
    """The tutorial sources, in order."""
    return sorted(p for p in SRC.glob("[0-9][0-9]_*.py"))


def notebook_path(source: Path) -> Path:
    return HERE / (source.stem + ".ipynb")


def parse_cells(text: str) -> list[tuple[str, str]]:
    """``[(kind, source), ...]`` with kind "markdown" or "code", from percent-format ``text``."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = _MARKER.match(line)
        if m:
            cells.append(("markdown" if m.group(1) else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"text before the first cell marker: {line!r}")
    out = []
    for kind, lines in cells:
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            m = re.fullmatch(r'r?"""\n?(.*?)\n?"""', body.strip(), flags=re.S)
            if not m:
                raise ValueError(f"a markdown cell must be one triple-quoted string, got:\n{body[:200]}")
            body = m.group(1).strip("\n")
        out.append((kind, body))
    return out


def build(source: Path):
    """The notebook (an nbformat NotebookNode without outputs) for one source file."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    cells = []
    for kind, body in parse_cells(source.read_text(encoding="utf-8")):
        cells.append(new_markdown_cell(body) if kind == "markdown" else new_code_cell(body))
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb


def strip_ids(nb) -> None:
    """Deterministic cell ids (nbformat draws random ones): the diff of a rebuild stays small."""
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"


def execute(nb, cwd: Path, quick: bool, timeout: int = CELL_TIMEOUT):
    """Run ``nb`` in place with nbclient in ``cwd``; quick mode sets NPMASK_TUTORIAL_QUICK=1."""
    from nbclient import NotebookClient

    env = {
        QUICK_ENV: "1" if quick else "0",
        # npmask from this checkout even when it is not installed
        "PYTHONPATH": os.pathsep.join(p for p in [str(HERE.parent), os.environ.get("PYTHONPATH")] if p),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the kernel process
    try:
        NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def main(argv=None) -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="name prefixes of the notebooks to build (default: all)")
    ap.add_argument("--execute", action="store_true", help="run each notebook (full mode) and keep outputs")
    ap.add_argument("--quick", action="store_true", help="with --execute: quick mode (for trying out)")
    args = ap.parse_args(argv)
    for src in sources():
        if args.only and not any(src.stem.startswith(p) for p in args.only):
            continue
        nb = build(src)
        strip_ids(nb)
        if args.execute:
            t0 = time.perf_counter()
            execute(nb, HERE, quick=args.quick)
            print(f"{src.stem}: executed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            for cell in nb.cells:  # execution times and other volatile metadata make noisy diffs
                cell.metadata.pop("execution", None)
        out = notebook_path(src)
        tmp = out.with_suffix(".ipynb.tmp")
        nbformat.write(nb, str(tmp))
        os.replace(tmp, out)
        print(f"wrote {out.relative_to(HERE.parent)} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
