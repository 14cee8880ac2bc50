"""Batch norm with the ReLU and the residual sum fused in, as CUDA kernels, for CuPy arrays.

On a GPU a WRN step is bound by kernel launches, not by arithmetic: the generic batch norm
(:mod:`npmask.nn.batchnorm`, whose code runs on CuPy as it is) launches a kernel for every NumPy-style
operation, then ReLU and the residual addition launch their own. Here, with per-channel vectors
shaped (1, C, 1) against the (N, C, L) activation:

forward (training)::

    s1 = sum x                              (one reduction over axes 0 and 2)
    s2 = sum (x - s1/M)^2                   (one reduction: the centred sum of squares)
    mean, inv_std, scale, shift, running statistics   (one small kernel over the C channels)
    y  = relu((x - mean) * scale + shift [+ r])       (one elementwise kernel)

In eval mode the channel kernel makes ``scale = w s``, ``shift = b - running_mean * scale`` and
subtracts nothing (centre 0): ``y = x * scale + shift``, the generic path's affine map.

backward, with the ReLU's mask ``[y > 0]`` folded in (y is the forward's output, kept by the layer)::

    dbias   = sum dy * [y > 0]                        (one reduction)
    dw_sum  = sum dy * [y > 0] * (x - mean)           (one reduction; dweight = dw_sum * s)
    dweight, k1 = s dweight / M, k2 = dbias / M, scale = w s   (one small kernel over C)
    dx = (d - ((x - mean) * k1 + k2)) * scale,   d = dy * [y > 0]   (one elementwise kernel,
                                                                     which also writes d for a residual)

x itself is kept for the backward pass instead of the centred x - mean: x - mean is recomputed in the
kernels (one subtraction per value) rather than written to and read back from memory.

The arithmetic is the generic path's, operation for operation, so the results agree to rounding (the
GPU sums in another order and may contract a * b + c into one fused multiply-add). Every kernel body
is written as statements ``name = expression;`` over + - * /, ``sqrt`` and two helper functions (the
``_PREAMBLE``), a subset that is also Python: tests/test_batchnorm_cuda.py evaluates the very same
strings with NumPy to check the host code and the formulas against the NumPy path without a GPU.

CuPy is imported only when a kernel is first needed, never at import time.
"""
from __future__ import annotations

from functools import lru_cache

from ..backend import _import_cupy, backend_name, get_array_module

# relu_if(on, v): max(v, 0) when on (NaN stays NaN, as NumPy's maximum); mask_if(on, y): the ReLU's
# gradient mask [y > 0] when on, else 1. T's own zero and one keep float and double apart.
_PREAMBLE = """
template <typename U> __device__ U npmask_relu_if(int on, U v) { return (on && v < (U)0) ? (U)0 : v; }
template <typename U> __device__ U npmask_mask_if(int on, U y) { return (on && !(y > (U)0)) ? (U)0 : (U)1; }
"""

# (in params, out params, body) of each elementwise kernel. Per-channel vectors are (C,) in the
# channel kernels ("stats", "stats_eval", "grads") and (1, C, 1) in the activation-sized ones.
_ELEMENTWISE = {
    "stats": ("T s1, T s2, T w, T b, T m, T eps, T mom, T keep, T unbias",
              "T mean, T inv_std, T scale, T shift, T rm, T rv",
              "mean = s1 / m; T var = s2 / m; inv_std = 1 / sqrt(var + eps); scale = w * inv_std; "
              "shift = b; rm = keep * rm + mom * mean; rv = keep * rv + mom * (var * unbias);"),
    "stats_eval": ("T w, T b, T rm, T rv, T eps",
                   "T mean, T centre, T inv_std, T scale, T shift",
                   "mean = rm; centre = 0; inv_std = 1 / sqrt(rv + eps); scale = w * inv_std; "
                   "shift = b - mean * scale;"),
    "forward": ("T x, T centre, T scale, T shift, int32 relu", "T y",
                "y = npmask_relu_if(relu, (x - centre) * scale + shift);"),
    "forward_residual": ("T x, T r, T centre, T scale, T shift, int32 relu", "T y",
                         "y = npmask_relu_if(relu, (x - centre) * scale + shift + r);"),
    "grads": ("T dbias, T dw_sum, T inv_std, T w, T m", "T dweight, T k1, T k2, T scale",
              "dweight = dw_sum * inv_std; k1 = inv_std * (dweight / m); k2 = dbias / m; "
              "scale = w * inv_std;"),
    "grads_into": ("T dbias, T dw_sum, T inv_std, T w, T m", "T k1, T k2, T scale, T gw, T gb",
                   "T dweight = dw_sum * inv_std; k1 = inv_std * (dweight / m); k2 = dbias / m; "
                   "scale = w * inv_std; gw = gw + dweight; gb = gb + dbias;"),
    "backward": ("T dy, T y, T x, T mean, T k1, T k2, T scale, int32 relu", "T dx",
                 "T d = dy * npmask_mask_if(relu, y); dx = (d - ((x - mean) * k1 + k2)) * scale;"),
    "backward_d": ("T dy, T y, T x, T mean, T k1, T k2, T scale, int32 relu", "T dx, T d",
                   "d = dy * npmask_mask_if(relu, y); dx = (d - ((x - mean) * k1 + k2)) * scale;"),
    "backward_eval": ("T dy, T y, T scale, int32 relu", "T dx",
                      "T d = dy * npmask_mask_if(relu, y); dx = d * scale;"),
    "backward_eval_d": ("T dy, T y, T scale, int32 relu", "T dx, T d",
                        "d = dy * npmask_mask_if(relu, y); dx = d * scale;"),
}

# (in params, map expression) of each reduction: sums over the axes (0, 2) of (N, C, L).
_REDUCTIONS = {
    "sum": ("T x", "x"),
    "sqdev": ("T x, T s1, T m", "(x - s1 / m) * (x - s1 / m)"),
    "dsum": ("T dy, T y, int32 relu", "dy * npmask_mask_if(relu, y)"),
    "ddot": ("T dy, T y, T x, T mean, int32 relu", "dy * npmask_mask_if(relu, y) * (x - mean)"),
}


def applies(*arrays) -> bool:
    """True when the fused kernels serve: CuPy arrays (the first decides), all of its dtype (None
    entries ignored); other cases take the generic path, which runs on CuPy as well."""
    first = arrays[0]
    return backend_name(first) == "cupy" and all(a is None or a.dtype == first.dtype for a in arrays)


def _elementwise(cp, name):
    in_params, out_params, body = _ELEMENTWISE[name]
    return cp.ElementwiseKernel(in_params, out_params, body, f"npmask_bn_{name}", preamble=_PREAMBLE)


def _reduction(cp, name):
    in_params, expr = _REDUCTIONS[name]
    return cp.ReductionKernel(in_params, "T out", expr, "a + b", "out = a", "0", f"npmask_bn_{name}",
                              preamble=_PREAMBLE)


@lru_cache(maxsize=None)
def kernels() -> dict:
    """The kernel objects by name, built on first use (needs CuPy; a GPU only to run them)."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError("the fused batch-norm kernels need CuPy, which is not installed")
    built = {name: _elementwise(cp, name) for name in _ELEMENTWISE}
    built.update({name: _reduction(cp, name) for name in _REDUCTIONS})
    return built


def forward(x3, weight, bias, running_mean, running_var, eps, momentum, training, relu, r3):
    """``(y3, mean, inv_std)`` for x3 (N, C, L), the optional residual r3 of its shape, ``relu`` a bool.

    In training the running statistics are updated in place; ``mean`` is what backward subtracts
    from x (the batch mean, or a copy of running_mean in eval mode).
    """
    xp = get_array_module(x3)
    k = kernels()
    n, c, length = x3.shape
    t = x3.dtype.type
    m = n * length

    def col(v):                                   # (C,) -> (1, C, 1), to broadcast against x3
        return v.reshape(1, c, 1)

    scale, shift, inv_std, mean = (xp.empty(c, dtype=x3.dtype) for _ in range(4))
    if training:
        s1 = k["sum"](x3, axis=(0, 2))
        s2 = k["sqdev"](x3, col(s1), t(m), axis=(0, 2))
        k["stats"](s1, s2, weight, bias, t(m), t(eps), t(momentum), t(1 - momentum),
                   t(m / (m - 1)), mean, inv_std, scale, shift, running_mean, running_var)
        centre = mean
    else:
        centre = xp.empty(c, dtype=x3.dtype)
        k["stats_eval"](weight, bias, running_mean, running_var, t(eps), mean, centre, inv_std,
                        scale, shift)
    if r3 is None:
        y3 = k["forward"](x3, col(centre), col(scale), col(shift), int(relu))
    else:
        y3 = k["forward_residual"](x3, r3, col(centre), col(scale), col(shift), int(relu))
    return y3, mean, inv_std


def backward(dy3, x3, y3, mean, inv_std, weight, training, need_params, want_d, grads=None):
    """``(dx3, d3, dweight, dbias)``; y3 is the forward's output when a ReLU was fused, else None.

    d3 (the masked gradient dy * [y > 0], for a residual's branch) only with ``want_d``, else None;
    dweight and dbias are None for a frozen layer in eval mode (``need_params`` False), whose dx
    is a fixed scaling. With ``grads`` (the layer's weight and bias gradients) dweight and dbias
    are added into them by the channel kernel itself (two launches fewer) and returned as None.
    """
    k = kernels()
    c = dy3.shape[1]
    relu = int(y3 is not None)
    y = y3 if relu else dy3                       # not read when relu = 0

    def col(v):
        return v.reshape(1, c, 1)

    dweight = dbias = None
    if training or need_params:
        dbias = k["dsum"](dy3, y, relu, axis=(0, 2))
        dw_sum = k["ddot"](dy3, y, x3, col(mean), relu, axis=(0, 2))
        m = dy3.dtype.type(dy3.shape[0] * dy3.shape[2])
        if grads is None:
            dweight, k1, k2, scale = k["grads"](dbias, dw_sum, inv_std, weight, m)
        else:                                     # CuPy: all outputs given, or none
            k1, k2, scale = (get_array_module(dy3).empty_like(inv_std) for _ in range(3))
            k["grads_into"](dbias, dw_sum, inv_std, weight, m, k1, k2, scale, *grads)
            dweight = dbias = None
    else:
        scale = weight * inv_std
    if training:
        args = (dy3, y, x3, col(mean), col(k1), col(k2), col(scale), relu)
        name = "backward"
    else:
        args, name = (dy3, y, col(scale), relu), "backward_eval"
    if want_d:
        dx3, d3 = k[name + "_d"](*args)
    else:
        dx3, d3 = k[name](*args), None
    return dx3, d3, dweight, dbias
