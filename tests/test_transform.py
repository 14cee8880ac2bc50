"""The affine mask transform: fast path == reference, gradients by finite differences."""
import itertools

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from npmask.gradcheck import numeric_gradient, rel_error
from npmask.masking.transform import (apply_affine, surrogate_derivative, transform_backward,
                                      transform_backward_reference, transform_forward,
                                      transform_forward_reference)

# Each k: fixed 0, fixed 1, fixed other, or learned (array).
K_CHOICES = ("zero", "one", "fixed", "learned")
ALL_LEARNED = ("learned", "learned", "learned", "learned")  # k0, k1, k2, k3 all learned
shapes = st.sampled_from([(3, 2, 3, 3), (4, 1, 1, 1), (2, 5), (5, 3, 1, 3), (1, 4, 3, 3)])


def make_case(shape, choices, channelwise, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape).astype(dtype)
    R = rng.uniform(-1, 1, shape).astype(dtype)
    R[np.abs(R) < 1e-3] = 0.5  # away from the threshold
    n = shape[0] if channelwise else 1
    ks = []
    for c in choices:
        if c == "zero":
            ks.append(0.0)
        elif c == "one":
            ks.append(1.0)
        elif c == "fixed":
            ks.append(float(rng.uniform(-2, 2)))
        elif c == "learned":
            ks.append(rng.uniform(-2, 2, n).astype(dtype))
        else:
            raise ValueError(f"unknown k choice {c!r}; one of {K_CHOICES}")
    G = rng.standard_normal(shape).astype(dtype)
    return W, R, tuple(ks), G


case = st.tuples(shapes, st.tuples(*[st.sampled_from(K_CHOICES)] * 4), st.booleans(),
                 st.integers(0, 2**31 - 1), st.sampled_from(["identity", "sigmoid"]),
                 st.sampled_from([0.0, 0.3]))


@given(case)
def test_fast_forward_and_backward_equal_reference(c):
    shape, choices, channelwise, seed, surrogate, tau = c
    W, R, ks, G = make_case(shape, choices, channelwise, seed)
    Wt, cache = transform_forward(W, R, ks, tau)
    np.testing.assert_allclose(Wt, transform_forward_reference(W, R, ks, tau), rtol=1e-12, atol=1e-12)
    assert Wt.dtype == W.dtype and Wt.shape == W.shape
    G_copy = G.copy()
    dks, dR, dW = transform_backward(G, cache, need_R=True, need_W=True, surrogate=surrogate)
    assert np.array_equal(G, G_copy), "backward wrote into G"
    rks, rR, rW = transform_backward_reference(G, W, R, ks, tau, surrogate)
    for j, k in enumerate(ks):
        if isinstance(k, float):
            assert dks[j] is None
        else:
            assert dks[j].shape == k.shape
            np.testing.assert_allclose(dks[j], rks[j], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dR, rR, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dW, rW, rtol=1e-12, atol=1e-12)


@given(case, st.sampled_from([2, 3]))
def test_output_channels_on_threads_give_the_serial_bits(c, threads):
    """The fast path's elementwise work split over threads by output channel: the serial numbers."""
    from npmask import config
    shape, choices, channelwise, seed, surrogate, tau = c
    W, R, ks, G = make_case(shape, choices, channelwise, seed, dtype=np.float32)
    results = []
    for t in (threads, 1):
        with config.using(threads=t, parallel_min_floats=0):
            Wt, cache = transform_forward(W, R, ks, tau)
            dks, dR, dW = transform_backward(G, cache, need_W=True, surrogate=surrogate)
            results.append([Wt, cache.M, dR, dW] + [d for d in dks if d is not None])
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@given(case)
def test_k_and_weight_gradients_by_finite_differences(c):
    shape, choices, channelwise, seed, surrogate, tau = c
    assume("learned" in choices)
    W, R, ks, G = make_case(shape, choices, channelwise, seed)
    _, cache = transform_forward(W, R, ks, tau)
    dks, _, dW = transform_backward(G, cache, need_W=True, surrogate=surrogate)

    def f():
        return transform_forward(W, R, ks, tau)[0]

    # W~ is linear in each k and in W (M fixed), so central differences are exact for any step; a
    # large step keeps the rounding error (about eps * |L| / h) far below the tolerance (with
    # h = 1e-6 it reached 1.4e-7 of a small dk2).
    for j, k in enumerate(ks):
        if not isinstance(k, float):
            assert rel_error(dks[j], numeric_gradient(f, k, G, h=1e-2)) < 1e-7, f"k{j}"
    assert rel_error(dW, numeric_gradient(f, W, G, h=1e-2)) < 1e-7


@given(case)
def test_R_gradient_is_surrogate_times_dL_dM(c):
    """dL/dR = h~'(R - tau) ∘ dL/dM, with dL/dM by finite differences on a real-valued M."""
    shape, choices, channelwise, seed, surrogate, tau = c
    W, R, ks, G = make_case(shape, choices, channelwise, seed)
    _, cache = transform_forward(W, R, ks, tau)
    _, dR, _ = transform_backward(G, cache, surrogate=surrogate)
    M = (R >= tau).astype(W.dtype)
    # W~ is linear in M, so central differences are exact for any step; a large step keeps the
    # rounding error (about eps * |L| / h) far below the tolerance.
    dM = numeric_gradient(lambda: apply_affine(W, M, ks), M, G, h=1e-2)
    # h~' written out independently of the code under test: 1, or e^-x / (1 + e^-x)^2
    x = R - tau
    h_prime = np.ones_like(x) if surrogate == "identity" else np.exp(-x) / (1 + np.exp(-x)) ** 2
    np.testing.assert_allclose(dR, h_prime * dM, rtol=1e-7, atol=1e-9)
    dR_ref = transform_backward_reference(G, W, R, ks, tau, surrogate)[1]
    np.testing.assert_allclose(dR_ref, h_prime * dM, rtol=1e-7, atol=1e-9)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_sigmoid_surrogate_derivative_is_that_of_the_smooth_sigmoid():
    """h~'(x) = σ'(x): known values, the closed form e^-x/(1+e^-x)^2, and finite differences of σ."""
    x = np.array([-6.0, -2.0, -0.5, 0.0, 1e-3, np.log(3.0), 4.0])
    got = surrogate_derivative(x, "sigmoid")
    assert got[3] == pytest.approx(0.25)                      # σ(0) = 1/2: 1/2 * 1/2
    assert got[5] == pytest.approx(0.1875)                    # σ(ln 3) = 3/4: 3/4 * 1/4
    np.testing.assert_allclose(got, np.exp(-x) / (1 + np.exp(-x)) ** 2, rtol=1e-12)
    h = 1e-5
    np.testing.assert_allclose(got, (_sigmoid(x + h) - _sigmoid(x - h)) / (2 * h), rtol=1e-8)
    assert np.array_equal(surrogate_derivative(x, "identity"), np.ones_like(x))


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_sigmoid_R_gradient_matches_finite_differences_of_the_smooth_surrogate(tau):
    """With M replaced by σ(R - tau), L = Σ G∘W~ is smooth in R: its finite differences must equal
    dL/dR of the sigmoid surrogate (the backward pass uses the hard M's A = k2 + k3 W, which does
    not depend on M, so the two agree exactly up to rounding)."""
    W, R, ks, G = make_case((4, 3, 3, 3), ALL_LEARNED, False, 5)
    _, cache = transform_forward(W, R, ks, tau)
    _, dR, _ = transform_backward(G, cache, surrogate="sigmoid")
    R_var = R.copy()
    dR_num = numeric_gradient(lambda: apply_affine(W, _sigmoid(R_var - tau), ks), R_var, G, h=1e-6)
    assert rel_error(dR, dR_num) < 1e-7


def test_mask_keeps_an_entry_exactly_at_the_threshold():
    """h(r) = 1[r >= 0] as the paper writes: R == tau keeps the weight (every path agrees)."""
    W = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3)
    tau = 0.25
    R = np.array([[0.25, 0.2499, 0.3], [-1.0, 0.25, 0.25000001]], dtype=np.float32)
    expected = np.array([[1, 0, 1], [0, 1, 1]], dtype=np.float32)
    pb = (0.0, 0.0, 0.0, 1.0)   # W~ = W∘M
    Wt, cache = transform_forward(W, R, pb, tau)
    assert np.array_equal(cache.M, expected.astype(bool))
    assert np.array_equal(Wt, W * expected)
    assert np.array_equal(transform_forward_reference(W, R, pb, tau), W * expected)


def test_R_gradient_is_zero_when_k2_k3_are_zero():
    """A known pitfall: at init of simple/full (k2 = k3 = 0) dL/dR = G∘(k2 + k3*W) is exactly 0."""
    W, R, _, G = make_case((3, 2, 3, 3), ALL_LEARNED, False, 1)
    ks = (1.0, np.zeros(1), np.zeros(1), np.zeros(1))
    _, cache = transform_forward(W, R, ks)
    _, dR, _ = transform_backward(G, cache)
    assert not dR.any()


def test_mask_is_a_hard_threshold_and_piggyback_is_W_times_M():
    W, R, _, _ = make_case((4, 3, 3, 3), ALL_LEARNED, False, 2)
    Wt, cache = transform_forward(W, R, (0.0, 0.0, 0.0, 1.0), 0.0)
    assert cache.M.dtype == bool
    assert np.array_equal(Wt, W * (R >= 0))


@pytest.mark.parametrize("threads", [1, 3])
def test_piggyback_keeps_W_itself_as_A_and_never_writes_it(threads):
    """k3 = 1, k2 = 0 (W∘M): A = k2 + k3*W is W, kept by reference (no weight-sized copy for the
    backward pass); W is left untouched, and W~, dR and the k gradients are the reference's, on one
    thread or with the output channels shared over three."""
    from npmask import config
    W, R, _, G = make_case((64, 16, 3, 3), ALL_LEARNED, False, 4, np.float32)
    W0 = W.copy()
    for k0, k1 in ((0.0, 0.0), (1.0, 0.0), (0.0, np.full(1, 0.3, np.float32))):
        ks = (k0, k1, 0.0, 1.0)
        with config.using(threads=threads, parallel_min_floats=0):
            Wt, cache = transform_forward(W, R, ks, 0.0)
            dks, dR, _ = transform_backward(G, cache)
        assert cache.A is W
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(Wt, transform_forward_reference(W, R, ks, 0.0))
        ref_dks, ref_dR, _ = transform_backward_reference(G, W, R, ks, 0.0)
        np.testing.assert_array_equal(dR, ref_dR)
        if not isinstance(k1, float):
            np.testing.assert_allclose(dks[1], ref_dks[1], rtol=1e-5)


def test_float32_stays_float32():
    W, R, ks, G = make_case((8, 4, 3, 3), ("fixed", "learned", "learned", "learned"), True, 3,
                            dtype=np.float32)
    Wt, cache = transform_forward(W, R, ks)
    dks, dR, dW = transform_backward(G, cache, need_W=True, surrogate="sigmoid")
    assert Wt.dtype == dR.dtype == dW.dtype == np.float32
    assert all(d.dtype == np.float32 for d in dks if d is not None)


@pytest.mark.parametrize("bad", ["shape", "k_shape", "k_dtype", "surrogate"])
def test_bad_inputs_are_clear_errors(bad):
    W, R, _, G = make_case((4, 3, 3, 3), ALL_LEARNED, False, 4)
    ks = [1.0, np.zeros(1), np.zeros(1), np.zeros(1)]
    if bad == "shape":
        with pytest.raises(ValueError, match="shape"):
            transform_forward(W, R[:2], ks)
    elif bad == "k_shape":
        ks[2] = np.zeros(3)
        with pytest.raises(ValueError, match="k2"):
            transform_forward(W, R, ks)
    elif bad == "k_dtype":
        ks[1] = np.zeros(1, dtype=np.float32)
        with pytest.raises(ValueError, match="dtype"):
            transform_forward(W, R, ks)
    else:
        _, cache = transform_forward(W, R, ks)
        with pytest.raises(ValueError, match="surrogate"):
            transform_backward(G, cache, surrogate="tanh")


def test_every_fixed_learned_combination_matches_reference():
    """Exhaustive over the 4^4 combinations on one shape (hypothesis samples them; this covers all)."""
    for choices in itertools.product(K_CHOICES, repeat=4):
        W, R, ks, G = make_case((3, 2, 2, 2), choices, True, 5)
        Wt, cache = transform_forward(W, R, ks)
        np.testing.assert_allclose(Wt, transform_forward_reference(W, R, ks), atol=1e-12)
        dks, dR, dW = transform_backward(G, cache, need_W=True)
        rks, rR, rW = transform_backward_reference(G, W, R, ks)
        np.testing.assert_allclose(dR, rR, atol=1e-12)
        np.testing.assert_allclose(dW, rW, atol=1e-12)
        for d, r, k in zip(dks, rks, ks):
            if not isinstance(k, float):
                np.testing.assert_allclose(d, r, atol=1e-12)
