"""Fully connected layer: ``y = x W^T + b``.

Shapes: ``x`` (N, in_features), ``W`` (out_features, in_features) as in PyTorch, ``b``
(out_features,), ``y`` (N, out_features). With the upstream gradient ``dy`` (N, out_features):

    dx = dy W          (N, in)
    dW = dy^T x        (out, in)
    db = sum_n dy[n]   (out,)

The functional pair :func:`linear_forward` / :func:`linear_backward` is what :class:`Linear` uses;
layers that build their weight on the fly (the masked linear layer) call it directly.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import rng as make_rng
from .checks import check_array
from .module import Module


def _check_input(x, weight) -> None:
    if x.ndim != 2:
        raise ValueError(f"linear layer expects input of shape (N, in_features), got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear layer expects {weight.shape[1]} input features, got input of shape "
                         f"{tuple(x.shape)}")


def linear_forward(x, weight, bias=None):
    """``y = x W^T + b`` for ``x`` (N, in), ``weight`` (out, in), ``bias`` (out,) or None -> (N, out)."""
    _check_input(x, weight)
    y = x @ weight.T
    if bias is not None:
        y += bias  # y is a fresh array: adding in place saves one temporary
    return y


def linear_backward(dy, x, weight, need_dx: bool = True, need_dweight: bool = True,
                    has_bias: bool = True):
    """Gradients of :func:`linear_forward`: returns ``(dx, dweight, dbias)``.

    ``dy`` (N, out) is the upstream gradient, ``x`` and ``weight`` the forward inputs. An entry that
    was not asked for (``need_dx``, ``need_dweight``, ``has_bias`` False) is None, and costs nothing.
    """
    if dy.ndim != 2 or dy.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"linear backward expects dy of shape (N, out) = ({x.shape[0]}, {weight.shape[0]}) "
                         f"as the forward output, got shape {tuple(dy.shape)}")
    dx = dy @ weight if need_dx else None
    dweight = dy.T @ x if need_dweight else None
    dbias = dy.sum(axis=0) if has_bias else None
    return dx, dweight, dbias


class Linear(Module):
    """Fully connected layer with parameters ``weight`` (out, in) and optional ``bias`` (out,).

    Initialisation is PyTorch's default for ``nn.Linear``: ``weight`` from Kaiming-uniform with
    ``a = sqrt(5)``, which works out to ``U(-1/sqrt(in), 1/sqrt(in))``, and ``bias`` from
    ``U(-1/sqrt(in), 1/sqrt(in))``. ``rng`` is an int seed or a ``numpy.random.Generator``
    (None: fresh OS entropy, like PyTorch without a seed; pass a seed for reproducible weights).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=np.float32,
                 rng=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got in_features={in_features}, "
                             f"out_features={out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        g = make_rng(rng)
        # kaiming_uniform_(a=sqrt(5)): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in)
        bound = 1.0 / math.sqrt(in_features)
        self.register_param("weight", g.uniform(-bound, bound, (out_features, in_features)).astype(dtype))
        if bias:
            self.register_param("bias", g.uniform(-bound, bound, (out_features,)).astype(dtype))
        self._x = None

    def forward(self, x):
        check_array(self, x, "input", None)
        self._x = x
        return linear_forward(x, self.params["weight"], self.params.get("bias"))

    def backward(self, dy):
        check_array(self, dy, "gradient", None)
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward")
        has_bias = "bias" in self.params and self.requires_grad("bias")
        dx, dw, db = linear_backward(dy, self._x, self.params["weight"], need_dx=True,
                                     need_dweight=self.requires_grad("weight"), has_bias=has_bias)
        if dw is not None:
            self.accumulate_grad("weight", dw)
        if db is not None:
            self.accumulate_grad("bias", db)
        return dx

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self.params}"
