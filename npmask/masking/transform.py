"""The affine binary-mask transform of a weight tensor (eq. 1 of the paper) and its backward pass.

Shapes: W and R (O, ...) -- a conv weight (O, C, kh, kw) or a linear weight (O, in); G = dL/dW~ of
the same shape. Each k_j is either a *fixed* Python number or a *learned* array of shape (1,) (one
scalar per layer) or (O,) (one per output channel, the channel-wise variant).

Forward (the binary mask is always the hard threshold)::

    M  = h(R - tau) = 1[R >= tau]
    W~ = k0*W + k1*1 + k2*M + k3*(W∘M)

Backward, with sums over every element (per output channel for a (O,) k)::

    dL/dk0 = Σ G∘W      dL/dk1 = Σ G      dL/dk2 = Σ G∘M      dL/dk3 = Σ G∘W∘M
    dL/dM  = G∘(k2 + k3*W)                          (M treated as a real input)
    dL/dR  = dL/dM ∘ h~'(R - tau)                   (surrogate derivative, section 3.3 of the paper)
    dL/dW  = G∘(k0 + k3*M)                          (on request: training W through the transform;
                                                     npmask's frozen backbone never asks for it)

Surrogates h~: ``"identity"`` (straight-through, h~' = 1, the paper's default) and ``"sigmoid"``
(h~' = σ(x)(1 - σ(x))).

Two implementations live here:

- :func:`transform_forward_reference` / :func:`transform_backward_reference`: the formulas above,
  written out term by term. Obviously correct, slow (a float copy of M, many temporaries).
- :func:`transform_forward` / :func:`transform_backward`: the same numbers, organised for speed.
  Rewriting eq. 1 as ``W~ = (k0*W + k1) + M∘A`` with ``A = k2 + k3*W`` (what a weight gains when its
  mask bit is 1) shows that A is exactly dL/dM / G: the forward pass computes A once and the backward
  pass reuses it, so dL/dR costs one multiplication. Terms whose k is fixed to 0 are skipped, a k
  fixed to 1 costs no multiplication, M stays a 1-byte boolean array, and the full sums
  Σ G∘W and Σ (G∘M)∘W are BLAS dot products (no temporary). The elementwise work (M, A, W~ in the
  forward pass; G∘M and dL/dR in the backward) is split by output channel over npmask's threads
  (:func:`npmask.nn.parallel.in_parallel`: the same bits as serially; only weights of at least
  ``settings.parallel_min_floats`` entries, 256K by default: in WRN-28-4 the 3x3 convolutions of
  the 256-channel stage); the sums stay whole-array, on the calling thread.

On CuPy arrays the fast path hands over to :mod:`npmask.masking.cuda`, where each direction is one
fused GPU kernel (plus one reduction per learned k) computing the same formulas.
"""
from __future__ import annotations

from ..backend import get_array_module
from ..nn.parallel import in_parallel
from . import cuda
from .common import TransformCache, is_fixed

SURROGATES = ("identity", "sigmoid")


# ---------------------------------------------------------------------------------- small helpers
def _is(k, value: float) -> bool:
    return is_fixed(k) and float(k) == value


def _bcast(k, ndim: int):
    """A k shaped to broadcast against an ndim-dimensional weight: (1,)/(O,) -> (O or 1, 1, ..., 1)."""
    if is_fixed(k):
        return float(k)
    return k.reshape((-1,) + (1,) * (ndim - 1))


def _rows(k, lo: int, hi: int):
    """The rows lo:hi of a weight-shaped or (O, 1, ..) array; a number or a (1, 1, ..) k as it is."""
    if is_fixed(k) or k.shape[0] == 1:
        return k
    return k[lo:hi]


def _check(W, R, ks, tau):
    if len(ks) != 4:
        raise ValueError(f"the transform takes four coefficients (k0, k1, k2, k3), got {len(ks)}")
    if R.shape != W.shape:
        raise ValueError(f"the real mask R has shape {tuple(R.shape)} but the weight W has shape "
                         f"{tuple(W.shape)}; they must match")
    for j, k in enumerate(ks):
        if not is_fixed(k):
            if k.ndim != 1 or k.shape[0] not in (1, W.shape[0]):
                raise ValueError(f"learned k{j} must have shape (1,) or (O,) = ({W.shape[0]},), got "
                                 f"{tuple(k.shape)}")
            if k.dtype != W.dtype:
                raise ValueError(f"k{j} has dtype {k.dtype} but W has dtype {W.dtype}")
    float(tau)


def surrogate_derivative(x, surrogate: str = "identity"):
    """h~'(x): 1 for ``"identity"`` (straight-through), σ(x)(1-σ(x)) for ``"sigmoid"``; dtype of x."""
    xp = get_array_module(x)
    if surrogate == "identity":
        return xp.ones_like(x)
    if surrogate == "sigmoid":
        s = 1 / (1 + xp.exp(-x))
        return s * (1 - s)
    raise ValueError(f"unknown surrogate {surrogate!r}; known: {', '.join(SURROGATES)}")


def _reduce_like(a, k):
    """Σ a over everything (k of shape (1,)) or over all axes but the first (k of shape (O,))."""
    if k.shape[0] == 1 and a.shape[0] != 1:
        return a.sum().reshape(1)
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _dot_like(a, b, k):
    """Σ a∘b reduced like k, without materialising a∘b: a BLAS dot (one k) or a row-wise einsum.

    A boolean b (the mask) goes to einsum also for one k: BLAS cannot take it, and einsum converts
    it as it goes, so the simple model's dk2 = Σ G∘M needs no weight-sized G∘M."""
    xp = get_array_module(a, b)
    if k.shape[0] == 1 and a.shape[0] != 1:
        if b.dtype != bool:
            return xp.vdot(a.reshape(-1), b.reshape(-1)).reshape(1)
        return xp.einsum("i,i->", a.reshape(-1), b.reshape(-1)).reshape(1)
    return xp.einsum("ij,ij->i", a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


# ---------------------------------------------------------------------------------- reference
def apply_affine(W, M, ks):
    """W~ = k0*W + k1 + k2*M + k3*(W∘M) for a *real-valued* M of W's shape (term by term).

    This is eq. 1 with M treated as an ordinary input, used by the reference forward and by the
    tests that check dL/dM by finite differences.
    """
    k0, k1, k2, k3 = (_bcast(k, W.ndim) for k in ks)
    return k0 * W + k1 + k2 * M + k3 * (W * M)


def transform_forward_reference(W, R, ks, tau: float = 0.0):
    """The obviously-correct forward: M = 1[R >= tau] as W's dtype, then eq. 1 term by term."""
    _check(W, R, ks, tau)
    M = (R >= tau).astype(W.dtype)
    return apply_affine(W, M, ks)


def transform_backward_reference(G, W, R, ks, tau: float = 0.0, surrogate: str = "identity"):
    """Every gradient of the transform, written out: returns ``(dks, dR, dW)``.

    ``dks[j]`` is shaped like k_j when k_j is learned and is a float when it is fixed (the gradient a
    scalar k would get); dR and dW are shaped like W.
    """
    _check(W, R, ks, tau)
    M = (R >= tau).astype(W.dtype)
    k0, k1, k2, k3 = (_bcast(k, W.ndim) for k in ks)
    per_term = (G * W, G, G * M, G * W * M)
    dks = []
    for k, t in zip(ks, per_term):
        dks.append(float(t.sum()) if is_fixed(k) else _reduce_like(t, k))
    dM = G * (k2 + k3 * W)
    dR = dM * surrogate_derivative(R - tau, surrogate)
    dW = G * (k0 + k3 * M)
    return dks, dR, dW


# ---------------------------------------------------------------------------------- fast path
def transform_forward(W, R, ks, tau: float = 0.0):
    """W~ = k0*W + k1 + k2*M + k3*(W∘M), M = 1[R >= tau]; returns ``(W~, cache)``.

    W, R (O, ...); ``ks = (k0, k1, k2, k3)``, each a fixed number or a learned (1,)/(O,) array.
    W~ has W's shape and dtype. The cache holds references to W and R: do not modify them in place
    before :func:`transform_backward`.

    Computed as ``W~ = (k0*W + k1) + M∘A`` with ``A = k2 + k3*W``, kept for the backward pass.
    """
    _check(W, R, ks, tau)
    if cuda.applies(W):                                # CuPy: one fused kernel (masking/cuda.py)
        return cuda.transform_forward(W, R, ks, tau)
    xp = get_array_module(W, R)
    nd = W.ndim
    k0, k1, k2, k3 = (_bcast(k, nd) for k in ks)
    tau = float(tau)
    M = xp.empty(W.shape, dtype=bool)                  # M = 1[R >= tau], 1 byte per weight
    # A = k2 + k3*W: the amount a weight gains when its mask bit is on (and dL/dM = G∘A).
    if _is(k3, 0.0):
        A = None if _is(k2, 0.0) else k2               # a number or a broadcastable k array
    elif _is(k3, 1.0) and _is(k2, 0.0):
        A = W                                          # A = W itself (piggyback's W∘M): no copy,
    else:                                              # no weight-sized array kept for backward
        A = xp.empty_like(W)
    Wt = xp.empty_like(W)

    def rows(lo, hi):   # elementwise: the output channels are split over threads (nn/parallel.py)
        w, m, t = W[lo:hi], M[lo:hi], Wt[lo:hi]
        xp.greater_equal(R[lo:hi], tau, out=m)
        if A is None:
            t[...] = 0
        else:
            a = _rows(A, lo, hi)
            if not _is(k3, 0.0) and A is not W:       # (A is W: read only, never written)
                if _is(k3, 1.0):
                    a[...] = w
                else:
                    xp.multiply(w, _rows(k3, lo, hi), out=a)
                if not _is(k2, 0.0):
                    a += _rows(k2, lo, hi)
            xp.multiply(m, a, out=t, dtype=W.dtype)    # W~ = M∘A (broadcasts a k2-only A) ...
        if _is(k0, 1.0):                               # ... + k0*W + k1
            t += w
        elif not _is(k0, 0.0):
            t += w * _rows(k0, lo, hi)                 # a temporary of the rows' size (no BN after)
        if not _is(k1, 0.0):
            t += _rows(k1, lo, hi)

    in_parallel(xp, W.shape[0], W.size, rows)
    # A is kept only as an array of W's shape (a k2-only A is recomputed from the k itself), or
    # as W itself when k3 = 1 and k2 = 0.
    return Wt, TransformCache(W, R, M, A, tuple(ks), tau)


def transform_backward(G, cache: TransformCache, need_k=(True, True, True, True), need_R: bool = True,
                       need_W: bool = False, surrogate: str = "identity"):
    """Gradients of :func:`transform_forward`; returns ``(dks, dR, dW)``. ``G`` is read, never written.

    G = dL/dW~ (W's shape). ``dks[j]`` is an array shaped like k_j when k_j is learned and
    ``need_k[j]`` is true, else None (fixed k's get no gradient). dR (W's shape) when ``need_R``,
    dW when ``need_W``, else None.
    """
    if G.shape != cache.W.shape:
        raise ValueError(f"G has shape {tuple(G.shape)}, the transformed weight has {tuple(cache.W.shape)}")
    if surrogate not in SURROGATES:
        raise ValueError(f"unknown surrogate {surrogate!r}; known: {', '.join(SURROGATES)}")
    if cuda.applies(cache.W):                          # CuPy: fused kernels (masking/cuda.py)
        return cuda.transform_backward(G, cache, need_k, need_R, need_W, surrogate)
    W, R, M, A, ks, tau = cache
    xp = get_array_module(G, W)
    nd = W.ndim
    want = [bool(need_k[j]) and not is_fixed(ks[j]) for j in range(4)]

    dks = [None] * 4
    if want[0]:
        dks[0] = _dot_like(G, W, ks[0])
    if want[1]:
        dks[1] = _reduce_like(G, ks[1])
    GM = None
    if want[3] or (need_W and not _is(ks[3], 0.0)):
        GM = xp.empty_like(G)                          # G∘M, shared by dk3, dW and dk2
    dR = xp.empty_like(G) if need_R else None
    if GM is not None or dR is not None:
        def rows(lo, hi):   # elementwise: the output channels are split over threads
            if GM is not None:
                xp.multiply(G[lo:hi], M[lo:hi], out=GM[lo:hi], dtype=G.dtype)
            if dR is not None:
                if A is None:
                    dR[lo:hi] = 0
                else:                                  # dL/dM = G∘(k2 + k3*W), A from the forward
                    xp.multiply(G[lo:hi], _rows(A, lo, hi), out=dR[lo:hi], dtype=G.dtype)
                if surrogate != "identity":
                    dR[lo:hi] *= surrogate_derivative(R[lo:hi] - tau, surrogate)
        in_parallel(xp, G.shape[0], G.size, rows)
    if want[2]:                                        # without G∘M (simple): one pass, no temporary
        dks[2] = _reduce_like(GM, ks[2]) if GM is not None else _dot_like(G, M, ks[2])
    if want[3]:
        dks[3] = _dot_like(GM, W, ks[3])

    dW = None
    if need_W:
        k0, k3 = _bcast(ks[0], nd), _bcast(ks[3], nd)
        dW = G * k0 if not _is(ks[0], 0.0) else xp.zeros_like(G)
        if GM is not None:
            dW += GM * k3
    return dks, dR, dW
