"""The fused CUDA transform kernels (npmask/masking/cuda.py).

The kernels give the generic NumPy path's numbers (forward and every gradient) for every variant's
coefficient pattern and both surrogates: on a GPU, and without one with the kernels' own C compiled
for the CPU (tests/cuda_on_cpu.py, which calls them as CuPy does); the same tests run both ways
(fixture ``kernels_on``). With a GPU also: the transform dispatches CuPy arrays to them. Without
one (CI, this machine) further: the module imports without importing CuPy, the kernel objects can
be built (CUDA compiles them only on their first call), NumPy arrays never take the CUDA path,
every kernel of npmask compiles with NVRTC (in a hand-made wrapper, and as the very source CuPy
generates for it), and the Adam kernel's body gives Adam._arithmetic's bits, evaluated with NumPy
and run as C through Adam's own CuPy branch.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cuda_on_cpu
import numpy as np
import pytest

from npmask.backend import cupy_available, to_device, to_numpy
from npmask.masking import cuda, transform
from npmask.masking.variants import get_variant, variant_names

GPU = cupy_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no usable CUDA device (CuPy not installed or no GPU): "
                               "the CUDA kernels can only be compared with the generic path on a GPU")

MASK_VARIANTS = [v for v in variant_names() if get_variant(v).has_mask]


@pytest.fixture(params=["gpu", "c-on-cpu", "c-on-cpu-fma"])
def kernels_on(request, monkeypatch):
    """Where the transform kernels run: a function that puts a test's arrays there. "gpu": CuPy
    arrays on the device (skipped without one); "c-on-cpu": NumPy arrays, with masking.cuda's
    kernel objects replaced by the same kernels compiled for the CPU (tests/cuda_on_cpu.py);
    "c-on-cpu-fma": the same with a * b + c fused where the compiler can, as a GPU may, so the
    tolerances below are known to hold for fused arithmetic too."""
    if request.param == "gpu":
        if not GPU:
            pytest.skip(needs_gpu.kwargs["reason"])
        return lambda a: a if isinstance(a, float) else to_device(a, "cupy")
    fma = request.param.endswith("fma")
    cuda_on_cpu.skip_unless_runnable(fma)
    cuda_on_cpu.build(monkeypatch, cuda, fma=fma)
    return lambda a: a


def _problem(variant: str, followed_by_bn: bool, shape=(6, 4, 3, 3), seed=0, dtype=np.float32):
    """W, R (about half the mask bits on), the ks of ``variant`` with random learned values, G."""
    rng = np.random.default_rng(seed)
    v = get_variant(variant)
    W = rng.standard_normal(shape).astype(dtype)
    R = rng.uniform(-1, 1, shape).astype(dtype)
    G = rng.standard_normal(shape).astype(dtype)
    n_k = shape[0] if v.channelwise else 1
    ks = []
    for j in range(4):
        kind, value = v.k_spec(j, followed_by_bn)
        ks.append(value if kind == "fixed" else (value + 0.3 * rng.standard_normal(n_k)).astype(dtype))
    return W, R, tuple(ks), G, v.surrogate


def test_module_imports_without_cupy():
    code = "import sys, npmask.masking.cuda, npmask.masking.transform; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_objects_build_without_a_device():
    pytest.importorskip("cupy")
    k = cuda.kernels()
    assert set(k) == {"forward", "grad_r", "grad_w", "sums"}
    assert type(k["forward"]).__name__ == "ElementwiseKernel"
    assert type(k["sums"]).__name__ == "ReductionKernel"


def test_numpy_arrays_take_the_generic_path(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CUDA path was taken for NumPy arrays")
    monkeypatch.setattr(cuda, "transform_forward", boom)
    monkeypatch.setattr(cuda, "transform_backward", boom)
    W, R, ks, G, surrogate = _problem("full", followed_by_bn=False)
    assert not cuda.applies(W, R)
    Wt, cache = transform.transform_forward(W, R, ks)
    dks, dR, _ = transform.transform_backward(G, cache, surrogate=surrogate)
    assert Wt.dtype == dR.dtype == np.float32


@pytest.mark.parametrize("variant", MASK_VARIANTS)
@pytest.mark.parametrize("followed_by_bn", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_equal_generic_path(variant, followed_by_bn, dtype, kernels_on):
    W, R, ks, G, surrogate = _problem(variant, followed_by_bn, dtype=dtype)
    Wt_ref, cache_ref = transform.transform_forward(W, R, ks)
    dks_ref, dR_ref, dW_ref = transform.transform_backward(G, cache_ref, need_W=True, surrogate=surrogate)

    gpu = kernels_on
    Wc, Rc, Gc, ksc = gpu(W), gpu(R), gpu(G), tuple(gpu(k) for k in ks)
    Wt, cache = cuda.transform_forward(Wc, Rc, ksc)
    dks, dR, dW = cuda.transform_backward(Gc, cache, need_W=True, surrogate=surrogate)

    f32 = dtype == np.float32
    assert Wt.dtype == dR.dtype == dW.dtype == dtype
    np.testing.assert_allclose(to_numpy(Wt), Wt_ref, rtol=1e-6 if f32 else 1e-14, atol=1e-6 if f32 else 1e-14)
    np.testing.assert_allclose(to_numpy(dR), dR_ref, rtol=1e-6 if f32 else 1e-14, atol=1e-7 if f32 else 1e-15)
    np.testing.assert_allclose(to_numpy(dW), dW_ref, rtol=1e-6 if f32 else 1e-14, atol=1e-7 if f32 else 1e-15)
    for j in range(4):
        assert (dks[j] is None) == (dks_ref[j] is None), f"k{j}"
        if dks[j] is not None:
            assert dks[j].shape == ks[j].shape and dks[j].dtype == W.dtype
            np.testing.assert_allclose(to_numpy(dks[j]), dks_ref[j], rtol=1e-5 if f32 else 1e-12,
                                       atol=1e-5 if f32 else 1e-12)


@pytest.mark.parametrize("variant", ["piggyback", "full", "full_sigmoid"])
def test_kernels_keep_a_mask_entry_exactly_at_the_threshold(variant, kernels_on):
    """h(r) = 1[r >= 0]: an R equal to tau keeps its weight in the kernels as in the generic path."""
    W, R, ks, G, surrogate = _problem(variant, followed_by_bn=False)
    tau = 0.25
    R[:, :, 0, 0] = tau                          # a whole slice exactly at the threshold
    Wt_ref, cache_ref = transform.transform_forward(W, R, ks, tau)
    assert cache_ref.M[:, :, 0, 0].all()
    dks_ref, _, dW_ref = transform.transform_backward(G, cache_ref, need_W=True, surrogate=surrogate)
    gpu = kernels_on
    Wt, cache = cuda.transform_forward(gpu(W), gpu(R), tuple(gpu(k) for k in ks), tau)
    dks, _, dW = cuda.transform_backward(gpu(G), cache, need_W=True, surrogate=surrogate)
    np.testing.assert_allclose(to_numpy(Wt), Wt_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_numpy(dW), dW_ref, rtol=1e-6, atol=1e-7)
    for j in range(4):
        if dks[j] is not None:
            np.testing.assert_allclose(to_numpy(dks[j]), dks_ref[j], rtol=1e-5, atol=1e-5)


def test_kernel_sources_threshold_with_greater_or_equal():
    """Without a GPU: every mask comparison in the kernels' CUDA code is R >= tau (never R > tau)."""
    src = Path(cuda.__file__).read_text()
    assert "R >= tau" in src
    assert not re.search(r"R\s*>\s*tau", src)


@needs_gpu
def test_transform_dispatches_cupy_arrays_to_the_kernels(monkeypatch):
    calls = []
    fwd, bwd = cuda.transform_forward, cuda.transform_backward
    monkeypatch.setattr(cuda, "transform_forward", lambda *a, **k: calls.append("f") or fwd(*a, **k))
    monkeypatch.setattr(cuda, "transform_backward", lambda *a, **k: calls.append("b") or bwd(*a, **k))
    W, R, ks, G, surrogate = _problem("full", followed_by_bn=True)
    gpu = lambda a: a if isinstance(a, float) else to_device(a, "cupy")  # noqa: E731
    Wt, cache = transform.transform_forward(gpu(W), gpu(R), tuple(gpu(k) for k in ks))
    transform.transform_backward(gpu(G), cache, surrogate=surrogate)
    assert calls == ["f", "b"]


# ---------------------------------------------------------------------------------- compilation
# The oldest virtual architecture both CUDA 12's and CUDA 13's NVRTC accept (13 dropped compute_70
# and older: "invalid value for --gpu-architecture", seen on an H100 with CuPy 14 / CUDA 13).
NVRTC_ARCH = "-arch=compute_75"


def _nvrtc():
    """CuPy's NVRTC binding when the NVRTC library can be loaded (no GPU or driver needed), else None."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:  # cupy missing, or libnvrtc not installed (pip install nvidia-cuda-nvrtc-cu12)
        return None


def _record_kernels(monkeypatch):
    """Build every CuPy kernel object npmask defines, recording the arguments they were built with."""
    cp = pytest.importorskip("cupy")
    from npmask.optim import cuda as optim_cuda
    from npmask.nn import batchnorm, batchnorm_cuda, conv_cuda
    built, sites, records = [], set(), []

    def recorder(kind):
        def build(*args, **kwargs):
            caller = sys._getframe(1)          # where in npmask the kernel is built
            sites.add((Path(caller.f_code.co_filename).resolve(), caller.f_lineno))
            built.append(((kind,) + args, kwargs.get("preamble", "")))
            records.append((kind, args, kwargs))
        return build
    monkeypatch.setattr(cp, "ElementwiseKernel", recorder("elementwise"))
    monkeypatch.setattr(cp, "ReductionKernel", recorder("reduction"))
    for factory in (cuda.kernels, optim_cuda.adam_kernel, optim_cuda.adam_all_kernel, batchnorm._cupy_dot_kernel,
                    batchnorm_cuda.kernels, conv_cuda.kernels):
        factory.__wrapped__()
    _record_kernels.records = records          # (kind, args, kwargs): for CuPy's own code generator
    return built, sites


def _kernel_source(kind, in_params, out_params, body, *rest, T="float", preamble=""):
    """A CUDA source that declares the kernel's parameters the way CuPy does and contains its body.

    Inputs become values, outputs references, each read from its own pointer at index i (a ``raw``
    input stays a pointer, indexed by the body itself); for a ReductionKernel the body is the map expression, combined by the reduce expression into ``out``.
    The kernel's ``preamble`` (helper functions) comes after the type definition, as in CuPy.
    """
    def params(text):
        ctypes = {"int32": "int", "int64": "long long", "uint64": "unsigned long long"}
        return [(ctypes.get(t, t), name) for t, name in (p.split()[-2:] for p in text.split(","))]
    raw = {p.split()[-1] for p in in_params.split(",") if p.split()[0] == "raw"}
    ins, outs = params(in_params), params(out_params)
    args = ", ".join(f"{t}* {'' if name in raw else '_'}{name}" for t, name in ins + outs)
    decls = " ".join([f"{t} {name} = _{name}[i];" for t, name in ins if name not in raw]
                     + [f"{t}& {name} = _{name}[i];" for t, name in outs])
    if kind == "reduction":
        reduce_expr, post = rest[0], rest[1]
        body = (f"T _mapped = ({body});\n"          # own scopes, as CuPy's: a, b may be parameter names
                f"  {{ T a = _mapped, b = _mapped; T _reduced = ({reduce_expr}); {{ T a = _reduced; {post}; }} }}")
    return (f"typedef {T} T;\n{preamble}\nextern \"C\" __global__ void k({args}, int n) {{\n"
            f"  int i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= n) return;\n"
            f"  {decls}\n  {body}\n}}\n")


def test_kernel_source_harness_rejects_a_bad_body():
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12): the CUDA kernels' "
                    "sources cannot be compiled on this machine")
    src = _kernel_source("elementwise", "T x", "T y", "y = not_a_function(x);")
    prog = nvrtc.createProgram(src, "bad.cu", [], [])
    with pytest.raises(Exception):
        nvrtc.compileProgram(prog, [NVRTC_ARCH])


def test_every_kernel_body_compiles_with_nvrtc(monkeypatch):
    """Without a GPU: each fused kernel's CUDA code (as CuPy would wrap it) compiles, float and double.

    CuPy compiles a kernel only at its first launch, on a device; this catches a syntax or type error
    in a kernel body on machines without one (CI), as long as NVRTC itself is installed.
    """
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12): the CUDA kernels' "
                    "sources cannot be compiled on this machine")
    built, sites = _record_kernels(monkeypatch)
    root = Path(cuda.__file__).resolve().parents[1]
    defined = {(path.resolve(), number) for path in root.rglob("*.py")
               for number, line in enumerate(path.read_text().splitlines(), start=1)
               if re.search(r"\.(?:Elementwise|Reduction)Kernel\(", line)}
    assert defined and defined == sites, ("every place in npmask/ that builds a CUDA kernel must be "
                                          f"built by this test: not covered {defined - sites}")
    for spec, preamble in built:
        kind, in_params, out_params, body = spec[:4]
        for T in ("float", "double"):
            src = _kernel_source(kind, in_params, out_params, body, *spec[4:], T=T, preamble=preamble)
            prog = nvrtc.createProgram(src, f"{spec[-1]}.cu", [], [])
            try:
                nvrtc.compileProgram(prog, [NVRTC_ARCH])
            except Exception as err:
                raise AssertionError(f"{spec[-1]} ({T}) does not compile:\n{nvrtc.getProgramLog(prog)}\n{src}") from err


# ----------------------------------------------------------------- CuPy's own generated source
# CuPy writes a kernel's CUDA source in Python-callable functions that need no device (CuPy 14:
# cupy/_core/_kernel.pyx _get_elementwise_kernel_code, cupy/_core/_reduction.pyx
# _ReductionKernel_get_cached_function_code), from the argument descriptions (_ArgInfo) and the
# type map (_TypeMap) that a call would make. Compiled with NVRTC after CuPy's headers
# (cupy/_core/core.pyx compile_with_cache: _cupy_header_list, assemble_cupy_compiler_options),
# this is the code a GPU would compile: it catches what the hand-made harness above cannot
# (a local that clashes with one of CuPy's generated identifiers, e.g. ``T i`` against the loop
# index ``i``, or a name that clashes with CuPy's headers or macros; a *parameter* named ``i``
# CuPy itself refuses when the kernel object is built). These are CuPy internals: if they change, the test skips.
_NDARRAY, _INDEXER, _SCALAR = 1, 2, 3           # cupy/_core/_kernel.pxd: enum _ArgKind


def _cupy_generated_source(cp, kind, args, kwargs, dtype, scalars=False):
    """CuPy's source for a call with T = dtype: fixed-type parameters (int32) as scalars, as npmask
    passes them (raw ones as arrays); T inputs as arrays, or with ``scalars`` all but the first as scalars (the two
    declare a parameter differently: a function parameter, or a reference into ``_raw_<name>``)."""
    from cupy._core import _carray, _kernel, _reduction, _scalar
    dtype = np.dtype(dtype)

    def info(p, ndim, first=False):
        if p.raw and p.dtype is not None:          # a raw array of a fixed type (Adam's addresses)
            return _kernel._ArgInfo(_NDARRAY, cp.ndarray, p.dtype, 1, True, True)
        if p.dtype is not None or (scalars and not first):
            return _kernel._ArgInfo(_SCALAR, _scalar.CScalar, p.dtype or dtype, 0, True, True)
        return _kernel._ArgInfo(_NDARRAY, cp.ndarray, dtype, ndim, False, True)

    if kind == "elementwise":
        k = cp.ElementwiseKernel(*args, **kwargs)
        infos = (tuple(info(p, 3, i == 0) for i, p in enumerate(k.in_params))
                 + tuple(_kernel._ArgInfo(_NDARRAY, cp.ndarray, p.dtype or dtype, 3, True, True)
                         for p in k.out_params)
                 + (_kernel._ArgInfo(_INDEXER, _carray.Indexer, None, 3, True, True),))
        type_map = _kernel._TypeMap((("T", dtype),))
        return k.name, _kernel._get_elementwise_kernel_code(
            infos, type_map, k.params, k.operation, k.name, k.preamble, **k.kwargs)
    r = cp.ReductionKernel(*args, **kwargs)
    infos = (tuple(info(p, 3, i == 0) for i, p in enumerate(r.in_params))
             + tuple(_kernel._ArgInfo(_NDARRAY, cp.ndarray, p.dtype or dtype, 1, True, True)
                     for p in r.out_params)
             + (_kernel._ArgInfo(_INDEXER, _carray.Indexer, None, 3, True, True),
                _kernel._ArgInfo(_INDEXER, _carray.Indexer, None, 1, True, True),
                _kernel._ArgInfo(_SCALAR, _scalar.CScalar, np.dtype(np.int32), 0, True, True)))
    type_map = _kernel._TypeMap((("T", dtype.type), ("IndexT", "int32")))
    return r.name, _reduction._ReductionKernel_get_cached_function_code(
        r.nin, r.nout, r._params, infos, type_map, r.name, 256, r.reduce_type, r.identity,
        r.map_expr, r.reduce_expr, r.post_map_expr, r.preamble, r.options)


def test_cupys_own_kernel_sources_compile_with_nvrtc(monkeypatch):
    """Without a GPU: the source CuPy itself generates for every npmask kernel compiles, float and
    double (see the comment above); a probe kernel of CuPy's own shape must compile first."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC is not installed: the CUDA kernels' sources cannot be compiled here")
    cp = pytest.importorskip("cupy")
    try:
        from cupy._core import core
        header = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
        options = list(core.assemble_cupy_compiler_options(())) + [NVRTC_ARCH]
        probe = _cupy_generated_source(cp, "elementwise", ("T x", "T y", "y = x", "probe"), {},
                                       np.float32)
        probe_sum = _cupy_generated_source(cp, "reduction", ("T x", "T out", "x", "a + b", "out = a",
                                                             "0", "probe_sum"), {}, np.float32)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"CuPy's internal code generator is not as in CuPy 14 ({err!r})")

    def compile_(name, code):
        prog = nvrtc.createProgram(header + code, f"{name}.cu", [], [])
        try:
            nvrtc.compileProgram(prog, options)
            return None
        except Exception:
            return nvrtc.getProgramLog(prog)
    log = compile_(*probe) or compile_(*probe_sum)
    if log is not None:
        pytest.skip(f"CuPy's headers do not compile with this NVRTC (no CUDA headers?):\n{log[:2000]}")
    bad = _cupy_generated_source(cp, "elementwise", ("T x", "T y", "T i = x; y = i;", "bad"), {},
                                 np.float32)
    assert compile_(*bad) is not None, "a local named i (CuPy's loop index) must not compile"

    real = (cp.ElementwiseKernel, cp.ReductionKernel)
    _record_kernels(monkeypatch)
    monkeypatch.setattr(cp, "ElementwiseKernel", real[0])
    monkeypatch.setattr(cp, "ReductionKernel", real[1])
    records = _record_kernels.records
    assert len(records) >= 10
    for kind, args, kwargs in records:
        for dtype, scalars in ((np.float32, False), (np.float64, False), (np.float32, True)):
            name, code = _cupy_generated_source(cp, kind, args, kwargs, dtype, scalars)
            log = compile_(name, code)
            assert log is None, (f"{name} ({np.dtype(dtype)}, scalars={scalars}) does not "
                                 f"compile:\n{log}\n{code}")


def _eval_body(body, ns):
    """A kernel body of statements ``[T ]name = expression;`` (// comments) evaluated with NumPy."""
    for statement in filter(None, (s.split("//")[0].strip() for s in body.splitlines())):
        statement = statement.rstrip(";").removeprefix("T ")
        target, expr = (p.strip() for p in statement.split("=", 1))
        ns[target] = eval(expr, {"__builtins__": {}, "sqrt": np.sqrt}, ns)
    return ns


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_kernel_body_is_adams_arithmetic(weight_decay):
    """Without a GPU: the Adam kernel's body, evaluated in float32 with the arguments
    Adam._update passes, gives _arithmetic's bits (a GPU may still contract into FMAs)."""
    from npmask.optim import Adam
    from npmask.optim import cuda as optim_cuda
    rng = np.random.default_rng(0)
    p0, g = (rng.standard_normal(50).astype(np.float32) for _ in range(2))
    m0, v0 = rng.standard_normal(50).astype(np.float32), rng.uniform(0, 1, 50).astype(np.float32)
    opt = Adam([], lr=1e-3, betas=(0.9, 0.999), weight_decay=weight_decay)
    step_size, bias2 = opt._scalars("w", 3)
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    opt._arithmetic(np, p, g, m, v, step_size, bias2)
    T, (b1, b2) = np.float32, opt.betas
    ns = _eval_body(optim_cuda.ADAM_BODY, dict(
        g=g, step_size=T(step_size), b1=T(b1), b2=T(b2), c1=T(1 - b1), c2=T(1 - b2),
        bias2=T(bias2), eps=T(opt.eps), wd=T(weight_decay), p=p0.copy(), m=m0.copy(), v=v0.copy()))
    for name, want in (("m", m), ("v", v), ("p", p)):
        assert ns[name].dtype == np.float32 and np.array_equal(ns[name], want), name
