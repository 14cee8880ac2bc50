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
+ bias_c``, and backward writes the training formula as four in-place passes over dx,
``dx = (w s) * (dy - (centred * (s dweight / M) + dbias / M))``, with no temporary array.
Both work on the (N, C, L) view of the input (L = H*W; 1 for BatchNorm1d). Per-channel sums (the
mean, dbias) and sums of products (the variance, dweight) use ``einsum``, which adds without a
temporary array and, for these reductions over the first and last axes, runs faster than
``sum(axis=(0, 2))`` (same accuracy; benchmarks/elementwise.py). On NumPy every
per-channel vector is spread to a (C, L) array before it meets an activation (:func:`_spread`).
Channels are independent, so on NumPy both passes split the channels over a few threads
(:mod:`npmask.nn.parallel`), with bit-identical results.

Fused with the ReLU after it (setting ``fuse_bn_relu``, :func:`fuse_relu_into`), the blocks call,
through :class:`~npmask.nn.bn_relu.BNReLU`, ``forward(x, relu=True, residual=skip)``:
y = max(bn(x) + skip, 0) is made in the same per-channel pass, on the slice still in cache, with
the operations of the separate addition and ReLU (the same bits), and backward first takes the
ReLU's gradient ``dy * [y > 0]`` from the kept output y, in the same channel loop. On CuPy those
calls run as a few fused kernels (:mod:`npmask.nn.batchnorm_cuda`), and so, with the setting on,
does a batch norm with no ReLU after it (a shortcut's): four kernels a pass instead of one launch
per operation below.
"""
from __future__ import annotations

import functools

import numpy as np

from ..backend import _import_cupy, get_array_module
from ..config import settings
from .module import Module
from . import batchnorm_cuda, parallel


def _channel_sum(a3):
    """sum over images and positions of a3 (N, C, L) -> (C,).

    On NumPy ``einsum`` (faster than ``sum(axis=(0, 2))`` for WRN-28-4's shapes,
    benchmarks/elementwise.py); on CuPy the plain reduction.
    """
    if get_array_module(a3) is np:
        return np.einsum("ncl->c", a3)
    return a3.sum(axis=(0, 2))


def _channel_dot(a3, b3):
    """sum over images and positions of a3 * b3, both (N, C, L) -> (C,), with no temporary product.

    On NumPy ``einsum`` adds the products as it goes. On CuPy einsum is slower than one fused
    ReductionKernel over the same axes (benchmarks/cupy_reductions.py,
    benchmarks/results/gpu_h100.md), which is used there instead.
    """
    if get_array_module(a3, b3) is np:
        return np.einsum("ncl,ncl->c", a3, b3)
    return _cupy_dot_kernel()(a3, b3, axis=(0, 2))


@functools.lru_cache(maxsize=None)
def _cupy_dot_kernel():
    return _import_cupy().ReductionKernel("T a, T b", "T out", "a * b", "a + b", "out = a", "0",
                                          "npmask_channel_dot")


def _spread(xp, v, length: int):
    """The per-channel vector v (C,) shaped to broadcast against an (N, C, L) activation.

    On NumPy it is repeated along L into a contiguous (C, L) array (one image's worth of memory):
    NumPy's ufunc loops run faster (benchmarks/elementwise.py) when every operand is contiguous
    along the last axis than with the (C, 1) view, whose stride along L is 0. On CuPy the view
    serves, and the copy would be one more kernel launch.
    """
    column = v.reshape(-1, 1)
    return np.repeat(column, length, axis=1) if xp is np else column


def _over_channels(xp, x3, fn) -> None:
    """``fn(lo, hi)`` for ranges of channels covering all of x3's (N, C, L); on threads for images.

    Threads must not change a single bit of the result, and NumPy's sums over axes (0, 2) add in
    the same order for a slice of channels as for the whole array only when the slice has at least
    two channels (a one-channel slice is reduced along another path, which can differ by 1 ulp).
    So images are split into parts of two or more channels; an (N, C) input (L = 1), whose channel
    values are strided and which is small anyway, is one part.
    """
    if x3.shape[2] > 1 and x3.shape[1] >= 2 * settings.threads:
        parallel.in_parallel(xp, x3.shape[1], x3.size, fn)
    else:
        fn(0, x3.shape[1])


def fuse_relu_into(module) -> bool:
    """True when a block's :class:`~npmask.nn.bn_relu.BNReLU` step runs ``module`` with the ReLU
    after it (and the sum before that ReLU) fused in, as ``module.forward(x, relu=True,
    residual=...)``: the setting ``fuse_bn_relu`` is on and the module takes those arguments (a
    batch norm, or a wrapper that hands them on to one)."""
    return settings.fuse_bn_relu and bool(getattr(module, "takes_fused_relu", False))


class BatchNorm(Module):
    """The batch-norm base class: subclasses say which input rank they take; channels are axis 1.

    ``isinstance(m, BatchNorm)`` finds every batch-norm layer (e.g. to give each domain its own).
    """

    takes_fused_relu = True   # forward(x, relu=..., residual=...): see fuse_relu_into
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

    def _check_input(self, x):
        if x.ndim != self._ndim or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects input of shape "
                             f"{self._layout} with C={self.num_features}, got shape {tuple(x.shape)}")

    def forward(self, x, relu: bool = False, residual=None):
        """``y = bn(x)``; fused (:func:`fuse_relu_into`): ``y = max(bn(x) + residual, 0)``.

        ``relu=True`` applies the ReLU, a ``residual`` (an array of x's shape) is added before it,
        each in the same per-channel pass that writes y, with the operations of the separate
        addition and ReLU modules (the same bits on NumPy). The ReLU's backward needs only the sign
        of its output, so y itself is kept for the backward pass (no mask array); the caller must not
        change y in place.
        """
        self._check_input(x)
        xp = get_array_module(x)
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)                          # (N, C, L): L = H*W, or 1 for (N, C)
        length = x3.shape[2]
        m = n * length                                    # values per channel
        if self.training and m < 2:
            raise ValueError(f"{type(self).__name__} in training mode needs more than one value per "
                             f"channel (got input of shape {tuple(x.shape)}); use eval() or a larger batch")
        if residual is not None and tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{type(self).__name__}: the residual has shape {tuple(residual.shape)}, "
                             f"the output {tuple(x.shape)}")
        weight, bias = self.params["weight"], self.params["bias"]
        if (relu or residual is not None or settings.fuse_bn_relu) and batchnorm_cuda.applies(
                x, weight, self.buffers["running_mean"], residual):
            return self._forward_cuda(x3, x.shape, bool(relu), residual)
        r3 = None if residual is None else residual.reshape(n, c, length)
        y = xp.empty_like(x)
        y3 = y.reshape(n, c, length)
        if self.training:
            mean, var = xp.empty(c, dtype=x.dtype), xp.empty(c, dtype=x.dtype)
            centred = xp.empty_like(x)
            c3 = centred.reshape(n, c, length)
        else:
            mean, var, centred = self.buffers["running_mean"].copy(), self.buffers["running_var"], None
        inv_std = xp.empty(c, dtype=x.dtype)

        def channels(lo, hi):
            # Every channel is normalised independently of the others, so the channels are split
            # over threads (npmask/nn/parallel.py): each part writes only its own channels.
            xs, ys = x3[:, lo:hi], y3[:, lo:hi]
            if centred is not None:
                mean[lo:hi] = _channel_sum(xs) / m
                cs = c3[:, lo:hi]
                xp.subtract(xs, _spread(xp, mean[lo:hi], length), out=cs)
                var[lo:hi] = _channel_dot(cs, cs) / m  # biased: this is what normalises the batch
            inv_std[lo:hi] = 1 / xp.sqrt(var[lo:hi] + self.eps)  # s_c, reused unchanged by backward
            # y = weight * xhat + bias with xhat = (x - mean) * s folded into one per-channel scale, so
            # the activation-sized arrays are written twice (centred, y) instead of four times;
            # backward rebuilds what it needs from ``centred`` (or x) and s.
            scale = weight[lo:hi] * inv_std[lo:hi]
            if centred is None:   # eval: y = x * scale + (bias - mean * scale), a fixed affine map
                xp.multiply(xs, _spread(xp, scale, length), out=ys)
                shift = bias[lo:hi] - mean[lo:hi] * scale
            else:
                xp.multiply(cs, _spread(xp, scale, length), out=ys)
                shift = bias[lo:hi]
            xp.add(ys, _spread(xp, shift, length), out=ys)
            if r3 is not None:      # the residual sum, one addition per value as add_into's
                xp.add(ys, r3[:, lo:hi], out=ys)
            if relu:                # as ReLU's forward, in place on the cache-hot slice
                xp.maximum(ys, 0, out=ys)

        _over_channels(xp, x3, channels)
        if self.training:
            mom = self.momentum
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            # in place, so references held elsewhere stay valid; running var is unbiased (M / (M-1))
            rm[...] = (1 - mom) * rm + mom * mean.astype(rm.dtype)
            rv[...] = (1 - mom) * rv + mom * (var * (m / (m - 1))).astype(rv.dtype)
        # x is kept only in eval mode (where there is no centred copy): holding both would keep an
        # extra activation-sized array alive until the backward pass.
        self._cache = (x if centred is None else None, mean, centred, inv_std, self.training,
                       y if relu else None, residual is not None, False)
        return y

    def _forward_cuda(self, x3, shape, relu, residual):
        """The fused forward on CuPy (:mod:`npmask.nn.batchnorm_cuda`); x is kept, not centred."""
        y3, mean, inv_std = batchnorm_cuda.forward(
            x3, self.params["weight"], self.params["bias"], self.buffers["running_mean"],
            self.buffers["running_var"], self.eps, self.momentum, self.training, relu,
            None if residual is None else residual.reshape(x3.shape))
        y = y3.reshape(shape)
        self._cache = (x3.reshape(shape), mean, None, inv_std, self.training,
                       y if relu else None, residual is not None, True)
        return y

    def backward(self, dy):
        """dx; after a forward with a ``residual``, ``(dx, d)``: d is the gradient of the sum (for
        the residual's branch), ``dy * [y > 0]`` with the ReLU fused, else dy itself."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        x, mean, centred, inv_std, training, y, residual, kernels = self._cache
        kept = centred if centred is not None else x
        if tuple(dy.shape) != tuple(kept.shape):
            raise ValueError(f"{type(self).__name__}.backward got dy of shape {tuple(dy.shape)}; "
                             f"the forward pass produced {tuple(kept.shape)}")
        xp = get_array_module(dy)
        need_w, need_b = self.requires_grad("weight"), self.requires_grad("bias")
        n, c = dy.shape[:2]
        dy3 = dy.reshape(n, c, -1)
        length = dy3.shape[2]
        m = n * length
        if kernels:                             # the forward ran the CuPy kernels: so does backward
            into = (self.grads["weight"], self.grads["bias"]) if need_w and need_b else None
            dx3, d3, dweight, dbias = batchnorm_cuda.backward(
                dy3, kept.reshape(dy3.shape), None if y is None else y.reshape(dy3.shape), mean,
                inv_std, self.params["weight"], training, need_w or need_b, residual and y is not None,
                into)                           # the kernel adds into the gradients itself
            return self._gradients(dy.shape, dx3, dy3 if d3 is None else d3, dweight, dbias,
                                   need_w and into is None, need_b and into is None, residual)
        scale = self.params["weight"] * inv_std  # weight * s, per channel
        dx = xp.empty_like(dy)
        dx3 = dx.reshape(n, c, length)
        # the fused ReLU's gradient d = dy * [y > 0] (y > 0 exactly where ReLU's input was), made per
        # slice as ReLU's backward would, into a new array: the residual's branch takes it
        y3 = None if y is None else y.reshape(n, c, length)
        d3 = dy3 if y3 is None else xp.empty_like(dy3)
        if not training and not (need_w or need_b):
            def fixed(lo, hi):                                    # a frozen BN in eval mode is a
                if y3 is not None:                                # fixed scaling
                    xp.multiply(dy3[:, lo:hi], xp.greater(y3[:, lo:hi], 0), out=d3[:, lo:hi])
                xp.multiply(d3[:, lo:hi], _spread(xp, scale[lo:hi], length), out=dx3[:, lo:hi])
            _over_channels(xp, dy3, fixed)
            return self._gradients(dy.shape, dx3, d3, None, None, False, False, residual)
        dbias, dweight = xp.empty(c, dtype=dy.dtype), xp.empty(c, dtype=dy.dtype)

        kept3 = kept.reshape(n, c, length)              # centred (training) or x (eval)

        def channels(lo, hi):
            dys, dxs = dy3[:, lo:hi], dx3[:, lo:hi]
            if y3 is not None:
                dys = d3[:, lo:hi]
                xp.multiply(dy3[:, lo:hi], xp.greater(y3[:, lo:hi], 0), out=dys)
            cs = kept3[:, lo:hi]
            if centred is None:
                cs = cs - _spread(xp, mean[lo:hi], length)
            s = inv_std[lo:hi]
            dbias[lo:hi] = _channel_sum(dys)
            dweight[lo:hi] = _channel_dot(dys, cs) * s  # sum dy * xhat, xhat = centred * s
            if training:
                # dx = weight * s / M * (M dy - dbias - xhat * dweight)
                #    = (w s) * (dy - (centred * (s dweight / M) + dbias / M)), in place in dx
                xp.multiply(cs, _spread(xp, s * (dweight[lo:hi] / m), length), out=dxs)
                xp.add(dxs, _spread(xp, dbias[lo:hi] / m, length), out=dxs)
                xp.subtract(dys, dxs, out=dxs)
                xp.multiply(dxs, _spread(xp, scale[lo:hi], length), out=dxs)
            else:
                xp.multiply(dys, _spread(xp, scale[lo:hi], length), out=dxs)

        _over_channels(xp, dy3, channels)
        return self._gradients(dy.shape, dx3, d3, dweight, dbias, need_w, need_b, residual)

    def _gradients(self, shape, dx3, d3, dweight, dbias, need_w, need_b, residual):
        """Accumulates the parameters' gradients; returns dx, or (dx, d) after a residual."""
        if need_w:
            self.accumulate_grad("weight", dweight)
        if need_b:
            self.accumulate_grad("bias", dbias)
        dx = dx3.reshape(shape)
        return (dx, d3.reshape(shape)) if residual else dx

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(BatchNorm):
    """Batch normalisation over (N, C, H, W): statistics per channel over N, H and W."""

    _ndim = 4
    _layout = "(N, C, H, W)"


class BatchNorm1d(BatchNorm):
    """Batch normalisation over (N, C) features: statistics per feature over the batch."""

    _ndim = 2
    _layout = "(N, C)"


_BatchNorm = BatchNorm      # the former private name, kept so that older code still imports
