"""CuPy's ElementwiseKernel and ReductionKernel, run on the CPU: a test helper, no GPU needed.

A kernel's own CUDA C (its body, map/reduce/post-map expressions and preamble) is compiled by the
host's C++ compiler into a small shared library and called through ctypes on NumPy arrays, which
stand in for CuPy arrays. The call follows CuPy 14's rules (cupy/_core/_kernel.pyx and
_reduction.pyx), so that npmask's host code can call these objects exactly as it calls CuPy's:

- T is decided by the *array* arguments, inputs and outputs (all of one dtype, else TypeError
  "Type is mismatched", as CuPy); scalars (Python or NumPy) are cast to the parameter's type. An
  ``int32`` parameter takes an integer that fits in 32 bits (else OverflowError, as CuPy); a float
  or a bool there is refused, where CuPy would truncate it: stricter, a host-code mistake here.
- Non-raw arrays broadcast together, outputs included; a given output must have the broadcast
  shape (ValueError "Out shape is mismatched"); missing outputs are allocated with it.
- Elementwise: each non-raw array parameter is a reference to its element ``i`` (``const`` for an
  input), declared as CuPy declares it, in the scope the body runs in; ``i`` is the ``ptrdiff_t``
  index in C order of the broadcast shape; a scalar is a ``const`` value of the function's scope
  (a kernel parameter in CuPy); a ``raw`` array is indexed by the body (here a pointer to its
  C-ordered elements, ``const`` for an input, which is what CuPy's ``CArray[ptrdiff_t]`` reads).
- Reduction: ``_type_reduce _s = identity``, then ``_s = REDUCE(_s, map)`` over the reduced
  elements, then ``POST_MAP(_s)`` with ``out`` a reference to the output element, with CuPy's
  macros. The elements are added in C order, one after another; a GPU adds them in a tree, so sums
  agree to rounding only.

Arithmetic: by default (FLAGS) every ``a * b + c`` is two roundings, as in NumPy, so a kernel that
does the NumPy path's operations gives its bits. NVRTC may fuse such pairs into one fused
multiply-add: ``fma=True`` (FLAGS_FMA) builds the code with every fusion GCC finds, to check that a
comparison's tolerance also holds for fused arithmetic (which pairs a GPU fuses may differ).

What this cannot show: anything of the launch (grid and block sizes, streams, shared memory), and
the device's ``exp`` and ``sqrt``, which may differ from the C library's in the last bit. NumPy
arrays play CuPy's here, so a host array that leaks into a kernel call (which CuPy refuses) goes
unseen: the tests with real ``cupy.ndarray`` objects (conftest's ``host_backed_cupy``) and the GPU
runs cover that. Arrays that are both an input and an output are modelled when both are
contiguous and whole (the same memory, as on the GPU); other overlaps are refused.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

COMPILER = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
FLAGS = ("-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
# As a GPU may compute: every a * b + c the compiler can fuse, fused (one rounding; GCC fuses at -O2)
FLAGS_FMA = ("-std=c++17", "-O2", "-ffp-contract=fast", "-mfma", "-fno-fast-math", "-shared", "-fPIC")
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.int32): "int",
          np.dtype(np.int64): "long long", np.dtype(np.uint64): "unsigned long long"}
_PRELUDE = """#include <math.h>
#include <stddef.h>
#define __device__
#define __host__
#define __forceinline__ inline
"""
_loaded: dict[str, ctypes.CDLL] = {}


class CompileError(RuntimeError):
    """The C++ compiler refused a kernel's code; the message holds its log and the source."""


def _param_list(text: str):
    """(raw, type, name) of each parameter of a CuPy parameter string such as ``raw T x, int32 n``."""
    out = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        words = piece.split()
        raw = words[0] == "raw"
        if len(words) != 2 + raw:
            raise ValueError(f"Unknown keyword in parameter {piece!r}")      # as CuPy
        type_, name = words[-2:]
        out.append((raw, type_, name))
    return out


def _library(source: str, flags=FLAGS) -> ctypes.CDLL:
    """The source compiled once (cached on disk by its hash, for later runs and other processes)."""
    key = hashlib.sha256((COMPILER or "").encode() + " ".join(flags).encode() + source.encode()).hexdigest()[:24]
    if key in _loaded:
        return _loaded[key]
    if COMPILER is None:
        raise CompileError("no C++ compiler (g++, c++ or clang++) on PATH")
    folder = Path(tempfile.gettempdir()) / f"npmask-cpu-kernels-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    lib = folder / f"{key}.so"
    if not lib.exists():
        src = folder / f"{key}.{os.getpid()}.cpp"
        tmp = folder / f"{key}.{os.getpid()}.so"
        src.write_text(source)
        done = subprocess.run([COMPILER, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
        src.unlink()
        if done.returncode != 0:
            raise CompileError(f"{done.stderr}\n--- source ---\n{source}")
        os.replace(tmp, lib)                      # atomic: another process may compile it too
    _loaded[key] = ctypes.CDLL(str(lib))
    return _loaded[key]


class _Kernel:
    flags = FLAGS

    def __init__(self, in_params: str, out_params: str, name: str, preamble: str):
        self.ins, self.outs = _param_list(in_params), _param_list(out_params)
        self.name, self.preamble = name, preamble
        for raw, type_, pname in self.ins + self.outs:
            if type_ not in ("T", "int32", "float32", "float64", "int64", "uint64"):
                raise NotImplementedError(f"parameter type {type_} of {name}")
            if pname == "i":
                raise ValueError("CuPy refuses a parameter named i")

    def _decide_t(self, args):
        """CuPy's _decide_params_type: T from the array arguments, which must agree."""
        t = None
        for (raw, type_, pname), a in zip(self.ins + self.outs, args):
            if not isinstance(a, np.ndarray):
                continue
            if type_ != "T":
                if a.dtype != np.dtype(type_):
                    raise TypeError(f"Type is mismatched. {pname} {a.dtype} {type_}")
            elif t is None:
                t = a.dtype
            elif a.dtype != t:
                raise TypeError(f"Type is mismatched. {pname} {a.dtype} {t} T")
        if t is None and any(type_ == "T" for _, type_, _ in self.ins + self.outs):
            raise TypeError(f"{self.name}: T is decided by array arguments, and none was given")
        if t is not None and t not in (np.float32, np.float64):
            raise NotImplementedError(f"{self.name}: T = {t} (only float32 and float64 here)")
        return t

    def _dtype(self, type_, t):
        return t if type_ == "T" else np.dtype(type_)

    def _scalar(self, type_, value, t, pname):
        dtype = self._dtype(type_, t)
        if dtype == np.int32:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{self.name}: {pname} is int32, given {value!r}")
            if not -2 ** 31 <= int(value) < 2 ** 31:
                raise OverflowError(f"{self.name}: {pname} = {value} does not fit in int32")
        return np.array(value, dtype=dtype)       # CuPy's CScalar.apply_dtype: cast to the type

    def _source(self, t, kinds, body_loop: str, signature: str) -> str:
        lines = [_PRELUDE, f"typedef {_CTYPE[t]} T;" if t is not None else "", self.preamble,
                 f'extern "C" void npmask_cpu_kernel({signature}, void** _args) {{']
        nin = len(self.ins)
        for k, ((raw, type_, pname), kind) in enumerate(zip(self.ins + self.outs, kinds)):
            ctype = "T" if type_ == "T" else _CTYPE[np.dtype(type_)]
            const = "const " if k < nin else ""
            if kind == "scalar":                  # CuPy: a const kernel parameter
                lines.append(f"  const {ctype} {pname} = *(const {ctype}*)_args[{k}];")
            elif raw:                             # CuPy: a CArray, read-only for an input
                lines.append(f"  {const}{ctype}* {pname} = ({const}{ctype}*)_args[{k}];")
            else:
                lines.append(f"  {ctype}* _raw_{pname} = ({ctype}*)_args[{k}];")
        lines += [body_loop, "}"]
        return "\n".join(lines)

    def _pointers(self, arrays):
        return (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])


class ElementwiseKernel(_Kernel):
    """``cupy.ElementwiseKernel(in_params, out_params, operation, name, preamble=...)`` on the CPU."""

    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True,
                 preamble="", no_return=False, return_tuple=False, **kwargs):
        super().__init__(in_params, out_params, name, preamble)
        if kwargs:                                # options, loop_prep, after_loop: not modelled
            raise NotImplementedError(f"{name}: {sorted(kwargs)}")
        self.operation, self.return_tuple, self.no_return = operation, return_tuple, no_return

    def __call__(self, *args, size=None):
        nin, params = len(self.ins), self.ins + self.outs
        if len(args) not in (nin, len(params)):
            raise TypeError(f"Wrong number of arguments for {self.name!r}. It must be either "
                            f"{nin} or {len(params)} (with outputs), but given {len(args)}.")
        for a in args[nin:]:
            if not isinstance(a, np.ndarray):
                raise TypeError("Output arguments type must be cupy.ndarray")
        nonraw = [a for (raw, _, _), a in zip(params, args) if not raw and isinstance(a, np.ndarray)]
        if size is not None:
            if nonraw:
                raise ValueError("Specified 'size' can be used only if all of the ndarray are 'raw'.")
            shape = (size,)
        elif not nonraw:
            raise ValueError("Loop size is undecided.")
        else:
            shape = np.broadcast_shapes(*[a.shape for a in nonraw])
        t = self._decide_t(args)
        outs = list(args[nin:])
        for (raw, type_, pname), out in zip(self.outs, outs):
            if not raw and out.shape != shape:
                raise ValueError("Out shape is mismatched")
        if not outs:
            outs = [np.empty(shape, dtype=self._dtype(type_, t)) for _, type_, _ in self.outs]
        ret = None if self.no_return else outs[0] if not self.return_tuple and len(outs) == 1 \
            else tuple(outs)
        if 0 in shape:                            # CuPy returns before casting or compiling
            return ret

        kinds, arrays, write_back = [], [], []
        for k, ((raw, type_, pname), a) in enumerate(zip(params, list(args[:nin]) + outs)):
            if not isinstance(a, np.ndarray):
                kinds.append("scalar")
                arrays.append(self._scalar(type_, a, t, pname))
            elif raw:
                kinds.append("raw")
                arrays.append(np.ascontiguousarray(a) if k < nin else a)
                if k >= nin and not a.flags.c_contiguous:
                    raise NotImplementedError(f"{self.name}: a non-contiguous raw output")
            else:
                kinds.append("array")
                full = np.broadcast_to(a, shape) if a.shape != shape else a
                if k >= nin and not full.flags.c_contiguous:
                    buf = np.ascontiguousarray(full)
                    write_back.append((a, buf))
                    arrays.append(buf)
                else:
                    arrays.append(np.ascontiguousarray(full))
        self._check_overlaps(args[:nin], outs, arrays, nin)
        decls = []
        for (raw, type_, pname), kind, k in zip(params, kinds, range(len(params))):
            ctype = "T" if type_ == "T" else _CTYPE[np.dtype(type_)]
            if kind == "array":
                const = "const " if k < nin else ""
                decls.append(f"    {const}{ctype} &{pname} = _raw_{pname}[i];")
        # the declarations and the body in the loop's own scope, as CuPy's: a body that redeclares
        # i or a parameter does not compile, on the GPU or here
        loop = ("  for (ptrdiff_t i = 0; i < _n; ++i) {\n" + "\n".join(decls)
                + f"\n{self.operation}\n  }}")
        source = self._source(t, kinds, loop, "long long _n")
        fn = _library(source, self.flags).npmask_cpu_kernel
        fn.argtypes, fn.restype = [ctypes.c_longlong, ctypes.c_void_p], None
        fn(int(np.prod(shape, dtype=np.int64)), self._pointers(arrays))
        for dst, buf in write_back:
            dst[...] = buf
        return ret


    def _check_overlaps(self, ins, outs, arrays, nin):
        """An input that shares memory with an output: modelled only when both are the very same
        whole, contiguous array passed as it is (then the C sees one memory, as the GPU would)."""
        for k, a in enumerate(ins):
            for j, o in enumerate(outs):
                if not isinstance(a, np.ndarray) or not np.shares_memory(a, o):
                    continue
                same = (not self.ins[k][0] and arrays[k] is a and arrays[nin + j] is o
                        and a.ctypes.data == o.ctypes.data and a.shape == o.shape and a.strides == o.strides)
                if not same:
                    raise NotImplementedError(f"{self.name}: input {self.ins[k][2]} overlaps output "
                                              f"{self.outs[j][2]} in a way this runner does not model")


def _axes(axis, ndim):
    """CuPy's reading of ``axis`` (None: all; an int or a tuple; negative from the end; out of
    range: AxisError; repeated: ValueError), as sorted non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    given = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = []
    for a in given:
        if not -ndim <= a < ndim:
            raise getattr(np, "exceptions", np).AxisError(a, ndim)
        axes.append(a % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError("duplicate value in 'axis'")
    return tuple(sorted(axes))


class ReductionKernel(_Kernel):
    """``cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr, post_map_expr,
    identity, name, reduce_type=None, preamble=...)`` on the CPU (reductions to one output)."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,
                 name="reduce_kernel", reduce_type=None, reduce_dims=True, preamble="", options=()):
        super().__init__(in_params, out_params, name, preamble)
        if len(self.outs) != 1 or self.outs[0][0]:
            raise NotImplementedError(f"{name}: one non-raw output only")
        if any(raw for raw, _, _ in self.ins):
            raise NotImplementedError(f"{name}: raw inputs")
        self.map_expr, self.reduce_expr, self.post_map_expr = map_expr, reduce_expr, post_map_expr
        self.identity = identity
        out_type = self.outs[0][1]                # CuPy: the output parameter's C type
        self.reduce_type = reduce_type or ("T" if out_type == "T" else _CTYPE[np.dtype(out_type)])

    def __call__(self, *args, out=None, axis=None, keepdims=False):
        if len(args) != len(self.ins):
            raise TypeError(f"Wrong number of arguments for {self.name!r}")
        t = self._decide_t(list(args) + ([out] if out is not None else []))
        arrays_in = [a for a in args if isinstance(a, np.ndarray)]
        if not arrays_in:
            raise ValueError("Loop size is undecided.")
        shape = np.broadcast_shapes(*[a.shape for a in arrays_in])
        ndim = len(shape)
        axes = _axes(axis, ndim)
        kept = tuple(d for d in range(ndim) if d not in axes)
        n_out = int(np.prod([shape[d] for d in kept], dtype=np.int64))
        n_red = int(np.prod([shape[d] for d in axes], dtype=np.int64))
        out_shape = tuple(1 if d in axes else shape[d] for d in range(ndim)) if keepdims \
            else tuple(shape[d] for d in kept)
        result = np.empty(out_shape, dtype=self._dtype(self.outs[0][1], t)) if out is None else out
        if result.shape != out_shape:
            raise ValueError("Out shape is mismatched")
        if n_out == 0:                            # CuPy returns before casting or compiling
            return result

        kinds, arrays = [], []
        for (raw, type_, pname), a in zip(self.ins, args):
            if isinstance(a, np.ndarray):
                kinds.append("array")
                moved = np.broadcast_to(a, shape).transpose(kept + axes)
                arrays.append(np.ascontiguousarray(moved).reshape(n_out * n_red))
            else:
                kinds.append("scalar")
                arrays.append(self._scalar(type_, a, t, pname))
        buf = np.ascontiguousarray(result).reshape(-1) if not result.flags.c_contiguous else result
        kinds.append("array")
        arrays.append(buf)
        inputs = []
        for (raw, type_, pname), kind in zip(self.ins, kinds):
            ctype = "T" if type_ == "T" else _CTYPE[np.dtype(type_)]
            if kind == "array":
                inputs.append(f"      const {ctype} {pname} = _raw_{pname}[_i * _n_red + _j];")
        out_type = "T" if self.outs[0][1] == "T" else _CTYPE[np.dtype(self.outs[0][1])]
        loop = (f"#define REDUCE(a, b) ({self.reduce_expr})\n#define POST_MAP(a) ({self.post_map_expr})\n"
                f"  typedef {self.reduce_type} _type_reduce;\n"
                "  for (ptrdiff_t _i = 0; _i < _n_out; ++_i) {\n"
                f"    _type_reduce _s = _type_reduce({self.identity});\n"
                "    for (ptrdiff_t _j = 0; _j < _n_red; ++_j) {\n"
                + "\n".join(inputs)
                + f"\n      _type_reduce _a = static_cast<_type_reduce>({self.map_expr});\n"
                "      _s = REDUCE(_s, _a);\n    }\n"
                f"    {out_type} &{self.outs[0][2]} = _raw_{self.outs[0][2]}[_i];\n"
                "    POST_MAP(_s);\n  }")
        source = self._source(t, kinds, loop, "long long _n_out, long long _n_red")
        fn = _library(source, self.flags).npmask_cpu_kernel
        fn.argtypes, fn.restype = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p], None
        fn(n_out, n_red, self._pointers(arrays))
        if buf is not result:
            result[...] = buf.reshape(result.shape)
        return result


def fake_cupy(fma: bool = False):
    """A stand-in for the cupy module with these two kernel classes (for ``_import_cupy``); with
    ``fma``, classes whose code is compiled with contraction into fused multiply-adds (FLAGS_FMA)."""
    import types
    if not fma:
        return types.SimpleNamespace(ElementwiseKernel=ElementwiseKernel, ReductionKernel=ReductionKernel)
    return types.SimpleNamespace(
        ElementwiseKernel=type("ElementwiseKernel", (ElementwiseKernel,), {"flags": FLAGS_FMA}),
        ReductionKernel=type("ReductionKernel", (ReductionKernel,), {"flags": FLAGS_FMA}))


def build(monkeypatch, module, factory: str = "kernels", fma: bool = False):
    """``module.<factory>()``'s kernel objects built with these classes, and ``module.<factory>``
    patched to return them: npmask's host code then runs the kernels' own C on NumPy arrays."""
    monkeypatch.setattr(module, "_import_cupy", lambda: fake_cupy(fma))
    built = getattr(module, factory).__wrapped__()
    monkeypatch.setattr(module, factory, lambda: built)
    return built


def available() -> bool:
    return COMPILER is not None


def fma_available() -> bool:
    """Whether code built with FLAGS_FMA runs here: a C++ compiler and an x86-64 CPU with FMA."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return available() and os.uname().machine == "x86_64" and " fma " in flags.replace("\n", " ")


def skip_reason(fma: bool = False) -> str | None:
    """Why the kernels' C cannot run here (None when it can)."""
    if not available():
        return "no C++ compiler (g++, c++ or clang++): the kernels' C cannot run on the CPU"
    if fma and not fma_available():
        return "no x86-64 CPU with FMA here: the kernels cannot be run with fused multiply-adds"
    return None


def skip_unless_runnable(fma: bool = False) -> None:
    """pytest.skip with :func:`skip_reason` when the kernels' C (or its FMA build) cannot run here."""
    import pytest
    if skip_reason(fma):
        pytest.skip(skip_reason(fma))

