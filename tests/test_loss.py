"""Softmax cross-entropy: gradient check, stability with large logits, validation, accuracy."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npmask import nn
from npmask.gradcheck import numeric_gradient, rel_error

seeds = st.integers(0, 2**32 - 1)


def reference_loss(z, t):
    """Textbook formula written differently from the implementation: log of the softmax ratio."""
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return -np.mean(np.log(p[np.arange(len(t)), t]))


@given(n=st.integers(1, 6), k=st.integers(1, 7), scale=st.floats(0.1, 10.0), seed=seeds)
def test_softmax_cross_entropy_gradcheck(n, k, scale, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k)) * scale
    t = rng.integers(0, k, n)
    loss, dz = nn.softmax_cross_entropy(z, t)
    assert isinstance(loss, float)
    assert loss == pytest.approx(reference_loss(z, t), rel=1e-12, abs=1e-12)
    z0 = z.copy()
    num = numeric_gradient(lambda: np.asarray(nn.softmax_cross_entropy(z, t)[0]), z, np.asarray(1.0))
    np.testing.assert_array_equal(z, z0)
    # absolute floor: the loss is O(1), so central differences carry ~1e-16/h ~ 1e-10 of noise
    assert rel_error(dz, num) < 1e-6 or np.abs(dz - num).max() < 1e-9
    np.testing.assert_allclose(dz.sum(axis=1), 0, atol=1e-12)  # softmax rows sum to 1, minus the one-hot


def test_known_values():
    z = np.zeros((4, 5), np.float32)
    loss, dz = nn.softmax_cross_entropy(z, np.array([0, 1, 2, 4]))
    assert loss == pytest.approx(np.log(5), rel=1e-6)
    expect = np.full((4, 5), 0.2 / 4, np.float32)
    expect[np.arange(4), [0, 1, 2, 4]] -= 1 / 4
    np.testing.assert_allclose(dz, expect, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_are_stable_and_dtype_kept(dtype):
    z = np.array([[1000.0, 0.0, -1000.0], [5000.0, 5001.0, 4999.0]], dtype)
    t = np.array([1, 1])
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
        loss, dz = nn.softmax_cross_entropy(z, t)
    assert np.isfinite(loss) and np.all(np.isfinite(dz))
    assert dz.dtype == dtype
    expect_row1 = 1000.0  # -log softmax = 1000 + log(1 + e^-1000 + e^-2000)
    expect_row2 = np.log(1 + np.exp(-1.0) + np.exp(-2.0))
    assert loss == pytest.approx((expect_row1 + expect_row2) / 2, rel=1e-6)
    # shifting all logits of a row changes nothing
    loss2, dz2 = nn.softmax_cross_entropy(z - z.max(axis=1, keepdims=True), t)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(dz2, dz, atol=1e-7)


def test_logits_are_not_modified():
    z = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    z0 = z.copy()
    nn.softmax_cross_entropy(z, np.array([0, 1, 3]))
    np.testing.assert_array_equal(z, z0)


@pytest.mark.parametrize("logits,labels,match", [
    (np.zeros((3,)), np.array([0, 1, 2]), r"shape \(N, num_classes\)"),
    (np.zeros((3, 4)), np.array([0, 1]), r"shape \(3,\)"),
    (np.zeros((3, 4)), np.array([[0, 1, 2]]), r"shape \(3,\)"),
    (np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]), "integers"),
    (np.zeros((3, 4)), np.array([0, 4, 1]), r"\[0, 3\].*\[0, 4\]"),
    (np.zeros((3, 4)), np.array([0, -1, 1]), r"\[0, 3\]"),
    (np.zeros((3, 4), np.int64), np.array([0, 1, 1]), "floating point"),
    (np.zeros((0, 4)), np.zeros(0, np.int64), "empty"),
])
def test_validation_errors(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        nn.softmax_cross_entropy(logits, labels)


def test_class_wrapper_and_accuracy():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, 3)).astype(np.float32)
    t = np.array([0, 1, 2, 0, 1, 2])
    crit = nn.SoftmaxCrossEntropy()
    with pytest.raises(RuntimeError, match="before forward"):
        crit.backward()
    loss = crit.forward(z, t)
    ref_loss, ref_dz = nn.softmax_cross_entropy(z, t)
    assert loss == ref_loss
    np.testing.assert_array_equal(crit.backward(), ref_dz)
    assert crit(z, t) == ref_loss

    z = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [1.0, 1.0]])
    assert nn.accuracy(z, np.array([0, 1, 1, 0])) == 0.75  # a tie counts as the first class
    with pytest.raises(ValueError):
        nn.accuracy(z, np.array([0, 1]))
