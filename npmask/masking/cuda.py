"""The mask transform as fused CUDA kernels, used when W and R are CuPy arrays.

The generic code in :mod:`npmask.masking.transform` runs on CuPy as it is, but every NumPy-style
operation there is one GPU kernel that reads and writes a whole weight-sized array. The transform is
elementwise, so on the GPU each direction can be ONE pass that reads W, R (and G) once:

forward (one ElementwiseKernel)::

    W~ = [R >= tau] * (k3*W + k2) + k0*W + k1

backward (one ElementwiseKernel for dL/dR, one ReductionKernel for all the learned k's)::

    dL/dR  = G * (k3*W + k2) * h~'(R - tau)          h~' = 1 (identity) or s(1-s), s = sigmoid
    dL/dk0 = sum G*W   dL/dk1 = sum G   dL/dk2 = sum G*[R >= tau]   dL/dk3 = sum G*W*[R >= tau]
    dL/dW  = G * (k0 + k3*[R >= tau])                 (on request; npmask never asks for it)

The mask M = [R >= tau] is recomputed inside each kernel from R (one comparison) instead of being
stored: on the GPU that is cheaper than writing and re-reading a mask array. The k's sums come out
of one reduction as J rows of O (J learned k's, O output channels: each row's term picked by a
small index array broadcast against W); a (1,) k then sums its row over the channels, a
channel-wise (O,) k is its row.

The numbers equal the generic path's up to float rounding (the order of the additions in a GPU sum
differs from NumPy's); ``tests/test_cuda_kernels.py`` checks that whenever a GPU is present.

CuPy is imported only when a kernel is first needed, never at import time, so this module loads on
machines without CuPy or without a GPU; the kernel objects themselves can be built without a device
(CUDA compiles them on their first call).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..backend import _import_cupy, backend_name, get_array_module
from .common import TransformCache, is_fixed

# One expression per coefficient: dL/dk_j = sum over the weights of this term.
_DK_TERMS = (
    "G * W",                          # dk0: the term k0*W
    "G",                              # dk1: the term k1*1
    "(R >= tau ? G : (T)0)",           # dk2: the term k2*M
    "(R >= tau ? G * W : (T)0)",       # dk3: the term k3*(W∘M)
)


def applies(*arrays) -> bool:
    """True when the fused CUDA path should be used: the weight (first array) is a CuPy array."""
    return bool(arrays) and backend_name(arrays[0]) == "cupy"


@lru_cache(maxsize=None)
def kernels() -> dict:
    """The kernel objects, built on first use (needs CuPy installed; a GPU only to run them)."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError("the CUDA transform kernels need CuPy, which is not installed")
    forward = cp.ElementwiseKernel(
        "T W, T R, T k0, T k1, T k2, T k3, T tau", "T Wt",
        "Wt = (R >= tau ? k3 * W + k2 : (T)0) + k0 * W + k1;",
        "npmask_mask_transform_forward")
    grad_r = cp.ElementwiseKernel(
        "T G, T W, T R, T k2, T k3, T tau, int32 sigmoid", "T dR",
        """
        T dM = G * (k3 * W + k2);                    // dL/dM: what the mask bit would add
        if (sigmoid) {                               // surrogate derivative s(1-s) of R - tau
            T s = (T)1 / ((T)1 + exp(tau - R));
            dM = dM * (s * ((T)1 - s));
        }
        dR = dM;
        """,
        "npmask_mask_transform_grad_r")
    grad_w = cp.ElementwiseKernel(
        "T G, T R, T k0, T k3, T tau", "T dW",
        "dW = G * (k0 + (R >= tau ? k3 : (T)0));",
        "npmask_mask_transform_grad_w")
    # Every learned k's sums in ONE reduction: the index array j (J, 1, ..., 1), broadcast against
    # the weight, picks each row's term, and the J x O sums come out together.
    pick = "".join(f"j == {j} ? ({term}) : " for j, term in enumerate(_DK_TERMS[:-1])) + f"({_DK_TERMS[-1]})"
    sums = cp.ReductionKernel("T G, T W, T R, T tau, int32 j", "T out", pick, "a + b", "out = a", "0",
                              "npmask_mask_transform_dk")
    return {"forward": forward, "grad_r": grad_r, "grad_w": grad_w, "sums": sums}


_ROWS: dict = {}    # (array type, device, k indices, weight ndim) -> the index array, made once


def _rows(W, js: tuple):
    """The index array (J, 1, ..., 1) of the learned k's ``js``, on W's device: made at the first
    step and kept, so that no later step copies it from the host (and a CUDA graph can replay it)."""
    key = (type(W), getattr(getattr(W, "device", None), "id", None), js, W.ndim)
    if key not in _ROWS:
        rows = np.array(js, dtype=np.int32).reshape((len(js),) + (1,) * W.ndim)
        _ROWS[key] = get_array_module(W).asarray(rows)
    return _ROWS[key]


def _kernel_arg(k, W):
    """A k as a kernel argument: a fixed number as a scalar of W's dtype, a learned (1,)/(O,) array
    reshaped to broadcast against W as (O or 1, 1, ..., 1)."""
    if is_fixed(k):
        return W.dtype.type(k)
    return k.reshape((-1,) + (1,) * (W.ndim - 1))


def transform_forward(W, R, ks, tau: float = 0.0):
    """CuPy version of :func:`npmask.masking.transform.transform_forward` (inputs already checked).

    Returns ``(W~, cache)``; the cache holds W, R, the ks and tau (no mask, no A: the backward
    kernels recompute them from R and W).
    """
    k0, k1, k2, k3 = (_kernel_arg(k, W) for k in ks)
    Wt = kernels()["forward"](W, R, k0, k1, k2, k3, W.dtype.type(tau))
    return Wt, TransformCache(W, R, None, None, tuple(ks), float(tau))


def transform_backward(G, cache, need_k=(True, True, True, True), need_R: bool = True,
                       need_W: bool = False, surrogate: str = "identity"):
    """CuPy version of :func:`npmask.masking.transform.transform_backward`: ``(dks, dR, dW)``."""
    W, R, _, _, ks, tau = cache
    kern = kernels()
    t = W.dtype.type(tau)
    dks = [None] * 4
    js = tuple(j for j in range(4) if need_k[j] and not is_fixed(ks[j]))
    if js:
        # One sum per output channel and k (a thread block each), then each (O,) row summed for a
        # scalar k: a ReductionKernel with a single output runs in ONE block, several times slower
        # on large weights (benchmarks/results/gpu_h100.md, "CuPy reductions").
        per_channel = kern["sums"](G, W, R, t, _rows(W, js), axis=tuple(range(2, W.ndim + 1)))
        scalar = [ks[j].shape[0] == 1 for j in js]
        totals = per_channel.sum(axis=1) if any(scalar) else None
        for row, j in enumerate(js):
            dks[j] = (totals[row] if scalar[row] else per_channel[row]).reshape(ks[j].shape)
    dR = None
    if need_R:
        k2, k3 = _kernel_arg(ks[2], W), _kernel_arg(ks[3], W)
        dR = kern["grad_r"](G, W, R, k2, k3, t, int(surrogate == "sigmoid"))
    dW = None
    if need_W:
        dW = kern["grad_w"](G, R, _kernel_arg(ks[0], W), _kernel_arg(ks[3], W), t)
    return dks, dR, dW
