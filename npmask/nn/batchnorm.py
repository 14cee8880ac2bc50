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
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .module import Module


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
        m = x.size // self.num_features  # values per channel
        if self.training:
            if m < 2:
                raise ValueError(f"{type(self).__name__} in training mode needs more than one value per "
                                 f"channel (got input of shape {tuple(x.shape)}); use eval() or a larger batch")
            mean = x.mean(axis=axes)
            centred = x - mean.reshape(shape)
            var = (centred * centred).mean(axis=axes)  # biased: this is what normalises the batch
            mom = self.momentum
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            # in place, so references held elsewhere stay valid; running var is unbiased (M / (M-1))
            rm[...] = (1 - mom) * rm + mom * mean.astype(rm.dtype)
            rv[...] = (1 - mom) * rv + mom * (var * (m / (m - 1))).astype(rv.dtype)
        else:
            centred = x - self.buffers["running_mean"].reshape(shape)
            var = self.buffers["running_var"]
        inv_std = 1 / xp.sqrt(var + self.eps)  # s_c, reused unchanged by backward
        xhat = centred * inv_std.reshape(shape)
        self._cache = (xhat, inv_std, axes, shape, self.training)
        return xhat * self.params["weight"].reshape(shape) + self.params["bias"].reshape(shape)

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        xhat, inv_std, axes, shape, training = self._cache
        dbias = dy.sum(axis=axes)
        dweight = (dy * xhat).sum(axis=axes)
        if self.requires_grad("weight"):
            self.accumulate_grad("weight", dweight)
        if self.requires_grad("bias"):
            self.accumulate_grad("bias", dbias)
        scale = (self.params["weight"] * inv_std).reshape(shape)
        if not training:
            return dy * scale
        m = dy.size // self.num_features
        # dx = weight * s / M * (M dy - sum(dy) - xhat * sum(dy * xhat)); the two sums are dbias, dweight
        return (scale / m) * (m * dy - dbias.reshape(shape) - xhat * dweight.reshape(shape))

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
