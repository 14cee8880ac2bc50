"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU, behind one small module.

Code never picks its array module from an import-time global. It asks the arrays it was given::

    xp = get_array_module(x)      # numpy or cupy, whichever x lives in
    y = xp.maximum(x, 0)

so NumPy and CuPy arrays can be used in one process. New arrays are created on a backend chosen by
name (``"numpy"`` or ``"cupy"``) with :func:`get_backend`. CuPy is imported lazily, on first use,
and a missing package or a missing GPU give one clear :class:`BackendError`.
"""
from __future__ import annotations

import numpy as np

BACKENDS = ("numpy", "cupy")

_cupy = None  # the cupy module once it has been imported and checked


class BackendError(RuntimeError):
    """Raised when the requested array backend cannot be used."""


def _import_cupy():
    """Return the cupy module if it is installed (without checking for a device), else None."""
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: PLC0415  (imported lazily on purpose)
        except Exception:  # ImportError, or a broken CUDA library raising at import
            return None
        _cupy = cupy
    return _cupy


def cupy_available() -> bool:
    """True when cupy is installed *and* at least one CUDA device can be used."""
    try:
        get_backend("cupy")
    except BackendError:
        return False
    return True


def get_backend(name: str = "numpy"):
    """Return the array module called ``name`` ("numpy" or "cupy").

    Raises BackendError naming the problem: an unknown name, cupy not installed, or cupy installed
    but no usable CUDA device (no GPU, no driver, or a CUDA version mismatch).
    """
    if name == "numpy":
        return np
    if name != "cupy":
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    cp = _import_cupy()
    if cp is None:
        raise BackendError(
            "backend 'cupy' requested but CuPy is not installed: install the extra that matches "
            "your CUDA toolkit, e.g. `pip install 'npmask[cuda12]'` (cupy-cuda12x) or "
            "`pip install 'npmask[cuda13]'` (cupy-cuda13x)")
    try:
        count = cp.cuda.runtime.getDeviceCount()
        if count < 1:
            raise RuntimeError("no CUDA device found")
        cp.zeros(1)  # the first real allocation: fails on a driver/toolkit mismatch
    except Exception as err:
        raise BackendError(
            "backend 'cupy' requested and CuPy is installed, but no usable CUDA device was found "
            f"({type(err).__name__}: {err}). Check that this machine has an NVIDIA GPU, that "
            "`nvidia-smi` lists it, and that the cupy-cuda package matches the driver's CUDA "
            "version.") from None
    return cp


def get_array_module(*arrays):
    """Return numpy or cupy: cupy if any of ``arrays`` is a cupy array, else numpy.

    Never imports cupy: if cupy was not imported yet, no argument can be a cupy array.
    """
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def backend_name(x) -> str:
    """"numpy" or "cupy", the backend that holds array ``x``."""
    return "cupy" if get_array_module(x) is not np else "numpy"


def to_numpy(x):
    """Return ``x`` as a NumPy array (copies from the GPU when ``x`` is a cupy array)."""
    if get_array_module(x) is not np:
        return x.get()
    return np.asarray(x)


def to_device(x, backend: str):
    """Return ``x`` as an array of ``backend`` ("numpy" or "cupy"); no copy when it already is."""
    xp = get_backend(backend)
    if xp is np:
        return to_numpy(x)
    return xp.asarray(x)


def seed(value: int) -> None:
    """Seed the global generators of NumPy and, when it is usable, CuPy.

    npmask itself draws from explicit ``numpy.random.Generator`` objects (see :func:`rng`); this
    helper is for user code that relies on the global generators.
    """
    np.random.seed(value)
    if _import_cupy() is not None and cupy_available():
        _cupy.random.seed(value)


def rng(seed_value) -> np.random.Generator:
    """A NumPy Generator from an int seed (or pass a Generator through)."""
    if isinstance(seed_value, np.random.Generator):
        return seed_value
    return np.random.default_rng(seed_value)
