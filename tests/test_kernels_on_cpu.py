"""The CPU runner of CUDA kernels (tests/cuda_on_cpu.py) and the kernels no other file runs with it.

The runner is what lets the fused kernels' own C run in CI without a GPU (the transform kernels in
test_cuda_kernels.py, batch norm's in test_batchnorm_cuda.py, im2col/col2im in test_conv_cuda.py),
so it is checked first: it follows CuPy's calling rules where npmask relies on them (T from the
arrays, scalars cast, broadcasting, given outputs written in place, const inputs, reduction axes),
gives NumPy's numbers for simple kernels, and its FMA build really fuses. Then: Adam's kernel
through Adam's own CuPy branch, the same bits as the NumPy path; batch norm's channel dot; and
training steps with every fused kernel of the CuPy path in C at once.
"""
from __future__ import annotations

import cuda_on_cpu
import numpy as np
import pytest
from test_conv_cuda import _bits, _masked_wrn_steps
from test_graph_step import _assert_same_state, _train

from npmask import config
from npmask.masking import cuda as masking_cuda
from npmask.nn import batchnorm, batchnorm_cuda, conv_cuda
from npmask.optim import Adam, optimizers
from npmask.optim import cuda as optim_cuda

pytestmark = pytest.mark.skipif(not cuda_on_cpu.available(), reason=str(cuda_on_cpu.skip_reason()))

ElementwiseKernel, ReductionKernel = cuda_on_cpu.ElementwiseKernel, cuda_on_cpu.ReductionKernel


# ------------------------------------------------------------------------------------ the runner
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_broadcasts_casts_scalars_and_allocates_the_output(dtype):
    k = ElementwiseKernel("T x, T a, T col, int32 n", "T y", "y = a * x + col * n;", "probe")
    rng = np.random.default_rng(0)
    x, col = rng.standard_normal((2, 3, 4)).astype(dtype), rng.standard_normal((1, 3, 1)).astype(dtype)
    y = k(x, 0.1, col, 3)                           # a Python float cast to T, as CuPy's CScalar
    assert y.dtype == dtype and y.shape == x.shape
    t = np.dtype(dtype).type
    assert np.array_equal(_bits(y), _bits(t(0.1) * x + col * t(3)))


def test_elementwise_several_outputs_given_in_place_and_read_modify_write():
    k = ElementwiseKernel("T g, T lr", "T p, T m", "m = (T)0.5 * m + g; p = p - lr * m;", "probe2")
    g = np.arange(5, dtype=np.float32)
    p, m = np.ones(5, np.float32), np.full(5, 2, np.float32)
    out = k(g, np.float32(0.25), p, m)
    assert out[0] is p and out[1] is m                      # written where they are, returned
    assert np.array_equal(m, 1 + g) and np.array_equal(p, 1 - 0.25 * (1 + g))


def test_elementwise_raw_input_indexed_by_the_body_and_the_loop_index():
    k = ElementwiseKernel("raw T x, int32 n", "T y", "y = x[n - 1 - i] + i;", "reverse")
    x = np.arange(6, dtype=np.float64) * 10
    y = np.empty(6)
    k(x, 6, y)
    assert np.array_equal(y, x[::-1] + np.arange(6))


def test_elementwise_refuses_what_cupy_refuses():
    k = ElementwiseKernel("T x, T a", "T y", "y = a * x;", "probe3")
    x32, x64 = np.ones(3, np.float32), np.ones(3, np.float64)
    with pytest.raises(TypeError, match="Type is mismatched"):
        k(x32, x64)                                 # two arrays for one T
    with pytest.raises(TypeError, match="Type is mismatched"):
        k(x32, 1.0, np.empty(3, np.float64))        # an output of another dtype
    with pytest.raises(ValueError, match="Out shape is mismatched"):
        k(np.ones((2, 3), np.float32), 1.0, np.empty((1, 3), np.float32))
    with pytest.raises(ValueError):
        k(x32, 1.0, np.empty(4, np.float32))        # not broadcastable
    with pytest.raises(TypeError, match="Wrong number of arguments"):
        k(x32)
    with pytest.raises(ValueError, match="Loop size is undecided"):
        k(1.0, 2.0)
    n = ElementwiseKernel("T x, int32 n", "T y", "y = x * n;", "probe4")
    with pytest.raises(OverflowError):
        n(x32, 2 ** 31)                             # CuPy's PyArray_Pack raises too
    with pytest.raises(ValueError, match="Unknown keyword"):
        ElementwiseKernel("const T x", "T y", "y = x;", "probe5")


def test_int32_parameters_refuse_floats_and_bools_stricter_than_cupy():
    """CuPy would truncate 2.5 to 2; npmask's host code always passes ints, and the runner holds
    it to that."""
    n = ElementwiseKernel("T x, int32 n", "T y", "y = x * n;", "probe4")
    for bad in (2.5, True, np.float32(2)):
        with pytest.raises(TypeError):
            n(np.ones(3, np.float32), bad)


def test_scalars_are_weak_and_cast_to_t():
    """A NumPy float64 scalar with float32 arrays is cast to float32 (only arrays decide T)."""
    k = ElementwiseKernel("T x, T a", "T y", "y = a * x;", "probe6")
    x = np.random.default_rng(7).standard_normal(9).astype(np.float32)
    y = k(x, np.float64(0.1))
    assert y.dtype == np.float32 and np.array_equal(_bits(y), _bits(np.float32(0.1) * x))


def test_outputs_take_part_in_broadcasting_and_non_contiguous_ones_are_written_back():
    k = ElementwiseKernel("T x", "T y", "y = x + i;", "probe7")
    x = np.arange(3, dtype=np.float64)
    y = k(x, np.empty((2, 3)))                      # the output's shape drives the loop
    assert np.array_equal(y, [[0, 2, 4], [3, 5, 7]])
    big = np.zeros((2, 6))
    k(x, big[:, ::2])
    assert np.array_equal(big[:, ::2], [[0, 2, 4], [3, 5, 7]]) and not big[:, 1::2].any()


def test_an_array_both_input_and_output_is_one_memory_or_refused():
    k = ElementwiseKernel("T x", "T y", "y = x + 1; y = y + x;", "alias")
    a = np.ones(4)
    k(a, a)                                         # x and y are the same element: 2, then 4
    assert np.array_equal(a, np.full(4, 4.0))
    b = np.ones((2, 4))
    with pytest.raises(NotImplementedError, match="overlaps"):
        k(b[:, ::2], b[:, ::2])


def test_scalars_and_raw_inputs_are_read_only_as_in_cupy():
    """CuPy passes a scalar as a const kernel parameter and a raw input as a const CArray: a body
    writing either does not compile there, nor here. A body may still shadow a scalar."""
    with pytest.raises(cuda_on_cpu.CompileError):
        ElementwiseKernel("T x, T a", "T y", "a = a * 2; y = a * x;", "writes_scalar")(np.ones(2), 1.0)
    with pytest.raises(cuda_on_cpu.CompileError):
        ElementwiseKernel("raw T x", "T y", "x[i] = 1; y = x[i];", "writes_raw")(np.ones(2), np.empty(2))
    y = ElementwiseKernel("T x, T a", "T y", "T a = 3; y = a * x;", "shadows_scalar")(np.ones(2), 1.0)
    assert np.array_equal(y, [3, 3])


def test_inputs_are_const_and_bad_code_does_not_compile():
    """CuPy declares a non-raw input ``const T &x``: a body that writes it must fail as on a GPU."""
    with pytest.raises(cuda_on_cpu.CompileError, match="read-only|assignment of"):
        ElementwiseKernel("T x", "T y", "x = 1; y = x;", "writes_input")(np.ones(2))
    with pytest.raises(cuda_on_cpu.CompileError):
        ElementwiseKernel("T x", "T y", "y = not_a_function(x);", "bad")(np.ones(2))


@pytest.mark.parametrize("body", ["T i = x; y = i;", "T x = 2; y = x;", "T y = 1;"])
def test_a_local_named_like_the_index_or_a_parameter_does_not_compile(body):
    """The body shares the scope of the loop index ``i`` and of the parameters' declarations, as in
    CuPy's generated code: redeclaring one is an error there, and here."""
    with pytest.raises(cuda_on_cpu.CompileError, match="redeclar|conflicting|shadows"):
        ElementwiseKernel("T x", "T y", body, "shadow")(np.ones(2))
    ElementwiseKernel("T x", "T y", "T z = x; y = z;", "no_shadow")(np.ones(2))


@pytest.mark.parametrize("axis", [None, 0, (0, 2), (1,), (2, 0), -1])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduction_axes_scalars_and_broadcasting(axis, keepdims):
    k = ReductionKernel("T x, T c, T s", "T out", "(x - c) * s", "a + b", "out = a", "0", "centred")
    rng = np.random.default_rng(1)
    x, c = rng.standard_normal((3, 4, 5)), rng.standard_normal((1, 4, 1))
    got = k(x, c, 2.0, axis=axis, keepdims=keepdims)
    want = ((x - c) * 2.0).sum(axis=axis, keepdims=keepdims)
    assert got.shape == want.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_reduction_refuses_bad_axes_and_takes_a_fixed_output_type():
    k = ReductionKernel("T x", "T out", "x", "a + b", "out = a", "0", "plain_sum")
    x = np.ones((2, 3, 4))
    for bad in (3, -4, (0, 3)):
        with pytest.raises(getattr(np, "exceptions", np).AxisError):
            k(x, axis=bad)
    with pytest.raises(ValueError, match="duplicate"):
        k(x, axis=(1, -2))
    f = ReductionKernel("T x", "float32 out", "x", "a + b", "out = a", "0", "to_float32")
    got = f(x, axis=(0, 2))
    assert got.dtype == np.float32 and np.array_equal(got, np.full(3, 8, np.float32))


def test_reduction_identity_post_map_and_a_given_output():
    k = ReductionKernel("T x", "T out", "x", "max(a, b)", "out = a * 2", "-1000", "max2", preamble=
                        "template <typename U> U max(U a, U b) { return a > b ? a : b; }")
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    out = np.empty(6, np.float32)
    assert k(x, axis=0, out=out) is out
    assert np.array_equal(out, x.max(axis=0) * 2)
    assert np.array_equal(k(np.empty((0, 3), np.float32), axis=0), np.full(3, -2000, np.float32))


def test_the_runner_catches_a_wrong_body():
    """A mutation of a body changes the numbers: the runner really runs the code it is given."""
    x = np.linspace(-1, 1, 7)
    right = ElementwiseKernel("T x", "T y", "y = x >= 0 ? x : (T)0;", "relu")(x)
    wrong = ElementwiseKernel("T x", "T y", "y = x > 0 ? x : (T)0.5;", "relu_wrong")(x)
    assert np.array_equal(right, np.maximum(x, 0)) and not np.array_equal(wrong, right)


@pytest.mark.skipif(not cuda_on_cpu.fma_available(), reason="no x86-64 CPU with FMA here")
def test_the_fma_build_really_fuses():
    """The "c-on-cpu-fma" runs elsewhere check tolerances against fused arithmetic: they would
    prove nothing if the compiler did not fuse. Plain build: NumPy's two roundings; FMA build:
    one rounding, which differs on some entries and is never further from the exact value."""
    rng = np.random.default_rng(6)
    a, x, b = (rng.standard_normal(2000).astype(np.float32) for _ in range(3))
    body = ("T x, T a, T b", "T y", "y = a * x + b;", "axpb")
    plain = cuda_on_cpu.fake_cupy().ElementwiseKernel(*body)(x, a, b)
    fused = cuda_on_cpu.fake_cupy(fma=True).ElementwiseKernel(*body)(x, a, b)
    assert np.array_equal(_bits(plain), _bits(a * x + b))
    exact = a.astype(np.float64) * x + b
    assert (fused != plain).sum() > 10
    assert np.all(np.abs(fused - exact) <= np.abs(plain - exact))


# ------------------------------------------------------------------------------------ Adam
class _NotNumPy:
    """NumPy under another name: Adam's ``get_array_module(p) is not np`` test then takes its
    CuPy branch (the fused kernel) for NumPy arrays."""
    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_kernel_through_adams_cupy_branch_gives_the_numpy_bits(weight_decay, dtype, monkeypatch):
    """Adam._update's CuPy branch with the kernel's C on the CPU: the host code's arguments (the
    scalars of p's dtype, 1 - beta rounded once) and the body, three steps, the same bits as the
    NumPy path. (A GPU may contract a * b + c into one rounding; this runner does not.)"""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(40).astype(dtype)
    grads = [rng.standard_normal(40).astype(dtype) for _ in range(3)]

    def run():
        p = p0.copy()
        opt = Adam([], lr=1e-3, betas=(0.9, 0.999), weight_decay=weight_decay)
        state = {}
        for g in grads:
            opt._update("w", p, g, state)
        return p, state["exp_avg"], state["exp_avg_sq"]
    want = run()
    cuda_on_cpu.build(monkeypatch, optim_cuda, "adam_kernel")
    calls = []
    kernel = optim_cuda.adam_kernel()
    monkeypatch.setattr(optim_cuda, "adam_kernel", lambda: lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(optimizers, "get_array_module", lambda *a: _NotNumPy())
    got = run()
    assert len(calls) == 3
    for name, a, b in zip(("p", "m", "v"), got, want):
        assert a.dtype == dtype and np.array_equal(_bits(a), _bits(b)), name


def test_adam_kernel_reads_device_scalars_as_it_reads_scalars(monkeypatch):
    """The captured step passes step_size and bias2 as 0-d arrays (npmask.optim.device): the
    kernel gives the same bits as with scalars."""
    kernel = cuda_on_cpu.build(monkeypatch, optim_cuda, "adam_kernel")
    rng = np.random.default_rng(4)
    g, p = rng.standard_normal(30).astype(np.float32), rng.standard_normal(30).astype(np.float32)
    m, v = rng.standard_normal(30).astype(np.float32), rng.uniform(0, 1, 30).astype(np.float32)
    t = np.float32
    fixed = (t(0.9), t(0.999), t(1 - 0.9), t(1 - 0.999))
    results = []
    for step_size, bias2 in ((t(1e-3 / 0.19), t(0.0447)), (np.array(1e-3 / 0.19, t), np.array(0.0447, t))):
        state = [a.copy() for a in (p, m, v)]
        kernel(g, step_size, *fixed, bias2, t(1e-8), t(1e-4), *state)
        results.append(state)
    for a, b in zip(*results):
        assert np.array_equal(_bits(a), _bits(b))


def _adam_in_c(monkeypatch):
    """Adam's CuPy branch for NumPy arrays (addresses as NumPy's), both its kernels' C on the CPU;
    returns the one-launch kernel."""
    monkeypatch.setattr(optimizers, "get_array_module", lambda *a: _NotNumPy())
    monkeypatch.setattr(optim_cuda, "address", lambda a: a.ctypes.data)
    cuda_on_cpu.build(monkeypatch, optim_cuda, "adam_kernel")
    return cuda_on_cpu.build(monkeypatch, optim_cuda, "adam_all_kernel")


def _adam_run(weight_decay, dtype, steps=4):
    """Parameters and moments after Adam's steps on three parameters: one frozen for the third
    step (the others in one launch), then unfrozen and the state saved and loaded (step counts
    differ: one launch each)."""
    from npmask.nn.module import Module
    rng = np.random.default_rng(5)
    m = Module()
    for i, shape in enumerate([(3, 4), (7,), (2, 2, 5)]):
        m.register_param(f"w{i}", rng.standard_normal(shape).astype(dtype))
    opt = Adam(m.parameters(), lr=1e-2, weight_decay=weight_decay)
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in m.params.values()] for _ in range(steps)]
    for n, step_grads in enumerate(grads):
        if n == 2:
            m.freeze("w1")
        if n == 3:
            m.unfreeze("w1")
            opt.load_state_dict(opt.state_dict())
        opt.zero_grad()
        for name, value in zip(m.params, step_grads):
            if name in m.grads:
                m.grads[name] += value
        opt.step()
    return {k: v.copy() for k, v in m.params.items()}, {k: {b: np.array(x) for b, x in st.items()}
                                                        for k, st in opt.state.items()}


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_in_one_launch_gives_the_numpy_bits(weight_decay, dtype, monkeypatch):
    """Every parameter of the optimiser in one launch (the flat gradients of zero_grad, flat
    moments beside them, the parameters found by their addresses): the NumPy path's bits, over
    steps with a parameter frozen, unfrozen and the state saved and loaded in between."""
    want = _adam_run(weight_decay, dtype)
    kernel = _adam_in_c(monkeypatch)
    calls = []
    monkeypatch.setattr(optim_cuda, "adam_all_kernel", lambda: lambda *a: calls.append(a[3]) or kernel(*a))
    got = _adam_run(weight_decay, dtype)
    assert calls == [3, 3, 2]              # several parameters per launch; the last step: one each
    for name in want[0]:
        assert np.array_equal(_bits(got[0][name]), _bits(want[0][name])), name
    assert want[1].keys() == got[1].keys()
    for name in want[1]:
        for key in want[1][name]:
            assert np.array_equal(got[1][name][key], want[1][name][key]), (name, key)


# ------------------------------------------------------------------------------------ batch norm's dot
def test_channel_dot_kernel_is_the_einsum(monkeypatch):
    kernel = cuda_on_cpu.build(monkeypatch, batchnorm, "_cupy_dot_kernel")
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((6, 4, 9)), rng.standard_normal((6, 4, 9))
    np.testing.assert_allclose(kernel(a, b, axis=(0, 2)), np.einsum("ncl,ncl->c", a, b), rtol=1e-13)
    monkeypatch.setattr(batchnorm, "get_array_module", lambda *arrays: _NotNumPy())
    np.testing.assert_allclose(batchnorm._channel_dot(a, b), np.einsum("ncl,ncl->c", a, b), rtol=1e-13)


# ------------------------------------------------------------------------------------ all at once
def test_training_steps_with_every_cuda_kernel_in_c(monkeypatch):
    """A masked WRN's training steps with every fused kernel of the CuPy path running its C on
    the CPU at once (mask transform, batch norm + ReLU (+ residual), im2col/col2im, Adam), each
    taken where the CuPy path takes it: the losses and the final state agree with the NumPy path
    to float32 rounding, and every kind of kernel ran."""
    with config.using(folded_rows=False):
        want_losses, want = _masked_wrn_steps(False, "full")
    ran = set()

    def count(f, name):
        return lambda *a, **kw: ran.add(name) or f(*a, **kw)

    def counted(kernels, prefix):
        return {k: count(f, f"{prefix}.{k}") for k, f in kernels.items()}
    mask = counted(cuda_on_cpu.build(monkeypatch, masking_cuda), "mask")
    monkeypatch.setattr(masking_cuda, "kernels", lambda: mask)
    monkeypatch.setattr(masking_cuda, "applies", lambda *arrays: True)
    bn = counted(cuda_on_cpu.build(monkeypatch, batchnorm_cuda), "bn")
    monkeypatch.setattr(batchnorm_cuda, "kernels", lambda: bn)
    monkeypatch.setattr(batchnorm_cuda, "applies",
                        lambda *arrays: all(a is None or a.dtype == arrays[0].dtype for a in arrays))
    conv = counted(cuda_on_cpu.build(monkeypatch, conv_cuda), "conv")
    monkeypatch.setattr(conv_cuda, "kernels", lambda: conv)
    monkeypatch.setattr(conv_cuda, "enabled", lambda xp: config.settings.cuda_conv_kernels)
    adam = _adam_in_c(monkeypatch)
    monkeypatch.setattr(optim_cuda, "adam_all_kernel", lambda: lambda *a: ran.add("adam") or adam(*a))
    with config.using(folded_rows=False):
        got_losses, got = _masked_wrn_steps(True, "full")
    assert {"mask.forward", "mask.grad_r", "mask.sums", "bn.forward", "bn.backward", "bn.sum",
            "bn.grads_into", "conv.im2col", "conv.col2im", "adam"} <= ran, sorted(ran)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_graph_step_with_adams_kernel_in_c_trains_bit_for_bit_as_train_step(monkeypatch):
    """The CUDA-graph step hands Adam its step size and bias correction as 0-d device arrays
    (npmask.optim.device), rewritten in place before every replay; with Adam's kernel in C taking
    them (GraphStep's NumPy emulation of capture and replay around it), the training is the plain
    NumPy loop's, bit for bit, over a change of learning rate."""
    plain, plain_state, _ = _train("plain")
    adam = _adam_in_c(monkeypatch)
    scalars = []

    def kernel(*args):
        scalars.append((type(args[4]), type(args[9])))        # step_size, bias2
        return adam(*args)
    monkeypatch.setattr(optim_cuda, "adam_all_kernel", lambda: kernel)
    steps, state, step = _train("graph")
    assert step.steps["replayed"] > 0 and scalars
    assert set(scalars) == {(np.ndarray, np.ndarray)}          # the device scalars, not floats
    assert steps == plain
    _assert_same_state(state, plain_state)
