"""The batch norm's expanded forward/backward against the textbook formulas, term by term.

npmask/nn/batchnorm.py folds xhat = (x - mean) * s into per-channel scales and expands the backward
formula so that each activation-sized array is read once; this checks it against the formulas of
its docstring written out directly (float64), in training and eval mode, trained and frozen.
"""
import numpy as np
import pytest

from npmask import nn


def random_batchnorm(shape, dtype, training, frozen, rng):
    """A BatchNorm2d (4-D shape) or BatchNorm1d for inputs of ``shape``, its weight, bias and
    running statistics drawn from ``rng``; frozen or not, in training or eval mode."""
    layer = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1]).astype(dtype)
    layer.params["weight"][...] = rng.uniform(0.5, 2, shape[1])
    layer.params["bias"][...] = rng.standard_normal(shape[1])
    layer.buffers["running_mean"][...] = rng.standard_normal(shape[1])
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2, shape[1])
    if frozen:
        layer.freeze()
    return layer.train(training)


def _reference(x, dy, weight, bias, running_mean, running_var, eps, training):
    """(y, dx, dweight, dbias) by the docstring's formulas, xhat materialised."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = x.size // x.shape[1]
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = running_mean, running_var
    s = 1 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * s.reshape(shape)
    y = weight.reshape(shape) * xhat + bias.reshape(shape)
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    if training:
        dx = (weight * s / m).reshape(shape) * (m * dy - dbias.reshape(shape) - xhat * dweight.reshape(shape))
    else:
        dx = (weight * s).reshape(shape) * dy
    return y, dx, dweight, dbias


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
def test_fast_batchnorm_matches_formulas(shape, training, frozen):
    rng = np.random.default_rng(len(shape) + 2 * training + 4 * frozen)
    layer = random_batchnorm(shape, np.float64, training, frozen, rng)
    x = rng.standard_normal(shape) * 3 + 1
    dy = rng.standard_normal(shape)
    ref = _reference(x, dy, layer.params["weight"], layer.params["bias"],
                     layer.buffers["running_mean"].copy(), layer.buffers["running_var"].copy(),
                     layer.eps, training)
    y = layer.forward(x)
    dx = layer.backward(dy)
    np.testing.assert_allclose(y, ref[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, ref[1], rtol=1e-10, atol=1e-12)
    if frozen:
        assert layer.grads == {}
    else:
        np.testing.assert_allclose(layer.grads["weight"], ref[2], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grads["bias"], ref[3], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape, threads", [
    ((4, 7, 5, 6), 3),     # parts of 2, 2 and 3 channels
    ((6, 5, 4, 4), 2),     # parts of 2 and 3
    ((5, 4, 9, 11), 2),    # parts of 2 and 2
    ((5, 3, 9, 11), 2),    # one part would have 1 channel (sums in another order): run as one part
    ((9, 5), 3),           # (N, C): always one part
])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_on_threads_give_the_serial_bits(shape, threads, training, frozen, dtype):
    """Channels split over threads give exactly the numbers of one thread, run after run."""
    from npmask import config
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(dtype) * 3 + 1
    dy = rng.standard_normal(shape).astype(dtype)
    results = []
    for threads in (threads, 1, threads):
        with config.using(threads=threads, parallel_min_floats=0):
            layer = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1]).astype(dtype)
            layer.params["weight"][...] = np.linspace(0.5, 2, shape[1])
            layer.buffers["running_var"][...] = np.linspace(0.5, 3, shape[1])
            if frozen:
                layer.freeze()
            layer.train(training)
            y = layer.forward(x)
            dx = layer.backward(dy)
            grads = [layer.grads.get(k) for k in ("weight", "bias")]
            results.append([y, dx, layer.buffers["running_mean"].copy(), layer.buffers["running_var"].copy()]
                           + [g.copy() for g in grads if g is not None])
    for threaded, serial in ((results[0], results[1]), (results[2], results[1])):
        assert len(threaded) == len(serial)
        for a, b in zip(threaded, serial):
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)
