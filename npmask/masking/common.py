"""What both implementations of the mask transform need: the fixed/learned test of a k and the cache.

:mod:`npmask.masking.transform` (NumPy, and CuPy without fused kernels) and
:mod:`npmask.masking.cuda` (the fused CUDA kernels) both read these; they live in this leaf module so
that transform.py can hand over to cuda.py without cuda.py importing transform.py back.
"""
from __future__ import annotations

from numbers import Number
from typing import NamedTuple


def is_fixed(k) -> bool:
    """True for a fixed k (a plain Python/NumPy number), False for a learned k (an array)."""
    return isinstance(k, Number)


class TransformCache(NamedTuple):
    """What :func:`~npmask.masking.transform.transform_backward` needs from the forward pass
    (references, no copies)."""

    W: object          # the pretrained weight
    R: object          # the real-valued mask
    M: object          # bool array, 1[R >= tau]
    A: object          # k2 + k3*W: an array, W itself (k3 fixed 1, k2 fixed 0: piggyback), a
                       # broadcastable k2 / float (k3 fixed 0), or None (k2 and k3 fixed 0)
    ks: tuple          # the four coefficients as given (numbers or arrays)
    tau: float
