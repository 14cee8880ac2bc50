"""Pooling layers over (N, C, H, W): MaxPool2d, AvgPool2d, GlobalAvgPool2d.

Max and average pooling are written as a loop over the ``kh * kw`` kernel offsets ``(i, j)``: for
each offset, the strided slice

    xp_pad[:, :, i : i + s*(Ho-1) + 1 : s, j : j + s*(Wo-1) + 1 : s]      (N, C, Ho, Wo)

holds the element at offset (i, j) of every window. Forward combines these slices (max or sum);
backward adds the gradient back into the same slices with ``+=``, one offset at a time. Within one
slice no position repeats, so this is exact and deterministic without scatter-add atomics, and the
same code runs on NumPy and CuPy. Output size (floor mode, as PyTorch's default):

    Ho = (H + 2 * padding - kh) // stride + 1
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .module import Module


def _pair(v, name):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class _Pool2d(Module):
    """Shared geometry of max and average pooling."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride if stride is not None else kernel_size, "stride")
        self.padding = _pair(padding, "padding")
        kh, kw = self.kernel_size
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{type(self).__name__}: kernel_size and stride must be >= 1 and padding >= 0, "
                             f"got kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}")
        if self.padding[0] > kh // 2 or self.padding[1] > kw // 2:
            # as PyTorch: a window made only of padding would have no input element
            raise ValueError(f"{type(self).__name__}: padding {self.padding} must be at most half the "
                             f"kernel size {self.kernel_size}")
        self._cache = None

    def _geometry(self, x):
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects input of shape (N, C, H, W), got {tuple(x.shape)}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        H, W = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        if H < kh or W < kw:
            raise ValueError(f"{type(self).__name__}: input of spatial size {tuple(x.shape[2:])} with padding "
                             f"{self.padding} is smaller than the kernel {self.kernel_size}")
        return (H - kh) // sh + 1, (W - kw) // sw + 1

    def _pad(self, x, value):
        ph, pw = self.padding
        if ph == 0 and pw == 0:
            return x
        xp = get_array_module(x)
        out = xp.full((x.shape[0], x.shape[1], x.shape[2] + 2 * ph, x.shape[3] + 2 * pw), value, dtype=x.dtype)
        out[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]] = x
        return out

    def _window(self, i, j, ho, wo):
        """The index tuple selecting kernel offset (i, j) of every window (see the module docstring)."""
        sh, sw = self.stride
        return (slice(None), slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))

    def _crop(self, dx_pad):
        ph, pw = self.padding
        if ph == 0 and pw == 0:
            return dx_pad
        return dx_pad[:, :, ph:dx_pad.shape[2] - ph, pw:dx_pad.shape[3] - pw]

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max pooling: ``y[n,c,a,b] = max over the window``; padding counts as -inf (never selected).

    Backward routes each ``dy[n,c,a,b]`` to the position of the maximum of its window. On ties the
    first offset in row-major kernel order wins, so the routing is deterministic.
    """

    def forward(self, x):
        ho, wo = self._geometry(x)
        xp = get_array_module(x)
        x_pad = self._pad(x, -np.inf)
        kh, kw = self.kernel_size
        best = None
        arg = xp.zeros((x.shape[0], x.shape[1], ho, wo), dtype=np.int32)  # offset index i*kw + j
        for i in range(kh):
            for j in range(kw):
                v = x_pad[self._window(i, j, ho, wo)]
                if best is None:
                    best = v.copy()
                    continue
                better = v > best  # strict: on a tie the earlier offset keeps the gradient
                best = xp.where(better, v, best)
                arg = xp.where(better, np.int32(i * kw + j), arg)
        self._cache = (arg, x_pad.shape, ho, wo)
        return best

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError("MaxPool2d.backward called before forward")
        arg, pad_shape, ho, wo = self._cache
        xp = get_array_module(dy)
        kh, kw = self.kernel_size
        dx_pad = xp.zeros(pad_shape, dtype=dy.dtype)
        for i in range(kh):
            for j in range(kw):
                dx_pad[self._window(i, j, ho, wo)] += xp.where(arg == i * kw + j, dy, 0)
        return self._crop(dx_pad)


class AvgPool2d(_Pool2d):
    """Average pooling: ``y = (1 / (kh*kw)) * sum over the window``, zero padding counted in the
    average (PyTorch's default ``count_include_pad=True``). Backward: every position of a window
    receives ``dy / (kh*kw)``.
    """

    def forward(self, x):
        ho, wo = self._geometry(x)
        x_pad = self._pad(x, 0)
        kh, kw = self.kernel_size
        total = None
        for i in range(kh):
            for j in range(kw):
                v = x_pad[self._window(i, j, ho, wo)]
                total = v.copy() if total is None else total + v
        self._cache = (x_pad.shape, ho, wo)
        return total * x.dtype.type(1.0 / (kh * kw))

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError("AvgPool2d.backward called before forward")
        pad_shape, ho, wo = self._cache
        xp = get_array_module(dy)
        kh, kw = self.kernel_size
        share = dy * dy.dtype.type(1.0 / (kh * kw))
        dx_pad = xp.zeros(pad_shape, dtype=dy.dtype)
        for i in range(kh):
            for j in range(kw):
                dx_pad[self._window(i, j, ho, wo)] += share
        return self._crop(dx_pad)


class GlobalAvgPool2d(Module):
    """(N, C, H, W) -> (N, C): the mean over H and W. Backward spreads ``dy / (H*W)`` evenly."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"GlobalAvgPool2d expects input of shape (N, C, H, W), got {tuple(x.shape)}")
        self._shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        if self._shape is None:
            raise RuntimeError("GlobalAvgPool2d.backward called before forward")
        xp = get_array_module(dy)
        n, c, h, w = self._shape
        dx = xp.empty(self._shape, dtype=dy.dtype)
        dx[...] = (dy * dy.dtype.type(1.0 / (h * w)))[:, :, None, None]
        return dx
