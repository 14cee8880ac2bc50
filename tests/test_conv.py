"""The convolution: the readable path against the naive loop reference, the fast path against both,
numeric gradient checks, dtype and contracts. (The thread pool itself: tests/test_parallel.py.)"""
import contextlib

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from npmask import config
from npmask.gradcheck import check_layer, rel_error
import npmask.nn.conv as conv_module
from npmask.nn import conv_columns, conv_fast
from npmask.nn.conv import Conv2d, conv2d_backward, conv2d_forward
from npmask.nn.conv_reference import conv2d_backward_naive, conv2d_forward_naive


@st.composite
def conv_cases(draw, max_batch=3, max_channels=5, max_size=9):
    """A valid (x shape, weight shape, stride, padding, bias?, seed) combination."""
    n = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_channels))
    o = draw(st.integers(1, max_channels))
    h = draw(st.integers(1, max_size))
    w = draw(st.integers(1, max_size))
    kh = draw(st.integers(1, 4))
    kw = draw(st.sampled_from([kh, draw(st.integers(1, 4))]))  # mostly square, sometimes not
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    assume(h + 2 * padding >= kh and w + 2 * padding >= kw)      # the kernel must fit
    assume(padding < max(kh, kw))                                # output not all padding
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return (n, c, h, w), (o, c, kh, kw), stride, padding, bias, seed


@pytest.fixture
def use():
    """``use(name=value, ...)``: npmask settings (npmask.config.using) until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(config.using(**overrides))


def _arrays(xshape, wshape, bias, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xshape).astype(dtype)
    weight = rng.standard_normal(wshape).astype(dtype)
    b = rng.standard_normal(wshape[0]).astype(dtype) if bias else None
    return x, weight, b, rng


@given(conv_cases())
@settings(max_examples=60)                                      # cheap: tiny shapes, float64
def test_fast_conv_matches_naive_reference(case):
    xshape, wshape, stride, padding, bias, seed = case
    x, weight, b, rng = _arrays(xshape, wshape, bias, seed)
    y, cache = conv2d_forward(x, weight, b, stride, padding)
    y_ref = conv2d_forward_naive(x, weight, b, stride, padding)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)

    dy = rng.standard_normal(y.shape)
    dy_copy = dy.copy()
    dx, dweight, dbias = conv2d_backward(dy, cache)
    dx_ref, dw_ref, db_ref = conv2d_backward_naive(dy, x, weight, stride, padding, with_bias=bias)
    np.testing.assert_array_equal(dy, dy_copy)                   # backward never writes into dy
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dweight, dw_ref, rtol=1e-10, atol=1e-10)
    if bias:
        np.testing.assert_allclose(dbias, db_ref, rtol=1e-10, atol=1e-10)
    else:
        assert dbias is None


@given(conv_cases(max_batch=2, max_channels=3, max_size=6))
@settings(max_examples=15)
def test_conv2d_layer_gradcheck(case):
    xshape, wshape, stride, padding, bias, seed = case
    o, c, kh, kw = wshape
    layer = Conv2d(c, o, (kh, kw), stride=stride, padding=padding, bias=bias, dtype=np.float64, rng=seed)
    x = np.random.default_rng(seed + 1).standard_normal(xshape)
    report = check_layer(layer, x, seed=seed)                   # raises on failure
    assert set(report.errors) == {"x", "weight"} | ({"bias"} if bias else set())


def test_naive_reference_against_hand_computed_example():
    # A 1x1x3x3 input, a 2x2 kernel: every output is a hand-checkable dot product.
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    w = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = conv2d_forward_naive(x, w)
    expected = np.array([[0 + 2 + 9 + 16, 1 + 4 + 12 + 20], [3 + 8 + 18 + 28, 4 + 10 + 21 + 32]])
    np.testing.assert_array_equal(y[0, 0], expected)


# (N, C, H, W, O, kh, kw, stride, padding): the special paths that small drawn shapes rarely reach.
GEOMETRIES = [
    (3, 4, 16, 16, 5, 3, 3, 1, 1),     # "folded rows" (stride 1, Ho = H, Wo = W, >= 256 pixels)
    (2, 3, 12, 24, 4, 5, 5, 1, 2),     # folded rows, two wrapped columns on each side
    (3, 4, 6, 24, 5, 3, 3, 1, 1),      # "shifted rows" columns (stride 1, Wo = W, < 256 pixels)
    (2, 3, 6, 2, 4, 7, 7, 1, 3),       # shifted rows, padding wider than the image (pw > W)
    (2, 3, 130, 2, 4, 7, 7, 1, 3),     # folded rows, padding wider than the image (pw > W)
    (2, 3, 5, 22, 4, 1, 3, 1, 1),      # shifted rows, non-square kernel (rows padded, kh = 1)
    (2, 3, 7, 9, 4, 5, 5, 1, 2),       # shifted rows, two wrapped columns on each side
    (2, 3, 6, 24, 4, 3, 3, 1, 0),      # "wide rows" (stride 1, Wo < W, Wp/Wo <= 1.1; also dx)
    (3, 5, 6, 7, 4, 1, 1, 1, 0),       # 1x1: the input is the column matrix
    (3, 5, 7, 7, 4, 1, 1, 2, 0),       # 1x1 stride 2: a strided slice
    (2, 3, 9, 9, 4, 3, 3, 2, 1),       # strided 3x3, input gradient by col2im
    (2, 3, 5, 5, 2, 2, 2, 1, 2),       # stride 1 but padding > k - 1: col2im fallback
]


def _forward_backward(x, weight, b, stride, padding, dy_seed):
    """(y, dx, dweight, dbias) of conv2d_forward/backward under the current settings."""
    y, cache = conv2d_forward(x, weight, b, stride, padding)
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape).astype(x.dtype)
    return (y, *conv2d_backward(dy, cache)), dy


@given(conv_cases())
@settings(max_examples=60)
def test_readable_conv_matches_naive_reference(case):
    # The im2col + GEMM + col2im path of conv.py, the one a reader follows, against the plain loops.
    xshape, wshape, stride, padding, bias, seed = case
    x, weight, b, _ = _arrays(xshape, wshape, bias, seed)
    with config.using(conv_impl="readable"):
        got, dy = _forward_backward(x, weight, b, stride, padding, seed + 1)
    want = (conv2d_forward_naive(x, weight, b, stride, padding),
            *conv2d_backward_naive(dy, x, weight, stride, padding, with_bias=bias))
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


@given(conv_cases(max_batch=5, max_channels=6, max_size=12), st.sampled_from([1, 300, 1 << 20]),
       st.sampled_from([np.float32, np.float64]))
@settings(max_examples=40)
def test_fast_conv_matches_the_readable_path(case, chunk_floats, dtype):
    # The fast path computes the same sums in another order: tight in float64, within float32
    # rounding in float32 (relative to the size of the terms, which can cancel).
    xshape, wshape, stride, padding, bias, seed = case
    x, weight, b, _ = _arrays(xshape, wshape, bias, seed, dtype)
    with config.using(conv_chunk_floats=chunk_floats, folded_min_pixels=0):
        fast, _ = _forward_backward(x, weight, b, stride, padding, seed + 1)
        with config.using(conv_impl="readable"):
            readable, _ = _forward_backward(x, weight, b, stride, padding, seed + 1)
    for f, r in zip(fast, readable):
        if r is None:
            assert f is None
            continue
        assert f.dtype == r.dtype == dtype and f.shape == r.shape
        scale = max(1.0, float(np.abs(r).max()))
        tol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(f, r, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_fast_conv_matches_the_readable_path_on_every_special_path(geometry):
    n, c, h, w, o, kh, kw, stride, padding = geometry
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        x, weight, b, _ = _arrays((n, c, h, w), (o, c, kh, kw), True, 11, dtype)
        fast, _ = _forward_backward(x, weight, b, stride, padding, 12)
        with config.using(conv_impl="readable"):
            readable, _ = _forward_backward(x, weight, b, stride, padding, 12)
        for f, r in zip(fast, readable):
            assert f.dtype == r.dtype == dtype
            np.testing.assert_allclose(f, r, rtol=tol, atol=tol * max(1.0, float(np.abs(r).max())))


def test_im2col_and_col2im_are_adjoint():
    # <im2col(x), g> = <x, col2im(g)> for every x and g: col2im is the transpose of the copy.
    rng = np.random.default_rng(0)
    for (n, c, h, w), kh, kw, stride, padding in (((2, 3, 7, 6), 3, 2, 2, 1), ((1, 2, 5, 5), 3, 3, 1, 1)):
        x = rng.standard_normal((n, c, h, w))
        cols = conv_module.im2col(x, kh, kw, stride, padding)
        g = rng.standard_normal(cols.shape)
        back = conv_module.col2im(g, x.shape, kh, kw, stride, padding)
        assert back.shape == x.shape
        np.testing.assert_allclose(np.sum(cols * g), np.sum(x * back), rtol=1e-12)


@pytest.mark.parametrize("geometry, folded, shifted, wide", [
    ((3, 4, 16, 16, 5, 3, 3, 1, 1), True, True, False), ((2, 3, 12, 24, 4, 5, 5, 1, 2), True, True, False),
    ((3, 4, 6, 24, 5, 3, 3, 1, 1), False, True, False), ((2, 3, 7, 9, 4, 5, 5, 1, 2), False, True, False),
    ((2, 3, 16, 22, 4, 1, 3, 1, 1), False, True, False),                  # Ho > H: not folded
    ((2, 3, 6, 24, 4, 3, 3, 1, 0), False, False, True), ((5, 7, 8, 8, 6, 3, 3, 1, 0), False, False, False),
    ((2, 3, 9, 9, 4, 3, 3, 2, 1), False, False, False),
    ((2, 3, 5, 11, 4, 2, 2, 1, 0), False, False, True),     # Wp = 11 = 1.1 Wo: 10% junk, still wide
    ((2, 3, 5, 12, 4, 3, 3, 1, 0), False, False, False)])   # Wp = 12 > 1.1 Wo: the general layout
def test_geometries_reach_the_column_layouts_they_are_listed_for(geometry, folded, shifted, wide):
    n, c, h, w, o, kh, kw, stride, padding = geometry
    ho, wo = (conv_module.conv_output_size(s, k, stride, padding) for s, k in ((h, kh), (w, kw)))
    assert conv_columns._folds(np, n, c, h, w, kh, kw, stride, padding, padding, ho, wo) == folded
    # (where folded rows apply, the shifted-rows columns are what folded_rows=False falls back to)
    cols = conv_columns._Columns(np, np.float64, n, c, h, w, kh, kw, stride, padding, padding, ho, wo)
    assert (cols.shifted, cols.wide) == (shifted, wide)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("chunk_floats", [1, 1 << 20])             # one image per chunk / one chunk
@pytest.mark.parametrize("folded_rows", [True, False])              # False: the columns of _Columns
def test_special_paths_match_reference(geometry, chunk_floats, folded_rows, use):
    use(conv_chunk_floats=chunk_floats)
    use(folded_rows=folded_rows)
    n, c, h, w, o, kh, kw, stride, padding = geometry
    x, weight, b, rng = _arrays((n, c, h, w), (o, c, kh, kw), True, 7)
    y, cache = conv2d_forward(x, weight, b, stride, padding)
    np.testing.assert_allclose(y, conv2d_forward_naive(x, weight, b, stride, padding), rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(y.shape)
    for got, want in zip(conv2d_backward(dy, cache), conv2d_backward_naive(dy, x, weight, stride, padding)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@given(conv_cases(max_batch=5), st.integers(1, 300))
@settings(max_examples=15)
def test_chunked_batches_match_reference(case, chunk_floats):
    # Small chunks: several chunks per batch, the last one partial, buffers reused across them.
    xshape, wshape, stride, padding, bias, seed = case
    x, weight, b, rng = _arrays(xshape, wshape, bias, seed)
    with config.using(conv_chunk_floats=chunk_floats):          # (hypothesis forbids fixtures)
        y, cache = conv2d_forward(x, weight, b, stride, padding)
        dy = rng.standard_normal(y.shape)
        grads = conv2d_backward(dy, cache)
    np.testing.assert_allclose(y, conv2d_forward_naive(x, weight, b, stride, padding), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads[:2], conv2d_backward_naive(dy, x, weight, stride, padding)[:2]):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [
    # (N, C, H, O, k, stride, padding): the fast paths used by WRN (3x3 padded, 1x1, strided).
    (4, 8, 12, 16, 3, 1, 1), (4, 8, 12, 16, 3, 2, 1), (3, 6, 8, 10, 1, 1, 0), (3, 6, 8, 10, 1, 2, 0),
    (2, 3, 24, 4, 3, 1, 1),
])
def test_float32_in_float32_out_and_close_to_float64(shape):
    n, c, h, o, k, stride, padding = shape
    x64, w64, b64, rng = _arrays((n, c, h, h), (o, c, k, k), True, 0)
    y64, cache64 = conv2d_forward(x64, w64, b64, stride, padding)
    dy64 = rng.standard_normal(y64.shape)
    grads64 = conv2d_backward(dy64, cache64)

    x, w, b, dy = (a.astype(np.float32) for a in (x64, w64, b64, dy64))
    y, cache = conv2d_forward(x, w, b, stride, padding)
    grads = conv2d_backward(dy, cache)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    assert rel_error(y, y64) < 1e-5
    for g, g64 in zip(grads, grads64):
        assert rel_error(g, g64) < 1e-5


def test_frozen_weight_and_first_layer_skip_their_gradients():
    layer = Conv2d(3, 4, 3, padding=1, bias=True, rng=0)
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((2, 4, 5, 5)).astype(np.float32)
    layer.freeze("weight")
    layer.forward(x)
    dx = layer.backward(dy)
    assert "weight" not in layer.grads and dx.shape == x.shape
    np.testing.assert_allclose(layer.grads["bias"], dy.sum(axis=(0, 2, 3)), rtol=1e-5)

    layer.need_input_grad = False
    layer.forward(x)
    assert layer.backward(dy) is None
    _, dweight, _ = conv2d_backward(dy, conv2d_forward(x, layer.params["weight"], None, 1, 1)[1],
                                    need_dweight=False)
    assert dweight is None


def test_gradients_accumulate_and_init_statistics():
    layer = Conv2d(16, 64, 3, padding=1, rng=0)
    assert layer.params["weight"].shape == (64, 16, 3, 3) and "bias" not in layer.params
    assert layer.params["weight"].dtype == np.float32
    # He normal with fan_out: std sqrt(2 / (64 * 9)) = 0.0589.
    assert abs(layer.params["weight"].std() / np.sqrt(2 / (64 * 9)) - 1) < 0.05
    x = np.random.default_rng(1).standard_normal((2, 16, 4, 4)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((2, 64, 4, 4)).astype(np.float32)
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert y.dtype == dx.dtype == layer.grads["weight"].dtype == np.float32
    once = layer.grads["weight"].copy()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.grads["weight"], 2 * once, rtol=1e-5)


@pytest.mark.parametrize("bad", [
    dict(x=(2, 3, 5, 5), w=(4, 2, 3, 3)),                       # channel mismatch
    dict(x=(2, 3, 5), w=(4, 3, 3, 3)),                          # x not 4-D
    dict(x=(2, 3, 2, 2), w=(4, 3, 3, 3)),                       # kernel larger than input
])
def test_bad_shapes_give_clear_errors(bad):
    x = np.zeros(bad["x"], dtype=np.float32)
    w = np.zeros(bad["w"], dtype=np.float32)
    with pytest.raises(ValueError):
        conv2d_forward(x, w, None, 1, 0)


def test_mixed_dtypes_rejected():
    with pytest.raises(ValueError, match="dtype"):
        conv2d_forward(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 3, 3), dtype=np.float32), None, 1, 0)


# ------------------------------------------------------------------ chunks on several threads
@pytest.fixture
def threaded_chunks(use):
    """Every convolution's chunks shared out over 3 threads, however small the work."""
    use(threads=3)
    use(parallel_min_flops=0)


@pytest.mark.parametrize("geometry", GEOMETRIES + [
    (5, 7, 8, 8, 6, 3, 3, 1, 0),       # 3x3 stride 1, general columns (Wo < W, too many junk columns)
    (5, 7, 9, 9, 6, 3, 3, 2, 1),       # 3x3 stride 2: col2im
    (4, 2, 6, 6, 3, 1, 1, 2, 0),       # 1x1 stride 2
    (9, 3, 20, 20, 4, 3, 3, 1, 1),     # folded rows; shifted rows with 2-3 images per chunk
    (9, 3, 5, 5, 4, 1, 1, 1, 0),       # 1x1 stride 1: a transpose copy of several images
])
@pytest.mark.parametrize("chunk_floats", [1, 200, 1 << 20])      # 1 image/chunk, partial, the default
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("folded_rows", [True, False])
def test_threaded_chunks_match_reference_and_serial_bit_for_bit(geometry, chunk_floats, dtype, folded_rows,
                                                                threaded_chunks, use):
    use(conv_chunk_floats=chunk_floats)
    use(folded_rows=folded_rows)
    n, c, h, w, o, kh, kw, stride, padding = geometry
    x, weight, b, rng = _arrays((n, c, h, w), (o, c, kh, kw), True, 3, dtype)
    dy = rng.standard_normal((n, o, conv_module.conv_output_size(h, kh, stride, padding),
                              conv_module.conv_output_size(w, kw, stride, padding))).astype(dtype)

    def run():
        y, cache = conv2d_forward(x, weight, b, stride, padding)
        return (y, *conv2d_backward(dy, cache))

    threaded, again = run(), run()
    use(threads=1)
    serial = run()
    for t, a, s in zip(threaded, again, serial):
        assert t.dtype == dtype
        np.testing.assert_array_equal(t, a)                      # deterministic run to run
        np.testing.assert_array_equal(t, s)                      # and the same bits as 1 thread
    y_ref = conv2d_forward_naive(x, weight, b, stride, padding)
    refs = (y_ref, *conv2d_backward_naive(dy, x, weight, stride, padding, with_bias=True))
    tol = 1e-10 if dtype == np.float64 else 1e-4
    for got, want in zip(threaded, refs):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@given(conv_cases(max_batch=5, max_channels=6), st.integers(1, 300), st.integers(2, 4))
@settings(max_examples=15)
def test_threaded_chunked_batches_match_reference(case, chunk_floats, threads):
    xshape, wshape, stride, padding, bias, seed = case
    x, weight, b, rng = _arrays(xshape, wshape, bias, seed)
    with config.using(conv_chunk_floats=chunk_floats, threads=threads, parallel_min_flops=0):
        y, cache = conv2d_forward(x, weight, b, stride, padding)
        dy = rng.standard_normal(y.shape)
        grads = conv2d_backward(dy, cache)
    y_ref = conv2d_forward_naive(x, weight, b, stride, padding)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads[:2], conv2d_backward_naive(dy, x, weight, stride, padding)[:2]):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("folded", [False, True])
def test_a_realistic_layer_gives_the_same_bits_on_one_two_and_three_threads(folded, use):
    """GEMMs large enough for BLAS to use its threads if it were let: the results are bit-identical
    for every thread count, on any BLAS, because every chunk's GEMMs run on one BLAS thread (OpenBLAS's
    multi-threaded sgemm gives other bits than its one-thread sgemm on some CPUs)."""
    x, weight, _, rng = _arrays((8, 64, 16, 16), (64, 64, 3, 3), False, 5, np.float32)
    dy = rng.standard_normal((8, 64, 16, 16)).astype(np.float32)
    use(conv_chunk_floats=1 << 19)    # 4 chunks of 2 images (unfolded)
    use(folded_min_pixels=256 if folded else 1 << 30)

    def run(threads):
        use(threads=threads)
        use(parallel_min_flops=0)
        y, cache = conv2d_forward(x, weight, None, 1, 1)
        return (y, *conv2d_backward(dy, cache)[:2])
    serial = run(1)
    for threads in (2, 3):
        for a, b in zip(serial, run(threads)):
            np.testing.assert_array_equal(a, b)


def test_empty_batch_gives_empty_outputs_and_a_zero_weight_gradient():
    for kernel, stride, padding in ((3, 1, 1), (3, 2, 1), (1, 2, 0), (1, 1, 0)):
        x = np.zeros((0, 3, 8, 8), np.float32)
        w = np.ones((4, 3, kernel, kernel), np.float32)
        y, cache = conv2d_forward(x, w, None, stride, padding)
        dx, dw, _ = conv2d_backward(np.zeros(y.shape, np.float32), cache)
        assert y.shape[:2] == (0, 4) and dx.shape == x.shape
        np.testing.assert_array_equal(dw, np.zeros_like(w))


def test_in_order_sum_adds_in_index_order_whatever_the_arrival_order():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-3, 4)
              for _ in range(9)]
    serial = arrays[0].copy()
    for a in arrays[1:]:
        serial += a
    for order in (range(9), reversed(range(9)), rng.permutation(9)):
        total = conv_fast._InOrderSum()
        for i in order:
            total.add(int(i), arrays[int(i)].copy())
        np.testing.assert_array_equal(total.total, serial)
        assert not total._waiting                                # nothing left behind
    shuffled = arrays[3].copy()
    for a in arrays[:3] + arrays[4:]:
        shuffled += a
    assert not np.array_equal(shuffled, serial)                  # the order does change the bits


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (33, 64), (300, 257), (2304, 256)])
def test_transposed_copy_in_bands_is_the_transpose(shape, threads, use):
    use(threads=threads)
    use(parallel_min_floats=0)    # the bands shared out, also small
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t = conv_fast._transposed(np, a)
    assert t.flags.c_contiguous and t.dtype == a.dtype
    np.testing.assert_array_equal(t, a.T)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (1, 2, 1, 3), (4, 3, 5, 5)])
def test_folded_weight_relayouts_are_the_plain_transposes(shape, threads, use):
    """_FoldedRows' weight layouts (written one kernel column or offset at a time, output channels
    over threads) are exactly the transposes they stand for."""
    use(threads=threads)
    use(parallel_min_floats=0)
    o, c, kh, kw = shape
    w = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(conv_columns._FoldedRows.weights(w),
                                  w.transpose(2, 0, 1, 3).reshape(kh, o, c * kw))
    total = np.random.default_rng(3).standard_normal((kh, c * kw, o)).astype(np.float32)
    dw = conv_columns._FoldedRows.weight_gradient(total, o, c, kh, kw)
    assert dw.flags.c_contiguous
    np.testing.assert_array_equal(dw, total.reshape(kh, c, kw, o).transpose(3, 1, 0, 2))


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 3), st.booleans(), st.sampled_from([1, 3]), st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_folded_rows_on_any_same_size_geometry_match_reference(n, c, o, h, w, padding, bias, threads, seed):
    # Every stride-1 convolution with a (2p+1)x(2p+1) kernel and padding p takes folded rows here,
    # whatever the image size (also images narrower than the padding), on one thread or several.
    k = 2 * padding + 1
    x, weight, b, rng = _arrays((n, c, h, w), (o, c, k, k), bias, seed)
    with config.using(folded_min_pixels=0, threads=threads, parallel_min_flops=0):
        assert conv_columns._folds(np, n, c, h, w, k, k, 1, padding, padding, h, w)
        y, cache = conv2d_forward(x, weight, b, 1, padding)
        dy = rng.standard_normal(y.shape)
        grads = conv2d_backward(dy, cache)
    np.testing.assert_allclose(y, conv2d_forward_naive(x, weight, b, 1, padding), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, conv2d_backward_naive(dy, x, weight, 1, padding, with_bias=bias)):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ columns kept for the weight gradient
@pytest.mark.parametrize("geometry", GEOMETRIES + [(9, 3, 20, 20, 4, 3, 3, 1, 1), (9, 3, 20, 20, 4, 3, 3, 2, 1),
                                                   (5, 2, 11, 9, 3, 2, 3, 3, 0)])
@pytest.mark.parametrize("threads, chunk_floats", [(1, 1 << 20), (3, 200), (3, 1)])
def test_kept_columns_give_the_weight_gradient_bit_for_bit(geometry, threads, chunk_floats, use):
    """A training layer's forward pass keeps the column matrices of a small convolution, and the
    weight gradient made from them is the one made by building them again, bit for bit, on one or
    several threads, with one image or several per chunk; it also matches the naive reference."""
    use(threads=threads)
    use(parallel_min_flops=0)
    use(conv_chunk_floats=chunk_floats)
    n, c, h, w, o, kh, kw, stride, padding = geometry
    x, weight, b, rng = _arrays((n, c, h, w), (o, c, kh, kw), True, 7, np.float32)
    y, cache = conv2d_forward(x, weight, b, stride, padding)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    rebuilt = conv2d_backward(dy, cache)
    assert cache[5] is None                                      # not asked for: nothing kept
    y_kept, cache_kept = conv2d_forward(x, weight, b, stride, padding, keep_columns=True)
    strided = stride > 1 and kh * kw > 1                         # the layouts that keep them
    assert bool(cache_kept[5]) == strided
    kept = conv2d_backward(dy, cache_kept)
    assert not cache_kept[5]                                     # used once, then let go
    np.testing.assert_array_equal(y_kept, y)
    for a, r in zip(kept, rebuilt):
        np.testing.assert_array_equal(a, r)
    want = conv2d_backward_naive(dy.astype(np.float64), x.astype(np.float64), weight.astype(np.float64),
                                 stride, padding)[1]
    np.testing.assert_allclose(kept[1], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(conv2d_backward(dy, cache_kept)[1], rebuilt[1])  # again: rebuilt


def test_columns_are_kept_only_under_the_threshold_and_only_by_a_training_layer(use):
    x, weight, _, rng = _arrays((4, 3, 16, 16), (5, 3, 3, 3), False, 1, np.float32)
    floats = 4 * 3 * 3 * 3 * 8 * 8                               # n * C*kh*kw * Ho*Wo, stride 2
    use(conv_keep_columns_floats=floats)
    assert conv2d_forward(x, weight, None, 2, 1, keep_columns=True)[1][5]
    use(conv_keep_columns_floats=floats - 1)
    assert conv2d_forward(x, weight, None, 2, 1, keep_columns=True)[1][5] is None
    use(conv_keep_columns_floats=1 << 21)
    assert conv2d_forward(x, weight, None, 1, 1, keep_columns=True)[1][5] is None    # stride 1
    assert conv2d_forward(x, weight[:, :, :1, :1], None, 2, 0, keep_columns=True)[1][5] is None  # 1x1
    with config.using(conv_impl="readable"):                     # the readable path keeps nothing
        assert conv2d_forward(x, weight, None, 2, 1, keep_columns=True)[1][5] is None
    layer = Conv2d(3, 5, 3, stride=2, padding=1, rng=0)
    layer.forward(x)
    assert layer._cache[5]                                       # training, weight trained
    layer.eval()
    layer.forward(x)
    assert layer._cache[5] is None                               # eval: no backward pass follows
    layer.train()
    layer.freeze("weight")
    layer.forward(x)
    assert layer._cache[5] is None                               # no weight gradient wanted


def test_weight_grad_refuses_kept_columns_that_do_not_match_its_chunks(use):
    """Kept columns are used chunk by chunk: a list of another length (columns kept under other
    settings), or any for a folded-rows convolution (which keeps none), is an error, not a silently
    wrong or partial weight gradient."""
    use(conv_chunk_floats=1)                                     # one image per chunk
    x, weight, _, rng = _arrays((3, 2, 9, 9), (4, 2, 3, 3), False, 3, np.float32)
    kept = []
    y = conv_fast.conv_gemm(x, weight, 2, 1, 1, 5, 5, kept=kept)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    assert len(kept) == 3
    np.testing.assert_array_equal(conv_fast.weight_grad(dy, x, 3, 3, 2, 1, columns=kept),
                                  conv_fast.weight_grad(dy, x, 3, 3, 2, 1))
    for wrong in (kept[:2], kept + kept[:1]):
        with pytest.raises(ValueError, match="kept column matrices"):
            conv_fast.weight_grad(dy, x, 3, 3, 2, 1, columns=wrong)
    x16 = rng.standard_normal((2, 2, 16, 16)).astype(np.float32)   # folded rows: stride 1, 16x16
    dy16 = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="kept column matrices"):
        conv_fast.weight_grad(dy16, x16, 3, 3, 1, 1, columns=kept[:2])


def test_the_default_threshold_keeps_the_small_networks_strided_layers_not_wrn28_4s():
    """WRN-16-1 / 28-1 at 32x32 batch 32 keep their stride-2 3x3 layers' columns; WRN-28-4 at 64x64
    (the Decathlon network) keeps none, so its peak memory stays where it was."""
    keep = lambda c, h: conv_fast.keeps_columns((32, c, h, h), (2 * c, c, 3, 3), 2, h // 2, h // 2)  # noqa: E731
    assert keep(16, 32) and keep(32, 16)                         # WRN-16-1, WRN-28-1
    assert not keep(64, 64) and not keep(128, 32)                # WRN-28-4 at 64x64


# ------------------------------------------------------------------ col2im by phases
@pytest.mark.parametrize("geometry", [
    # n, c, h, w, o, kh, kw, stride, padding
    (2, 3, 9, 9, 4, 3, 3, 2, 1),       # WRN's stride-2 3x3
    (3, 2, 10, 10, 3, 3, 3, 2, 0),     # the last row and column of x get no gradient
    (2, 3, 11, 7, 4, 3, 2, 3, 2),      # stride 3, non-square kernel and image, padding < stride
    (2, 2, 8, 8, 3, 5, 5, 2, 3),       # padding > stride: phases start inside the padding
    (2, 2, 6, 6, 3, 4, 4, 3, 0),       # kernel > stride
    (2, 2, 5, 7, 3, 2, 2, 2, 0),       # even kernel: x's last row and column lie past every shift
    (2, 3, 7, 7, 2, 1, 1, 2, 0),       # 1x1 stride 2: gaps in x, zero there
    (2, 3, 5, 5, 2, 2, 2, 1, 2),       # stride 1, padding > k - 1
    (2, 3, 6, 5, 4, 3, 3, 1, 1),       # stride 1 (one phase)
    (0, 3, 6, 6, 4, 3, 3, 2, 1),       # an empty batch
])
@pytest.mark.parametrize("threads, chunk_floats", [(1, 1 << 20), (3, 1), (3, 150)])
def test_col2im_by_phases_is_the_readable_col2im(geometry, threads, chunk_floats, use):
    """The fast input gradient by col2im (its phase layout, conv_fast.input_grad_col2im) against the
    readable W_mat.T @ dy_mat + col2im of conv.py, over strides, paddings and kernels where the
    phases differ in size, where parts of x get no gradient, on one or three threads."""
    use(threads=threads)
    use(parallel_min_flops=0)
    use(conv_chunk_floats=chunk_floats)
    n, c, h, w, o, kh, kw, stride, padding = geometry
    x, weight, _, rng = _arrays((n, c, h, w), (o, c, kh, kw), False, 11)
    ho = conv_module.conv_output_size(h, kh, stride, padding)
    wo = conv_module.conv_output_size(w, kw, stride, padding)
    dy = rng.standard_normal((n, o, ho, wo))
    got = conv_fast.input_grad_col2im(dy, weight, x.shape, stride, padding)
    dcols = weight.reshape(o, -1).T @ dy.transpose(1, 0, 2, 3).reshape(o, n * ho * wo)
    want = conv_module.col2im(dcols, x.shape, kh, kw, stride, padding)
    assert got.shape == want.shape and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if n:
        naive = conv2d_backward_naive(dy, x, weight, stride, padding)[0]
        np.testing.assert_allclose(got, naive, rtol=1e-10, atol=1e-10)
