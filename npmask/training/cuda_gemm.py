"""Matrix products by cuBLAS called directly, so that a CUDA graph can capture them.

CuPy's own cuBLAS wrappers refuse to run while a stream is being captured: before every call
they set the handle's stream, and ``cupy_backends``' ``cublas.setStream`` raises
``NotImplementedError('calling cuBLAS API during stream capture is currently unsupported')``.
Every GEMM of a training step goes through them (``a @ b`` in the convolutions and the linear
layer). cuBLAS itself can be captured (its CUDA Graphs section: a workspace set by the user, so
that nothing is allocated during the capture, and coefficients in host memory, which the capture
copies).

:func:`gemms_capturable` replaces ``cupy.ndarray.__matmul__`` inside a ``with`` block by
:func:`matmul`: a 2-D float32/float64 product by ``cublasGemmEx`` (loaded with ctypes) on a handle
and a workspace of its own, on the current stream, with the arguments CuPy's own product passes
(the compute type CuPy's ``tensordot_core_v11`` picks: 32F/64F, or 32F_FAST_TF32 under
``CUPY_TF32=1``, or the pedantic ones, see :func:`cublas_compute_type`; the default algorithm with
tensor ops from compute capability 8.0).
Anything else (other dtypes, batched products) goes to CuPy's product. The graph step uses it
while capturing and for the steps it runs uncaptured, so that both run the same GEMMs.

:func:`gemm_arguments` (C = A @ B of row-major views, as the column-major call
C^T = B^T A^T) is plain arithmetic on shapes and strides, tested on the CPU against a NumPy model
of the column-major call.
"""
from __future__ import annotations

import contextlib
import ctypes

from .errors import GraphStepError

WORKSPACE_BYTES = 32 << 20          # cuBLAS's advice for Hopper; ample for the older GPUs
OP_N, OP_T = 0, 1                   # cublasOperation_t


# cublasComputeType_t (cupy_backends/cuda/libs/cublas.pxd) and CuPy's own compute-type settings
# (cupy/_core/_routines_linalg.pyx: COMPUTE_TYPE_PEDANTIC = 2, COMPUTE_TYPE_TF32 = 7)
COMPUTE_32F, COMPUTE_32F_PEDANTIC, COMPUTE_32F_FAST_TF32 = 68, 69, 77
COMPUTE_64F, COMPUTE_64F_PEDANTIC = 70, 71
_CUPY_PEDANTIC, _CUPY_TF32 = 2, 7


def cublas_compute_type(dtype_char: str, cupy_setting: int) -> int:
    """The cublasComputeType_t that CuPy's ``a @ b`` passes to cublasGemmEx for a real float32
    ("f") or float64 ("d") product, given CuPy's compute-type setting for the dtype
    (``_routines_linalg.get_compute_type``: 1 by default, 7 with ``CUPY_TF32=1`` for float32),
    as in CuPy 14's ``tensordot_core_v11``."""
    if dtype_char == "f":
        return {_CUPY_PEDANTIC: COMPUTE_32F_PEDANTIC,
                _CUPY_TF32: COMPUTE_32F_FAST_TF32}.get(cupy_setting, COMPUTE_32F)
    return COMPUTE_64F_PEDANTIC if cupy_setting == _CUPY_PEDANTIC else COMPUTE_64F


def _cupy_compute_setting(dtype) -> int:
    try:
        from cupy._core import _routines_linalg  # noqa: PLC0415  (CuPy's own choice, no device needed)
        return int(_routines_linalg.get_compute_type(dtype))
    except Exception:        # another CuPy: its default
        return 1


def _layout(shape, strides, itemsize: int):
    """(operation, leading dimension) that passes the transpose of the row-major view (r, c) to a
    column-major routine, or None when its strides do not allow one (it must be copied first)."""
    r, c = shape
    sr, sc = strides
    if c == 1:
        sc = itemsize                   # a stride along an axis of length 1 is never used
    if r == 1:
        sr = c * itemsize
    if sc == itemsize and sr > 0 and sr % itemsize == 0 and sr // itemsize >= max(1, c):
        return OP_N, sr // itemsize     # rows contiguous: column-major it is X^T (c x r) already
    if sr == itemsize and sc > 0 and sc % itemsize == 0 and sc // itemsize >= max(1, r):
        return OP_T, sc // itemsize     # columns contiguous (a transposed view): X (r x c)
    return None


def gemm_arguments(a_shape, a_strides, b_shape, b_strides, itemsize: int):
    """The column-major call for row-major C (m, n) = A (m, k) @ B (k, n), C new and C-contiguous:
    ``(transa, transb, m', n', k', first, lda, second, ldb, ldc)`` with first/second naming the
    operands ("b", "a"); None when A or B must be made contiguous first."""
    (m, k), (_, n) = a_shape, b_shape
    la, lb = _layout(a_shape, a_strides, itemsize), _layout(b_shape, b_strides, itemsize)
    if la is None or lb is None:
        return None
    return lb[0], la[0], n, m, k, "b", lb[1], "a", la[1], max(1, n)


class _Cublas:
    """A cuBLAS handle of our own with its workspace, and cublasGemmEx through ctypes."""

    def __init__(self, cp):
        from cupy_backends.cuda.libs import cublas   # noqa: PLC0415  (loads libcublas: GPU only)
        self.cp, self.consts = cp, cublas
        self.lib = _load_cublas()
        self.lib.cublasGemmEx.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cublasSetWorkspace_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate_v2")
        self.workspace = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)
        major = int(cp.cuda.Device().compute_capability) // 10
        self.algo = cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP if major >= 8 else cublas.CUBLAS_GEMM_DEFAULT

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def matmul(self, a, b):
        cp = self.cp
        m, n = a.shape[0], b.shape[1]
        out = cp.empty((m, n), dtype=a.dtype)
        if a.shape[1] == 0 or out.size == 0:
            out.fill(0)
            return out
        args = gemm_arguments(a.shape, a.strides, b.shape, b.strides, a.itemsize)
        if args is None:
            a, b = cp.ascontiguousarray(a), cp.ascontiguousarray(b)
            args = gemm_arguments(a.shape, a.strides, b.shape, b.strides, a.itemsize)
        transa, transb, m_, n_, k_, first, lda, second, ldb, ldc = args
        ops = {"a": a, "b": b}
        compute = cublas_compute_type(a.dtype.char, _cupy_compute_setting(a.dtype))
        if a.dtype == cp.float32:        # cudaDataType_t CUDA_R_32F = 0, CUDA_R_64F = 1
            one, zero, dtype = ctypes.c_float(1), ctypes.c_float(0), 0
        else:
            one, zero, dtype = ctypes.c_double(1), ctypes.c_double(0), 1
        stream = cp.cuda.get_current_stream().ptr
        # setting the stream resets the workspace to cuBLAS's own: set ours after it, every call
        self._check(self.lib.cublasSetStream_v2(self.handle, stream), "cublasSetStream_v2")
        self._check(self.lib.cublasSetWorkspace_v2(self.handle, self.workspace.data.ptr,
                                                   self.workspace.nbytes), "cublasSetWorkspace_v2")
        self._check(self.lib.cublasGemmEx(
            self.handle, transa, transb, m_, n_, k_, ctypes.addressof(one),
            ops[first].data.ptr, dtype, lda, ops[second].data.ptr, dtype, ldb,
            ctypes.addressof(zero), out.data.ptr, dtype, ldc, compute, self.algo), "cublasGemmEx")
        return out


def _load_cublas():
    """libcublas as CuPy found it (cuda.pathfinder), else by its usual names."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib  # noqa: PLC0415  (CuPy's finder)
        path = load_nvidia_dynamic_lib("cublas").abs_path
        if path:
            return ctypes.CDLL(path)
    except Exception:        # not installed, or an older CuPy without it: the usual names
        pass
    for name in ("libcublas.so.12", "libcublas.so.13", "libcublas.so", "cublas64_12.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("libcublas was not found (needed to capture GEMMs in a CUDA graph)")


_state: dict = {}        # "cublas": the _Cublas of this process, made on first use


def matmul(a, b, fallback):
    """``a @ b`` for CuPy arrays: 2-D float32/float64 by :class:`_Cublas`, else ``fallback``."""
    if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype or a.dtype.char not in "fd" \
            or a.shape[1] != b.shape[0]:
        return fallback(a, b)
    if "cublas" not in _state:
        import cupy  # noqa: PLC0415  (only reached with CuPy arrays)
        try:
            _state["cublas"] = _Cublas(cupy)
        except (ImportError, OSError, RuntimeError) as err:   # no libcublas, or no handle
            raise GraphStepError(
                f"--cuda-graphs calls cuBLAS directly and could not set it up ({type(err).__name__}: "
                f"{err}); train without --cuda-graphs") from err
    return _state["cublas"].matmul(a, b)


@contextlib.contextmanager
def gemms_capturable(cp):
    """Inside the block, ``a @ b`` of CuPy arrays runs :func:`matmul` (see the module docstring)."""
    cls = cp.ndarray
    own = cls.__dict__.get("__matmul__")
    original = cls.__matmul__

    def patched(a, b):
        if not isinstance(b, cls):
            return original(a, b)
        return matmul(a, b, original)
    cls.__matmul__ = patched
    try:
        yield
    finally:
        if own is None:
            del cls.__matmul__
        else:
            cls.__matmul__ = own
