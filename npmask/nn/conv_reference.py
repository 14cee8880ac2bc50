"""A naive 2-D convolution written for clarity, not speed: the definition the fast code is tested against.

Shapes: x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None, output y (N, O, Ho, Wo) with

    Ho = (H + 2*padding - kh) // stride + 1          Wo = (W + 2*padding - kw) // stride + 1

Forward (cross-correlation, as in PyTorch), with xp the zero-padded input:

    y[n, o, i, j] = bias[o] + sum_{c, p, q} weight[o, c, p, q] * xp[n, c, i*stride + p, j*stride + q]

Backward, for an upstream gradient dy = dL/dy, differentiate the same sum term by term:

    dweight[o, c, p, q] = sum_{n, i, j} dy[n, o, i, j] * xp[n, c, i*stride + p, j*stride + q]
    dxp[n, c, i*stride + p, j*stride + q] += sum_o dy[n, o, i, j] * weight[o, c, p, q]
    dbias[o] = sum_{n, i, j} dy[n, o, i, j]

and dx is dxp with the padding cut away. Plain Python loops over the output positions; NumPy only
for the small sums over channels. Use it on tiny inputs only (tests, teaching).
"""
from __future__ import annotations

import numpy as np


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one spatial axis: (size + 2*padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def conv2d_forward_naive(x, weight, bias=None, stride: int = 1, padding: int = 0):
    """y (N, O, Ho, Wo) from x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None."""
    x = np.asarray(x)
    weight = np.asarray(weight)
    n, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    assert c == c_w, "input channels of x and weight differ"
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))

    y = np.zeros((n, o, ho, wo), dtype=x.dtype)
    for b in range(n):
        for out_c in range(o):
            for i in range(ho):
                for j in range(wo):
                    # The receptive field of output (i, j): a C x kh x kw window of the input.
                    window = xpad[b, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    y[b, out_c, i, j] = np.sum(window * weight[out_c])
            if bias is not None:
                y[b, out_c] += bias[out_c]
    return y


def conv2d_backward_naive(dy, x, weight, stride: int = 1, padding: int = 0, with_bias: bool = True):
    """(dx, dweight, dbias) for upstream gradient dy (N, O, Ho, Wo); dbias is None without bias."""
    dy = np.asarray(dy)
    x = np.asarray(x)
    weight = np.asarray(weight)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    _, _, ho, wo = dy.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))

    dxpad = np.zeros_like(xpad)
    dweight = np.zeros_like(weight)
    for b in range(n):
        for out_c in range(o):
            for i in range(ho):
                for j in range(wo):
                    g = dy[b, out_c, i, j]
                    rows = slice(i * stride, i * stride + kh)
                    cols = slice(j * stride, j * stride + kw)
                    # y[b, out_c, i, j] used this window once, weighted by weight[out_c]:
                    # each side of the product receives g times the other side.
                    dweight[out_c] += g * xpad[b, :, rows, cols]
                    dxpad[b, :, rows, cols] += g * weight[out_c]
    dx = dxpad[:, :, padding:padding + h, padding:padding + w]
    dbias = dy.sum(axis=(0, 2, 3)) if with_bias else None
    return dx, dweight, dbias
