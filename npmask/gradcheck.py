"""Numeric gradient checks for hand-written backward passes.

The idea (CS231n's ``gradient_check.py``): for a layer ``y = f(x)`` and a *random* upstream gradient
``g`` (random, not all ones, so that transposed or permuted gradients cannot pass by accident), the
scalar ``L = sum(f(x) * g)`` has ``dL/dx = backward(g)``. The central difference

    dL/dx[i] ≈ (L(x + h e_i) - L(x - h e_i)) / (2h)

checks each entry, in float64. That costs two forward passes per entry, fine for a small layer. For
a whole model, :func:`directional_check` compares the derivative along one random direction ``v``
over all inputs and parameters, ``<grad, v>`` against ``(L(θ + h v) - L(θ - h v)) / 2h``, in O(1)
forward passes.

Use it on your own layer::

    from npmask.gradcheck import check_layer
    report = check_layer(MyLayer(...).astype(np.float64), x)   # raises AssertionError if wrong
    print(report)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import get_array_module, to_numpy


def rel_error(a, b) -> float:
    """max |a - b| / max(|a| + |b|), with a floor so two zero arrays give 0."""
    a = to_numpy(a).astype(np.float64)
    b = to_numpy(b).astype(np.float64)
    denom = max(float(np.max(np.abs(a) + np.abs(b), initial=0.0)), 1e-12)
    return float(np.max(np.abs(a - b), initial=0.0)) / denom


def numeric_gradient(f, x, upstream, h: float = 1e-6):
    """Central-difference gradient of ``L(x) = sum(f(x) * upstream)`` with respect to ``x``.

    ``f`` is called with no arguments after each in-place perturbation of ``x`` (so ``x`` may be an
    input or a parameter array the function reads). ``x`` is restored exactly afterwards.
    """
    xp = get_array_module(x)
    grad = xp.zeros_like(x, dtype=np.float64)
    flat = x.reshape(-1)  # a view: writing into it perturbs x
    gflat = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i].copy()
        flat[i] = old + h
        plus = float(xp.sum(f() * upstream))
        flat[i] = old - h
        minus = float(xp.sum(f() * upstream))
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


@dataclass
class GradcheckReport:
    """Relative error of every checked gradient: ``errors["x"]``, ``errors["weight"]``, ..."""

    errors: dict = field(default_factory=dict)
    tol: float = 1e-6

    @property
    def ok(self) -> bool:
        return all(e <= self.tol for e in self.errors.values())

    def __str__(self) -> str:
        rows = [f"  {name:<24} rel. error {err:.2e}  {'ok' if err <= self.tol else 'FAIL'}"
                for name, err in self.errors.items()]
        return "gradient check (tolerance %.0e)\n" % self.tol + "\n".join(rows)


def check_layer(layer, x, upstream=None, seed: int = 0, h: float = 1e-6, tol: float = 1e-6,
                params=None, raise_on_fail: bool = True) -> GradcheckReport:
    """Check ``layer.backward`` against central differences for the input and every trained parameter.

    ``layer`` and ``x`` should be float64. ``upstream`` defaults to a seeded standard-normal array
    shaped like the output. ``params``: names to check (default: every trainable parameter).
    The layer's gradients are zeroed first; its forward is re-run in its current mode, so a layer
    with state (batch-norm running averages) should be checked on copies if that state matters.
    """
    xp = get_array_module(x)
    layer.zero_grad()
    x_copy = x.copy()
    y = layer.forward(x)
    if not bool(xp.array_equal(x, x_copy)):
        raise AssertionError(f"{type(layer).__name__}.forward wrote into its input")
    if upstream is None:
        # A stream of its own: a caller drawing x from default_rng(seed) must not get upstream == x
        # (for batch norm that makes dx vanish and hides errors).
        upstream_rng = np.random.default_rng([seed, 0x6772616463686B])
        upstream = xp.asarray(upstream_rng.standard_normal(y.shape), dtype=y.dtype)
    upstream_copy = upstream.copy()
    dx = layer.backward(upstream)
    if not bool(xp.array_equal(upstream, upstream_copy)):
        raise AssertionError(f"{type(layer).__name__}.backward wrote into the upstream gradient")

    report = GradcheckReport(tol=tol)
    report.errors["x"] = rel_error(dx, numeric_gradient(lambda: layer.forward(x), x, upstream, h))
    names = params if params is not None else [k for k in layer.params if layer.requires_grad(k)]
    for name in names:
        num = numeric_gradient(lambda: layer.forward(x), layer.params[name], upstream, h)
        report.errors[name] = rel_error(layer.grads[name], num)
    if raise_on_fail and not report.ok:
        raise AssertionError(str(report))
    return report


def directional_check(model, x, loss_fn, seed: int = 0, h: float = 1e-7, tol: float = 1e-6,
                      raise_on_fail: bool = True) -> tuple[float, float]:
    """Check a whole model along one random direction over its input and all trained parameters.

    ``loss_fn(output) -> (loss, dloss/doutput)``. Returns ``(analytic, numeric)`` directional
    derivatives; raises AssertionError when their relative difference exceeds ``tol``.

    The step ``h`` is small (1e-7) because the direction is a unit normal per entry: a larger step
    moves some pre-activations across a ReLU or max-pool kink, where the loss is not smooth.
    """
    xp = get_array_module(x)
    rng = np.random.default_rng(seed)
    refs = model.parameter_refs(trainable_only=True)

    def rand_like(a):
        return xp.asarray(rng.standard_normal(a.shape), dtype=a.dtype)

    vx = rand_like(x)
    vp = [rand_like(r.data) for r in refs]

    model.zero_grad()
    loss, dout = loss_fn(model.forward(x))
    dx = model.backward(dout)
    analytic = float(xp.sum(dx * vx)) + sum(float(xp.sum(r.grad * v)) for r, v in zip(refs, vp))

    originals = [r.data.copy() for r in refs]

    def loss_at(t):
        for r, v, p0 in zip(refs, vp, originals):
            r.data[...] = p0 + t * v
        try:
            return float(loss_fn(model.forward(x + t * vx))[0])
        finally:
            for r, p0 in zip(refs, originals):
                r.data[...] = p0  # restored exactly, not by subtracting

    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    err = abs(analytic - numeric) / max(abs(analytic) + abs(numeric), 1e-12)
    if raise_on_fail and err > tol:
        raise AssertionError(f"directional check failed: analytic {analytic:.10g}, numeric "
                             f"{numeric:.10g}, relative error {err:.2e} > {tol:.0e}")
    return analytic, numeric
