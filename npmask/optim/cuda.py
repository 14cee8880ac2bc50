"""The optimisers' CuPy kernels: Adam's update fused into one ElementwiseKernel, per parameter or
for all of an optimiser's parameters at once.

Imported only for CuPy parameters; building the kernel object needs CuPy, compiling it a device.
"""
from __future__ import annotations

import functools

import numpy as np

from ..backend import _import_cupy, get_array_module
from .grads import same


@functools.lru_cache(maxsize=None)
def adam_kernel():
    """Adam's update as one CuPy ElementwiseKernel: the same formula as ``Adam._arithmetic``, the
    same operations on the same operands (equal up to the GPU's contraction of a * b + c into a
    fused multiply-add; the kernel adds the weight decay term even when it is 0).

    ``c1``, ``c2`` are ``1 - beta1``, ``1 - beta2`` computed on the host and rounded once to T, as
    ``_arithmetic``'s ``(1 - b1) * g`` does: ``(T)1 - b2`` in float32 would be 1 - 0.999f =
    0.00099998713 instead of 0.001f, 1.3e-5 off. ``step_size`` and ``bias2`` are scalars of the
    parameter's dtype or 0-d device arrays (the device-side scalars of a captured step,
    :mod:`npmask.optim.device`): the kernel reads both the same way, so an update gives the same
    bits either way.
    """
    return _import_cupy().ElementwiseKernel(
        "T g, T step_size, T b1, T b2, T c1, T c2, T bias2, T eps, T wd", "T p, T m, T v",
        ADAM_BODY, "npmask_adam_update")


# The body of adam_kernel: statements ``name = expression;`` (tests/test_cuda_kernels.py evaluates
# them with NumPy against Adam._arithmetic).
ADAM_BODY = """
        T gw = g + wd * p;                              // L2 weight decay
        m = b1 * m + c1 * gw;                           // first moment
        v = b2 * v + c2 * (gw * gw);                    // second moment
        p = p - step_size * (m / (sqrt(v) / bias2 + eps));
        """


# ---------------------------------------------------------------- every parameter in one launch
@functools.lru_cache(maxsize=None)
def adam_all_kernel():
    """Adam's update of ALL of an optimiser's parameters in one launch (``adam_kernel`` is one
    launch per parameter: 168 of them in a masked WRN-28-4's step).

    The loop runs over the flat gradient array that holds every parameter's gradient
    (:mod:`npmask.optim.grads`) and the flat moment arrays beside it; entry ``i`` belongs to the
    parameter ``lo`` with ``starts[lo] <= i < starts[lo + 1]`` (a binary search over the
    ``nparams + 1`` offsets), whose array lives at the device address ``params[lo]``. Each entry's update is
    ADAM_BODY, the very statements of adam_kernel, so both give the same bits.
    """
    return _import_cupy().ElementwiseKernel(
        "T g, raw uint64 params, raw int64 starts, int32 nparams, T step_size, T b1, T b2, T c1, T c2, "
        "T bias2, T eps, T wd", "T m, T v", ADAM_ALL_BODY, "npmask_adam_update_all")


def address(a) -> int:
    """The device address of a CuPy array's first element."""
    return a.data.ptr


def step_all(adam, todo) -> bool:
    """Adam's step for the parameters ``todo`` (those with a gradient) as one launch of
    :func:`adam_all_kernel`; False, having done nothing, when they do not allow it: their
    gradients must be the views of one flat array that ``zero_grad`` made (one dtype), each
    parameter a contiguous array of its own, all at the same step count."""
    grads = getattr(adam, "_grads", None)
    if (grads is None or len(grads.flats) != 1 or not same([r.grad for r in todo], grads.views)
            or len({id(r.data) for r in todo}) < len(todo)
            or not all(r.data.flags.c_contiguous for r in todo)):
        return False
    states = [adam.state.get(r.name, {}) for r in todo]
    steps = {s.get("step", 0) for s in states}
    if len(steps) != 1:
        return False
    t = steps.pop()
    moments = _flat_moments(adam, todo, states, grads.flats[0], t)
    if moments is None:
        return False
    t += 1
    for r in todo:
        adam.state[r.name]["step"] = t
    step_size, bias2 = adam._scalars(todo[0].name, t)
    (b1, b2), T = adam.betas, grads.flats[0].dtype.type
    if adam.device is None:                  # floats as scalars of the dtype; else 0-d arrays
        step_size, bias2 = T(step_size), T(bias2)
    params, starts = _table(adam, todo)
    adam_all_kernel()(grads.flats[0], params, starts, len(todo), step_size, T(b1), T(b2),
                      T(1 - b1), T(1 - b2), bias2, T(adam.eps), T(adam.weight_decay), *moments)
    return True


def _flat_moments(adam, todo, states, flat_grad, step):
    """(m, v) as flat arrays laid out as the gradients, their views put in the parameters' states:
    zeros at the first step, else the moments there gathered once (a state loaded from a file, or
    made by per-parameter steps); None when some parameter lacks them."""
    held = getattr(adam, "_moments", None)
    if held is not None and same([s.get("exp_avg") for s in states], held[2]) \
            and same([s.get("exp_avg_sq") for s in states], held[3]):
        return held[0], held[1]
    xp = get_array_module(flat_grad)
    flats = []
    for key in ("exp_avg", "exp_avg_sq"):
        if step == 0:
            flats.append(xp.zeros_like(flat_grad))
        elif all(key in s for s in states):
            flats.append(xp.concatenate([s[key].reshape(-1) for s in states]).astype(
                flat_grad.dtype, copy=False))
        else:
            return None
    views = ([], [])
    start = 0
    for r in todo:
        state = adam.state.setdefault(r.name, {})
        state.setdefault("step", 0)
        for key, flat, out in zip(("exp_avg", "exp_avg_sq"), flats, views):
            state[key] = flat[start:start + r.data.size].reshape(r.data.shape)
            out.append(state[key])
        start += r.data.size
    adam._moments = (flats[0], flats[1], views[0], views[1])
    return flats[0], flats[1]


def _table(adam, todo):
    """The parameters' device addresses and start offsets, made when the parameter arrays change
    (the arrays are held with the table, so an address cannot be reused by another array)."""
    held = getattr(adam, "_table", None)
    if not same([r.data for r in todo], held and held[0]):
        xp = get_array_module(todo[0].data)
        sizes = np.array([0] + [r.data.size for r in todo], dtype=np.int64)
        params = xp.asarray(np.array([address(r.data) for r in todo], dtype=np.uint64))
        held = adam._table = ([r.data for r in todo], params, xp.asarray(np.cumsum(sizes)))
    return held[1], held[2]


# Around ADAM_BODY: the entry's parameter found, read into p, updated, written back.
ADAM_ALL_BODY = """
        int lo = 0, hi = nparams;                       // starts[lo] <= i < starts[lo + 1]
        while (hi - lo > 1) {
            int mid = (lo + hi) / 2;
            if (starts[mid] <= i) lo = mid; else hi = mid;
        }
        T* here = reinterpret_cast<T*>(params[lo]) + (i - starts[lo]);
        T p = *here;
""" + ADAM_BODY + """
        *here = p;
"""
