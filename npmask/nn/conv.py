"""2-D convolution (cross-correlation, NCHW) with a hand-written backward pass.

Shapes: x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None, y (N, O, Ho, Wo) with
Ho = (H + 2p - kh) // s + 1, Wo = (W + 2p - kw) // s + 1 (s = stride, p = padding), and xpad the
input with p zeros on every side. The formulas (``conv_reference.py`` writes them as plain loops):

    y[n, o, i, j]    = b[o] + sum_{c,u,v} W[o, c, u, v] * xpad[n, c, s*i + u, s*j + v]
    dW[o, c, u, v]   = sum_{n,i,j} dy[n, o, i, j] * xpad[n, c, s*i + u, s*j + v]
    dxpad[n, c, s*i + u, s*j + v] += sum_o W[o, c, u, v] * dy[n, o, i, j]
    db[o]            = sum_{n,i,j} dy[n, o, i, j]

How (im2col + GEMM + col2im): copy every receptive field into a *channel-major* column matrix

    cols[(c, u, v), (n, i, j)] = xpad[n, c, s*i + u, s*j + v]      shape (C*kh*kw, N*Ho*Wo)

and each of the first three sums is ONE matrix product (GEMM), which BLAS runs near the machine's
peak; with W_mat = W.reshape(O, C*kh*kw) and dy_mat[o, (n, i, j)] = dy[n, o, i, j]:

    y_mat = W_mat @ cols          (O, N*Ho*Wo)
    dW    = dy_mat @ cols.T       (O, C*kh*kw)
    dcols = W_mat.T @ dy_mat      (C*kh*kw, N*Ho*Wo), then col2im: each entry is added back to the
                                  input pixel it was copied from (the adjoint of im2col)

:func:`im2col` and :func:`col2im` loop over the kh*kw kernel offsets (u, v), one strided slice each.
This file is that path, top to bottom. By default the functional API hands the same sums to
:mod:`npmask.nn.conv_fast` (chunks of images sized for the CPU cache, shared over threads, cheaper
column layouts), which is tested against this path; ``npmask.config.using(conv_impl="readable")``
runs this one. :class:`Conv2d` is the layer; the masked convolution calls ``conv2d_forward`` /
``conv2d_backward`` with its transformed weight.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, rng as make_rng
from ..config import settings
from . import conv_fast
from .checks import check_array
from .module import Module

__all__ = ["conv2d_forward", "conv2d_backward", "conv_output_size", "im2col", "col2im", "Conv2d"]


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one spatial axis: (size + 2*padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_output_shape(x_shape, weight_shape, stride: int, padding: int) -> tuple:
    """(N, O, Ho, Wo) of a convolution of input ``x_shape`` with ``weight_shape``."""
    n, _, h, w = x_shape
    o, _, kh, kw = weight_shape
    return (n, o, conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding))


def check_conv_gradient(layer, dy, cache) -> None:
    """dy of a convolution's backward must have the shape its forward output had."""
    if cache is None:
        return  # the layer's own "backward called before forward" error follows
    x, weight, _, stride, padding = cache[:5]
    check_array(layer, dy, "gradient", conv_output_shape(x.shape, weight.shape, stride, padding))


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _check_shapes(x, weight, bias, stride: int, padding: int):
    if x.ndim != 4:
        raise ValueError(f"conv2d expects x shaped (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"conv2d expects weight shaped (O, C, kh, kw), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1]} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"conv2d needs one dtype for x, weight and bias; got x {x.dtype}, weight "
                         f"{weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}"))
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    _, _, h, w = x.shape
    _, _, kh, kw = weight.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel {kh}x{kw} does not fit the input {h}x{w} with padding {padding}")
    return ho, wo


def _windows(a, u: int, v: int, stride: int, ho: int, wo: int):
    """The view a[:, :, s*i + u, s*j + v] for all i < Ho, j < Wo: what kernel offset (u, v) meets."""
    return a[:, :, u:u + stride * (ho - 1) + 1:stride, v:v + stride * (wo - 1) + 1:stride]


def im2col(x, kh: int, kw: int, stride: int, padding: int):
    """cols (C*kh*kw, N*Ho*Wo) with cols[(c, u, v), (n, i, j)] = xpad[n, c, s*i + u, s*j + v]."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    xpad = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
    xpad[:, :, padding:padding + h, padding:padding + w] = x
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):                            # (N, C, Ho, Wo) -> rows (c, u, v)
            cols[:, u, v] = _windows(xpad, u, v, stride, ho, wo).transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * ho * wo)


def col2im(dcols, x_shape, kh: int, kw: int, stride: int, padding: int):
    """dx (N, C, H, W) from dcols (C*kh*kw, N*Ho*Wo): the adjoint of :func:`im2col`.

    Every entry of dcols goes back to the input pixel it was copied from, one strided-slice ``+=``
    per kernel offset (overlapping windows add up), in a fixed order: deterministic, no atomics.
    """
    xp = get_array_module(dcols)
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    dxpad = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=dcols.dtype)
    d = dcols.reshape(c, kh, kw, n, ho, wo)
    for u in range(kh):
        for v in range(kw):
            _windows(dxpad, u, v, stride, ho, wo)[...] += d[:, u, v].transpose(1, 0, 2, 3)
    return xp.ascontiguousarray(dxpad[:, :, padding:padding + h, padding:padding + w])


def _dy_matrix(dy):
    """dy_mat (O, N*Ho*Wo) with dy_mat[o, (n, i, j)] = dy[n, o, i, j]."""
    n, o, ho, wo = dy.shape
    return dy.transpose(1, 0, 2, 3).reshape(o, n * ho * wo)


def conv2d_forward(x, weight, bias=None, stride: int = 1, padding: int = 0, keep_columns: bool = False):
    """y = conv2d(x, weight) + bias; returns ``(y, cache)`` for :func:`conv2d_backward`.

    x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None; y (N, O, Ho, Wo), same dtype as x.
    ``cache`` is opaque: pass it unchanged to :func:`conv2d_backward`. It holds references to ``x``
    and ``weight`` (no copies), so neither may be modified in place before the backward pass.

    ``keep_columns``: a training layer whose weight gradient will be needed says so; the fast path
    then keeps the column matrix of a small convolution in the cache (``settings.
    conv_keep_columns_floats``) and the backward pass's weight gradient uses it instead of copying
    x into columns again (the same numbers, bit for bit). The backward pass lets it go.
    """
    xp = get_array_module(x, weight)
    stride, padding = int(stride), int(padding)
    ho, wo = _check_shapes(x, weight, bias, stride, padding)
    n, o, kh, kw = x.shape[0], weight.shape[0], weight.shape[2], weight.shape[3]
    columns = None
    if settings.conv_impl == "readable":
        y_mat = weight.reshape(o, -1) @ im2col(x, kh, kw, stride, padding)        # (O, N*Ho*Wo)
        y = xp.ascontiguousarray(y_mat.reshape(o, n, ho, wo).transpose(1, 0, 2, 3))
    else:
        columns = [] if keep_columns else None
        y = conv_fast.conv_gemm(x, weight, stride, padding, padding, ho, wo, kept=columns)
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    cache = (x, weight, bias is not None, stride, padding, columns or None)
    return y, cache


def conv2d_backward(dy, cache, need_dx: bool = True, need_dweight: bool = True):
    """Gradients of conv2d: returns ``(dx, dweight, dbias)``; ``dy`` is read, never written.

    dy (N, O, Ho, Wo) is dL/dy; dx (N, C, H, W), dweight (O, C, kh, kw), dbias (O,). An entry is
    None when it was not asked for (``need_dx``/``need_dweight`` False) or, for dbias, when the
    forward pass had no bias. Skipping dx (first layer) or dweight (frozen weight) saves one GEMM.
    """
    x, weight, has_bias, stride, padding = cache[:5]
    columns = (cache[5] if len(cache) > 5 else None) or None   # kept by the forward pass (used once)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    if tuple(dy.shape[:2]) != (n, o) or dy.dtype != x.dtype:
        raise ValueError(f"dy has shape {tuple(dy.shape)} and dtype {dy.dtype}; the forward pass "
                         f"produced ({n}, {o}, Ho, Wo) in {x.dtype}")
    readable = settings.conv_impl == "readable"
    dbias = dy.sum(axis=(0, 2, 3)) if has_bias else None
    dweight = dx = None
    if need_dweight and readable:
        dweight = (_dy_matrix(dy) @ im2col(x, kh, kw, stride, padding).T).reshape(weight.shape)
    elif need_dweight:
        dweight = conv_fast.weight_grad(dy, x, kh, kw, stride, padding, columns=columns)
    if columns is not None:
        columns.clear()          # used once: their memory goes now, not at the next forward pass
    if need_dx and readable:
        dcols = weight.reshape(o, -1).T @ _dy_matrix(dy)                          # (C*kh*kw, N*Ho*Wo)
        dx = col2im(dcols, x.shape, kh, kw, stride, padding)
    elif need_dx:
        dx = conv_fast.input_grad(dy, weight, x.shape, stride, padding)
    return dx, dweight, dbias


class Conv2d(Module):
    """2-D convolution layer: params "weight" (O, C, kh, kw) and, with ``bias=True``, "bias" (O,).

    Initialisation: He/Kaiming normal with fan_out, std = sqrt(2 / (O * kh * kw)), as in the
    reference Wide-ResNet code (``m.weight.data.normal_(0, math.sqrt(2. / n))`` with
    ``n = kh * kw * out_channels``). fan_out keeps the variance of the *backward* signal constant
    through ReLU networks; the bias starts at zero.

    Set ``need_input_grad = False`` on the first layer of a network: its input is the image, whose
    gradient nobody needs, and skipping it saves one GEMM. A frozen weight (``freeze("weight")``)
    likewise skips the weight-gradient GEMM.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
                 padding: int = 0, bias: bool = False, dtype=np.float32, rng=None):
        super().__init__()
        kh, kw = _pair(kernel_size, "kernel_size")
        if min(in_channels, out_channels, kh, kw) < 1:
            raise ValueError(f"Conv2d needs positive channels and kernel size, got in={in_channels}, "
                             f"out={out_channels}, kernel={kernel_size}")
        if int(stride) < 1 or int(padding) < 0:
            raise ValueError(f"Conv2d needs stride >= 1 and padding >= 0, got {stride}, {padding}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (kh, kw)
        self.stride, self.padding = int(stride), int(padding)
        self.need_input_grad = True
        gen = make_rng(rng)
        std = np.sqrt(2.0 / (out_channels * kh * kw))
        weight = (gen.standard_normal((out_channels, in_channels, kh, kw)) * std).astype(dtype)
        self.register_param("weight", weight)
        if bias:
            self.register_param("bias", np.zeros(out_channels, dtype=dtype))
        self._cache = None

    def forward(self, x):
        check_array(self, x, "input", None)
        y, self._cache = conv2d_forward(x, self.params["weight"], self.params.get("bias"),
                                        self.stride, self.padding,
                                        keep_columns=self.training and self.requires_grad("weight"))
        return y

    def backward(self, dy):
        check_conv_gradient(self, dy, self._cache)
        if self._cache is None:
            raise RuntimeError("Conv2d.backward called before forward")
        dx, dweight, dbias = conv2d_backward(dy, self._cache, need_dx=self.need_input_grad,
                                             need_dweight=self.requires_grad("weight"))
        if dweight is not None:
            self.accumulate_grad("weight", dweight)
        if dbias is not None:
            self.accumulate_grad("bias", dbias)
        return dx

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}")
