"""Solutions to the exercises of tutorial 1 (backprop by hand).

1.1 ``batchnorm_backward``: the training-mode backward pass of batch norm, and ``MyBatchNorm2d``,
    a BatchNorm2d that uses it (it must pass ``check_layer``).
1.2 ``conv2d_backward_loops``: the backward pass of a convolution written as plain loops (equal to
    npmask's im2col/GEMM version).
"""
from __future__ import annotations

import numpy as np

from npmask.nn import BatchNorm2d


def batchnorm_backward(dy, x, weight, eps=1e-5):
    """(dx, dweight, dbias) of training-mode batch norm, x and dy (N, C, H, W), weight (C,).

    With M = N*H*W values per channel, mean/var the biased batch statistics, s = 1/sqrt(var + eps)
    and xhat = (x - mean) * s: dbias = sum dy, dweight = sum dy * xhat and
    dx = weight * s / M * (M * dy - dbias - xhat * dweight), sums over (N, H, W).
    """
    axes = (0, 2, 3)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    s = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * s
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    w = weight.reshape(1, -1, 1, 1)
    dx = w * s / m * (m * dy - dbias.reshape(1, -1, 1, 1) - xhat * dweight.reshape(1, -1, 1, 1))
    return dx, dweight, dbias


class MyBatchNorm2d(BatchNorm2d):
    """npmask's forward pass, the backward pass of :func:`batchnorm_backward` (training mode)."""

    def forward(self, x):
        self._x = x
        return super().forward(x)

    def backward(self, dy):
        dx, dweight, dbias = batchnorm_backward(dy, self._x, self.params["weight"], self.eps)
        self.accumulate_grad("weight", dweight)
        self.accumulate_grad("bias", dbias)
        return dx


def conv2d_backward_loops(dy, x, weight, stride=1, padding=0):
    """(dx, dweight, dbias) of y = conv2d(x, weight) + bias, by looping over output positions.

    Each output y[n, o, i, j] is the dot product of weight[o] with the input window at
    (i*stride, j*stride) of the padded input; so that window receives dy[n, o, i, j] * weight[o]
    and weight[o] receives dy[n, o, i, j] * window.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    dxp = np.zeros_like(xp)
    dweight = np.zeros_like(weight)
    ho, wo = dy.shape[2:]
    for i in range(ho):
        for j in range(wo):
            r, q = i * stride, j * stride
            window = xp[:, :, r:r + kh, q:q + kw]                   # (N, C, kh, kw)
            g = dy[:, :, i, j]                                      # (N, O)
            dweight += np.einsum("no,nckl->ockl", g, window)
            dxp[:, :, r:r + kh, q:q + kw] += np.einsum("no,ockl->nckl", g, weight)
    dx = dxp[:, :, padding:padding + h, padding:padding + w]
    return dx, dweight, dy.sum(axis=(0, 2, 3))
