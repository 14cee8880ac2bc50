"""The optimisers' CuPy kernel: Adam's update fused into one ElementwiseKernel.

Imported only for CuPy parameters; building the kernel object needs CuPy, compiling it a device.
"""
from __future__ import annotations

import functools

from ..backend import _import_cupy


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
