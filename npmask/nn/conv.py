"""2-D convolution (cross-correlation, NCHW) with a hand-written backward pass, fast enough to train.

Shapes: x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None, y (N, O, Ho, Wo) with
Ho = (H + 2p - kh) // s + 1, Wo = (W + 2p - kw) // s + 1 (s = stride, p = padding).

The formulas (``conv_reference.py`` writes them as plain loops):

    y[n, o, i, j]    = b[o] + sum_{c,u,v} W[o, c, u, v] * xpad[n, c, s*i + u, s*j + v]
    dW[o, c, u, v]   = sum_{n,i,j} dy[n, o, i, j] * xpad[n, c, s*i + u, s*j + v]
    dxpad[n, c, s*i + u, s*j + v] += sum_o W[o, c, u, v] * dy[n, o, i, j]
    db[o]            = sum_{n,i,j} dy[n, o, i, j]

How it is made fast (im2col, "contract with the weights first"): the receptive fields of a few
images are copied into a *channel-major* column matrix

    cols[(c, u, v), (n, i, j)] = xpad[n, c, s*i + u, s*j + v]      shape (C*kh*kw, nb*Ho*Wo)

so that each of the three sums above is ONE matrix product (GEMM), which BLAS runs near the
machine's peak:

    y  = W_mat @ cols          W_mat = W.reshape(O, C*kh*kw)
    dW = dy_mat @ cols.T       dy_mat[o, (n, i, j)] = dy[n, o, i, j]
    dx:  for stride 1, the input gradient is itself a convolution, of dy (padded by k-1-p) with the
         kernel flipped in both spatial axes and its channel axes swapped, so it takes the same
         im2col + GEMM route. Otherwise dcols = W_mat.T @ dy_mat, then "col2im": each column entry
         is added back to the input pixel it was copied from, one strided-slice ``+=`` per kernel
         offset (u, v), which is deterministic (no scatter-add atomics).

The batch is processed in chunks of a few images: the column matrix of a whole batch can be tens of
megabytes, and streaming it through memory (not the arithmetic) is what costs time; a chunk's columns
stay in the CPU cache between the copy and the GEMM. For stride 1 the columns are built from
contiguous slices of the flattened image ("shifted rows", "wide rows": :class:`_Columns`); where the
output is as large as the input (3x3, padding 1) and the images are large enough, only the kernel's
kw column shifts are copied, and its kh rows are column slices of that matrix, one GEMM each
("folded rows": :class:`_FoldedRows`). 1x1
convolutions need no columns at all (the input *is* the column matrix, after a strided slice when
the stride is 2). Every temporary has the dtype of x: float32 in, float32 throughout. On NumPy the
chunks are shared out over a few threads, each doing a whole chunk (copies and a one-thread GEMM;
:func:`npmask.nn.parallel.each_chunk`); the chunks, and so the results, do not depend on how many.

The functional API (``conv2d_forward`` / ``conv2d_backward``) is what other layers build on (the
masked convolution calls it with its transformed weight); :class:`Conv2d` is the layer.
"""
from __future__ import annotations

import threading

import numpy as np

from ..backend import get_array_module, rng as make_rng
from .checks import check_array, check_conv_gradient
from .module import Module
from .parallel import contiguous, each_chunk, in_parallel

__all__ = ["conv2d_forward", "conv2d_backward", "conv_output_size", "Conv2d"]


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one spatial axis: (size + 2*padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _check_shapes(x, weight, bias, stride: int, padding: int):
    if x.ndim != 4:
        raise ValueError(f"conv2d expects x shaped (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"conv2d expects weight shaped (O, C, kh, kw), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1]} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"conv2d needs one dtype for x, weight and bias; got x {x.dtype}, weight "
                         f"{weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}"))
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    _, _, h, w = x.shape
    _, _, kh, kw = weight.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel {kh}x{kw} does not fit the input {h}x{w} with padding {padding}")
    return ho, wo


# Column floats per chunk of images on the CPU: at most about 1M (4 MB in float32, one to a few
# images), so that a chunk's columns are still in the core's cache when its GEMM reads them. Each
# chunk's GEMM runs on one BLAS thread (the cores work on different chunks, :func:`each_chunk`), and
# one-thread GEMMs of these shapes are fastest on small chunks: measured (CPU time, 2026-11-24) for
# the 64-channel layer of WRN-28-4, 118-138 GFLOP/s with 2K columns, 87 with 8K and 64 with 16K,
# against 124 for a 2048^2 GEMM; whole training steps with 512K, 768K and 2M-float chunks were no
# faster (1.4-1.9% slower, within the noise). The number of chunks is a multiple of
# CHUNKS_MULTIPLE (unless the batch has fewer images; then one image each) and the chunks are of
# equal size (to one image), so that 2 or 4 threads can finish a pass together (5 chunks of 7, 7,
# 7, 7 and 4 images would leave one of 2 threads 18 images and the other 14; on 2 cores the whole
# step measured the same either way, 0.996x). Tests lower CHUNK_FLOATS to exercise several (and
# uneven) chunks.
# On a GPU the loop over chunks would only add kernel launches: there a chunk holds up to 64M
# floats (256 MB), in practice the whole batch.
CHUNK_FLOATS = 1 << 20
CHUNKS_MULTIPLE = 4
GPU_CHUNK_FLOATS = 1 << 26
# "Shifted rows" columns where they apply (see _Columns); False falls back to the wide-row and
# general layouts, e.g. to compare the two with benchmarks/step_ab.py or benchmarks/conv.py
# --setting. Measured (benchmarks/results/train_step_cpu.txt, run 24): all convolutions of
# WRN-28-4, forward and backward, on one core 0.916x the time of the fallback; whole training
# steps on 2 cores, taking turns in one process, 0.966x (paired median, two runs). On 2 cores the
# per-layer figures of conv.py scatter too much to show it (convs this does not touch: 0.84-1.17x).
SHIFTED_ROWS = True
# "Folded rows" (see _FoldedRows) for the stride-1 convolutions whose output is as large as their
# input (Ho = H, Wo = W: every 3x3 pad-1 convolution, and its input gradient) on images of at least
# FOLDED_MIN_PIXELS, on NumPy; False falls back to the layouts above. Measured
# (benchmarks/results/train_step_cpu.txt, run 29): all convolutions of WRN-28-4, forward and
# backward, on one core 0.871x the time of shifted rows (64-channel 32x32 layers 0.836x,
# 128-channel 16x16 0.772x); whole training steps on 2 cores, taking turns in one process, 0.970x
# (paired median). On 8x8 images (64 output columns per image) the three GEMMs are too small, and
# stacking images computes padding rows between them: 1.05-1.1x slower, so those keep shifted rows.
FOLDED_ROWS = True
FOLDED_MIN_PIXELS = 256


def _chunks(xp, n: int, col_floats: int) -> tuple[int, list[tuple[int, int]]]:
    """(nb, [(n0, n1), ...]): the batch of n images in chunks wide enough for a fast GEMM and small
    enough for the columns to stay in cache, and nb, the images of the largest (what a thread's
    buffers must hold); ``col_floats`` is the column floats of one image. The chunks do not depend
    on how many threads will share them (so neither do the results)."""
    if n == 0:
        chunks = [(0, 0)]                               # an empty batch: one empty chunk
    elif xp is not np:
        nb = max(1, GPU_CHUNK_FLOATS // max(col_floats, 1))
        chunks = [(n0, min(n, n0 + nb)) for n0 in range(0, n, nb)]
    else:
        fewest = -(-n // max(1, CHUNK_FLOATS // max(col_floats, 1)))  # chunks of <= CHUNK_FLOATS
        count = min(n, -(-fewest // CHUNKS_MULTIPLE) * CHUNKS_MULTIPLE)
        chunks = [(n * i // count, n * (i + 1) // count) for i in range(count)]
    return max(n1 - n0 for n0, n1 in chunks), chunks


def _wrapped(v: int, pw: int, w: int) -> slice:
    """The output columns j whose entry for kernel column v (v != pw) wraps around the border.

    In a layout of rows of W pixels with no padding columns ("shifted rows", "folded rows"), output
    column j reads pixel j + v - pw of its row, but the flat slice reads past the row's end into
    the next row (or before its start into the one above) where that is outside [0, W): for
    v < pw the first pw - v columns, for v > pw the last v - pw (all W of them when the padding is
    wider than the image). Those entries must be zero, the padding.
    """
    return slice(0, pw - v) if v < pw else slice(max(0, w + pw - v), w)


class _Columns:
    """im2col for chunks of images of one geometry, with buffers reused from chunk to chunk.

    ``cols(x_chunk)`` returns the channel-major column matrix (C*kh*kw, m*Ho*R) of m images, where a
    column is one output position (n, i, j) and R is the length of an output row in this layout:

    - general case (R = Wo): cols[(c,u,v), (n,i,j)] = xpad[n, c, s*i + u, s*j + v], one strided
      copy per kernel offset (u, v). Its inner loops copy one output row (Wo floats) at a time,
      which is slow for small images;
    - stride 1 and an output as wide as the input, Wo = W (every 3x3 convolution with padding 1,
      and the input gradient of one) ("shifted rows", R = Wo): only the rows are padded; each
      channel's image is one flat row, ``pw`` zeros + the padded rows + ``pw`` zeros, and the kernel
      offset (u, v) is the *contiguous* slice of it that starts at u*W + v. An output pixel in the
      first or last ``pw`` columns then reads, for some v, a pixel of the row above or below
      instead of the zero padding (the slice wraps around the border); those few entries (at most
      2*pw of every W) are zeroed after the copy. No junk columns, and for one image dy is
      already the matrix the weight gradient needs. (Letting the GEMM write straight into y as
      well measured slower, on the 64-channel 32x32 layers: so it does not);
    - other stride-1 convolutions with little padding ("wide rows", R = Wp = W + 2*pw): the padded
      image is flattened and offset (u, v) is the contiguous slice at u*Wp + v. The price is Wp - Wo
      junk columns per output row (the positions that wrap around the right border), which the GEMM
      computes and :meth:`product` discards; it is used only when that costs at most 10% extra
      arithmetic, and then the copy is ~2x faster. The two flat layouts are one code path: rows
      of R floats (W, or Wp with the padding columns), the slice of offset (u, v) at u*R + v.

    ``product(w_mat, x_chunk, y_chunk)`` writes the valid outputs of the GEMM w_mat @ cols into
    y_chunk (m, O, Ho, Wo); ``rows(dy_chunk)`` lays out an upstream gradient like the columns
    (junk columns zero, so they add nothing to a weight gradient). Each thread has its own instance.
    """

    def __init__(self, xp, dtype, nb, c, h, w, kh, kw, stride, ph, pw, ho, wo):
        self.c, self.h, self.w, self.kh, self.kw = c, h, w, kh, kw
        self.stride, self.ph, self.pw, self.ho, self.wo = stride, ph, pw, ho, wo
        self.hp, self.wp = h + 2 * ph, w + 2 * pw
        pointwise = kh == 1 and kw == 1 and ph == 0 and pw == 0
        self.shifted = SHIFTED_ROWS and not pointwise and stride == 1 and wo == w
        self.wide = not self.shifted and stride == 1 and self.wp * 10 <= wo * 11
        self.r = self.wp if self.wide else wo          # shifted rows: R = Wo = W
        if pointwise:
            self.xpad = None                           # not needed: see cols()
        elif self.shifted or self.wide:
            # One flat row per channel: Hp rows of R, pixel (i, j) at pw + (ph + i)*R + j, and
            # enough zeros after them for the last offset's slice (it ends at Hp*R + kw - 2).
            self.xpad = xp.zeros((nb, c, self.hp * self.r + max(kw - 1, pw)), dtype=dtype)
        else:
            self.xpad = xp.zeros((nb, c, self.hp, self.wp), dtype=dtype)
        self.buf = xp.empty((c * kh * kw, nb * ho * self.r), dtype=dtype)
        self.dy_buf = None
        self.xp, self.dtype, self.nb = xp, dtype, nb

    def cols(self, x_chunk):
        m = x_chunk.shape[0]
        c, kh, kw, ho, wo, s = self.c, self.kh, self.kw, self.ho, self.wo, self.stride
        k, length = c * kh * kw, m * ho * self.r
        cols = self.buf[:, :length].reshape(c, kh, kw, m, ho * self.r)
        if self.xpad is None:                          # 1x1, no padding: a (strided) transpose
            x_chunk = x_chunk[:, :, ::s, ::s] if s > 1 else x_chunk
            if m == 1:   # one image needs no im2col: the (strided) input is the column matrix
                return x_chunk.reshape(c, ho * wo)      # a view for stride 1, a copy for stride 2
            cols.reshape(c, m, ho, wo)[...] = x_chunk.transpose(1, 0, 2, 3)
        elif self.shifted or self.wide:
            pw, w, r = self.pw, self.w, self.r
            flat = self.xpad[:m]
            image = flat[:, :, pw:pw + self.hp * r].reshape(m, c, self.hp, r)
            image[:, :, self.ph:self.ph + self.h, :w] = x_chunk
            for u in range(kh):
                for v in range(kw):
                    start = u * r + v
                    cols[:, u, v] = flat[:, :, start:start + ho * r].transpose(1, 0, 2)
            if self.shifted:        # rows of W, no padding columns: some slices wrap around the
                grid = cols.reshape(c, kh, kw, m, ho, w)       # border; those entries are padding
                for v in range(kw):
                    if v != pw:
                        grid[:, :, v, :, :, _wrapped(v, pw, w)] = 0
        else:
            xpad = self.xpad[:m]
            xpad[:, :, self.ph:self.ph + self.h, self.pw:self.pw + self.w] = x_chunk
            cols = cols.reshape(c, kh, kw, m, ho, wo)
            for u in range(kh):
                for v in range(kw):
                    window = xpad[:, :, u:u + s * (ho - 1) + 1:s, v:v + s * (wo - 1) + 1:s]
                    cols[:, u, v] = window.transpose(1, 0, 2, 3)
        return self.buf[:, :length].reshape(k, length)

    def product(self, w_mat, x_chunk, y_chunk):
        """y_chunk (m, O, Ho, Wo) = the valid outputs of w_mat (O, C*kh*kw) @ cols(x_chunk)."""
        o, m = w_mat.shape[0], x_chunk.shape[0]
        mat = w_mat @ self.cols(x_chunk)
        y_chunk[...] = mat.reshape(o, m, self.ho, self.r)[:, :, :, :self.wo].transpose(1, 0, 2, 3)

    def rows(self, dy_chunk):
        m, o = dy_chunk.shape[:2]
        if m == 1 and self.r == self.wo:   # one image, no junk: dy is already the matrix
            return dy_chunk.reshape(o, self.ho * self.wo)
        if self.dy_buf is None:
            self.dy_buf = self.xp.zeros((o, self.nb * self.ho * self.r), dtype=self.dtype)
        length = m * self.ho * self.r
        view = self.dy_buf[:, :length].reshape(o, m, self.ho, self.r)
        view[:, :, :, :self.wo].transpose(1, 0, 2, 3)[...] = dy_chunk
        return self.dy_buf[:, :length]


def _folds(xp, n, c, h, w, kh, kw, stride, ph, pw, ho, wo) -> bool:
    """Whether a convolution of this geometry takes the "folded rows" route (:class:`_FoldedRows`)."""
    return (FOLDED_ROWS and xp is np and n > 0 and stride == 1 and kh * kw > 1
            and ho == h and wo == w                 # i.e. kh = 2*ph + 1 and kw = 2*pw + 1
            and h * w >= FOLDED_MIN_PIXELS)


class _FoldedRows:
    """im2col with the kernel's columns only: ``kw`` copies of an image instead of ``kh * kw``.

    For a stride-1 convolution whose output is as large as its input (Ho = H, Wo = W, so
    kh = 2*ph + 1 and kw = 2*pw + 1), one image at a time. Each channel of the image is one flat
    row: pw zeros, ph zero rows of W, the H rows of W pixels, ph zero rows, pw zeros; row r (of the
    padded image), column j sits at flat[c, pw + r*W + j]. The column matrix holds only the ``kw``
    horizontal shifts of it,

        B[(c, v), s] = flat[c, s + v]                          shape (C*kw, (H + 2*ph) * W),

    because the kernel's row u is then a *column slice* of B, the one that starts u rows down:
    B[:, u*W : u*W + H*W] is the im2col matrix of kernel row u (a slice with a row stride, which
    BLAS takes as it is). The convolution is kh GEMMs with C*kw terms each, instead of one with
    C*kh*kw:

        y_mat  = sum_u W_u @ B[:, u*W : u*W + H*W]           W_u[o, (c, v)] = W[o, c, u, v]
        dW[:, :, u, :] = (B[:, u*W : u*W + H*W] @ dy_mat.T).T

    As with shifted rows (:class:`_Columns`), an output pixel in the first or last pw columns
    reads, for some v, a pixel of the row above or below instead of the zero padding; those entries
    of B are zeroed after the copy. The copy is kw/(kh*kw) = 1/3 of the shifted-rows columns for a
    3x3 kernel; the price is kh GEMMs instead of one and adding their outputs (the first writes
    straight into y). The GEMMs of one 8x8 image are too small for this to pay (several images
    stacked would compute junk rows between them: slower, measured), hence FOLDED_MIN_PIXELS.

    Rows of B are (c, v), so W_u is ``weight[:, :, u, :]``: :meth:`weights` lays the kernel out as
    (kh, O, C*kw) once per call. Each thread has its own instance (buffers reused image to image).
    """

    def __init__(self, dtype, c, h, w, kh, kw, ph, pw, o):
        self.c, self.h, self.w, self.kh, self.kw, self.ph, self.pw, self.o = c, h, w, kh, kw, ph, pw, o
        self.b = np.empty((c * kw, (h + 2 * ph) * w), dtype=dtype)
        self.flat = np.zeros((c, self.b.shape[1] + kw - 1), dtype=dtype)   # padding stays zero
        self.tmp = np.empty((o, h * w), dtype=dtype) if kh > 1 else None
        self.dtype = dtype

    @staticmethod
    def weights(weight):
        """W_u[o, (c, v)] = W[o, c, u, v], as one contiguous (kh, O, C*kw) array."""
        o, c, kh, kw = weight.shape
        out = np.empty((kh, o, c, kw), dtype=weight.dtype)

        def channels(lo, hi):  # one kernel column v at a time, so that NumPy's copy loop runs along
            for v in range(kw):  # C, not along v's 3 entries: 3.5-4x faster on 64-128 channels
                out[:, lo:hi, :, v] = weight[lo:hi, :, :, v].transpose(2, 0, 1)
        in_parallel(np, o, weight.size, channels)
        return out.reshape(kh, o, c * kw)

    def columns(self, image):
        """B (C*kw, (H + 2*ph) * W) for one image (C, H, W)."""
        c, h, w, kw, ph, pw = self.c, self.h, self.w, self.kw, self.ph, self.pw
        self.flat[:, pw + ph * w:pw + (ph + h) * w] = image.reshape(c, h * w)
        s = self.b.shape[1]
        b3 = self.b.reshape(c, kw, s)
        for v in range(kw):
            b3[:, v] = self.flat[:, v:v + s]
        grid = b3.reshape(c, kw, s // w, w)           # the entries that wrapped around the border
        for v in range(kw):
            if v != pw:
                grid[:, v, :, _wrapped(v, pw, w)] = 0
        return self.b

    def product(self, w_fold, image, out):
        """out (O, H, W) = the convolution of one image (C, H, W); ``w_fold`` from :meth:`weights`."""
        q, w = self.h * self.w, self.w
        b, out = self.columns(image), out.reshape(self.o, q)
        np.matmul(w_fold[0], b[:, :q], out=out)
        for u in range(1, self.kh):
            np.matmul(w_fold[u], b[:, u * w:u * w + q], out=self.tmp)
            out += self.tmp

    def weight_product(self, image, dy_image):
        """One image's dW, laid out (kh, C*kw, O): [u, (c, v), o] = sum over output positions."""
        q, w = self.h * self.w, self.w
        b, d = self.columns(image), dy_image.reshape(self.o, q)
        grad = np.empty((self.kh, self.c * self.kw, self.o), dtype=self.dtype)
        for u in range(self.kh):
            np.matmul(b[:, u * w:u * w + q], d.T, out=grad[u])
        return grad

    @staticmethod
    def weight_gradient(total, o, c, kh, kw):
        """dW (O, C, kh, kw) from the sum of :meth:`weight_product` over the images."""
        t4, out = total.reshape(kh, c, kw, o), np.empty((o, c, kh, kw), dtype=total.dtype)

        def channels(lo, hi):  # one kernel offset (u, v) at a time, as in weights(): 1.7-1.9x faster
            for u in range(kh):
                for v in range(kw):
                    out[lo:hi, :, u, v] = t4[u, :, v, lo:hi].T
        in_parallel(np, o, total.size, channels)
        return out


def _col2im(dcols, kh: int, kw: int, stride: int, ho: int, wo: int, out):
    """Add dcols (C, kh, kw, nb, Ho, Wo) back into out (nb, C, Hp, Wp): the adjoint of im2col.

    One strided-slice ``+=`` per kernel offset, in a fixed order (deterministic, no atomics).
    """
    for u in range(kh):
        for v in range(kw):
            window = out[:, :, u:u + stride * (ho - 1) + 1:stride, v:v + stride * (wo - 1) + 1:stride]
            window += dcols[:, u, v].transpose(1, 0, 2, 3)
    return out


def _conv_gemm(x, weight, stride: int, ph: int, pw: int, ho: int, wo: int):
    """y (N, O, Ho, Wo) = conv2d(x, weight) without bias, by im2col + GEMMs, chunk of images by chunk.

    ph, pw: zero padding of the rows and columns (they differ in the input-gradient pass below).
    """
    xp = get_array_module(x, weight)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    k = c * kh * kw
    y = xp.empty((n, o, ho, wo), dtype=x.dtype)
    if _folds(xp, n, c, h, w, kh, kw, stride, ph, pw, ho, wo):    # one image at a time
        w_fold = _FoldedRows.weights(weight)

        def one_image(folded, i):
            folded.product(w_fold, x[i], y[i])
        each_chunk(xp, n, lambda: _FoldedRows(x.dtype, c, h, w, kh, kw, ph, pw, o), one_image,
                   flops=2.0 * n * o * k * ho * wo)
        return y
    w_mat = weight.reshape(o, k)
    nb, chunks = _chunks(xp, n, k * ho * wo)

    def one_chunk(im2col, i):
        n0, n1 = chunks[i]
        im2col.product(w_mat, x[n0:n1], y[n0:n1])
    each_chunk(xp, len(chunks), lambda: _Columns(xp, x.dtype, nb, c, h, w, kh, kw, stride, ph, pw, ho, wo),
               one_chunk, flops=2.0 * n * o * k * ho * wo)
    return y


def conv2d_forward(x, weight, bias=None, stride: int = 1, padding: int = 0):
    """y = conv2d(x, weight) + bias; returns ``(y, cache)`` for :func:`conv2d_backward`.

    x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None; y (N, O, Ho, Wo), same dtype as x.
    ``cache`` is opaque: pass it unchanged to :func:`conv2d_backward`. It holds references to ``x``
    and ``weight`` (no copies), so neither may be modified in place before the backward pass.
    """
    stride, padding = int(stride), int(padding)
    ho, wo = _check_shapes(x, weight, bias, stride, padding)
    y = _conv_gemm(x, weight, stride, padding, padding, ho, wo)
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    cache = (x, weight, bias is not None, stride, padding)
    return y, cache


class _InOrderSum:
    """Adds arrays handed over in any order, in the order of their indices: ``add(i, a)``, ``total``.

    Threads finish their chunks in any order; holding each array until those before it have been
    added gives the same sum, bit for bit, as ``total = a0; total += a1; ...`` in a single thread,
    while keeping only the few arrays that arrived early (not one per chunk).
    """

    def __init__(self):
        self.total, self._next, self._waiting, self._lock = None, 0, {}, threading.Lock()

    def add(self, i: int, a) -> None:
        with self._lock:
            self._waiting[i] = a
            while self._next in self._waiting:
                a = self._waiting.pop(self._next)
                if self.total is None:
                    self.total = a
                else:
                    self.total += a
                self._next += 1


def _weight_grad(dy, x, kh: int, kw: int, stride: int, padding: int):
    """dW (O, C, kh, kw) = sum over chunks of dy_mat @ cols.T, computed as (cols @ dy_mat.T).T.

    The transposed product (K, O) = cols (K, M) @ dy_mat.T (M, O) runs faster in BLAS than
    dy_mat @ cols.T for these shapes (measured, on shifted-rows columns: ~1.3x on the 64-channel
    layers); folded rows do the same per kernel row. The chunks' products are added in chunk order (:class:`_InOrderSum`),
    so the sum does not depend on which thread computed which chunk.
    """
    xp = get_array_module(dy, x)
    n, c, h, w = x.shape
    _, o, ho, wo = dy.shape
    k = c * kh * kw
    dw_t = _InOrderSum()
    folded = _folds(xp, n, c, h, w, kh, kw, stride, padding, padding, ho, wo)
    if folded:                                         # one image at a time
        chunks = [(i, i + 1) for i in range(n)]
        buffers = lambda: _FoldedRows(x.dtype, c, h, w, kh, kw, padding, padding, o)  # noqa: E731

        def one_chunk(rows, i):
            dw_t.add(i, rows.weight_product(x[i], dy[i]))
    else:
        nb, chunks = _chunks(xp, n, k * ho * wo)
        buffers = lambda: _Columns(xp, x.dtype, nb, c, h, w, kh, kw, stride, padding, padding, ho, wo)  # noqa: E731

        def one_chunk(im2col, i):
            n0, n1 = chunks[i]
            dw_t.add(i, im2col.cols(x[n0:n1]) @ im2col.rows(dy[n0:n1]).T)
    each_chunk(xp, len(chunks), buffers, one_chunk, flops=2.0 * n * o * k * ho * wo)
    if folded:
        return _FoldedRows.weight_gradient(dw_t.total, o, c, kh, kw)
    return _transposed(xp, dw_t.total).reshape(o, c, kh, kw)


def _transposed(xp, a):
    """a.T (2-D) as a new C-contiguous array. On NumPy the copy goes in bands of 32 rows of a: a
    plain ``ascontiguousarray(a.T)`` walks a column by column and misses the cache; for the
    (2304, 256) weight gradient of WRN-28-4's 256-channel layers the bands took 0.29x its time
    (0.47 ms against 1.62 ms, one core; 16-row bands 0.41x, 128-row 0.49x; benchmarks/elementwise.py).
    A small array (under 64K entries, in cache anyway) is copied in one go; a large one's bands are
    shared over npmask's threads (:func:`~npmask.nn.parallel.in_parallel`), as are the other weight
    relayouts (:func:`~npmask.nn.parallel.contiguous`)."""
    if xp is not np or a.size < 1 << 16:
        return xp.ascontiguousarray(a.T)
    out = np.empty((a.shape[1], a.shape[0]), dtype=a.dtype)

    def bands(lo, hi):                                 # the threads take whole bands
        for i in range(32 * lo, min(32 * hi, a.shape[0]), 32):
            out[:, i:i + 32] = a[i:i + 32].T
    in_parallel(np, -(-a.shape[0] // 32), a.size, bands)
    return out


def _input_grad_col2im(dy, weight, x_shape, stride: int, padding: int):
    """dx by dcols = W_mat.T @ dy_mat and col2im (any stride and padding)."""
    xp = get_array_module(dy, weight)
    n, c, h, w = x_shape
    o, _, kh, kw = weight.shape
    _, _, ho, wo = dy.shape
    k = c * kh * kw
    w_mat_t = weight.reshape(o, k).T
    dx = xp.empty(x_shape, dtype=dy.dtype)
    nb, chunks = _chunks(xp, n, k * ho * wo)

    def one_chunk(dxpad, i):
        n0, n1 = chunks[i]
        m = n1 - n0
        dy_mat = dy[n0:n1].transpose(1, 0, 2, 3).reshape(o, m * ho * wo)
        dcols = (w_mat_t @ dy_mat).reshape(c, kh, kw, m, ho, wo)
        dxpad[:m] = 0
        _col2im(dcols, kh, kw, stride, ho, wo, dxpad[:m])
        dx[n0:n1] = dxpad[:m, :, padding:padding + h, padding:padding + w]
    each_chunk(xp, len(chunks), lambda: xp.empty((nb, c, h + 2 * padding, w + 2 * padding), dtype=dy.dtype),
               one_chunk, flops=2.0 * n * o * k * ho * wo)
    return dx


def conv2d_backward(dy, cache, need_dx: bool = True, need_dweight: bool = True):
    """Gradients of conv2d: returns ``(dx, dweight, dbias)``; ``dy`` is read, never written.

    dy (N, O, Ho, Wo) is dL/dy; dx (N, C, H, W), dweight (O, C, kh, kw), dbias (O,). An entry is
    None when it was not asked for (``need_dx``/``need_dweight`` False) or, for dbias, when the
    forward pass had no bias. Skipping dx (first layer) or dweight (frozen weight) saves one GEMM.

    For stride 1 the input gradient is itself a convolution: dx = conv2d(dy padded by k-1-p,
    W flipped in both spatial axes with in/out channels swapped). That reuses the fast forward path
    (im2col + GEMM) instead of col2im's nine read-modify-write passes.
    """
    x, weight, has_bias, stride, padding = cache
    xp = get_array_module(dy, x)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    if tuple(dy.shape[:2]) != (n, o) or dy.dtype != x.dtype:
        raise ValueError(f"dy has shape {tuple(dy.shape)} and dtype {dy.dtype}; the forward pass "
                         f"produced ({n}, {o}, Ho, Wo) in {x.dtype}")

    dbias = dy.sum(axis=(0, 2, 3)) if has_bias else None
    dweight = _weight_grad(dy, x, kh, kw, stride, padding) if need_dweight else None
    dx = None
    if need_dx:
        if stride == 1 and padding <= min(kh, kw) - 1:
            # dxpad[n,c,a,b] = sum_{o,u,v} W[o,c,u,v] dy[n,o,a-u,b-v]: a correlation of dy with the
            # flipped, channel-swapped kernel Wf[c,o,u,v] = W[o,c,kh-1-u,kw-1-v].
            w_flip = contiguous(xp, weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
            dx = _conv_gemm(dy, w_flip, 1, kh - 1 - padding, kw - 1 - padding, h, w)
        else:
            dx = _input_grad_col2im(dy, weight, x.shape, stride, padding)
    return dx, dweight, dbias


class Conv2d(Module):
    """2-D convolution layer: params "weight" (O, C, kh, kw) and, with ``bias=True``, "bias" (O,).

    Initialisation: He/Kaiming normal with fan_out, std = sqrt(2 / (O * kh * kw)), as in the
    reference Wide-ResNet code (``m.weight.data.normal_(0, math.sqrt(2. / n))`` with
    ``n = kh * kw * out_channels``). fan_out keeps the variance of the *backward* signal constant
    through ReLU networks; the bias starts at zero.

    Set ``need_input_grad = False`` on the first layer of a network: its input is the image, whose
    gradient nobody needs, and skipping it saves one GEMM. A frozen weight (``freeze("weight")``)
    likewise skips the weight-gradient GEMM.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
                 padding: int = 0, bias: bool = False, dtype=np.float32, rng=None):
        super().__init__()
        kh, kw = _pair(kernel_size, "kernel_size")
        if min(in_channels, out_channels, kh, kw) < 1:
            raise ValueError(f"Conv2d needs positive channels and kernel size, got in={in_channels}, "
                             f"out={out_channels}, kernel={kernel_size}")
        if int(stride) < 1 or int(padding) < 0:
            raise ValueError(f"Conv2d needs stride >= 1 and padding >= 0, got {stride}, {padding}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (kh, kw)
        self.stride, self.padding = int(stride), int(padding)
        self.need_input_grad = True
        gen = make_rng(rng)
        std = np.sqrt(2.0 / (out_channels * kh * kw))
        weight = (gen.standard_normal((out_channels, in_channels, kh, kw)) * std).astype(dtype)
        self.register_param("weight", weight)
        if bias:
            self.register_param("bias", np.zeros(out_channels, dtype=dtype))
        self._cache = None

    def forward(self, x):
        check_array(self, x, "input", None)
        y, self._cache = conv2d_forward(x, self.params["weight"], self.params.get("bias"),
                                        self.stride, self.padding)
        return y

    def backward(self, dy):
        check_conv_gradient(self, dy, self._cache)
        if self._cache is None:
            raise RuntimeError("Conv2d.backward called before forward")
        dx, dweight, dbias = conv2d_backward(dy, self._cache, need_dx=self.need_input_grad,
                                             need_dweight=self.requires_grad("weight"))
        if dweight is not None:
            self.accumulate_grad("weight", dweight)
        if dbias is not None:
            self.accumulate_grad("bias", dbias)
        return dx

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}")
