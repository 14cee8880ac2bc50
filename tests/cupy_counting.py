"""CuPy on NumPy, counted: npmask's CuPy path run on the CPU, every launch it would make recorded.

On a GPU a training step of npmask is bound by what it launches, not by arithmetic: each array
operation from Python is one CUDA kernel (or a cuBLAS call, a memset, a copy between host and
device), and each costs microseconds of Python and driver time before the GPU sees it. This module
makes that count visible without a GPU. :func:`counting_cupy` puts a stand-in for the ``cupy``
module in npmask's backend; :meth:`Model.to("cupy") <npmask.nn.Module.to>` then gives
:class:`DeviceArray` parameters, ``get_array_module`` answers the stand-in for them, and every
CuPy-only branch of npmask (the fused kernels, no CPU threads, the column layouts for CuPy) is taken
as on a GPU. The arithmetic is NumPy's; the fused kernels run their own C on the CPU
(tests/cuda_on_cpu.py), so the step's numbers are real and the branches that depend on them too.

What one operation on a :class:`DeviceArray` counts, following what CuPy 14 launches for it:

=============================================  =====================================================
``a + b``, ``xp.exp(a)``, any ufunc call        one ``kernel`` (none when the output is empty)
``a.sum(axis)``, ``a.mean()``, ``a.argmax()``   one ``reduction`` (CuPy's mean is one kernel)
``a @ b``, ``xp.dot``                           one ``gemm``, plus a ``copy`` per operand that is
                                                neither C- nor F-contiguous (CuPy copies those
                                                before it calls cuBLAS; C-contiguous for a
                                                product of more than two dimensions)
``a.copy()``, ``astype``, ``b[...] = a``,       one ``copy`` (a reshape, ravel or
a reshape that copies                           ascontiguousarray that is a view: nothing;
                                                ``b[s] += a`` writes b[s] in the addition: nothing)
``xp.concatenate`` of n arrays                  n ``copy`` (n <= 8), else a table of them copied
                                                to the device and one ``kernel``
``xp.zeros``, ``zeros_like``, ``fill(0)`` and   one ``memset``; ``xp.empty``: nothing
``a[...] = 0`` into contiguous memory
``xp.ones``, ``full``, ``a.fill(v)``,           one ``kernel``
``a[s] = v``, ``xp.arange``
``a[idx]``, ``a[idx] = v`` (index arrays)       one ``kernel``; with two or more index arrays also
                                                a ``memset`` and a ``kernel`` per array; a host
                                                index array one ``to_device``
views (slices, ``.T``, ``reshape``)             nothing
npmask's own ElementwiseKernel/ReductionKernel  one ``fused``, named by the kernel
``float(a)``, ``a.item()``, ``a.get()``,        one ``to_host``: a copy to the host, which waits for
``bool(a)``, boolean-mask indexing              the GPU (a synchronisation)
``xp.asarray(host array)``                      one ``to_device``
any other function of the array module          one ``kernel`` named by it (an estimate: einsum, say,
                                                may be a few)
=============================================  =====================================================

Nothing is counted for an empty array (CuPy launches nothing). A host NumPy array where CuPy takes
device arrays (operands, ``out=``, values assigned, any function but the ones that copy host data
to the device) raises TypeError, as CuPy does, so a host array leaking into the step is an error
here too. What a NumPy subclass cannot see: ``numpy.asarray(a)`` and ``host[...] = a`` of a
device array, which CuPy refuses. Each launch is recorded with the first npmask
function on the stack (``nn/conv_fast.py:forward``), so a count can be read by where it comes from.
The graph step (``--cuda-graphs``) is not modelled: it replays what the plain step launches.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import cuda_on_cpu
import numpy as np

import npmask
from npmask import backend

KINDS = ("kernel", "reduction", "gemm", "copy", "memset", "fused", "to_host", "to_device")
LAUNCHES = ("kernel", "reduction", "gemm", "copy", "memset", "fused")   # what the GPU runs
_NPMASK_DIR = str(Path(npmask.__file__).parent) + "/"
_BACKEND_FILE = str(Path(backend.__file__))

# The kernel factories of npmask (module, function): each builds its kernels through
# ``_import_cupy()`` once and caches them; under the stand-in they are built again, with its classes.
FACTORIES = (("npmask.masking.cuda", "kernels"), ("npmask.nn.batchnorm_cuda", "kernels"),
             ("npmask.nn.conv_cuda", "kernels"), ("npmask.optim.cuda", "adam_kernel"),
             ("npmask.optim.cuda", "adam_all_kernel"), ("npmask.nn.batchnorm", "_cupy_dot_kernel"))

_state = threading.local()


class Launch(tuple):
    """One recorded operation: (kind, name, where), where = "file:function" inside npmask."""
    __slots__ = ()
    kind = property(lambda self: self[0])
    name = property(lambda self: self[1])
    where = property(lambda self: self[2])


class Log:
    """The operations recorded while :meth:`recording` is active, in order."""

    def __init__(self):
        self.events: list[Launch] = []

    @contextlib.contextmanager
    def recording(self):
        previous = getattr(_state, "log", None)
        _state.log = self
        try:
            yield self
        finally:
            _state.log = previous

    def clear(self) -> None:
        self.events.clear()

    def counts(self) -> Counter:
        """Operations by kind."""
        return Counter(e.kind for e in self.events)

    def launches(self) -> int:
        """What the GPU would run: kernels, reductions, GEMMs, copies, memsets, fused kernels."""
        return sum(1 for e in self.events if e.kind in LAUNCHES)

    def by(self, *fields: str, kinds=LAUNCHES) -> Counter:
        """Counts of the events of ``kinds`` by some of their fields ("kind", "name", "where"),
        joined by spaces: ``log.by("where")``, ``log.by("kind", "name")``."""
        index = [("kind", "name", "where").index(f) for f in fields]
        return Counter(" ".join(e[i] for i in index) for e in self.events if e.kind in kinds)


def _where() -> str:
    frame = sys._getframe(3)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_NPMASK_DIR) and path != _BACKEND_FILE:
            return f"{path[len(_NPMASK_DIR):]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "outside npmask"


def _record(kind: str, name: str) -> None:
    log = getattr(_state, "log", None)
    if log is not None and not getattr(_state, "quiet", 0):
        log.events.append(Launch((kind, name, _where())))


@contextlib.contextmanager
def _quiet():
    """NumPy's own work inside one counted operation (np.mean calling add.reduce) is not counted again."""
    _state.quiet = getattr(_state, "quiet", 0) + 1
    try:
        yield
    finally:
        _state.quiet -= 1


def _plain(x):
    """DeviceArrays (also inside lists, tuples and dicts) as plain ndarray views of the same memory."""
    if isinstance(x, DeviceArray):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _device(x):
    """A result as CuPy gives it: arrays (0-d for scalars of NumPy) on the device."""
    if isinstance(x, DeviceArray):
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x).view(DeviceArray)
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    if isinstance(x, list):
        return [_device(v) for v in x]
    return x


def _refuse_host(values, what: str) -> None:
    """CuPy refuses NumPy arrays where it takes device arrays (no implicit host-to-device copy)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            _refuse_host(v, what)
        elif isinstance(v, np.ndarray) and not isinstance(v, DeviceArray):
            raise TypeError(f"{what}: a NumPy array where CuPy takes device arrays "
                            f"(shape {v.shape}); CuPy does not copy it to the GPU implicitly")


def _is_device(values) -> bool:
    return any(isinstance(v, DeviceArray) or (isinstance(v, (list, tuple)) and _is_device(v))
               for v in values)


def _gemm_copies(a, b) -> None:
    """CuPy's product (``_routines_linalg``: tensordot_core for 2-D operands, the strided-batched
    GEMM above) hands cuBLAS an operand as it is when it is C- or F-contiguous (2-D) or
    C-contiguous (a product with more dimensions, both operands) and copies any other first; a
    batched product's pointer kernels are not counted (npmask makes none). (The graph step's own GEMMs,
    npmask.training.cuda_gemm, also read rows with a leading dimension, without a copy.)"""
    batched = max(np.ndim(a), np.ndim(b)) > 2       # then both are made C-contiguous
    for x in (a, b):
        if isinstance(x, np.ndarray) and x.ndim >= 2 and x.size and not (
                x.flags.c_contiguous or (not batched and x.flags.f_contiguous)):
            _record("copy", "copy for cuBLAS")


def _shares(result, source) -> bool:
    return isinstance(result, np.ndarray) and isinstance(source, np.ndarray) and (
        result.size == 0 or np.shares_memory(_plain(result), _plain(source)))


_VIEWS = {"transpose", "swapaxes", "moveaxis", "expand_dims", "broadcast_to", "broadcast_arrays",
          "atleast_1d", "atleast_2d", "atleast_3d", "shape", "ndim", "size", "result_type",
          "may_share_memory", "shares_memory", "iscomplexobj", "isrealobj", "split", "array_split"}
_MAYBE_COPY = {"reshape", "ravel", "ascontiguousarray", "asarray", "asanyarray", "asfortranarray",
               "require", "squeeze", "array"}
_JOINS = {"concatenate", "stack", "hstack", "vstack", "column_stack"}
_COPIES = {"copy", "copyto", "flip", "roll", "pad", "repeat", "tile"}
_FILLS = {"zeros_like": "memset", "ones_like": "kernel", "full_like": "kernel", "empty_like": None}
_CREATE = {"zeros": "memset", "empty": None, "ones": "kernel", "full": "kernel",
           "arange": "kernel", "eye": "kernel", "identity": "kernel", "linspace": "kernel"}
_REDUCTIONS = {"vdot", "sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "prod", "any",
               "all", "count_nonzero", "nansum", "nanmax", "nanmin"}
_GEMMS = {"dot", "matmul", "tensordot", "inner"}


def _counted_function(name: str, func, args, kwargs):
    """A function of the array module called with device arrays, counted by the table above."""
    _refuse_host(list(args) + list(kwargs.values()), f"cupy.{name}")
    with _quiet():
        result = func(*_plain(args), **_plain(kwargs))
    first = args[0] if args else None
    if name in _VIEWS:
        pass
    elif name in _MAYBE_COPY:
        if not _shares(result, first):
            _record("copy", name)
    elif name in _FILLS:
        if _FILLS[name]:
            _record(_FILLS[name], name)
    elif name in _JOINS:
        parts = args[0] if args else ()
        if len(parts) <= 8:                    # CuPy: one copy per array, or one kernel after
            for _ in parts:                    # copying a table of their pointers to the device
                _record("copy", name)
        else:
            _record("to_device", f"{name}'s table of arrays")
            _record("kernel", name)
    elif name in _COPIES:
        _record("copy", name)
    elif name in _REDUCTIONS:
        _record("reduction", name)
    elif name in _GEMMS:
        if len(args) > 1:
            _gemm_copies(args[0], args[1])
        _record("gemm", name)
    else:
        _record("kernel", name)
    return None if name == "copyto" else _device(result)


class DeviceArray(np.ndarray):
    """A NumPy array standing for a ``cupy.ndarray``: what CuPy would launch for it is counted."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_host(list(inputs) + list(out or ()), f"cupy.{ufunc.__name__}")
        with _quiet():
            plain_out = None if out is None else tuple(_plain(o) for o in out)
            extra = {} if plain_out is None else {"out": plain_out}
            result = getattr(ufunc, method)(*_plain(inputs), **extra, **kwargs)
        size = np.size(out[0] if out else (result[0] if isinstance(result, tuple) else result))
        if ufunc is np.matmul:
            _gemm_copies(*inputs)
            _record("gemm", "matmul")
        elif size or method == "reduce":
            _record("reduction" if method == "reduce" else "kernel",
                    ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}")
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def __array_function__(self, func, types_, args, kwargs):
        return _counted_function(func.__name__, func, args, kwargs)

    # ---- methods NumPy implements in C, past the two hooks above
    def copy(self, order="C"):
        if self.size:
            _record("copy", "copy")
        with _quiet():
            return _device(self.view(np.ndarray).copy(order))

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        if self.size:
            _record("copy", "astype")
        with _quiet():
            return _device(self.view(np.ndarray).astype(dtype, order, casting))

    def fill(self, value):
        if self.size:                     # CuPy sets a contiguous array to 0 by a memset
            _record("memset" if value == 0 and self.flags.c_contiguous else "kernel", "fill")
        self.view(np.ndarray).fill(value)

    def reshape(self, *shape, **kwargs):
        with _quiet():
            result = self.view(np.ndarray).reshape(*shape, **kwargs)
        if not _shares(result, self.view(np.ndarray)):
            _record("copy", "reshape")
        return _device(result)

    def ravel(self, order="C"):
        return self.reshape(-1, order=order)

    def flatten(self, order="C"):
        return self.reshape(-1, order=order).copy() if self.flags.c_contiguous else self.reshape(-1)

    def mean(self, *args, **kwargs):
        return self._reduce("mean", *args, **kwargs)

    def argmax(self, *args, **kwargs):
        return self._reduce("argmax", *args, **kwargs)

    def argmin(self, *args, **kwargs):
        return self._reduce("argmin", *args, **kwargs)

    def var(self, *args, **kwargs):
        _record("reduction", "var (mean)")                # CuPy: the mean, then the squares' sum
        return self._reduce("var", *args, **kwargs)

    def _reduce(self, name, *args, **kwargs):
        _record("reduction", name)
        with _quiet():
            return _device(getattr(self.view(np.ndarray), name)(*args, **kwargs))

    def dot(self, other, out=None):
        _refuse_host([other], "cupy.ndarray.dot")
        _gemm_copies(self, other)
        _record("gemm", "dot")
        with _quiet():
            return _device(self.view(np.ndarray).dot(_plain(other)))

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        arrays = [k for k in keys if isinstance(k, (np.ndarray, list))]
        self._index_arrays(arrays)
        with _quiet():
            result = self.view(np.ndarray)[_plain(key)]
        if arrays:
            _record("kernel", "take")
        return _device(result)

    def _index_arrays(self, arrays) -> None:
        """What CuPy launches to prepare index arrays: a host one is copied to the device, a
        boolean mask is counted on the host first; with several, a memset and one kernel each
        combine them into one flat index (cupy/_core/_routines_indexing.pyx)."""
        for k in arrays:
            if not isinstance(k, DeviceArray):
                _record("to_device", "index array")
            elif k.dtype == bool:
                _record("to_host", "boolean mask (its count)")
        if len(arrays) >= 2:
            _record("memset", "index")
            for _ in arrays:
                _record("kernel", "index")

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and value.ndim:
            _refuse_host([value], "assignment")
        keys = key if isinstance(key, tuple) else (key,)
        arrays = [k for k in keys if isinstance(k, (np.ndarray, list))]
        with _quiet():
            target = None if arrays else self.view(np.ndarray)[_plain(key)]
        same = (isinstance(value, DeviceArray) and target is not None and value.shape == target.shape
                and value.strides == target.strides and value.ctypes.data == target.ctypes.data)
        if arrays:                             # a scatter
            self._index_arrays(arrays)
            _record("kernel", "scatter")
        elif target.size and not same:         # a[s] += b has already written a[s]: nothing
            if isinstance(value, np.ndarray) and value.ndim:
                _record("copy", "setitem")
            else:                              # CuPy's fill: a memset for 0 into contiguous memory
                _record("memset" if value == 0 and target.flags.c_contiguous else "kernel", "fill")
        with _quiet():
            self.view(np.ndarray)[_plain(key)] = _plain(value)

    # ---- reading values on the host: a copy from the device, after the GPU has caught up
    def _to_host(self, what):
        _record("to_host", what)
        return self.view(np.ndarray)

    def __float__(self):
        return float(self._to_host("float"))

    def __int__(self):
        return int(self._to_host("int"))

    def __index__(self):
        return self._to_host("index").__index__()

    def __bool__(self):
        return bool(self._to_host("bool"))

    def item(self, *args):
        return self._to_host("item").item(*args)

    def tolist(self):
        return self._to_host("tolist").tolist()

    def get(self, stream=None, order="C", out=None):
        return self._to_host("get").copy()

    @property
    def data(self):
        """As CuPy's ``a.data``, a memory pointer: its ``ptr`` is the first element's address."""
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def set(self, host):
        _record("to_device", "set")
        self.view(np.ndarray)[...] = host


class _CountedKernel:
    """One of npmask's kernel objects (built with tests/cuda_on_cpu.py's classes): a call is one
    ``fused`` launch; its C runs on plain views, outputs given in place stay the caller's arrays."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, *args, **kwargs):
        _refuse_host(args, self.kernel.name)
        if any(isinstance(a, np.ndarray) and a.size for a in args) or kwargs.get("size"):
            _record("fused", self.kernel.name)     # CuPy launches nothing for an empty loop
        plain = _plain(args)
        originals = {id(p): a for p, a in zip(plain, args) if isinstance(a, DeviceArray)}
        with _quiet():
            result = self.kernel(*plain, **_plain(kwargs))

        def back(r):
            given = originals.get(id(r))
            return _device(r) if given is None else given
        return tuple(back(r) for r in result) if isinstance(result, tuple) else back(result)


def _kernel_class(base):
    def make(*args, **kwargs):
        return _CountedKernel(base(*args, **kwargs))
    return make


def _is_host(values) -> bool:
    return any((isinstance(v, np.ndarray) and not isinstance(v, DeviceArray))
               or (isinstance(v, (list, tuple)) and _is_host(v)) for v in values)


_HOST_IN = {"asarray", "array", "ascontiguousarray", "asanyarray"}    # host data to the device


class _Ufunc:
    """A NumPy ufunc as CuPy's: device arrays only (their hook counts the call)."""

    def __init__(self, ufunc):
        self.ufunc = ufunc

    def __call__(self, *args, **kwargs):
        if not _is_device(args) and _is_host(list(args) + list(kwargs.values())):
            raise TypeError(f"cupy.{self.ufunc.__name__}: a NumPy array where CuPy takes device "
                            "arrays; CuPy does not copy it to the GPU implicitly")
        return self.ufunc(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.ufunc, name)


class CountingCupy(types.ModuleType):
    """The stand-in for the ``cupy`` module: NumPy's names, their results on the device, counted."""

    ndarray = DeviceArray

    def __init__(self):
        super().__init__("cupy")
        self.ElementwiseKernel = _kernel_class(cuda_on_cpu.ElementwiseKernel)
        self.ReductionKernel = _kernel_class(cuda_on_cpu.ReductionKernel)
        self.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            return _Ufunc(attr)
        if not callable(attr) or isinstance(attr, type):
            return attr                            # dtypes, constants, submodules
        return functools.partial(self._call, name, attr)

    @staticmethod
    def _call(name, fn, *args, **kwargs):
        if _is_device(args) or _is_device(kwargs.values()):
            return _counted_function(name, fn, args, kwargs)
        if name not in _HOST_IN and _is_host(list(args) + list(kwargs.values())):
            raise TypeError(f"cupy.{name}: a NumPy array where CuPy takes device arrays; CuPy "
                            "does not copy it to the GPU implicitly")
        with _quiet():
            result = fn(*args, **kwargs)
        if name in ("asarray", "array", "ascontiguousarray", "asanyarray"):
            _record("to_device", name)
        elif name in _CREATE:
            if _CREATE[name] and np.size(result):
                _record(_CREATE[name], name)
        else:
            return result                          # shapes, dtypes, Python numbers: host work
        return _device(result)

    @staticmethod
    def asnumpy(a, stream=None):
        if isinstance(a, DeviceArray):
            return a.get()
        return np.asarray(a)

    @staticmethod
    def get_array_module(*arrays):
        return backend.get_array_module(*arrays)


@contextlib.contextmanager
def counting_cupy(factories=FACTORIES):
    """npmask with the stand-in in CuPy's place; yields a :class:`Log`, which records inside
    ``with log.recording():``. The kernel ``factories`` (module, function) drop the kernels they
    cached, before (built with CuPy's classes) and after (with the stand-in's): npmask's
    ``_import_cupy()`` answers the stand-in meanwhile. Everything is put back after."""
    import importlib
    if not cuda_on_cpu.available():
        raise RuntimeError(cuda_on_cpu.skip_reason())
    caches = []
    for module_name, factory in factories:
        try:           # an older npmask, counted for comparison, may lack some
            caches.append(getattr(importlib.import_module(module_name), factory))
        except (ImportError, AttributeError):
            continue
    previous, backend._cupy = backend._cupy, CountingCupy()
    try:
        for cached in caches:
            cached.cache_clear()
        yield Log()
    finally:
        backend._cupy = previous
        for cached in caches:
            cached.cache_clear()
