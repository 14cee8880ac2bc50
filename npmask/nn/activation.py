"""Parameter-free elementwise and reshaping layers: ReLU, Dropout, Flatten."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, rng as make_rng
from .module import Module
from .parallel import in_parallel


class ReLU(Module):
    """``y = max(x, 0)``; backward ``dx = dy * [x > 0]`` (the subgradient 0 is used at x = 0).

    ``ReLU(inplace=True)`` writes y over x and returns x (as PyTorch's ``inplace``): for a caller
    that owns x and needs it no more, e.g. the residual sum of :class:`~npmask.nn.BasicBlock`; it
    saves a new activation-sized array. The backward pass is the same (it keeps only the mask).
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)
        self._mask = None

    def forward(self, x):
        xp = get_array_module(x)
        if x.ndim == 0:
            self._mask = x > 0
            return xp.maximum(x, 0)
        mask, y = xp.empty(x.shape, dtype=bool), (x if self.inplace else xp.empty_like(x))

        def rows(lo, hi):   # elementwise: the batch is split over threads (npmask/nn/parallel.py)
            xp.greater(x[lo:hi], 0, out=mask[lo:hi])   # before y, which may be x itself
            xp.maximum(x[lo:hi], 0, out=y[lo:hi])  # NEP 50: the Python 0 keeps x's dtype

        in_parallel(xp, x.shape[0], x.size, rows)
        self._mask = mask
        return y

    def backward(self, dy):
        if self._mask is None:
            raise RuntimeError("ReLU.backward called before forward")
        if dy.ndim == 0:
            return dy * self._mask
        xp = get_array_module(dy)
        dx = xp.empty_like(dy)
        in_parallel(xp, dy.shape[0], dy.size,
                    lambda lo, hi: xp.multiply(dy[lo:hi], self._mask[lo:hi], out=dx[lo:hi]))
        return dx

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class Dropout(Module):
    """Inverted dropout: in training, ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` per entry.

    Scaling by ``1/(1-p)`` at training time keeps ``E[y] = x``, so eval mode is the identity.
    Backward uses the same scaled mask: ``dx = dy * m / (1 - p)``.

    The mask is drawn on the CPU from ``rng`` (an int seed or ``numpy.random.Generator``), always as
    float32 uniforms, so a given seed gives the same mask for float32 and float64 inputs and for
    NumPy and CuPy arrays. Set ``reuse_mask = True`` to apply the last mask again on the next forward
    passes (same input shape): a numerical gradient check needs the function to stay fixed.
    """

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self._rng = make_rng(rng)
        self.reuse_mask = False
        self._mask = None  # the scaled mask m / (1 - p) of the last training forward, or None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        xp = get_array_module(x)
        if not (self.reuse_mask and self._mask is not None and self._mask.shape == x.shape):
            keep = self._rng.random(x.shape, dtype=np.float32) >= self.p
            mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
            self._mask = xp.asarray(mask)
        elif self._mask.dtype != x.dtype:
            self._mask = self._mask.astype(x.dtype)
        return x * self._mask

    def backward(self, dy):
        if self._mask is None:  # eval mode or p = 0: the identity
            return dy
        return dy * self._mask

    def _after_map_arrays(self, fn) -> None:
        if self._mask is not None:     # a kept mask moves (or is cast) with the module's arrays
            self._mask = fn(self._mask)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...); backward reshapes the gradient back."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x):
        if x.ndim < 1:
            raise ValueError("Flatten expects an input with a batch axis, got a 0-d array")
        self._shape = x.shape
        return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # not -1: N may be 0

    def backward(self, dy):
        if self._shape is None:
            raise RuntimeError("Flatten.backward called before forward")
        return dy.reshape(self._shape)
