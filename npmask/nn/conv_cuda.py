"""im2col and col2im as one CUDA kernel each, for CuPy arrays (``settings.cuda_conv_kernels``).

On a GPU a training step is bound by kernel launches. The generic column code
(:mod:`npmask.nn.conv_columns`, :mod:`npmask.nn.conv_fast`) runs on CuPy as it is, but launches one
strided-copy kernel per kernel offset (u, v) for the columns, and one accumulation per offset for
the input gradient. Here each is ONE ElementwiseKernel:

- :func:`im2col` writes the column matrix of a chunk of m images, one thread per entry::

      cols[(c, u, v), (img, oi, j)] = xpad[img, c, s*oi + u, s*j + v]    j < Wo
                                    = 0                                  Wo <= j < R

  in the layout the GEMM of :class:`~npmask.nn.conv_columns._Columns` reads: rows (c, u, v),
  columns (img, oi, j) with rows of R >= Wo entries (R = Wo, or R = Wp for the "wide rows" layout,
  whose GEMM computes R - Wo junk outputs per row that the caller discards). Padding is zero; the
  junk columns are zero too (the generic wide layout has the pixels that wrap around the border
  there; the valid outputs do not read them, and the weight gradient multiplies them by the zero
  junk columns of dy: its sums gain +0 instead of +-0 there, the same bits unless a partial sum is
  -0 or the input holds an infinity or NaN).

- :func:`col2im` is its adjoint in *gather* form, one thread per input pixel (img, c, a, b): the
  pixel sums, for the kernel offsets (u, v) in row-major order, the entries of dcols that were
  copied from it, starting from zero. No atomics: the same sum in the same order on every run, and
  the order of the generic path (which adds the offsets' blocks into a zeroed buffer in the same
  (u, v) order), so the results are the same bits. dcols may have rows of R >= Wo entries; the
  entries j >= Wo are not read.

Index arithmetic is in 32-bit ``int``: integer division and modulo (several per thread) are much
cheaper in 32 bits than in 64 on NVIDIA GPUs, and the arrays of a chunk fit: with
``settings.gpu_chunk_floats`` a chunk's column matrix has at most 2^26 entries unless one image's
columns alone are larger. :func:`fits` declines chunks with 2^31 entries or more, which then take
the generic path; the shape parameters are passed as int32 scalars. No dilation (npmask's
convolution has none).

CuPy is imported only when a kernel is first needed, never at import time.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..backend import _import_cupy
from ..config import settings

INT_LIMIT = 2 ** 31 - 1

_SHAPE = "int32 c, int32 h, int32 w, int32 kh, int32 kw, int32 s, int32 ph, int32 pw, " \
         "int32 ho, int32 wo, int32 r, int32 m"

# One thread per entry of cols (C*kh*kw, m*Ho*R); x is the chunk (m, C, H, W), contiguous, flat.
IM2COL_BODY = """
int k = i;
int cols_row = k / (m * ho * r);
int cols_col = k % (m * ho * r);
int jj = cols_col % r;
int oi = (cols_col / r) % ho;
int img = cols_col / (r * ho);
int v = cols_row % kw;
int u = (cols_row / kw) % kh;
int ch = cols_row / (kw * kh);
int a = s * oi + u - ph;
int b = s * jj + v - pw;
bool inside = jj < wo && a >= 0 && a < h && b >= 0 && b < w;
cols = inside ? x[((img * c + ch) * h + a) * w + b] : (T)0;
"""

# One thread per entry of dx (m, C, H, W); dcols (C*kh*kw, m*Ho*R), contiguous, flat.
COL2IM_BODY = """
int k = i;
int b = k % w;
int a = (k / w) % h;
int ch = (k / (w * h)) % c;
int img = k / (w * h * c);
T acc = 0;
for (int u = 0; u < kh; ++u) {
  int di = a + ph - u;
  if (di < 0 || di % s != 0 || di / s >= ho) continue;
  for (int v = 0; v < kw; ++v) {
    int dj = b + pw - v;
    if (dj < 0 || dj % s != 0 || dj / s >= wo) continue;
    acc += dcols[((ch * kh + u) * kw + v) * (m * ho * r) + (img * ho + di / s) * r + dj / s];
  }
}
dx = acc;
"""


def enabled(xp) -> bool:
    """Whether convolutions on the array module ``xp`` take the kernels: CuPy, and the setting on."""
    return settings.cuda_conv_kernels and xp is not np


def fits(c, h, w, kh, kw, ho, r, m) -> bool:
    """Whether a chunk of m images' input and column matrix both have under 2^31 entries (int
    indices); a chunk that does not fit takes the generic path."""
    return m * c * h * w <= INT_LIMIT and c * kh * kw * m * ho * r <= INT_LIMIT


def applies(xp, c, h, w, kh, kw, ho, r, m) -> bool:
    """Whether a convolution's chunks of m images (C, H, W), kernel kh x kw, Ho output rows of R
    entries, take the kernels: they are :func:`enabled` for ``xp`` and the chunk :func:`fits`."""
    return enabled(xp) and fits(c, h, w, kh, kw, ho, r, m)


@lru_cache(maxsize=None)
def kernels() -> dict:
    """The two kernel objects, built on first use (needs CuPy; a GPU only to run them)."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError("the CUDA im2col/col2im kernels need CuPy, which is not installed")
    return {"im2col": cp.ElementwiseKernel("raw T x, " + _SHAPE, "T cols", IM2COL_BODY,
                                           "npmask_conv_im2col"),
            "col2im": cp.ElementwiseKernel("raw T dcols, " + _SHAPE, "T dx", COL2IM_BODY,
                                           "npmask_conv_col2im")}


def im2col(x_chunk, out, kh, kw, stride, ph, pw, ho, wo, r):
    """Writes the columns of x_chunk (m, C, H, W) into out (C*kh*kw, m*Ho*R), rows of R >= Wo."""
    m, c, h, w = x_chunk.shape
    x = x_chunk.ravel() if x_chunk.flags.c_contiguous else x_chunk.copy().ravel()
    kernels()["im2col"](x, c, h, w, kh, kw, stride, ph, pw, ho, wo, r, m, out)
    return out


def col2im(dcols, out, kh, kw, stride, ph, pw, ho, wo, r):
    """Writes into out (m, C, H, W) the input gradient of the columns dcols (C*kh*kw, m*Ho*R)."""
    m, c, h, w = out.shape
    d = dcols.ravel() if dcols.flags.c_contiguous else dcols.copy().ravel()
    kernels()["col2im"](d, c, h, w, kh, kw, stride, ph, pw, ho, wo, r, m, out)
    return out
