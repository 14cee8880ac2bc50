"""The fused batch-norm CUDA kernels (npmask/nn/batchnorm_cuda.py): run on the CPU here, compared on a GPU.

Without a GPU, two ways (fixture ``emulated``): the kernel bodies are written in a subset of C that
is also Python (statements ``name = expression;``, ``T`` locals, two helper functions), so this
file builds the very same kernels as NumPy emulations (ElementwiseKernel: the body evaluated with
NumPy broadcasting; ReductionKernel: the map expression summed over the axes); and the kernels'
own C, preamble included, compiled for the CPU and called as CuPy calls it (tests/cuda_on_cpu.py).
Either way npmask's host code, the batch norm's dispatch and whole networks run through them,
against the NumPy path. That checks the formulas, the (1, C, 1) broadcasting, the reduction axes
and the argument order; tests/test_cuda_kernels.py checks that every body compiles with NVRTC.
With a GPU: the real kernels against NumPy.
"""
from __future__ import annotations

import re
import types

import cuda_on_cpu
import numpy as np
import pytest

from npmask import models, nn
from npmask.backend import cupy_available, to_device, to_numpy
from npmask.nn import batchnorm_cuda

needs_gpu = pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a usable CUDA device")


def _params(text):
    return [tuple(p.split()) for p in text.split(",")]


def _helpers(dtype):
    def relu_if(on, v):
        return np.where(v < 0, dtype.type(0), v) if on else v

    def mask_if(on, y):
        return (y > 0).astype(dtype) if on else dtype.type(1)
    return {"npmask_relu_if": relu_if, "npmask_mask_if": mask_if, "sqrt": np.sqrt}


def _bind(params, args):
    """The kernel's T (CuPy: from the array arguments, all of one dtype) and the named values."""
    dtypes = {a.dtype for (t, _), a in zip(params, args) if t == "T" and isinstance(a, np.ndarray)}
    assert len(dtypes) == 1, f"CuPy would reject T arrays of dtypes {dtypes}"
    dtype = dtypes.pop()
    values = {}
    for (t, name), a in zip(params, args):
        if t == "int32":
            assert isinstance(a, (int, np.integer)) and not isinstance(a, bool)
            values[name] = np.int32(a)
        elif isinstance(a, np.ndarray):
            values[name] = a
        else:
            values[name] = dtype.type(a)
    return dtype, values


class _Elementwise:
    def __init__(self, in_params, out_params, body, name, preamble=""):
        self.ins, self.outs, self.body, self.name = _params(in_params), _params(out_params), body, name

    def __call__(self, *args):
        assert len(args) in (len(self.ins), len(self.ins) + len(self.outs)), self.name
        dtype, ns = _bind(self.ins, args[:len(self.ins)])
        given = args[len(self.ins):]
        shape = np.broadcast_shapes(*[a.shape for a in args if isinstance(a, np.ndarray)])
        for (_, name), out in zip(self.outs, given):
            assert out.shape == shape and out.dtype == dtype, (self.name, name)   # CuPy: exactly
            ns[name] = out.copy()
        assigned = set()
        for statement in filter(None, (s.strip() for s in self.body.split(";"))):
            statement = statement[2:] if statement.startswith("T ") else statement
            target, expr = (p.strip() for p in statement.split("=", 1))
            assert "=" not in expr and "?" not in expr, statement
            ns[target] = eval(expr, {"__builtins__": {}}, {**_helpers(dtype), **ns})
            assigned.add(target)
        results = []
        for i, (_, name) in enumerate(self.outs):
            assert name in assigned, f"{self.name} never writes {name}"
            value = np.broadcast_to(np.asarray(ns[name]), shape)
            assert np.asarray(ns[name]).dtype in (dtype, np.int64), (self.name, name)
            if given:
                given[i][...] = value
                results.append(given[i])
            else:
                results.append(value.astype(dtype))
        return results[0] if len(results) == 1 else tuple(results)


class _Reduction:
    def __init__(self, in_params, out_params, map_expr, reduce_expr, post, identity, name, preamble=""):
        assert (out_params, reduce_expr, post, identity) == ("T out", "a + b", "out = a", "0")
        self.ins, self.expr, self.name = _params(in_params), map_expr, name

    def __call__(self, *args, axis):
        assert len(args) == len(self.ins), self.name
        dtype, ns = _bind(self.ins, args)
        shape = np.broadcast_shapes(*[a.shape for a in args if isinstance(a, np.ndarray)])
        mapped = np.broadcast_to(eval(self.expr, {"__builtins__": {}}, {**_helpers(dtype), **ns}), shape)
        assert mapped.dtype == dtype, self.name
        return mapped.sum(axis=axis, dtype=dtype)


@pytest.fixture(params=["numpy-emulation", "c-on-cpu", "c-on-cpu-fma"])
def emulated(request, monkeypatch):
    """npmask's fused batch norm running its CUDA kernels on NumPy arrays: as NumPy emulations, or
    their own C compiled for the CPU (with "fma": a * b + c fused where the compiler can, as a GPU
    may, so the tolerances are known to hold for fused arithmetic too)."""
    if request.param == "numpy-emulation":
        fake_cupy = types.SimpleNamespace(ElementwiseKernel=_Elementwise, ReductionKernel=_Reduction)
    else:
        fma = request.param.endswith("fma")
        cuda_on_cpu.skip_unless_runnable(fma)
        fake_cupy = cuda_on_cpu.fake_cupy(fma=fma)
    monkeypatch.setattr(batchnorm_cuda, "_import_cupy", lambda: fake_cupy)
    kernels = batchnorm_cuda.kernels.__wrapped__()
    monkeypatch.setattr(batchnorm_cuda, "kernels", lambda: kernels)
    applies = batchnorm_cuda.applies
    state = types.SimpleNamespace(on=False, calls=0)   # on: NumPy arrays take the emulated kernels

    def emulate(*arrays):
        state.calls += state.on
        return state.on and all(a is None or a.dtype == arrays[0].dtype for a in arrays)
    monkeypatch.setattr(batchnorm_cuda, "applies", emulate)
    assert set(kernels) == set(batchnorm_cuda._ELEMENTWISE) | set(batchnorm_cuda._REDUCTIONS)
    assert not applies(np.zeros(3))                    # NumPy arrays never take the real kernels
    return state


def _bn(c, dtype, training, frozen, ndim=4):
    rng = np.random.default_rng(c)
    layer = (nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d)(c).astype(dtype)
    layer.params["weight"][...] = rng.uniform(0.5, 2, c)
    layer.params["bias"][...] = rng.standard_normal(c)
    layer.buffers["running_mean"][...] = rng.standard_normal(c)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2, c)
    if frozen:
        layer.freeze()
    else:                               # backward adds to the gradients already there
        layer.grads["weight"][...] = rng.standard_normal(c)
        layer.grads["bias"][...] = rng.standard_normal(c)
    return layer.train(training)


def _bn_run(layer, x, r, dy, relu):
    y = layer.forward(x, relu=relu, residual=r)
    out = layer.backward(dy)
    dx, d = out if r is not None else (out, None)
    return [y, dx, d, layer.grads.get("weight"), layer.grads.get("bias"),
            layer.buffers["running_mean"], layer.buffers["running_var"]]


def _problem(shape, dtype, residual, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype) if residual else None
    return x, r, rng.standard_normal(shape).astype(dtype)


def _close(got, want, dtype, float32_tol=None):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else (float32_tol or dict(rtol=1e-4, atol=1e-5))
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is not None:
            a = to_numpy(a)
            assert a.dtype == dtype and a.shape == b.shape, i
            np.testing.assert_allclose(a, b, err_msg=f"output {i}", **tol)


CASES = [(shape, training, frozen, relu, residual)
         for shape in [(4, 3, 5, 6), (7, 5), (2, 6, 1, 1)]
         for training in (True, False) for frozen in (False, True)
         for relu, residual in ((True, False), (True, True), (False, True), (False, False))]


@pytest.mark.parametrize("shape, training, frozen, relu, residual", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_emulated_kernels_give_the_numpy_path(emulated, shape, training, frozen, relu, residual, dtype):
    x, r, dy = _problem(shape, dtype, residual)
    want = [_ref_of(w) for w in _bn_run(_bn(shape[1], dtype, training, frozen, len(shape)), x, r, dy, relu)]
    emulated.on = True
    got = _bn_run(_bn(shape[1], dtype, training, frozen, len(shape)), x, r, dy, relu)
    assert emulated.calls == 1                              # the forward took the kernels
    _close(got, want, dtype)


def _ref_of(a):
    return None if a is None else a.copy()


@pytest.mark.parametrize("name, size, shortcut_bns", [("wrn10_1", 8, 3), ("resnet_bottleneck", 32, 4),
                                                      ("densenet", 32, 0)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False])
def test_emulated_kernels_run_whole_networks(emulated, name, size, shortcut_bns, dtype, training):
    """Every batch norm takes the kernels: those with a ReLU (and a residual sum) fused in, and a
    shortcut's, which has no ReLU after it."""
    norms = []

    def run():
        if name == "wrn10_1":
            net = models.create(name, num_classes=5, input_size=size, dtype=dtype, seed=0)
        elif name == "densenet":
            net = models.DenseNet(3, (2, 2, 2), num_init_features=4, bn_size=2, num_classes=3,
                                  input_size=size, dtype=dtype, rng=3)
        else:
            net = models.ResNet("bottleneck", (1, 2, 1, 1), num_classes=3, input_size=size, width=2,
                                dtype=dtype, rng=1)
        net.train(training)
        norms[:] = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm)]
        rng = np.random.default_rng(0)
        y = net.forward(rng.standard_normal((4, 3, size, size)).astype(dtype))
        dx = net.backward(rng.standard_normal(y.shape).astype(dtype))
        return ([y, dx] + [g.copy() for _, m in net.named_modules() for _, g in sorted(m.grads.items())]
                + [b.copy() for _, b in net.named_buffers()])
    want = run()
    emulated.on = True
    got = run()
    assert emulated.calls == len(norms)                     # every batch norm took the kernels
    assert len([n for n in norms if "shortcut" in n or "downsample" in n]) == shortcut_bns
    # float32: the deepest stages normalise 4 values per channel (1x1 maps), which magnifies the
    # rounding of sums taken in another order; float64 checks the formulas to 1e-10
    _close(got, want, dtype, float32_tol=dict(rtol=1e-3, atol=2e-4))


def test_kernel_arithmetic_is_the_emulated_subset():
    """Every body keeps to what the emulation evaluates: no C-only syntax to drift apart."""
    texts = [body for _, _, body in batchnorm_cuda._ELEMENTWISE.values()]
    texts += [expr for _, expr in batchnorm_cuda._REDUCTIONS.values()]
    for text in texts:
        assert not re.search(r"\?|\(T\)|&&|\|\||==|\bif\b|\bfor\b|\[", text), text


# ---------------------------------------------------------------------------------- on a GPU
@needs_gpu
@pytest.mark.parametrize("shape, training, frozen, relu, residual", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpu_fused_batchnorm_matches_numpy(shape, training, frozen, relu, residual, dtype, monkeypatch):
    calls = []
    forward = batchnorm_cuda.forward
    monkeypatch.setattr(batchnorm_cuda, "forward", lambda *a: calls.append(1) or forward(*a))
    x, r, dy = _problem(shape, dtype, residual)
    want = [_ref_of(w) for w in _bn_run(_bn(shape[1], dtype, training, frozen, len(shape)), x, r, dy, relu)]
    gpu = lambda a: None if a is None else to_device(a, "cupy")  # noqa: E731
    layer = _bn(shape[1], dtype, training, frozen, len(shape)).to("cupy")
    got = _bn_run(layer, gpu(x), gpu(r), gpu(dy), relu)
    assert calls == [1]
    _close(got, want, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False])
def test_gpu_fused_wrn_matches_numpy(dtype, training, monkeypatch):
    calls = []
    forward = batchnorm_cuda.forward
    monkeypatch.setattr(batchnorm_cuda, "forward", lambda *a: calls.append(1) or forward(*a))

    def run(backend):
        net = models.create("wrn10_1", num_classes=5, input_size=8, dtype=dtype, seed=0).train(training)
        if backend == "cupy":
            net.to("cupy")
        rng = np.random.default_rng(0)
        x = to_device(rng.standard_normal((4, 3, 8, 8)).astype(dtype), backend)
        y = net.forward(x)
        dx = net.backward(to_device(rng.standard_normal(y.shape).astype(dtype), backend))
        return [to_numpy(a) for a in [y, dx] + [g for _, m in net.named_modules()
                                                for _, g in sorted(m.grads.items())]]
    want = run("numpy")
    assert not calls
    got = run("cupy")
    assert len(calls) == 10            # every batch norm of wrn10_1 took the kernels (as emulated):
                                       # 7 with a ReLU fused in, the 3 shortcuts' without
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-3, atol=1e-4)
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, err_msg=f"output {i}", **tol)
