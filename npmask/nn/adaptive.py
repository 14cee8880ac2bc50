"""Adaptive average pooling to a fixed output size (torchvision's VGG pools to 7x7 before its classifier).

For an input of H rows and an output of ``oh`` rows, output row ``i`` averages the input rows

    start(i) = floor(i * H / oh)        end(i) = ceil((i + 1) * H / oh)        (end exclusive)

and the same for columns (PyTorch's ``AdaptiveAvgPool2d`` bins). The bins cover every input row;
they may overlap (H not a multiple of oh) and, when H < oh, one input row feeds several output rows.
Backward: every position of bin (i, j) receives ``dy[..., i, j] / (bin area)``; overlapping bins
add up. When H = oh and W = ow every bin is one element and the layer is the identity.
"""
from __future__ import annotations

from ..backend import get_array_module
from .module import Module


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the ``out`` bins over ``size`` positions (see the module docstring)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


class AdaptiveAvgPool2d(Module):
    """(N, C, H, W) -> (N, C, oh, ow), the mean over each adaptive bin. ``output_size``: int or pair."""

    def __init__(self, output_size):
        super().__init__()
        if isinstance(output_size, (tuple, list)):
            oh, ow = (int(v) for v in output_size)
        else:
            oh = ow = int(output_size)
        if oh < 1 or ow < 1:
            raise ValueError(f"AdaptiveAvgPool2d needs an output size >= 1, got {output_size!r}")
        self.output_size = (oh, ow)
        self._shape = None

    def forward(self, x):
        if x.ndim != 4 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"AdaptiveAvgPool2d expects input of shape (N, C, H, W), got {tuple(x.shape)}")
        self._shape = x.shape
        oh, ow = self.output_size
        if (x.shape[2], x.shape[3]) == (oh, ow):
            return x.copy()                     # every bin is one element: the identity
        xp = get_array_module(x)
        y = xp.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype)
        for i, (h0, h1) in enumerate(adaptive_bins(x.shape[2], oh)):
            for j, (w0, w1) in enumerate(adaptive_bins(x.shape[3], ow)):
                y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
        return y

    def backward(self, dy):
        if self._shape is None:
            raise RuntimeError("AdaptiveAvgPool2d.backward called before forward")
        oh, ow = self.output_size
        if (self._shape[2], self._shape[3]) == (oh, ow):
            return dy.copy()
        xp = get_array_module(dy)
        dx = xp.zeros(self._shape, dtype=dy.dtype)
        for i, (h0, h1) in enumerate(adaptive_bins(self._shape[2], oh)):
            for j, (w0, w1) in enumerate(adaptive_bins(self._shape[3], ow)):
                share = dy[:, :, i, j] * dy.dtype.type(1.0 / ((h1 - h0) * (w1 - w0)))
                dx[:, :, h0:h1, w0:w1] += share[:, :, None, None]
        return dx

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
