"""The column layouts of the fast convolution (:mod:`npmask.nn.conv_fast`): im2col, made cheap.

:func:`npmask.nn.conv.im2col` copies kh*kw strided windows of the padded image into the column
matrix, one output row (Wo floats) at a time; for small images those short copies, not the GEMM,
take most of the time. The layouts here make the copies long and few:

- :class:`_Columns`, general case: the same matrix, one strided copy per kernel offset (u, v);
  for a strided convolution with long enough output rows ("phases"), the input is first split
  into its stride*stride phases and each offset's block is then a copy of contiguous rows;
- "shifted rows" (stride 1, Wo = W, ``settings.shifted_rows``): each channel is one flat row and
  offset (u, v) is a *contiguous* slice of it; the few entries that wrap around the border are
  zeroed afterwards;
- "wide rows" (other stride-1 convolutions with little padding): the same on the padded image,
  with junk columns the GEMM computes and the caller discards;
- :class:`_FoldedRows` ("folded rows", NumPy, 'same'-size stride-1 convolutions on images of at
  least ``settings.folded_min_pixels``): only the kernel's kw column shifts are copied, and each
  kernel row is a column slice of that matrix, one GEMM each.

Every layout gives the same column matrix (or the same products) as the readable im2col, so the
results agree with :mod:`npmask.nn.conv` to float32 rounding (tests/test_conv.py). Why each layout
pays, with the measurements: ``benchmarks/results/train_step_cpu.txt``.
"""
from __future__ import annotations

import numpy as np

from ..config import settings
from . import conv_cuda
from .parallel import in_parallel

# images per folded-rows call: their matrices B together at most this many floats (512 KB), so that
# the 16-64-channel layers of the small networks make one NumPy call for 2-4 images (their copies
# and GEMMs are short and the calls' own cost was a large part of the pass), while WRN-28-4's
# layers (over 300K floats per image) keep one image per call
FOLDED_GROUP_FLOATS = 1 << 17

# strided convolutions build their columns from the input's phases (_Columns.phased) only where the
# output rows are at least this long: on shorter rows the phases' own copies cost more than they
# save (benchmarks/results/cpuspeed3_cpu.txt)
PHASED_MIN_WIDTH = 16


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
    - stride s > 1 with output rows of at least ``PHASED_MIN_WIDTH``, NumPy ("phases", R = Wo): the same
      matrix, but xpad is kept as its s*s phases, phase (a, b) holding xpad[n, c, s*t + a, s*q + b]
      at [a, b, c, n, t, q] (channel-major, like the columns): s*s strided copies of x fill them,
      and offset (u, v)'s block is then rows u//s + i, columns v//s + j of phase (u % s, v % s),
      a copy of contiguous rows of Wo floats with no transpose;
    - stride 1 and an output as wide as the input, Wo = W (every 3x3 convolution with padding 1,
      and the input gradient of one) ("shifted rows", R = Wo): only the rows are padded; each
      channel's image is one flat row, ``pw`` zeros + the padded rows + ``pw`` zeros, and the kernel
      offset (u, v) is the *contiguous* slice of it that starts at u*W + v. An output pixel in the
      first or last ``pw`` columns then reads, for some v, a pixel of the row above or below
      instead of the zero padding (the slice wraps around the border); those few entries (at most
      2*pw of every W) are zeroed after the copy. No junk columns, and for one image dy is
      already the matrix the weight gradient needs;
    - other stride-1 convolutions with little padding ("wide rows", R = Wp = W + 2*pw): the padded
      image is flattened and offset (u, v) is the contiguous slice at u*Wp + v. The price is Wp - Wo
      junk columns per output row (the positions that wrap around the right border), which the GEMM
      computes and :meth:`product` discards; it is used only when that costs at most 10% extra
      arithmetic, and then the copy is faster. The two flat layouts are one code path: rows
      of R floats (W, or Wp with the padding columns), the slice of offset (u, v) at u*R + v.

    ``product(w_mat, x_chunk, y_chunk)`` writes the valid outputs of the GEMM w_mat @ cols into
    y_chunk (m, O, Ho, Wo); ``rows(dy_chunk)`` lays out an upstream gradient like the columns
    (junk columns zero, so they add nothing to a weight gradient). Each thread has its own instance.

    On CuPy with ``settings.cuda_conv_kernels`` (not for a 1x1 kernel without padding), ONE kernel
    (:func:`npmask.nn.conv_cuda.im2col`) writes the matrix of the layout chosen above, its junk
    columns zero.
    """

    def __init__(self, xp, dtype, nb, c, h, w, kh, kw, stride, ph, pw, ho, wo):
        self.c, self.h, self.w, self.kh, self.kw = c, h, w, kh, kw
        self.stride, self.ph, self.pw, self.ho, self.wo = stride, ph, pw, ho, wo
        self.hp, self.wp = h + 2 * ph, w + 2 * pw
        pointwise = kh == 1 and kw == 1 and ph == 0 and pw == 0
        self.shifted = settings.shifted_rows and not pointwise and stride == 1 and wo == w
        self.wide = not self.shifted and stride == 1 and self.wp * 10 <= wo * 11
        self.r = self.wp if self.wide else wo          # shifted rows: R = Wo = W
        # strided (s > 1, not a 1x1 kernel without padding): the padded image's s*s phases, see
        # cols(); NumPy only (on CuPy each copy is a kernel launch, and the phases add s*s of them)
        self.phased = (xp is np and not pointwise and stride > 1 and not self.wide
                       and wo >= PHASED_MIN_WIDTH)
        # on CuPy with settings.cuda_conv_kernels: one kernel writes the columns, rows of R as
        # chosen above (conv_cuda.py), and no padded copy of the input is kept
        self.kernel = not pointwise and conv_cuda.applies(xp, c, h, w, kh, kw, ho, self.r, nb)
        if pointwise or self.kernel:
            self.xpad = None                           # not needed: see cols()
        elif self.phased:
            # phase (a, b) holds xpad[n, c, s*t + a, s*q + b] at [a, b, c, n, t, q]; the entries that
            # are padding are zero from here on (cols() writes only those inside x)
            self.hq, self.wq = -(-self.hp // stride), -(-self.wp // stride)
            self.xpad = xp.zeros((stride, stride, c, nb, self.hq, self.wq), dtype=dtype)
            self.inside = [[(a, -(-(p - a) // stride), -(-(p + size - a) // stride)) for a in range(stride)]
                           for p, size in ((ph, h), (pw, w))]
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
        if self.kernel:
            conv_cuda.im2col(x_chunk, self.buf[:, :length], kh, kw, s, self.ph, self.pw, ho, wo, self.r)
        elif self.xpad is None:                        # 1x1, no padding: a (strided) transpose
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
        elif self.phased:
            # The window of kernel offset (u, v), xpad[:, :, u + s*i, v + s*j], is rows u//s + i and
            # columns v//s + j of phase (u % s, v % s): each phase is filled by one strided copy of
            # x, and then every offset's block is a copy of rows of Wo contiguous floats, already
            # channel-major, instead of a strided copy of x per offset. The same column matrix.
            phases = self.xpad[:, :, :, :m]
            x_cm = x_chunk.transpose(1, 0, 2, 3)
            for a, t0, t1 in self.inside[0]:
                for b, q0, q1 in self.inside[1]:
                    if t1 > t0 and q1 > q0:
                        phases[a, b, :, :, t0:t1, q0:q1] = x_cm[:, :, s * t0 + a - self.ph::s,
                                                                s * q0 + b - self.pw::s]
            cols = cols.reshape(c, kh, kw, m, ho, wo)
            for u in range(kh):
                for v in range(kw):
                    cols[:, u, v] = phases[u % s, v % s, :, :, u // s:u // s + ho, v // s:v // s + wo]
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
        """y_chunk (m, O, Ho, Wo) = the valid outputs of w_mat (O, C*kh*kw) @ cols(x_chunk).

        Returns the column matrix it used (in ``self.buf``, or a view of x_chunk): a caller that
        keeps it for the weight gradient gives this instance a new ``buf`` before the next chunk.
        """
        o, m = w_mat.shape[0], x_chunk.shape[0]
        cols = self.cols(x_chunk)
        mat = w_mat @ cols
        y_chunk[...] = mat.reshape(o, m, self.ho, self.r)[:, :, :, :self.wo].transpose(1, 0, 2, 3)
        return cols

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
    return (settings.folded_rows and xp is np and n > 0 and stride == 1 and kh * kw > 1
            and ho == h and wo == w                 # i.e. kh = 2*ph + 1 and kw = 2*pw + 1
            and h * w >= settings.folded_min_pixels)


class _FoldedRows:
    """im2col with the kernel's columns only: ``kw`` copies of an image instead of ``kh * kw``.

    For a stride-1 convolution whose output is as large as its input (Ho = H, Wo = W, so
    kh = 2*ph + 1 and kw = 2*pw + 1), image by image. Each channel of the image is one flat
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
    stacked would compute junk rows between them), hence ``settings.folded_min_pixels``.

    Rows of B are (c, v), so W_u is ``weight[:, :, u, :]``: :meth:`weights` lays the kernel out as
    (kh, O, C*kw) once per call. A call takes a group of images (:meth:`group`), each with its own
    B, and stacks each GEMM over them: a small image's copies and GEMMs are short, so one NumPy call
    per group instead of per image saves most of the calls' own cost. Each thread has its own
    instance (buffers reused group to group).
    """

    def __init__(self, dtype, c, h, w, kh, kw, ph, pw, o, nb: int = 1):
        self.c, self.h, self.w, self.kh, self.kw, self.ph, self.pw, self.o = c, h, w, kh, kw, ph, pw, o
        self.b = np.empty((nb, c * kw, (h + 2 * ph) * w), dtype=dtype)
        self.flat = np.zeros((nb, c, self.b.shape[2] + kw - 1), dtype=dtype)  # padding stays zero
        self.tmp = np.empty((nb, o, h * w), dtype=dtype) if kh > 1 else None
        self.dtype = dtype

    @staticmethod
    def group(n: int, c: int, h: int, w: int, kh: int, kw: int, ph: int) -> int:
        """Images per call: as many as keep their matrices B within ``FOLDED_GROUP_FLOATS`` (at
        least one). Each image's products are the same BLAS calls whatever the group (NumPy's
        stacked matmul runs one GEMM per image), so the group changes the speed, not the bits."""
        return max(1, min(n, FOLDED_GROUP_FLOATS // max(1, c * kw * (h + 2 * ph) * w)))

    @staticmethod
    def weights(weight):
        """W_u[o, (c, v)] = W[o, c, u, v], as one contiguous (kh, O, C*kw) array."""
        o, c, kh, kw = weight.shape
        out = np.empty((kh, o, c, kw), dtype=weight.dtype)

        def channels(lo, hi):  # one kernel column v at a time, so that NumPy's copy loop runs along
            for v in range(kw):  # C (long), not along v's 3 entries (short)
                out[:, lo:hi, :, v] = weight[lo:hi, :, :, v].transpose(2, 0, 1)
        in_parallel(np, o, weight.size, channels)
        return out.reshape(kh, o, c * kw)

    def columns(self, images):
        """B (m, C*kw, (H + 2*ph) * W) for m images (m, C, H, W), one matrix per image."""
        m = images.shape[0]
        c, h, w, kw, ph, pw = self.c, self.h, self.w, self.kw, self.ph, self.pw
        flat = self.flat[:m]
        flat[:, :, pw + ph * w:pw + (ph + h) * w] = images.reshape(m, c, h * w)
        s = self.b.shape[2]
        b4 = self.b[:m].reshape(m, c, kw, s)
        for v in range(kw):
            b4[:, :, v] = flat[:, :, v:v + s]
        grid = b4.reshape(m, c, kw, s // w, w)        # the entries that wrapped around the border
        for v in range(kw):
            if v != pw:
                grid[:, :, v, :, _wrapped(v, pw, w)] = 0
        return self.b[:m]

    def product(self, w_fold, images, out):
        """out (m, O, H, W) = the convolutions of m images (m, C, H, W); ``w_fold`` from
        :meth:`weights`. Each GEMM is stacked over the images: one NumPy call for the group."""
        m, q, w = images.shape[0], self.h * self.w, self.w
        b, out = self.columns(images), out.reshape(m, self.o, q)
        np.matmul(w_fold[0], b[:, :, :q], out=out)
        for u in range(1, self.kh):
            tmp = self.tmp[:m]
            np.matmul(w_fold[u], b[:, :, u * w:u * w + q], out=tmp)
            out += tmp

    def weight_product(self, images, dys):
        """Each image's dW, laid out (m, kh, C*kw, O): [i, u, (c, v), o] = sum over image i's
        output positions (a new array: the caller adds its images in order)."""
        m, q, w = images.shape[0], self.h * self.w, self.w
        b, d = self.columns(images), dys.reshape(m, self.o, q).transpose(0, 2, 1)
        grad = np.empty((m, self.kh, self.c * self.kw, self.o), dtype=self.dtype)
        for u in range(self.kh):
            np.matmul(b[:, :, u * w:u * w + q], d, out=grad[:, u])
        return grad

    @staticmethod
    def weight_gradient(total, o, c, kh, kw):
        """dW (O, C, kh, kw) from the sum of :meth:`weight_product` over the images."""
        t4, out = total.reshape(kh, c, kw, o), np.empty((o, c, kh, kw), dtype=total.dtype)

        def channels(lo, hi):  # one kernel offset (u, v) at a time, as in weights(): long copy loops
            for u in range(kh):
                for v in range(kw):
                    out[lo:hi, :, u, v] = t4[u, :, v, lo:hi].T
        in_parallel(np, o, total.size, channels)
        return out
