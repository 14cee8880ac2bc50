"""Masked layers: a frozen pretrained conv/linear weight W, transformed per domain by eq. 1.

A masked layer holds a *reference* to the pretrained layer it extends (``self.source``, not a child:
its weight is not a parameter of the masked layer and is not in its ``state_dict``) and its own
domain-specific parameters:

- ``mask_real``: R, shaped like W, initialised U(tau + lo, tau + hi) (``mask_init = (lo, hi)``,
  default (1e-4, 2e-4) as the paper), so that with lo >= 0 M = 1[R >= tau] starts all ones (only
  lo < hi is checked here; the command line also requires 0 < lo);
- ``k0`` .. ``k3``: only the *learned* coefficients are parameters, shape (1,) or (O,) (channel-wise);
  fixed ones are plain numbers in ``self.fixed_k``. Initial values give W~ = W at step 0.

Forward: W~ = k0*W + k1 + k2*M + k3*(W∘M) (see :mod:`npmask.masking.transform`), then the ordinary
conv/linear with W~ and the pretrained bias (shared, frozen). Backward: the conv/linear backward
gives dx and G = dL/dW~; the transform backward turns G into dL/dR and dL/dk.
"""
from __future__ import annotations

from ..nn.checks import check_array
from ..backend import get_array_module, rng as make_rng
from ..nn.conv import check_conv_gradient, conv2d_backward, conv2d_forward
from ..nn.linear import linear_backward, linear_forward
from ..nn.module import Module
from .transform import SURROGATES, transform_backward, transform_forward
from .variants import get_variant

DEFAULT_MASK_INIT = (1e-4, 2e-4)


class _MaskedLayer(Module):
    """Shared core of :class:`MaskedConv2d` and :class:`MaskedLinear`."""

    def __init__(self, source: Module, variant="full", *, followed_by_bn=None, tau: float = 0.0,
                 mask_init=DEFAULT_MASK_INIT, rng=None):
        super().__init__()
        variant = get_variant(variant)
        if not variant.has_mask:
            raise ValueError(f"variant {variant.name!r} has no mask; masked layers need a mask variant")
        if "weight" not in source.params:
            raise ValueError(f"{type(source).__name__} has no 'weight' to mask")
        lo, hi = (float(v) for v in mask_init)
        if not lo < hi:
            raise ValueError(f"mask_init must be (low, high) with low < high, got {mask_init}")
        if followed_by_bn is None:
            followed_by_bn = bool(getattr(source, "followed_by_bn", False))
        object.__setattr__(self, "source", source)       # a reference, not a registered child
        self.followed_by_bn = bool(followed_by_bn)
        self.variant_name = variant.name
        self.surrogate = variant.surrogate
        if self.surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {self.surrogate!r}; known: {', '.join(SURROGATES)}")
        self.tau = float(tau)
        self.channelwise = variant.channelwise

        W = self.weight
        xp = get_array_module(W)
        R = make_rng(rng).uniform(self.tau + lo, self.tau + hi, size=W.shape).astype(W.dtype)
        self.register_param("mask_real", xp.asarray(R))
        n_k = W.shape[0] if variant.channelwise else 1
        self.fixed_k = {}
        for j in range(4):
            kind, value = variant.k_spec(j, self.followed_by_bn)
            if kind == "learned":
                self.register_param(f"k{j}", xp.full((n_k,), value, dtype=W.dtype))
            else:
                self.fixed_k[j] = value
        self._tcache = None

    # ------------------------------------------------------------------ the transform
    @property
    def weight(self):
        """The pretrained (shared, frozen) weight W, read from the source layer."""
        return self.source.params["weight"]

    @property
    def bias(self):
        """The pretrained bias (shared, frozen) or None."""
        return self.source.params.get("bias")

    @property
    def ks(self) -> tuple:
        """(k0, k1, k2, k3): arrays for learned coefficients, floats for fixed ones."""
        return tuple(self.params[f"k{j}"] if j not in self.fixed_k else self.fixed_k[j] for j in range(4))

    def mask(self):
        """The binary mask M = 1[R >= tau] (bool array shaped like W)."""
        return self.params["mask_real"] >= self.tau

    def transformed_weight(self):
        """W~ for the current R and k's (no cache kept)."""
        return transform_forward(self.weight, self.params["mask_real"], self.ks, self.tau)[0]

    def _forward_weight(self):
        Wt, self._tcache = transform_forward(self.weight, self.params["mask_real"], self.ks, self.tau)
        return Wt

    def _needs_weight_grad(self) -> bool:
        return bool(self.grads)  # any of R, k's trained

    def _backward_weight(self, G) -> None:
        need_k = [self.requires_grad(f"k{j}") for j in range(4)]
        dks, dR, _ = transform_backward(G, self._tcache, need_k=need_k,
                                        need_R=self.requires_grad("mask_real"), surrogate=self.surrogate)
        for j in range(4):
            if dks[j] is not None:
                self.accumulate_grad(f"k{j}", dks[j])
        if dR is not None:
            self.accumulate_grad("mask_real", dR)

    def _after_map_arrays(self, fn) -> None:
        self._tcache = None

    def extra_repr(self) -> str:
        learned = [f"k{j}" for j in range(4) if j not in self.fixed_k]
        fixed = ", ".join(f"k{j}={v:g}" for j, v in self.fixed_k.items())
        return (f"{tuple(self.weight.shape)}, variant={self.variant_name}, learned={learned}, {fixed}, "
                f"surrogate={self.surrogate}, tau={self.tau:g}")


class MaskedConv2d(_MaskedLayer):
    """A pretrained Conv2d extended by a binary mask and affine coefficients (eq. 1 of the paper).

    ``MaskedConv2d(source_conv, variant, followed_by_bn=None, tau=0.0, mask_init=(1e-4, 2e-4), rng)``;
    x (N, C, H, W) -> y (N, O, Ho, Wo) with the source's stride and padding. ``followed_by_bn``
    defaults to the source's attribute of that name: k0 is fixed to 1 when it is true.
    """

    def __init__(self, source, variant="full", **kwargs):
        w = getattr(source, "params", {}).get("weight")
        if w is None or w.ndim != 4 or not hasattr(source, "stride"):
            raise ValueError(f"MaskedConv2d wraps a convolution (weight (out, in, kh, kw), stride, "
                             f"padding); got {type(source).__name__} with weight shape "
                             f"{None if w is None else tuple(w.shape)}: use MaskedLinear for a "
                             "Linear layer")
        super().__init__(source, variant, **kwargs)
        self.stride, self.padding = source.stride, source.padding
        self.need_input_grad = bool(getattr(source, "need_input_grad", True))
        self._ccache = None

    def forward(self, x):
        check_array(self, x, "input", (None, self.weight.shape[1], None, None))
        y, self._ccache = conv2d_forward(x, self._forward_weight(), self.bias, self.stride, self.padding,
                                         keep_columns=self.training and self._needs_weight_grad())
        return y

    def backward(self, dy):
        check_conv_gradient(self, dy, self._ccache)
        if self._ccache is None:
            raise RuntimeError("MaskedConv2d.backward called before forward")
        need_g = self._needs_weight_grad()
        dx, G, _ = conv2d_backward(dy, self._ccache, need_dx=self.need_input_grad, need_dweight=need_g)
        if need_g:
            self._backward_weight(G)
        return dx

    def _after_map_arrays(self, fn) -> None:
        self._tcache = self._ccache = None


class MaskedLinear(_MaskedLayer):
    """A pretrained Linear extended by a binary mask and affine coefficients: x (N, in) -> (N, out)."""

    def __init__(self, source, variant="full", **kwargs):
        w = getattr(source, "params", {}).get("weight")
        if w is None or w.ndim != 2:
            raise ValueError(f"MaskedLinear wraps a Linear layer (weight (out, in)); got "
                             f"{type(source).__name__} with weight shape "
                             f"{None if w is None else tuple(w.shape)}: use MaskedConv2d for a "
                             "convolution")
        super().__init__(source, variant, **kwargs)
        self._x = self._wt = None

    def forward(self, x):
        check_array(self, x, "input", (None, self.weight.shape[1]))
        self._x, self._wt = x, self._forward_weight()
        return linear_forward(x, self._wt, self.bias)

    def backward(self, dy):
        if self._x is not None:
            check_array(self, dy, "gradient", (self._x.shape[0], self.weight.shape[0]))
        if self._x is None:
            raise RuntimeError("MaskedLinear.backward called before forward")
        need_g = self._needs_weight_grad()
        dx, G, _ = linear_backward(dy, self._x, self._wt, need_dx=True, need_dweight=need_g,
                                   has_bias=False)
        if need_g:
            self._backward_weight(G)
        return dx

    def _after_map_arrays(self, fn) -> None:
        self._tcache = self._x = self._wt = None


class SharedFrozen(Module):
    """A pretrained layer used as is, frozen and in eval mode: no parameters of its own.

    Wraps the backbone's module by reference (not as a child, so a domain's ``train()`` cannot switch
    a shared batch norm to batch statistics, and its arrays are not in the domain's state). Used for
    the shared batch norm of ``piggyback`` and for every layer of ``classifier_only``.
    """

    def __init__(self, source: Module):
        super().__init__()
        object.__setattr__(self, "source", source)

    @property
    def takes_fused_relu(self) -> bool:
        """A shared batch norm takes the fused ReLU as the source does (npmask.nn.batchnorm)."""
        return bool(getattr(self.source, "takes_fused_relu", False))

    def forward(self, x, **fused):
        object.__setattr__(self.source, "training", False)
        return self.source.forward(x, **fused)

    def backward(self, dy):
        return self.source.backward(dy)  # the source is frozen: it accumulates nothing

    def extra_repr(self) -> str:
        return f"shared {type(self.source).__name__}({self.source.extra_repr()})"
