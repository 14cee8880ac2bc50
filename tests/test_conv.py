"""The fast convolution against the naive loop reference, numeric gradient checks, dtype and contracts."""
import threading

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from npmask.gradcheck import check_layer, rel_error
import npmask.nn.conv as conv_module
from npmask.nn import parallel
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


@pytest.mark.parametrize("geometry, folded, shifted, wide", [
    ((3, 4, 16, 16, 5, 3, 3, 1, 1), True, True, False), ((2, 3, 12, 24, 4, 5, 5, 1, 2), True, True, False),
    ((3, 4, 6, 24, 5, 3, 3, 1, 1), False, True, False), ((2, 3, 7, 9, 4, 5, 5, 1, 2), False, True, False),
    ((2, 3, 16, 22, 4, 1, 3, 1, 1), False, True, False),                  # Ho > H: not folded
    ((2, 3, 6, 24, 4, 3, 3, 1, 0), False, False, True), ((5, 7, 8, 8, 6, 3, 3, 1, 0), False, False, False),
    ((2, 3, 9, 9, 4, 3, 3, 2, 1), False, False, False)])
def test_geometries_reach_the_column_layouts_they_are_listed_for(geometry, folded, shifted, wide):
    n, c, h, w, o, kh, kw, stride, padding = geometry
    ho, wo = (conv_module.conv_output_size(s, k, stride, padding) for s, k in ((h, kh), (w, kw)))
    assert conv_module._folds(np, n, c, h, w, kh, kw, stride, padding, padding, ho, wo) == folded
    # (where folded rows apply, the shifted-rows columns are what FOLDED_ROWS = False falls back to)
    cols = conv_module._Columns(np, np.float64, n, c, h, w, kh, kw, stride, padding, padding, ho, wo)
    assert (cols.shifted, cols.wide) == (shifted, wide)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("chunk_floats", [1, 1 << 20])             # one image per chunk / one chunk
@pytest.mark.parametrize("folded_rows", [True, False])              # False: the columns of _Columns
def test_special_paths_match_reference(geometry, chunk_floats, folded_rows, monkeypatch):
    monkeypatch.setattr(conv_module, "CHUNK_FLOATS", chunk_floats)
    monkeypatch.setattr(conv_module, "FOLDED_ROWS", folded_rows)
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
    old = conv_module.CHUNK_FLOATS
    conv_module.CHUNK_FLOATS = chunk_floats
    try:
        y, cache = conv2d_forward(x, weight, b, stride, padding)
        dy = rng.standard_normal(y.shape)
        grads = conv2d_backward(dy, cache)
    finally:
        conv_module.CHUNK_FLOATS = old
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
def threaded_chunks(monkeypatch):
    """Every convolution's chunks shared out over 3 threads, however small the work."""
    monkeypatch.setattr(parallel, "THREADS", 3)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_FLOPS", 0)


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
                                                                threaded_chunks, monkeypatch):
    monkeypatch.setattr(conv_module, "CHUNK_FLOATS", chunk_floats)
    monkeypatch.setattr(conv_module, "FOLDED_ROWS", folded_rows)
    n, c, h, w, o, kh, kw, stride, padding = geometry
    x, weight, b, rng = _arrays((n, c, h, w), (o, c, kh, kw), True, 3, dtype)
    dy = rng.standard_normal((n, o, conv_module.conv_output_size(h, kh, stride, padding),
                              conv_module.conv_output_size(w, kw, stride, padding))).astype(dtype)

    def run():
        y, cache = conv2d_forward(x, weight, b, stride, padding)
        return (y, *conv2d_backward(dy, cache))

    threaded, again = run(), run()
    monkeypatch.setattr(parallel, "THREADS", 1)
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
    settings_ = [(conv_module, "CHUNK_FLOATS", chunk_floats), (parallel, "THREADS", threads),
                 (parallel, "PARALLEL_MIN_FLOPS", 0)]
    saved = [getattr(m, name) for m, name, _ in settings_]
    for m, name, value in settings_:                              # (hypothesis forbids monkeypatch)
        setattr(m, name, value)
    try:
        y, cache = conv2d_forward(x, weight, b, stride, padding)
        dy = rng.standard_normal(y.shape)
        grads = conv2d_backward(dy, cache)
    finally:
        for (m, name, _), value in zip(settings_, saved):
            setattr(m, name, value)
    y_ref = conv2d_forward_naive(x, weight, b, stride, padding)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads[:2], conv2d_backward_naive(dy, x, weight, stride, padding)[:2]):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("items, threads", [(7, 3), (2, 4), (1, 2), (10, 1)])
def test_in_parallel_covers_the_range_in_disjoint_parts(items, threads, monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", threads)
    parts = []
    parallel.in_parallel(np, items, 1 << 30, lambda lo, hi: parts.append((lo, hi)))
    assert len(parts) == min(threads, items)
    assert sorted(i for lo, hi in parts for i in range(lo, hi)) == list(range(items))


def test_in_parallel_stays_serial_off_numpy_small_or_one_thread(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 4)
    calls = []

    def record(lo, hi):
        calls.append((lo, hi))
    parallel.in_parallel(object(), 8, 1 << 30, record)       # not NumPy (e.g. CuPy): serial
    parallel.in_parallel(np, 8, parallel.PARALLEL_MIN_FLOATS - 1, record)  # small copy
    monkeypatch.setattr(parallel, "THREADS", 1)
    parallel.in_parallel(np, 8, 1 << 30, record)
    assert calls == [(0, 8)] * 3


def test_npmask_threads_must_be_a_positive_integer(monkeypatch):
    for bad in ("abc", "0", "-2"):
        monkeypatch.setenv("NPMASK_THREADS", bad)
        with pytest.raises(ValueError, match="NPMASK_THREADS must be a positive integer"):
            parallel._default_threads()
    monkeypatch.setenv("NPMASK_THREADS", "3")
    assert parallel._default_threads() == 3


def test_in_parallel_reraises_a_helper_threads_error_after_all_parts_ended(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 2)
    done = []

    def fn(lo, hi):
        if lo > 0:
            raise RuntimeError("boom")
        done.append(lo)
    with pytest.raises(RuntimeError, match="boom"):
        parallel.in_parallel(np, 4, 1 << 30, fn)
    assert done == [0]


def test_thread_pool_is_recreated_in_a_forked_child(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 2)
    pool = parallel._executor(2)
    assert parallel._executor(2) is pool                      # persistent
    monkeypatch.setattr(parallel.os, "getpid", lambda: -1)    # as seen from a child process
    child_pool = parallel._executor(2)
    assert child_pool is not pool
    child_pool.shutdown(wait=True)       # made under a fake pid: the next call makes a new pool


# ------------------------------------------------------------------ each_chunk
@pytest.fixture
def three_threads(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 3)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_FLOPS", 0)


@pytest.mark.parametrize("count", [1, 2, 7, 40])
def test_each_chunk_does_every_chunk_once_with_one_state_per_thread(count, three_threads):
    done, states = [], []

    def setup():
        state = {"thread": threading.get_ident(), "chunks": []}
        states.append(state)
        return state

    def fn(state, i):
        assert state["thread"] == threading.get_ident()          # a thread's own buffers
        state["chunks"].append(i)
        done.append(i)
    parallel.each_chunk(np, count, setup, fn, flops=1 << 40)
    assert sorted(done) == list(range(count))
    assert len(states) == min(3, count)                          # one worker per thread
    for s in states:
        assert s["chunks"] == sorted(s["chunks"])                # each thread takes them in order


def test_each_chunk_is_serial_off_numpy_small_or_one_thread(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 4)
    me = threading.get_ident()
    small = dict(flops=parallel.PARALLEL_MIN_FLOPS - 1, floats=parallel.PARALLEL_MIN_FLOATS - 1)
    for xp, work in ((object(), dict(flops=1 << 40)), (np, small)):
        seen = []
        parallel.each_chunk(xp, 5, lambda: [], lambda state, i: seen.append((threading.get_ident(), i)),
                            **work)
        assert seen == [(me, i) for i in range(5)]
    for work in (dict(flops=parallel.PARALLEL_MIN_FLOPS), dict(floats=parallel.PARALLEL_MIN_FLOATS)):
        workers, seen = [], []
        parallel.each_chunk(np, 5, lambda: workers.append(1), lambda state, i: seen.append(i), **work)
        assert sorted(seen) == list(range(5)) and len(workers) == 4  # either kind of work: threads
    monkeypatch.setattr(parallel, "THREADS", 1)
    seen = []
    parallel.each_chunk(np, 5, lambda: None, lambda state, i: seen.append(threading.get_ident()),
                        flops=1 << 40)
    assert seen == [me] * 5


def test_work_inside_a_chunk_does_not_nest_threads(three_threads, monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_MIN_FLOATS", 0)
    inner = []
    parallel.each_chunk(np, 6, lambda: None,
                        lambda state, i: parallel.in_parallel(np, 9, 1 << 40,
                                                              lambda lo, hi: inner.append((lo, hi))),
                        flops=1 << 40)
    assert inner == [(0, 9)] * 6                                 # each inner call ran whole, in its part
    outer = []
    parallel.in_parallel(np, 9, 1 << 40, lambda lo, hi: outer.append((lo, hi)))
    assert len(outer) == 3                                       # and the flag does not outlive the region


def test_each_chunk_reraises_an_error_after_every_thread_stopped(three_threads):
    running = []

    def fn(state, i):
        running.append(i)
        if i == 3:
            raise RuntimeError("chunk 3 failed")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]
    with pytest.raises(RuntimeError, match="chunk 3 failed"):
        parallel.each_chunk(np, 8, lambda: None, fn, flops=1 << 40)
    assert 3 in running
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info()] == before  # BLAS restored
    assert not getattr(parallel._local, "inside", False)         # and this thread is no part
    outer = []
    parallel.in_parallel(np, 6, 1 << 40, lambda lo, hi: outer.append(lo))
    assert len(outer) == 3                                       # threads work after the error


@pytest.mark.parametrize("threads", [1, 3])
def test_each_chunk_runs_blas_on_one_thread_and_restores_it(threads, monkeypatch):
    """Also with THREADS = 1: a chunk's GEMMs run on one BLAS thread whatever THREADS is."""
    monkeypatch.setattr(parallel, "THREADS", threads)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_FLOPS", 0)
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    before = blas_threads()
    if not before:
        pytest.skip("threadpoolctl sees no BLAS library in this process")
    inside = []
    parallel.each_chunk(np, 4, lambda: None, lambda state, i: inside.append(blas_threads()), flops=1 << 40)
    assert inside == [[1] * len(before)] * 4
    assert blas_threads() == before


@pytest.mark.parametrize("folded", [False, True])
def test_a_realistic_layer_gives_the_same_bits_on_one_two_and_three_threads(folded, monkeypatch):
    """GEMMs large enough for BLAS to use its threads if it were let: the results are bit-identical
    for every THREADS, on any BLAS, because every chunk's GEMMs run on one BLAS thread (OpenBLAS's
    multi-threaded sgemm gives other bits than its one-thread sgemm on some CPUs)."""
    x, weight, _, rng = _arrays((8, 64, 16, 16), (64, 64, 3, 3), False, 5, np.float32)
    dy = rng.standard_normal((8, 64, 16, 16)).astype(np.float32)
    monkeypatch.setattr(conv_module, "CHUNK_FLOATS", 1 << 19)    # 4 chunks of 2 images (unfolded)
    monkeypatch.setattr(conv_module, "FOLDED_MIN_PIXELS", 256 if folded else 1 << 30)

    def run(threads):
        monkeypatch.setattr(parallel, "THREADS", threads)
        monkeypatch.setattr(parallel, "PARALLEL_MIN_FLOPS", 0)
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
        total = conv_module._InOrderSum()
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
def test_transposed_copy_in_bands_is_the_transpose(shape, threads, monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", threads)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_FLOATS", 0)    # the bands shared out, also small
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t = conv_module._transposed(np, a)
    assert t.flags.c_contiguous and t.dtype == a.dtype
    np.testing.assert_array_equal(t, a.T)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_contiguous_is_a_plain_copy(threads, monkeypatch):
    """parallel.contiguous, a strided view copied with its first or second axis split over threads:
    the view's numbers in a C-contiguous array of its shape."""
    monkeypatch.setattr(parallel, "THREADS", threads)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_FLOATS", 0)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)
    views = [w.transpose(2, 0, 1, 3),                           # first axis short: split on the second
             w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1],
             w.reshape(3, 5, 3, 7).transpose(3, 1, 0, 2), w[:, 0, 0, 0], w[:0], w[0, 0, 0, 0]]
    for v in views:
        c = parallel.contiguous(np, v)
        assert c.flags.c_contiguous and c.dtype == v.dtype and c.shape == v.shape
        np.testing.assert_array_equal(c, v)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (1, 2, 1, 3), (4, 3, 5, 5)])
def test_folded_weight_relayouts_are_the_plain_transposes(shape, threads, monkeypatch):
    """_FoldedRows' weight layouts (written one kernel column or offset at a time, output channels
    over threads) are exactly the transposes they stand for."""
    monkeypatch.setattr(parallel, "THREADS", threads)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_FLOATS", 0)
    o, c, kh, kw = shape
    w = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(conv_module._FoldedRows.weights(w),
                                  w.transpose(2, 0, 1, 3).reshape(kh, o, c * kw))
    total = np.random.default_rng(3).standard_normal((kh, c * kw, o)).astype(np.float32)
    dw = conv_module._FoldedRows.weight_gradient(total, o, c, kh, kw)
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
    old = conv_module.FOLDED_MIN_PIXELS, parallel.THREADS, parallel.PARALLEL_MIN_FLOPS
    conv_module.FOLDED_MIN_PIXELS, parallel.THREADS, parallel.PARALLEL_MIN_FLOPS = 0, threads, 0
    try:
        assert conv_module._folds(np, n, c, h, w, k, k, 1, padding, padding, h, w)
        y, cache = conv2d_forward(x, weight, b, 1, padding)
        dy = rng.standard_normal(y.shape)
        grads = conv2d_backward(dy, cache)
    finally:
        conv_module.FOLDED_MIN_PIXELS, parallel.THREADS, parallel.PARALLEL_MIN_FLOPS = old
    np.testing.assert_allclose(y, conv2d_forward_naive(x, weight, b, 1, padding), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, conv2d_backward_naive(dy, x, weight, 1, padding, with_bias=bias)):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
