"""The optimisers' CuPy kernel: Adam's update fused into one ElementwiseKernel.

Imported only for CuPy parameters; building the kernel object needs CuPy, compiling it a device.
"""
from __future__ import annotations

import functools

from ..backend import _import_cupy


@functools.lru_cache(maxsize=None)
def adam_kernel():
    """Adam's update as one CuPy ElementwiseKernel: the same formula as ``Adam._arithmetic``
    (equal up to float rounding: the kernel adds the weight decay term even when it is 0).

    ``step_size`` and ``bias2`` are scalars of the parameter's dtype or 0-d device arrays (the
    device-side scalars of a captured step, :mod:`npmask.optim.device`): the kernel reads both the
    same way, so an update gives the same bits either way.
    """
    return _import_cupy().ElementwiseKernel(
        "T g, T step_size, T b1, T b2, T bias2, T eps, T wd", "T p, T m, T v",
        """
        T gw = g + wd * p;                              // L2 weight decay
        m = b1 * m + ((T)1 - b1) * gw;                  // first moment
        v = b2 * v + ((T)1 - b2) * (gw * gw);           // second moment
        p = p - step_size * (m / (sqrt(v) / bias2 + eps));
        """,
        "npmask_adam_update")
