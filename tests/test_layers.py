"""Property-based gradient checks and behaviour tests for the layers in npmask.nn (conv excepted).

Every gradient check is float64 with a random upstream gradient (check_layer's default, seeded
with ``seed + 1``: the same seed as the input would make the upstream gradient a copy of the input,
which hides errors, e.g. batch norm's dx would be ~0), shapes drawn by hypothesis (invalid
combinations rejected with ``assume``) and array values from a drawn seed, kept away from kinks
(ReLU at 0, ties in max pooling).
"""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from npmask import nn
from npmask.gradcheck import (GradcheckReport, check_layer, directional_check, numeric_gradient,
                              rel_error)

seeds = st.integers(0, 2**32 - 1)
small = st.integers(1, 4)


def normal(seed, shape, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def randomise_params(layer, seed):
    """Replace every parameter (in place) by random values, so that no gradient hides behind ones/zeros."""
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        p[...] = rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1.0, 1.0], p.shape)


# --------------------------------------------------------------------------------------- Linear
@given(n=small, fin=st.integers(1, 6), fout=st.integers(1, 5), bias=st.booleans(), seed=seeds)
def test_linear_gradcheck(n, fin, fout, bias, seed):
    layer = nn.Linear(fin, fout, bias=bias, rng=seed).astype(np.float64)
    report = check_layer(layer, normal(seed, (n, fin)), seed=seed + 1)
    assert set(report.errors) == ({"x", "weight", "bias"} if bias else {"x", "weight"})


def test_linear_functional_matches_formula_and_skips_unneeded():
    rng = np.random.default_rng(0)
    x, w, b, dy = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), rng.standard_normal(5), rng.standard_normal((4, 5))
    np.testing.assert_allclose(nn.linear_forward(x, w, b), x @ w.T + b)
    np.testing.assert_allclose(nn.linear_forward(x, w, None), x @ w.T)
    dx, dw, db = nn.linear_backward(dy, x, w)
    np.testing.assert_allclose(dx, dy @ w)
    np.testing.assert_allclose(dw, dy.T @ x)
    np.testing.assert_allclose(db, dy.sum(0))
    assert nn.linear_backward(dy, x, w, need_dx=False, need_dweight=False, has_bias=False) == (None, None, None)


def test_linear_init_is_pytorch_default():
    layer = nn.Linear(400, 300, rng=0)
    bound = 1 / np.sqrt(400)
    for name in ("weight", "bias"):
        p = layer.params[name]
        assert p.dtype == np.float32
        assert np.abs(p).max() <= bound
        assert np.abs(p).max() > 0.95 * bound  # uniform over the whole interval, not a narrower one
    assert layer.params["weight"].shape == (300, 400) and layer.params["bias"].shape == (300,)
    np.testing.assert_array_equal(nn.Linear(400, 300, rng=0).params["weight"], layer.params["weight"])


def test_linear_rejects_wrong_input():
    layer = nn.Linear(3, 2, rng=0)
    with pytest.raises(ValueError, match="3 input features"):
        layer.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        layer.forward(np.zeros((2, 3, 1), np.float32))


# --------------------------------------------------------------------------------------- BatchNorm
def bn_input(seed, shape):
    x = normal(seed, shape) * 2 + 0.5
    axes = (0,) + tuple(range(2, len(shape)))
    assume(x.var(axis=axes).min() > 0.05)  # nearly constant channels make the check ill-conditioned
    return x


@given(n=small, c=st.integers(1, 3), h=small, w=small, seed=seeds, training=st.booleans())
def test_batchnorm2d_gradcheck(n, c, h, w, seed, training):
    # with 2 values per channel xhat = +-1 whatever x is: dx is ~eps-small and its relative error noise
    assume(n * h * w >= 3)
    x = bn_input(seed, (n, c, h, w))
    layer = nn.BatchNorm2d(c).astype(np.float64)
    randomise_params(layer, seed + 1)
    rng = np.random.default_rng(seed + 2)
    layer.buffers["running_mean"][...] = rng.standard_normal(c)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, c)
    layer.train(training)
    check_layer(layer, x, seed=seed + 1)


@given(n=st.integers(3, 6), c=st.integers(1, 4), seed=seeds, training=st.booleans())
def test_batchnorm1d_gradcheck(n, c, seed, training):
    x = bn_input(seed, (n, c))
    layer = nn.BatchNorm1d(c).astype(np.float64)
    randomise_params(layer, seed + 1)
    layer.train(training)
    check_layer(layer, x, seed=seed + 1)


def test_batchnorm_running_stats_follow_momentum_with_unbiased_variance():
    layer = nn.BatchNorm2d(3, momentum=0.1).astype(np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    rm_ref, rv_ref = layer.buffers["running_mean"], layer.buffers["running_var"]
    for seed in range(3):
        x = normal(seed, (4, 3, 5, 2)) * 3 + seed
        layer.forward(x)
        per_channel = x.transpose(1, 0, 2, 3).reshape(3, -1)
        rm = 0.9 * rm + 0.1 * per_channel.mean(axis=1)
        rv = 0.9 * rv + 0.1 * per_channel.var(axis=1, ddof=1)
    np.testing.assert_allclose(layer.buffers["running_mean"], rm, rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], rv, rtol=1e-12)
    assert layer.buffers["running_mean"] is rm_ref and layer.buffers["running_var"] is rv_ref  # in place


def test_batchnorm_defaults_to_pytorchs_momentum():
    """The models build their batch norms with the defaults: momentum 0.1 (PyTorch's), so one
    training step moves the running statistics a tenth of the way to the batch's."""
    layer = nn.BatchNorm2d(3).astype(np.float64)
    x = normal(4, (4, 3, 5, 2)) * 3 + 2
    layer.forward(x)
    per_channel = x.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.1 * per_channel.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 + 0.1 * per_channel.var(axis=1, ddof=1),
                               rtol=1e-12)


def test_batchnorm_train_uses_batch_stats_and_eval_uses_running_stats():
    layer = nn.BatchNorm2d(2).astype(np.float64)
    layer.params["weight"][...] = [2.0, 0.5]
    layer.params["bias"][...] = [1.0, -1.0]
    x = normal(0, (8, 2, 3, 3)) * 4 + 3
    y = layer.forward(x)  # training: per channel, mean = bias and std = |weight| (up to eps)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), [1.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), [2.0, 0.5], rtol=1e-5)

    layer.buffers["running_mean"][...] = [1.0, 2.0]
    layer.buffers["running_var"][...] = [4.0, 0.25]
    before = [b.copy() for b in layer.buffers.values()]
    layer.eval()
    y = layer.forward(x)
    shape = (1, 2, 1, 1)
    expect = (x - np.array([1.0, 2.0]).reshape(shape)) / np.sqrt(np.array([4.0, 0.25]) + 1e-5).reshape(shape)
    expect = expect * np.array([2.0, 0.5]).reshape(shape) + np.array([1.0, -1.0]).reshape(shape)
    np.testing.assert_allclose(y, expect, rtol=1e-12)
    for b, b0 in zip(layer.buffers.values(), before):
        np.testing.assert_array_equal(b, b0)  # eval never updates the running statistics


def test_batchnorm_errors():
    with pytest.raises(ValueError, match="more than one value per channel"):
        nn.BatchNorm2d(2).forward(np.ones((1, 2, 1, 1), np.float32))
    nn.BatchNorm2d(2).eval().forward(np.ones((1, 2, 1, 1), np.float32))  # fine in eval
    with pytest.raises(ValueError, match="C=3"):
        nn.BatchNorm2d(3).forward(np.ones((2, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        nn.BatchNorm1d(3).forward(np.ones((2, 3, 2, 2), np.float32))
    for training in (True, False):
        bn = nn.BatchNorm2d(2).train(training)
        bn.forward(np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2))
        with pytest.raises(ValueError, match=r"dy of shape \(2, 2, 2, 3\); the forward pass produced "
                                             r"\(2, 2, 2, 2\)"):
            bn.backward(np.ones((2, 2, 2, 3), np.float32))


# --------------------------------------------------------------------------------------- ReLU, Flatten
def away_from_zero(seed, shape, margin=0.1):
    rng = np.random.default_rng(seed)
    return rng.uniform(margin, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


@given(shape=st.lists(small, min_size=1, max_size=4), seed=seeds)
def test_relu_gradcheck(shape, seed):
    check_layer(nn.ReLU(), away_from_zero(seed, tuple(shape)), seed=seed + 1)


def test_relu_values_and_zero_subgradient():
    x = np.array([[-1.0, 0.0, 2.0]], np.float32)
    layer = nn.ReLU()
    np.testing.assert_array_equal(layer.forward(x), [[0, 0, 2]])
    np.testing.assert_array_equal(layer.backward(np.array([[5.0, 5.0, 5.0]], np.float32)), [[0, 0, 5]])


@given(shape=st.lists(small, min_size=1, max_size=4), seed=seeds)
def test_relu_inplace_matches_relu(shape, seed):
    x = away_from_zero(seed, tuple(shape)).astype(np.float32)
    x.flat[0] = 0.0                               # the subgradient at 0 is 0 here too
    dy = normal(seed + 1, tuple(shape)).astype(np.float32)
    plain, inplace = nn.ReLU(), nn.ReLU(inplace=True)
    expected = plain.forward(x)
    given_x = x.copy()
    y = inplace.forward(given_x)
    assert y is given_x                           # written over its input, no new array
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(inplace.backward(dy), plain.backward(dy))


def test_check_layer_catches_a_forward_that_writes_into_its_input():
    with pytest.raises(AssertionError, match="ReLU.forward wrote into its input"):
        check_layer(nn.ReLU(inplace=True), away_from_zero(0, (3, 4)))


# ------------------------------------------------------------------ the gradient checker itself
# Every check above passes a correct layer; these make sure the checker also fails a wrong one.
class _WrongWeightGradient(nn.Linear):
    """A Linear whose weight gradient is off by 1e-4 (relative), its input gradient right."""

    def backward(self, dy):
        dx = super().backward(dy)
        self.grads["weight"] *= 1 + 1e-4
        return dx


class _Doubler(nn.Module):
    """y = 2x; ``writes_dy``: its backward returns 2 dy computed in dy's own array (a bug)."""

    def __init__(self, writes_dy=False):
        super().__init__()
        self.writes_dy, self.seen = writes_dy, None

    def forward(self, x):
        return 2 * x

    def backward(self, dy):
        self.seen = dy.copy()
        if self.writes_dy:
            dy *= 2
            return dy
        return 2 * dy


def test_check_layer_fails_a_wrong_parameter_gradient_and_honours_its_tolerance():
    """A parameter's gradient is compared (not only the input's), one failing entry fails the
    report, the report keeps the tolerance it was given."""
    layer = _WrongWeightGradient(3, 2, rng=0).astype(np.float64)
    x = normal(0, (4, 3))
    with pytest.raises(AssertionError, match=r"weight +rel. error \S+ +FAIL"):
        check_layer(layer, x)
    report = check_layer(layer, x, raise_on_fail=False)
    assert not report.ok
    assert max(report.errors["x"], report.errors["bias"]) <= 1e-6 < report.errors["weight"] < 1e-3
    assert check_layer(layer, x, tol=1e-3).ok                  # within a looser tolerance


def test_check_layer_zeroes_the_gradients_first():
    """Gradients left by an earlier backward do not count: the same layer checks twice."""
    layer = nn.Linear(3, 2, rng=0).astype(np.float64)
    x = normal(0, (4, 3))
    check_layer(layer, x)
    check_layer(layer, x)


def test_check_layer_catches_a_backward_that_writes_into_the_upstream_gradient():
    check_layer(_Doubler(), normal(0, (3, 4)))                 # the same gradient, made in a new array
    with pytest.raises(AssertionError, match="_Doubler.backward wrote into the upstream gradient"):
        check_layer(_Doubler(writes_dy=True), normal(0, (3, 4)))


def test_check_layer_upstream_is_no_copy_of_an_input_drawn_with_the_same_seed():
    """For batch norm an upstream gradient equal to its input makes dx vanish, which hides errors."""
    layer = _Doubler()
    x = np.random.default_rng(5).standard_normal((3, 4))
    check_layer(layer, x, seed=5)
    assert layer.seen.shape == x.shape and not np.allclose(layer.seen, x)


def test_rel_error_is_relative_also_for_small_gradients():
    """A gradient of size 1e-3 that is off by half is no small error (no absolute floor but 1e-12)."""
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.array([1e-3, 0.0]), np.array([2e-3, 0.0])) == pytest.approx(1 / 3)
    assert rel_error(np.array([1e-9]), np.array([-1e-9])) == pytest.approx(1.0)


def test_gradcheck_report_tolerance_is_inclusive():
    assert GradcheckReport({"x": 1e-6, "weight": 0.0}, tol=1e-6).ok
    assert not GradcheckReport({"x": 1e-6, "weight": 1.01e-6}, tol=1e-6).ok


class _ElementViews(np.ndarray):
    """Indexing one element of a 1-d array gives a 0-d view into it, as CuPy's ``a[i]`` does
    (NumPy's gives a copy)."""

    def __getitem__(self, key):
        if self.ndim == 1 and isinstance(key, (int, np.integer)):
            return np.ndarray.__getitem__(self, slice(key, key + 1)).reshape(())
        return np.ndarray.__getitem__(self, key)


def test_numeric_gradient_keeps_the_old_value_where_an_element_is_a_view():
    """numeric_gradient copies the entry before perturbing it: a view would follow the +h step, so
    the -h step would land on the old value and x would not be restored."""
    values = np.array([[0.5, -1.0], [2.0, 0.25]])
    x = values.copy().view(_ElementViews)
    upstream = np.array([[1.0, 2.0], [-1.0, 0.5]])
    grad = numeric_gradient(lambda: np.asarray(x) ** 2, x, upstream)
    np.testing.assert_allclose(np.asarray(grad), 2 * values * upstream, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(x), values)       # restored exactly


def test_directional_check_fails_a_wrong_gradient_and_restores_the_parameters():
    labels = np.array([0, 1, 1, 0, 1])

    def loss(out):
        return nn.softmax_cross_entropy(out, labels)
    x = normal(0, (5, 3))
    good = nn.Sequential(nn.Linear(3, 4, rng=0), nn.Linear(4, 2, rng=1)).astype(np.float64)
    before = {k: v.copy() for k, v in good.state_dict().items()}
    directional_check(good, x, loss, seed=1, h=1e-6)
    for k, v in good.state_dict().items():
        np.testing.assert_array_equal(v, before[k])             # not left at theta - h v
    np.testing.assert_array_equal(x, normal(0, (5, 3)))
    bad = nn.Sequential(nn.Linear(3, 4, rng=0), _WrongWeightGradient(4, 2, rng=1)).astype(np.float64)
    with pytest.raises(AssertionError, match="directional check failed"):
        directional_check(bad, x, loss, seed=1, h=1e-6)
    analytic, numeric = directional_check(bad, x, loss, seed=1, h=1e-6, raise_on_fail=False)
    assert 1e-6 < abs(analytic - numeric) / (abs(analytic) + abs(numeric)) < 1e-3


@given(shape=st.lists(small, min_size=1, max_size=4), seed=seeds)
def test_flatten_gradcheck(shape, seed):
    layer = nn.Flatten()
    x = normal(seed, tuple(shape))
    assert layer.forward(x).shape == (shape[0], int(np.prod(shape[1:])))
    check_layer(layer, x, seed=seed + 1)


# --------------------------------------------------------------------------------------- Dropout
@given(shape=st.lists(small, min_size=1, max_size=4), p=st.floats(0.0, 0.9), seed=seeds)
def test_dropout_gradcheck_with_fixed_mask(shape, p, seed):
    layer = nn.Dropout(p, rng=seed)
    layer.reuse_mask = True
    check_layer(layer, normal(seed, tuple(shape)), seed=seed + 1)


def test_dropout_seeded_determinism_and_scaling():
    x = normal(0, (200, 500)) + 3.0
    a, b = nn.Dropout(0.3, rng=7), nn.Dropout(0.3, rng=7)
    ya, yb = a.forward(x), b.forward(x)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(ya, a.forward(x))  # a new mask on every training forward
    kept = ya != 0
    np.testing.assert_allclose(ya[kept], x[kept] / 0.7, rtol=1e-12)  # inverted dropout
    frac = kept.mean()  # Binomial(100000, 0.7): std 0.0015, the bound is 10 std
    assert abs(frac - 0.7) < 0.015
    # backward uses the same scaled mask
    dy = normal(1, x.shape)
    dx = a.backward(dy)
    last_kept = a._mask != 0
    np.testing.assert_allclose(dx[last_kept], dy[last_kept] / 0.7, rtol=1e-12)
    assert np.all(dx[~last_kept] == 0)
    # float32 and float64 inputs see the same mask for the same seed
    y32 = nn.Dropout(0.3, rng=7).forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_array_equal(y32 != 0, kept)


def test_dropout_kept_mask_moves_with_the_module():
    """A kept mask (reuse_mask) is one of the module's arrays: Module.to / astype map it too, or the
    next forward after moving to another backend would multiply arrays of two backends."""
    layer = nn.Dropout(0.5, rng=0)
    layer.reuse_mask = True
    x = normal(0, (4, 6))
    y = layer.forward(x)
    before = layer._mask
    layer._map_arrays(np.copy)                 # what to(backend) does, with a copy for the move
    assert layer._mask is not before and np.array_equal(layer._mask, before)
    np.testing.assert_array_equal(layer.forward(x), y)          # the same mask, reused


def test_dropout_eval_is_identity():
    x = normal(0, (3, 4))
    layer = nn.Dropout(0.5, rng=0).eval()
    assert layer.forward(x) is x
    dy = normal(1, (3, 4))
    assert layer.backward(dy) is dy
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        nn.Dropout(1.0)


# --------------------------------------------------------------------------------------- pooling
pool_geometry = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1))  # kernel, stride, pad


def naive_pool(x, k, s, p, reduce, pad_value):
    """k, s, p: ints, or (rows, columns) pairs."""
    (kh, kw), (sh, sw), (ph, pw) = ((v, v) if isinstance(v, int) else v for v in (k, s, p))
    n, c, h, w = x.shape
    xp = np.full((n, c, h + 2 * ph, w + 2 * pw), pad_value)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.empty((n, c, ho, wo))
    for a in range(ho):
        for b in range(wo):
            out[:, :, a, b] = reduce(xp[:, :, a * sh:a * sh + kh, b * sw:b * sw + kw], axis=(2, 3))
    return out


def distinct_values(seed, shape):
    """Values spaced 0.01 apart in random order: no ties, and a 1e-6 step cannot change a maximum."""
    size = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(size) - size / 2).reshape(shape) * 0.01


@given(n=st.integers(1, 2), c=st.integers(1, 2), h=st.integers(1, 6), w=st.integers(1, 6),
       geom=pool_geometry, seed=seeds)
def test_maxpool_gradcheck_and_reference(n, c, h, w, geom, seed):
    k, s, p = geom
    assume(p <= k // 2 and h + 2 * p >= k and w + 2 * p >= k)
    x = distinct_values(seed, (n, c, h, w))
    layer = nn.MaxPool2d(k, s, p)
    np.testing.assert_array_equal(layer.forward(x), naive_pool(x, k, s, p, np.max, -np.inf))
    check_layer(layer, x, seed=seed + 1)


@given(n=st.integers(1, 2), c=st.integers(1, 2), h=st.integers(1, 6), w=st.integers(1, 6),
       geom=pool_geometry, seed=seeds)
def test_avgpool_gradcheck_and_reference(n, c, h, w, geom, seed):
    k, s, p = geom
    assume(p <= k // 2 and h + 2 * p >= k and w + 2 * p >= k)
    x = normal(seed, (n, c, h, w))
    layer = nn.AvgPool2d(k, s, p)
    np.testing.assert_allclose(layer.forward(x), naive_pool(x, k, s, p, np.mean, 0.0), rtol=1e-12, atol=1e-15)
    check_layer(layer, x, seed=seed + 1)


@given(n=st.integers(1, 2), c=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7),
       rows=pool_geometry, cols=pool_geometry, seed=seeds)
def test_pools_take_separate_row_and_column_geometries(n, c, h, w, rows, cols, seed):
    """kernel_size, stride and padding as (rows, columns) pairs: each dimension uses its own."""
    (kh, sh, ph), (kw, sw, pw) = rows, cols
    assume(ph <= kh // 2 and pw <= kw // 2 and h + 2 * ph >= kh and w + 2 * pw >= kw)
    assume(rows != cols)
    k, s, p = (kh, kw), (sh, sw), (ph, pw)
    for layer, x, reduce, pad_value in ((nn.MaxPool2d(k, s, p), distinct_values(seed, (n, c, h, w)), np.max, -np.inf),
                                        (nn.AvgPool2d(k, s, p), normal(seed, (n, c, h, w)), np.mean, 0.0)):
        np.testing.assert_allclose(layer.forward(x), naive_pool(x, k, s, p, reduce, pad_value), rtol=1e-12, atol=1e-15)
        check_layer(layer, x, seed=seed + 1)


def test_pool_stride_defaults_to_the_kernel_size():
    x = normal(0, (1, 2, 6, 9))
    for cls, reduce, pad_value in ((nn.MaxPool2d, np.max, -np.inf), (nn.AvgPool2d, np.mean, 0.0)):
        for k in (2, (2, 3)):
            np.testing.assert_allclose(cls(k).forward(x), naive_pool(x, k, k, 0, reduce, pad_value), rtol=1e-12)


def test_maxpool_ties_route_gradient_to_first_element():
    x = np.ones((1, 1, 2, 2), np.float32)
    layer = nn.MaxPool2d(2)
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward(np.full((1, 1, 1, 1), 3.0, np.float32)), [[[[3, 0], [0, 0]]]])


def test_maxpool_padding_never_selected():
    x = -np.ones((1, 1, 2, 2))
    y = nn.MaxPool2d(3, 1, 1).forward(x)
    np.testing.assert_array_equal(y, -np.ones((1, 1, 2, 2)))


def test_pool_errors():
    with pytest.raises(ValueError, match="half the kernel"):
        nn.MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        nn.AvgPool2d(3).forward(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        nn.MaxPool2d(2).forward(np.zeros((2, 2), np.float32))


@given(n=small, c=small, h=small, w=small, seed=seeds)
def test_global_avgpool_gradcheck(n, c, h, w, seed):
    x = normal(seed, (n, c, h, w))
    layer = nn.GlobalAvgPool2d()
    np.testing.assert_allclose(layer.forward(x), x.mean(axis=(2, 3)))
    check_layer(layer, x, seed=seed + 1)


# --------------------------------------------------------------------------------------- Sequential
@given(n=st.integers(3, 6), seed=seeds)
def test_sequential_directional_check(n, seed):
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 5, rng=seed), nn.BatchNorm1d(5), nn.ReLU(),
                          nn.Linear(5, 3, rng=seed + 1)).astype(np.float64)
    x = normal(seed, (n, 2, 2, 2))
    hidden = model[:2].forward(x)
    assume(hidden.var(axis=0).min() > 0.05)  # BN over a few samples: keep its curvature moderate
    assume(np.abs(model[2].forward(hidden)).min() > 1e-2)  # and the ReLU inputs away from the kink
    labels = np.random.default_rng(seed).integers(0, 3, n)
    # h = 1e-6, not the default 1e-5: when the directional derivative happens to be small (~1e-3), the
    # O(h^2) truncation error of the central difference alone reaches the 1e-6 relative tolerance
    directional_check(model, x, lambda out: nn.softmax_cross_entropy(out, labels), seed=seed + 1, h=1e-6)


def test_sequential_chain_and_api():
    lin1, relu, lin2 = nn.Linear(4, 3, rng=0), nn.ReLU(), nn.Linear(3, 2, rng=1)
    seq = nn.Sequential(lin1, relu)
    seq.append(lin2)
    assert len(seq) == 3 and seq[0] is lin1 and seq[-1] is lin2 and list(seq) == [lin1, relu, lin2]
    assert list(seq.children) == ["0", "1", "2"]
    assert [name for name, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert isinstance(seq[1:], nn.Sequential) and list(seq[1:]) == [relu, lin2]
    with pytest.raises(IndexError):
        seq[3]
    with pytest.raises(TypeError):
        seq.append("not a module")
    x = normal(0, (5, 4)).astype(np.float32)
    y = seq.forward(x)
    np.testing.assert_array_equal(y, lin2.forward(relu.forward(lin1.forward(x))))
    seq.zero_grad()
    dy = normal(1, y.shape).astype(np.float32)
    dx = seq.backward(dy)
    expect = ((dy @ lin2.params["weight"]) * (lin1.forward(x) > 0)) @ lin1.params["weight"]
    np.testing.assert_allclose(dx, expect, rtol=1e-5)


# --------------------------------------------------------------------------------------- dtypes
def float32_cases():
    x4 = normal(0, (2, 3, 6, 6), np.float32)
    return [
        (nn.Linear(5, 3, rng=0), normal(0, (4, 5), np.float32)),
        (nn.BatchNorm2d(3), x4),
        (nn.BatchNorm1d(5), normal(0, (4, 5), np.float32)),
        (nn.ReLU(), x4),
        (nn.Dropout(0.3, rng=0), x4),
        (nn.Flatten(), x4),
        (nn.MaxPool2d(3, 2, 1), x4),
        (nn.AvgPool2d(3, 2, 1), x4),
        (nn.GlobalAvgPool2d(), x4),
        (nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), x4),
    ]


@pytest.mark.parametrize("layer,x", float32_cases(), ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("training", [True, False])
def test_float32_is_kept_and_dy_untouched(layer, x, training):
    layer.train(training)
    y = layer.forward(x)
    assert y.dtype == np.float32
    dy = normal(1, y.shape, np.float32)
    dy0 = dy.copy()
    dx = layer.backward(dy)
    np.testing.assert_array_equal(dy, dy0)
    assert dx.dtype == np.float32 and dx.shape == x.shape
    for store in (layer.params, layer.grads, layer.buffers):
        assert all(a.dtype == np.float32 for a in store.values())


def test_grads_accumulate_across_backward_calls():
    layer = nn.Linear(3, 2, rng=0).astype(np.float64)
    x, dy = normal(0, (4, 3)), normal(1, (4, 2))
    layer.zero_grad()
    layer.forward(x)
    layer.backward(dy)
    once = {k: g.copy() for k, g in layer.grads.items()}
    layer.backward(dy)
    for k in once:
        np.testing.assert_allclose(layer.grads[k], 2 * once[k])


def test_linear_backward_rejects_a_wrong_upstream_shape():
    lin = nn.Linear(4, 3, rng=0)
    lin.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"dy of shape \(N, out\) = \(2, 3\)"):
        lin.backward(np.zeros((2, 9), np.float32))


def test_add_into_on_threads_matches_plain_add():
    from npmask import config
    from npmask.nn import parallel
    rng = np.random.default_rng(3)
    a = rng.standard_normal((7, 3, 4, 5)).astype(np.float32)
    b = rng.standard_normal(a.shape).astype(np.float32)
    for threads in (3, 1):
        with config.using(threads=threads, parallel_min_floats=0):
            out = a.copy()
            parallel.add_into(np, out, b)
        np.testing.assert_array_equal(out, a + b)
    scalar = np.array(1.5, np.float32)
    parallel.add_into(np, scalar, np.float32(2.0))
    assert scalar == 3.5


def test_relu_on_threads_matches_one_thread():
    from npmask import config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3, 4, 5)).astype(np.float32)
    x[0, 0, 0, :2] = 0.0                          # the subgradient at 0 is 0
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = []
    for threads in (3, 1):
        with config.using(threads=threads, parallel_min_floats=0):
            layer = nn.ReLU()
            out.append((layer.forward(x), layer.backward(dy)))
    for a, b in zip(*out):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out[0][0], np.maximum(x, 0))
    np.testing.assert_array_equal(out[0][1], dy * (x > 0))
