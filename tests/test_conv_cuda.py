"""The one-kernel im2col and col2im (npmask/nn/conv_cuda.py, ``settings.cuda_conv_kernels``).

Without a GPU: each kernel's index arithmetic is emulated with NumPy (a vectorised function over
all output indices i, mirroring the kernel body line by line, and checked to spell every statement
of the body) and compared bit for bit with the readable im2col / col2im of npmask/nn/conv.py on
many shapes; the host code (conv_cuda's wrappers, which layout, which chunk, where the result goes)
runs with the emulations in place of the kernel objects, against the readable convolution and in
masked WRN training steps. The kernels' own C, compiled for the CPU (tests/cuda_on_cpu.py), takes
the emulations' place in the same host-code tests and is compared bit for bit with the readable
functions. tests/test_cuda_kernels.py compiles both kernels with NVRTC. With a GPU: the real
kernels against the readable functions, convolutions with the setting on and off (the same
bits), and training steps of a masked WRN with it on and off (the same bits).
"""
from __future__ import annotations

import inspect
import itertools
import re

import cuda_on_cpu
import numpy as np
import pytest

from npmask import config, models
from npmask.backend import cupy_available, to_device, to_numpy
from npmask.nn import conv, conv_cuda

needs_gpu = pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a usable CUDA device")


def emulate_im2col(x, kh, kw, s, ph, pw, ho, wo, r):
    """conv_cuda.IM2COL_BODY for every i at once (C's / and % on non-negative ints: // and %)."""
    m, c, h, w = x.shape
    x = x.ravel()
    i = np.arange(c * kh * kw * m * ho * r)
    k = i
    cols_row = k // (m * ho * r)
    cols_col = k % (m * ho * r)
    jj = cols_col % r
    oi = (cols_col // r) % ho
    img = cols_col // (r * ho)
    v = cols_row % kw
    u = (cols_row // kw) % kh
    ch = cols_row // (kw * kh)
    a = s * oi + u - ph
    b = s * jj + v - pw
    inside = (jj < wo) & (a >= 0) & (a < h) & (b >= 0) & (b < w)
    cols = np.where(inside, x[np.where(inside, ((img * c + ch) * h + a) * w + b, 0)], x.dtype.type(0))
    return cols.reshape(c * kh * kw, m * ho * r)


def emulate_col2im(dcols, shape, kh, kw, s, ph, pw, ho, wo, r):
    """conv_cuda.COL2IM_BODY for every i at once; a skipped (u, v) leaves acc as it is."""
    m, c, h, w = shape
    dcols = dcols.ravel()
    i = np.arange(m * c * h * w)
    k = i
    b = k % w
    a = (k // w) % h
    ch = (k // (w * h)) % c
    img = k // (w * h * c)
    acc = np.zeros(k.shape, dtype=dcols.dtype)
    for u in range(kh):
        di = a + ph - u
        skip_u = (di < 0) | (di % s != 0) | (di // s >= ho)
        for v in range(kw):
            dj = b + pw - v
            ok = ~skip_u & ~((dj < 0) | (dj % s != 0) | (dj // s >= wo))
            at = ((ch * kh + u) * kw + v) * (m * ho * r) + (img * ho + di // s) * r + dj // s
            acc = np.where(ok, acc + dcols[np.where(ok, at, 0)], acc)
    return acc.reshape(shape)


def _norm(text):
    """C or Python expressions without spaces and parentheses, in one spelling of / & | (and no ~)."""
    text = re.sub(r"[\s()~]", "", text)
    return text.replace("//", "/").replace("&&", "&").replace("||", "|")


def _pieces(body):
    """What of a kernel body its emulation must contain: every ``int``/``bool`` statement (as
    ``name=expression``, loop counters aside), every condition of an ``if (...) continue;``, every index ``a[...]``."""
    return (re.findall(r"(?<!\()(?:int|bool)\s+(\w+\s*=[^;]+);", body) + re.findall(r"if \((.*)\) continue;", body)
            + re.findall(r"\w+\[([^\]]+)\]", body))


@pytest.mark.parametrize("body, emulation", [(conv_cuda.IM2COL_BODY, emulate_im2col),
                                             (conv_cuda.COL2IM_BODY, emulate_col2im)])
def test_emulations_mirror_the_kernel_bodies(body, emulation):
    """Each statement, condition and index of the body is in the emulation (spelt in Python), so the
    bit-for-bit comparisons below check the kernel's own index arithmetic."""
    pieces, source = _pieces(body), _norm(inspect.getsource(emulation))
    assert len(pieces) >= 10
    missing = [p for p in pieces if _norm(p) not in source]
    assert not missing, f"not mirrored in {emulation.__name__}: {missing}"


def _bits(a):
    a = np.asarray(a)
    if a.dtype.kind != "f":                            # integer buffers: compared as they are
        return a
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _cases():
    """(n, c, h, w, kh, kw, stride, padding): kernels 1/3/5 and non-square, strides 1/2, padding
    0/1/2, non-square images, batch 1-3, channels 1-5."""
    rng = np.random.default_rng(0)
    out = []
    for (kh, kw), s, p in itertools.product([(1, 1), (3, 3), (5, 5), (1, 3), (5, 3)], [1, 2], [0, 1, 2]):
        n, c = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        h, w = int(rng.integers(kh, kh + 6)), int(rng.integers(kw, kw + 6))
        out.append((n, c, h, w, kh, kw, s, p))
    return out


CASES = _cases()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, c, h, w, kh, kw, s, p", CASES)
def test_emulated_im2col_is_the_readable_one(n, c, h, w, kh, kw, s, p, dtype):
    x = np.random.default_rng(1).standard_normal((n, c, h, w)).astype(dtype)
    ho, wo = conv.conv_output_size(h, kh, s, p), conv.conv_output_size(w, kw, s, p)
    want = conv.im2col(x, kh, kw, s, p)
    assert np.array_equal(_bits(emulate_im2col(x, kh, kw, s, p, p, ho, wo, wo)), _bits(want))
    # rows of R > Wo (the "wide rows" layout): the valid columns, then zeros
    r = wo + 3
    wide = emulate_im2col(x, kh, kw, s, p, p, ho, wo, r).reshape(-1, n, ho, r)
    assert np.array_equal(_bits(wide[..., :wo].reshape(want.shape)), _bits(want))
    assert not wide[..., wo:].any()


@pytest.mark.parametrize("ph, pw", [(0, 2), (2, 1), (1, 0)])
def test_emulated_im2col_with_unequal_padding(ph, pw):
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 7)).astype(np.float32)
    for kh, kw, s in ((3, 5, 1), (5, 3, 2), (1, 3, 1)):
        xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        ho, wo = conv.conv_output_size(6, kh, s, ph), conv.conv_output_size(7, kw, s, pw)
        want = conv.im2col(xpad, kh, kw, s, 0)
        assert np.array_equal(_bits(emulate_im2col(x, kh, kw, s, ph, pw, ho, wo, wo)), _bits(want))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, c, h, w, kh, kw, s, p", CASES)
def test_emulated_col2im_is_the_readable_one(n, c, h, w, kh, kw, s, p, dtype):
    ho, wo = conv.conv_output_size(h, kh, s, p), conv.conv_output_size(w, kw, s, p)
    rng = np.random.default_rng(3)
    dcols = rng.standard_normal((c * kh * kw, n * ho * wo)).astype(dtype)
    dcols[:, ::7] = -0.0                               # signed zeros: the sums start from +0 too
    want = conv.col2im(dcols, (n, c, h, w), kh, kw, s, p)
    got = emulate_col2im(dcols, (n, c, h, w), kh, kw, s, p, p, ho, wo, wo)
    assert np.array_equal(_bits(got), _bits(want))
    # rows of R > Wo: the entries j >= Wo are never read (NaN there would show)
    r = wo + 2
    wide = np.full((c * kh * kw, n, ho, r), np.nan, dtype=dtype)
    wide[..., :wo] = dcols.reshape(-1, n, ho, wo)
    got = emulate_col2im(wide.reshape(-1, n * ho * r), (n, c, h, w), kh, kw, s, p, p, ho, wo, r)
    assert np.array_equal(_bits(got), _bits(want))


@pytest.fixture(params=["numpy-emulation", "c-on-cpu"])
def emulated(request, monkeypatch):
    """The kernel objects replaced by their NumPy emulations or by their own C compiled for the CPU
    (tests/cuda_on_cpu.py), called as CuPy would call them (arguments bound by the kernels'
    parameter names, the output last), and taken for NumPy arrays when the setting is on: npmask's
    host code, conv_cuda's wrappers included, runs."""
    calls = []
    names = [p.split()[-1] for p in ("raw T first, " + conv_cuda._SHAPE).split(",")]
    in_c = request.param == "c-on-cpu"
    if in_c:
        cuda_on_cpu.skip_unless_runnable()
        c_kernels = cuda_on_cpu.build(monkeypatch, conv_cuda)

    def fake(kind):
        def call(*args):
            assert len(args) == len(names) + 1
            v, out = dict(zip(names, args)), args[-1]
            assert v["first"].ndim == 1 and v["first"].flags.c_contiguous
            assert all(type(v[n]) is int for n in names[1:])
            m, c, h, w, kh, kw, ho, r = (v[n] for n in ("m", "c", "h", "w", "kh", "kw", "ho", "r"))
            geometry = (kh, kw, v["s"], v["ph"], v["pw"], ho, v["wo"], r)
            calls.append(kind)
            if in_c:
                return c_kernels[kind](*args)
            if kind == "im2col":
                assert out.shape == (c * kh * kw, m * ho * r)
                out[...] = emulate_im2col(v["first"].reshape(m, c, h, w), *geometry)
            else:
                assert out.shape == (m, c, h, w) and v["first"].size == c * kh * kw * m * ho * r
                out[...] = emulate_col2im(v["first"], out.shape, *geometry)
        return call
    monkeypatch.setattr(conv_cuda, "enabled", lambda xp: config.settings.cuda_conv_kernels)
    monkeypatch.setattr(conv_cuda, "kernels", lambda: {"im2col": fake("im2col"), "col2im": fake("col2im")})
    return calls


@pytest.mark.parametrize("shape, o, k, s, p", [
    ((3, 4, 8, 8), 5, 3, 1, 1),        # shifted rows (Wo = W)
    ((2, 3, 6, 32), 4, 3, 1, 0),       # wide rows (R = Wp = 32, Wo = 30)
    ((3, 4, 9, 8), 6, 3, 2, 1),        # strided: general columns, col2im with rows of Wq
    ((3, 4, 8, 8), 6, 1, 2, 0),        # strided 1x1: no columns, col2im with rows of Wo
    ((2, 2, 7, 6), 3, 5, 1, 2),
    ((2, 3, 7, 7), 2, 3, 2, 2),
    ((2, 3, 7, 9), 4, (3, 5), 1, 1),   # stride 1, non-square: the input gradient pads rows and
    ((2, 3, 9, 8), 4, (5, 3), 1, 2),   # columns differently (kh-1-p, kw-1-p)
    ((2, 3, 8, 9), 3, (1, 3), 2, 1),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_code_with_emulated_kernels_gives_the_readable_convolution(emulated, shape, o, k, s, p, dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    kh, kw = (k, k) if isinstance(k, int) else k
    wgt = rng.standard_normal((o, shape[1], kh, kw)).astype(dtype)

    def run(**settings):
        with config.using(folded_rows=False, **settings):
            y, cache = conv.conv2d_forward(x, wgt, None, s, p, keep_columns=True)
            dx, dw, _ = conv.conv2d_backward(np.ones_like(y) * 0.5 + y, cache)
        return y, dx, dw
    got = run(cuda_conv_kernels=True)
    if s == 1 and p <= min(kh, kw) - 1:          # the input gradient is a convolution: columns again
        assert "col2im" not in emulated and emulated.count("im2col") >= 2
    else:
        assert "col2im" in emulated
    assert ("im2col" in emulated) == (kh * kw > 1 or p > 0)  # a 1x1 kernel without padding has no columns
    emulated.clear()
    want = run(conv_impl="readable")
    assert not emulated
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, **tol)


def _masked_wrn_steps(on, variant, backend="numpy", sizes=(8, 8, 5)):
    """Losses and final state of a few training steps of a masked WRN-16-1, cuda_conv_kernels = on."""
    with config.using(cuda_conv_kernels=on):
        losses, state, _, _ = masked_wrn_training(variant, backend, sizes)
    return losses, state


def masked_wrn_training(variant, backend="numpy", sizes=(8, 8, 5), step=None):
    """(losses, final state, model, optimiser) of training steps of a masked WRN-16-1 on batches
    of ``sizes``, each ``step(model, optimiser, x, y) -> (loss, logits)`` (default: train_step)."""
    from npmask.multidomain import MultiDomainModel
    from npmask.optim import SGD, Adam, Optimizers
    from npmask.training.loop import train_step
    model = MultiDomainModel(models.create("wrn16_1", num_classes=5, input_size=16, seed=0))
    model.add_domain("d", num_classes=4, variant=variant, seed=1, mask_init=(-1e-4, 2e-4))
    model.set_domain("d").train()
    if backend == "cupy":
        model.to("cupy")
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=1e-3, weight_decay=1e-4),
                     head=SGD(groups["head"], lr=1e-2, momentum=0.9, weight_decay=5e-4))
    rng = np.random.default_rng(0)
    losses = []
    for n in sizes:
        x = to_device(rng.standard_normal((n, 3, 16, 16)).astype(np.float32), backend)
        y = to_device(rng.integers(0, 4, n), backend)
        loss, _ = (step or train_step)(model, opt, x, y)
        losses.append(float(loss))
    return losses, {k: to_numpy(v) for k, v in model.network().state_dict().items()}, model, opt


def test_masked_wrn_training_steps_with_emulated_kernels(emulated):
    """The host code in a whole training step (3x3 stride 1 and 2, 1x1 stride-2 shortcuts, masked
    convolutions): with the emulated kernels as without them, to float32 rounding (on NumPy the
    setting off takes other column layouts, whose GEMMs round differently)."""
    with config.using(folded_rows=False):
        want_losses, want = _masked_wrn_steps(False, "full")
        assert not emulated
        got_losses, got = _masked_wrn_steps(True, "full")
    assert "im2col" in emulated and "col2im" in emulated
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_setting_is_off_by_default_and_numpy_ignores_it(monkeypatch):
    assert config.settings.cuda_conv_kernels is False
    assert not conv_cuda.enabled(np)
    with config.using(cuda_conv_kernels=True):
        assert not conv_cuda.enabled(np)              # NumPy arrays never take the kernels

        def boom(*args):
            raise AssertionError("a CUDA kernel was called for NumPy arrays")
        monkeypatch.setattr(conv_cuda, "im2col", boom)
        monkeypatch.setattr(conv_cuda, "col2im", boom)
        x = np.ones((2, 3, 8, 8), np.float32)
        y, cache = conv.conv2d_forward(x, np.ones((4, 3, 3, 3), np.float32), None, 2, 1)
        conv.conv2d_backward(y, cache)


def test_chunks_too_large_for_int_indices_take_the_generic_path(monkeypatch):
    assert conv_cuda.fits(64, 32, 32, 3, 3, 32, 32, 128)
    assert not conv_cuda.fits(64, 256, 256, 3, 3, 256, 256, 128)     # 4.8G column entries
    assert not conv_cuda.fits(1, 1 << 16, 1 << 15, 1, 1, 1, 1, 1)   # 2^31 input entries
    assert not conv_cuda.applies(np, 64, 32, 32, 3, 3, 32, 32, 128)  # NumPy: never
    monkeypatch.setattr(conv_cuda, "enabled", lambda xp: True)       # as on CuPy with the setting
    assert conv_cuda.applies(np, 64, 32, 32, 3, 3, 32, 32, 128)
    assert not conv_cuda.applies(np, 64, 256, 256, 3, 3, 256, 256, 128)


# ------------------------------------------------------------------------------------ on a GPU
@pytest.fixture(params=["gpu", "c-on-cpu"])
def kernels_on(request, monkeypatch):
    """(put, empty) for arrays where conv_cuda's kernels run: CuPy arrays on a GPU (skipped
    without one), or NumPy arrays with the kernels' own C compiled for the CPU."""
    if request.param == "gpu":
        if not cupy_available():
            pytest.skip(needs_gpu.kwargs["reason"])
        import cupy as cp
        return (lambda a: to_device(a, "cupy")), cp.empty
    cuda_on_cpu.skip_unless_runnable()
    cuda_on_cpu.build(monkeypatch, conv_cuda)
    return (lambda a: a), np.empty


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, c, h, w, kh, kw, s, p", CASES)
def test_kernels_are_the_readable_functions(n, c, h, w, kh, kw, s, p, dtype, kernels_on):
    """conv_cuda's wrappers and kernels against the readable im2col / col2im, bit for bit: rows of
    R = Wo and R > Wo (junk columns zero; junk entries of dcols never read), signed zeros."""
    put, empty = kernels_on
    x = np.random.default_rng(1).standard_normal((n, c, h, w)).astype(dtype)
    ho, wo = conv.conv_output_size(h, kh, s, p), conv.conv_output_size(w, kw, s, p)
    want_cols = conv.im2col(x, kh, kw, s, p)
    for r in (wo, wo + 3):
        cols = empty((c * kh * kw, n * ho * r), dtype=dtype)
        conv_cuda.im2col(put(x), cols, kh, kw, s, p, p, ho, wo, r)
        cols = to_numpy(cols).reshape(-1, n, ho, r)
        assert np.array_equal(_bits(cols[..., :wo].reshape(want_cols.shape)), _bits(want_cols)), r
        assert not cols[..., wo:].any()
    dcols = np.random.default_rng(3).standard_normal(want_cols.shape).astype(dtype)
    dcols[:, ::7] = -0.0
    want_dx = conv.col2im(dcols, (n, c, h, w), kh, kw, s, p)
    for r in (wo, wo + 2):
        wide = np.full((c * kh * kw, n, ho, r), np.nan, dtype=dtype)
        wide[..., :wo] = dcols.reshape(-1, n, ho, wo)
        dx = empty((n, c, h, w), dtype=dtype)
        conv_cuda.col2im(put(wide.reshape(-1, n * ho * r)), dx, kh, kw, s, p, p, ho, wo, r)
        assert np.array_equal(_bits(to_numpy(dx)), _bits(want_dx)), r


@needs_gpu
@pytest.mark.parametrize("shape, o, k, s, p", [
    ((8, 16, 16, 16), 32, 3, 1, 1), ((8, 16, 16, 16), 32, 3, 2, 1), ((8, 16, 16, 16), 32, 1, 2, 0),
    ((4, 3, 6, 32), 8, 3, 1, 0), ((4, 5, 11, 7), 6, 5, 2, 2), ((3, 4, 8, 8), 4, 3, 1, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_convolution_same_bits_with_the_kernels(shape, o, k, s, p, dtype, monkeypatch):
    import cupy as cp
    calls = []
    real = conv_cuda.kernels()
    monkeypatch.setattr(conv_cuda, "kernels", lambda: calls.append(1) or real)
    rng = np.random.default_rng(5)
    x, wgt = (cp.asarray(rng.standard_normal(sh).astype(dtype)) for sh in (shape, (o, shape[1], k, k)))

    def run(on):
        with config.using(cuda_conv_kernels=on):
            y, cache = conv.conv2d_forward(x, wgt, None, s, p, keep_columns=True)
            dx, dw, _ = conv.conv2d_backward(y * 0.5 + 0.25, cache)
        return [to_numpy(a) for a in (y, dx, dw)]
    want = run(False)
    assert not calls
    got = run(True)
    assert calls
    for name, a, b in zip(("y", "dx", "dweight"), got, want):
        assert np.array_equal(_bits(a), _bits(b)), name


@needs_gpu
@pytest.mark.parametrize("variant", ["full", "piggyback"])
def test_gpu_masked_wrn_training_steps_same_bits_with_the_kernels(variant):
    want_losses, want = _masked_wrn_steps(False, variant, "cupy")
    got_losses, got = _masked_wrn_steps(True, variant, "cupy")
    assert got_losses == want_losses
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(_bits(got[name]), _bits(want[name])), name
