"""Batch normalisation (Ioffe & Szegedy, 2015) with PyTorch semantics.

For each channel c, over the M = N*H*W values of that channel in the batch (M = N for BatchNorm1d):

    mean_c = (1/M) sum x                 var_c = (1/M) sum (x - mean_c)^2      (biased)
    s_c    = 1 / sqrt(var_c + eps)       xhat  = (x - mean_c) * s_c
    y      = weight_c * xhat + bias_c

Training mode normalises with the batch statistics and updates the running averages

    running_mean <- (1 - momentum) * running_mean + momentum * mean_c
    running_var  <- (1 - momentum) * running_var  + momentum * var_c * M / (M - 1)   (unbiased)

Eval mode normalises with ``running_mean`` / ``running_var`` instead (a fixed affine map).

Backward, with the upstream gradient dy and sums over the M positions of channel c:

    dbias_c   = sum dy
    dweight_c = sum dy * xhat
    training: dx = weight_c * s_c / M * (M * dy - dbias_c - xhat * dweight_c)
    eval:     dx = weight_c * s_c * dy

The training formula is the compact per-channel form (as in Chainer): the mean and variance depend
on every x, which gives the two correction terms. The same s_c computed in forward is reused in
backward, so the two passes see exactly the same normalisation.

For speed (these layers touch every activation twice per step) xhat is never stored: forward keeps
the centred input x - mean_c and folds s_c into per-channel scales, ``y = centred * (weight_c s_c)
+ bias_c``, and backward expands the training formula into one pass over each array,
``dx = dy * (w s) - centred * (w s^2 dweight / M) - w s dbias / M``. Sums of products per channel
(the variance, dweight) use ``einsum``, which adds the products without a temporary array.
Channels are independent, so on NumPy both passes split the channels over a few threads
(:mod:`npmask.nn.parallel`), with bit-identical results.
"""
from __future__ import annotations

import functools

import numpy as np

from ..backend import get_array_module
from .module import Module
from . import parallel


def _channel_dot(a, b):
    """sum over every axis but the channel axis (1) of a * b, without the product's temporary.

    a, b (N, C) or (N, C, H, W) -> (C,). einsum adds the products of each (n, c) row as it goes.
    On CuPy, einsum was measured 2.7-7x slower than one fused ReductionKernel over the same axes
    (benchmarks/cupy_reductions.py, benchmarks/results/gpu_h100.md), which is used there instead.
    """
    xp = get_array_module(a, b)
    n, c = a.shape[:2]
    a3, b3 = a.reshape(n, c, -1), b.reshape(n, c, -1)
    if xp is np:
        return np.einsum("ncl,ncl->c", a3, b3)
    return _cupy_dot_kernel()(a3, b3, axis=(0, 2))


@functools.lru_cache(maxsize=None)
def _cupy_dot_kernel():
    from ..backend import _import_cupy
    return _import_cupy().ReductionKernel("T a, T b", "T out", "a * b", "a + b", "out = a", "0",
                                          "npmask_channel_dot")


def _part_shape(bshape, channels: int) -> tuple:
    """``bshape`` = (1, C, 1, ...), the broadcast shape of a per-channel vector, for ``channels``."""
    return (bshape[0], channels) + tuple(bshape[2:])


def _over_channels(xp, x, fn) -> None:
    """``fn(lo, hi)`` for ranges of channels covering all of x's; on threads for images.

    Threads must not change a single bit of the result, and NumPy's sums over axes (0, 2, 3) add in
    the same order for a slice of channels as for the whole array only when the slice has at least
    two channels (a one-channel slice is reduced along another path: measured, 1-ulp differences).
    So images are split into parts of two or more channels; an (N, C) input, whose channel values
    are strided and which is small anyway, is one part.
    """
    if x.ndim > 2 and x.shape[1] >= 2 * parallel.THREADS:
        parallel.in_parallel(xp, x.shape[1], x.size, fn)
    else:
        fn(0, x.shape[1])


class _BatchNorm(Module):
    """Shared core: subclasses say which input rank they take; the channel axis is always 1."""

    _ndim = None  # input rank: 4 for BatchNorm2d, 2 for BatchNorm1d
    _layout = ""  # for error messages

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 dtype=np.float32):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"{type(self).__name__} needs num_features >= 1, got {num_features}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        # PyTorch's initial state: identity affine map, running statistics of a standard normal.
        self.register_param("weight", np.ones(num_features, dtype=dtype))
        self.register_param("bias", np.zeros(num_features, dtype=dtype))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=dtype))
        self.register_buffer("running_var", np.ones(num_features, dtype=dtype))
        self._cache = None

    def _axes_and_shape(self, x):
        """Reduction axes (all but the channel axis) and the shape that broadcasts (C,) over x."""
        if x.ndim != self._ndim or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects input of shape "
                             f"{self._layout} with C={self.num_features}, got shape {tuple(x.shape)}")
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, self.num_features) + (1,) * (x.ndim - 2)
        return axes, shape

    def forward(self, x):
        axes, shape = self._axes_and_shape(x)
        xp = get_array_module(x)
        c = self.num_features
        m = x.size // c  # values per channel
        if self.training and m < 2:
            raise ValueError(f"{type(self).__name__} in training mode needs more than one value per "
                             f"channel (got input of shape {tuple(x.shape)}); use eval() or a larger batch")
        weight, bias = self.params["weight"], self.params["bias"]
        y = xp.empty_like(x)
        if self.training:
            mean, var = xp.empty(c, dtype=x.dtype), xp.empty(c, dtype=x.dtype)
            centred = xp.empty_like(x)
        else:
            mean, var, centred = self.buffers["running_mean"].copy(), self.buffers["running_var"], None
        inv_std = xp.empty(c, dtype=x.dtype)

        def channels(lo, hi):
            # Every channel is normalised independently of the others, so the channels are split
            # over threads (npmask/nn/parallel.py): each part writes only its own channels.
            xs, ys, sh = x[:, lo:hi], y[:, lo:hi], _part_shape(shape, hi - lo)
            if centred is not None:
                mean[lo:hi] = xs.mean(axis=axes)
                cs = centred[:, lo:hi]
                xp.subtract(xs, mean[lo:hi].reshape(sh), out=cs)
                var[lo:hi] = _channel_dot(cs, cs) / m  # biased: this is what normalises the batch
            inv_std[lo:hi] = 1 / xp.sqrt(var[lo:hi] + self.eps)  # s_c, reused unchanged by backward
            # y = weight * xhat + bias with xhat = (x - mean) * s folded into one per-channel scale, so
            # the activation-sized arrays are written twice (centred, y) instead of four times;
            # backward rebuilds what it needs from ``centred`` (or x) and s.
            scale = weight[lo:hi] * inv_std[lo:hi]
            if centred is None:   # eval: y = x * scale + (bias - mean * scale), a fixed affine map
                xp.multiply(xs, scale.reshape(sh), out=ys)
                ys += (bias[lo:hi] - mean[lo:hi] * scale).reshape(sh)
            else:
                xp.multiply(centred[:, lo:hi], scale.reshape(sh), out=ys)
                ys += bias[lo:hi].reshape(sh)

        _over_channels(xp, x, channels)
        if self.training:
            mom = self.momentum
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            # in place, so references held elsewhere stay valid; running var is unbiased (M / (M-1))
            rm[...] = (1 - mom) * rm + mom * mean.astype(rm.dtype)
            rv[...] = (1 - mom) * rv + mom * (var * (m / (m - 1))).astype(rv.dtype)
        # x is kept only in eval mode (where there is no centred copy): holding both would keep an
        # extra activation-sized array alive until the backward pass.
        self._cache = (x if centred is None else None, mean, centred, inv_std, axes, shape, self.training)
        return y

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        x, mean, centred, inv_std, axes, shape, training = self._cache
        xp = get_array_module(dy)
        need_w, need_b = self.requires_grad("weight"), self.requires_grad("bias")
        scale = self.params["weight"] * inv_std  # weight * s, per channel
        c, m = self.num_features, dy.size // self.num_features
        dx = xp.empty_like(dy)
        if not training and not (need_w or need_b):
            _over_channels(xp, dy, lambda lo, hi: xp.multiply(   # a frozen BN in eval mode is a
                dy[:, lo:hi], scale[lo:hi].reshape(_part_shape(shape, hi - lo)), out=dx[:, lo:hi]))
            return dx                                             # fixed scaling
        dbias, dweight = xp.empty(c, dtype=dy.dtype), xp.empty(c, dtype=dy.dtype)

        def channels(lo, hi):
            sh = _part_shape(shape, hi - lo)
            dys, dxs = dy[:, lo:hi], dx[:, lo:hi]
            cs = centred[:, lo:hi] if centred is not None else x[:, lo:hi] - mean[lo:hi].reshape(sh)
            dbias[lo:hi] = dys.sum(axis=axes)
            dweight[lo:hi] = _channel_dot(dys, cs) * inv_std[lo:hi]  # sum dy * xhat, xhat = centred * s
            xp.multiply(dys, scale[lo:hi].reshape(sh), out=dxs)
            if training:
                # dx = weight * s / M * (M dy - dbias - xhat * dweight), expanded so that each
                # activation-sized array is read once:
                # dx = dy * (w s) - centred * (w s * s * dweight / M) - (w s * dbias / M)
                dxs -= cs * (scale[lo:hi] * inv_std[lo:hi] * (dweight[lo:hi] / m)).reshape(sh)
                dxs -= (scale[lo:hi] * (dbias[lo:hi] / m)).reshape(sh)

        _over_channels(xp, dy, channels)
        if need_w:
            self.accumulate_grad("weight", dweight)
        if need_b:
            self.accumulate_grad("bias", dbias)
        return dx

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, C, H, W): statistics per channel over N, H and W."""

    _ndim = 4
    _layout = "(N, C, H, W)"


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) features: statistics per feature over the batch."""

    _ndim = 2
    _layout = "(N, C)"
