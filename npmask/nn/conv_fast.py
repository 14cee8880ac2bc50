"""The fast convolution that :mod:`npmask.nn.conv` dispatches to: the same sums, arranged for speed.

Same shapes and formulas as :mod:`npmask.nn.conv` (its readable im2col + GEMM + col2im is what
this module is tested against); what differs is how the work is laid out:

- the batch is processed in chunks of a few images (:func:`_chunks`): a whole batch's column matrix
  is tens of megabytes, and streaming it through memory, not the arithmetic, is what costs time; a
  chunk's columns stay in the CPU cache between the copy and the GEMM. On NumPy the chunks are
  shared out over npmask's threads (:func:`npmask.nn.parallel.each_chunk`), and neither the chunks
  nor the results depend on how many threads there are;
- the column matrix is built in cheaper layouts (:mod:`npmask.nn.conv_columns`); 1x1
  convolutions need no columns at all;
- for stride 1 the input gradient is itself a convolution (of dy with the flipped, channel-swapped
  kernel), so it takes the forward route instead of col2im's read-modify-write passes;
- the weight gradient is computed transposed, (cols @ dy_mat.T).T, which BLAS runs faster for these
  shapes, and the per-chunk products are added in chunk order (:class:`_InOrderSum`).

Every temporary has the dtype of x: float32 in, float32 throughout. The tuning constants are
settings (:mod:`npmask.config`); the measurements behind them are in ``benchmarks/results/``.
"""
from __future__ import annotations

import threading

import numpy as np

from ..backend import get_array_module
from ..config import settings
from . import conv_cuda
from .conv_columns import _Columns, _folds, _FoldedRows
from .parallel import contiguous, each_chunk, in_parallel


def _chunks(xp, n: int, col_floats: int) -> tuple[int, list[tuple[int, int]]]:
    """(nb, [(n0, n1), ...]): the batch of n images in chunks wide enough for a fast GEMM and small
    enough for the columns to stay in cache, and nb, the images of the largest (what a thread's
    buffers must hold); ``col_floats`` is the column floats of one image. The chunks do not depend
    on how many threads will share them (so neither do the results)."""
    if n == 0:
        chunks = [(0, 0)]                               # an empty batch: one empty chunk
    elif xp is not np:
        nb = max(1, settings.gpu_chunk_floats // max(col_floats, 1))
        chunks = [(n0, min(n, n0 + nb)) for n0 in range(0, n, nb)]
    else:
        per_chunk = settings.conv_chunk_floats // max(col_floats, 1)
        fewest = -(-n // max(1, per_chunk))                # chunks of <= conv_chunk_floats
        multiple = settings.conv_chunks_multiple
        count = min(n, -(-fewest // multiple) * multiple)
        chunks = [(n * i // count, n * (i + 1) // count) for i in range(count)]
    return max(n1 - n0 for n0, n1 in chunks), chunks


def conv_gemm(x, weight, stride: int, ph: int, pw: int, ho: int, wo: int, kept=None):
    """y (N, O, Ho, Wo) = conv2d(x, weight) without bias, by im2col + GEMMs, chunk of images by chunk.

    ph, pw: zero padding of the rows and columns (they differ in the input-gradient pass below).
    ``kept``: None, or an empty list that receives the column matrices of the chunks (in chunk
    order, each in its own array) when the batch's columns are small enough to keep
    (:func:`keeps_columns`), for :func:`weight_grad` to use instead of building them again.
    """
    xp = get_array_module(x, weight)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    k = c * kh * kw
    y = xp.empty((n, o, ho, wo), dtype=x.dtype)
    keep = kept is not None and keeps_columns(x.shape, weight.shape, stride, ho, wo)
    if _folds(xp, n, c, h, w, kh, kw, stride, ph, pw, ho, wo):    # a group of images at a time
        w_fold = _FoldedRows.weights(weight)
        nb = _FoldedRows.group(n, c, h, w, kh, kw, ph)

        def one_group(folded, i):
            folded.product(w_fold, x[i * nb:(i + 1) * nb], y[i * nb:(i + 1) * nb])
        each_chunk(xp, -(-n // nb), lambda: _FoldedRows(x.dtype, c, h, w, kh, kw, ph, pw, o, nb),
                   one_group, flops=2.0 * n * o * k * ho * wo)
        return y
    w_mat = weight.reshape(o, k)
    nb, chunks = _chunks(xp, n, k * ho * wo)
    store = [None] * len(chunks)

    def one_chunk(im2col, i):
        n0, n1 = chunks[i]
        if keep:                                       # this chunk's columns go to their own array
            im2col.buf = xp.empty((k, (n1 - n0) * ho * im2col.r), dtype=x.dtype)
        store[i] = im2col.product(w_mat, x[n0:n1], y[n0:n1])
    each_chunk(xp, len(chunks), lambda: _Columns(xp, x.dtype, nb, c, h, w, kh, kw, stride, ph, pw, ho, wo),
               one_chunk, flops=2.0 * n * o * k * ho * wo)
    if keep:
        kept.extend(store)
    return y


def keeps_columns(x_shape, w_shape, stride: int, ho: int, wo: int) -> bool:
    """Whether :func:`conv_gemm` keeps this convolution's columns when asked: a strided convolution
    with a kernel larger than 1x1 (the general im2col layout of
    :class:`~npmask.nn.conv_columns._Columns`: one strided copy of short rows per kernel offset)
    whose whole batch's column matrix has at most ``settings.conv_keep_columns_floats`` floats.

    Keeping them spares the weight gradient a second im2col of x: the same chunks, the same column
    matrices, so the same products, bit for bit. Only the strided layout's copies (short rows)
    cost enough to be worth the memory; the stride-1 layouts copy long contiguous rows and find
    the rebuilt columns still in cache, strided 1x1 convolutions are left out so that WRN-28-4's
    shortcuts do not raise its peak memory, and WRN-28-4's strided 3x3 layers are above the
    threshold (the measurements: benchmarks/results/code_comment_figures.md)."""
    n, c, _, _ = x_shape
    _, _, kh, kw = w_shape
    floats = n * c * kh * kw * ho * wo                 # stride > 1: no junk columns
    return stride > 1 and kh * kw > 1 and 0 < floats <= settings.conv_keep_columns_floats


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


def weight_grad(dy, x, kh: int, kw: int, stride: int, padding: int, columns=None):
    """dW (O, C, kh, kw) = sum over chunks of dy_mat @ cols.T, computed as (cols @ dy_mat.T).T.

    ``columns``: the chunks' column matrices that :func:`conv_gemm` kept from the forward pass of
    this x (a strided convolution: the same chunks, so the same products, bit for bit), or None to
    build them here.

    The transposed product (K, O) = cols (K, M) @ dy_mat.T (M, O) runs faster in BLAS than
    dy_mat @ cols.T for these shapes; folded rows do the same per kernel row. The chunks' products
    are added in chunk order (:class:`_InOrderSum`), so the sum does not depend on which thread
    computed which chunk.
    """
    xp = get_array_module(dy, x)
    n, c, h, w = x.shape
    _, o, ho, wo = dy.shape
    k = c * kh * kw
    dw_t = _InOrderSum()
    folded = _folds(xp, n, c, h, w, kh, kw, stride, padding, padding, ho, wo)
    if folded:                                         # a group of images at a time
        nb = _FoldedRows.group(n, c, h, w, kh, kw, padding)
        chunks = [(n0, min(n, n0 + nb)) for n0 in range(0, n, nb)]
        buffers = lambda: _FoldedRows(x.dtype, c, h, w, kh, kw, padding, padding, o, nb)  # noqa: E731

        def one_chunk(rows, i):       # each image's product added on its own, in image order
            n0, n1 = chunks[i]
            for j, grad in enumerate(rows.weight_product(x[n0:n1], dy[n0:n1])):
                dw_t.add(n0 + j, grad)
    else:
        nb, chunks = _chunks(xp, n, k * ho * wo)
        buffers = lambda: _Columns(xp, x.dtype, nb, c, h, w, kh, kw, stride, padding, padding, ho, wo)  # noqa: E731

        def one_chunk(im2col, i):
            n0, n1 = chunks[i]
            cols = im2col.cols(x[n0:n1]) if columns is None else columns[i]
            dw_t.add(i, cols @ im2col.rows(dy[n0:n1]).T)
    if columns is not None and (folded or len(columns) != len(chunks)):
        raise ValueError(f"weight_grad got {len(columns)} kept column matrices for {len(chunks)} chunks")
    each_chunk(xp, len(chunks), buffers, one_chunk, flops=2.0 * n * o * k * ho * wo)
    if folded:
        return _FoldedRows.weight_gradient(dw_t.total, o, c, kh, kw)
    return _transposed(xp, dw_t.total).reshape(o, c, kh, kw)


def _transposed(xp, a):
    """a.T (2-D) as a new C-contiguous array. On NumPy the copy goes in bands of 32 rows of a: a
    plain ``ascontiguousarray(a.T)`` walks a column by column and misses the cache (the band width
    was chosen with benchmarks/elementwise.py; figures in benchmarks/results/). A small array (under
    64K entries, in cache anyway) is copied in one go; a large one's bands are shared over npmask's
    threads (:func:`~npmask.nn.parallel.in_parallel`), as are the other weight relayouts
    (:func:`~npmask.nn.parallel.contiguous`)."""
    if xp is not np or a.size < 1 << 16:
        return xp.ascontiguousarray(a.T)
    out = np.empty((a.shape[1], a.shape[0]), dtype=a.dtype)

    def bands(lo, hi):                                 # the threads take whole bands
        for i in range(32 * lo, min(32 * hi, a.shape[0]), 32):
            out[:, i:i + 32] = a[i:i + 32].T
    in_parallel(np, -(-a.shape[0] // 32), a.size, bands)
    return out


def input_grad_col2im(dy, weight, x_shape, stride: int, padding: int):
    """dx by dcols = W_mat.T @ dy_mat and col2im (any stride and padding), col2im in long spans.

    col2im adds each kernel offset's block of dcols into the strided window of the padded input
    gradient that it came from; done as such (the readable :func:`npmask.nn.conv.col2im`) every
    addition runs along one output row, Wo floats (8 or 16 in a small network), into a strided
    destination. Here the padded gradient is kept as its s*s *phases* (s = stride): phase (a, b)
    holds the pixels (s*t + a, s*q + b), a plane of Hq x Wq, stored flat. Offset (u, v) adds only
    into phase (u % s, v % s), at rows and columns shifted by (u // s, v // s), so when dcols has
    rows of Wq (dy is laid out with Wq - Wo zero columns after each row, so those columns of dcols
    are zero) the block is ONE contiguous span of the flat plane, Ho*Wq floats long, starting at
    (u // s)*Wq + v // s: the valid entries land where they belong (no row wraps: Wq >= Wo +
    (kw - 1) // s) and the zero columns add nothing. The phases are then copied into dx, s*s strided
    copies. Every pixel receives the same additions in the same (u, v) order as in col2im.

    On CuPy with ``settings.cuda_conv_kernels`` the phases are replaced by ONE kernel
    (:func:`npmask.nn.conv_cuda.col2im`) that reads the same dcols (rows of Wq) and gives every
    pixel the same additions, from zero, in the same (u, v) order.
    """
    xp = get_array_module(dy, weight)
    n, c, h, w = x_shape
    o, _, kh, kw = weight.shape
    _, _, ho, wo = dy.shape
    if kh * kw == 1:                # one offset: one strided write, no additions to arrange
        return _input_grad_windows(dy, weight, x_shape, stride, padding)
    s, p = stride, padding
    k = c * kh * kw
    # a phase's rows and columns: those of the padded image (ceil(Hp / s)), which is at least
    # Ho + (kh - 1) // s, room for every shift (Hp = s*(Ho - 1) + kh + r, 0 <= r < s)
    hq, wq = -(-(h + 2 * p) // s), -(-(w + 2 * p) // s)
    plane = hq * wq
    w_mat_t = weight.reshape(o, k).T
    dx = xp.empty(x_shape, dtype=dy.dtype)
    nb, chunks = _chunks(xp, n, k * ho * wq)
    kernel = conv_cuda.applies(xp, c, h, w, kh, kw, ho, wq, nb)
    # the phases' rows (t0, t1) and columns that lie inside x, and where they start in dx
    rows = [(a, -(-(p - a) // s), -(-(p + h - a) // s)) for a in range(s)]
    cols = [(b, -(-(p - b) // s), -(-(p + w - b) // s)) for b in range(s)]

    def buffers():    # dy with zero columns after each row (they stay zero), and the s*s phases
        return (xp.zeros((o, nb * ho * wq), dtype=dy.dtype),
                None if kernel else xp.empty((s, s, nb, c, plane + wq), dtype=dy.dtype))

    def one_chunk(bufs, i):
        dy_buf, phases = bufs
        n0, n1 = chunks[i]
        m = n1 - n0
        dy_mat = dy_buf[:, :m * ho * wq]
        dy_mat.reshape(o, m, ho, wq)[:, :, :, :wo] = dy[n0:n1].transpose(1, 0, 2, 3)
        dcols = (w_mat_t @ dy_mat).reshape(c, kh, kw, m, ho * wq)
        if kernel:    # one CUDA kernel: each pixel gathers its entries, in the (u, v) order below
            conv_cuda.col2im(dcols, dx[n0:n1], kh, kw, s, p, p, ho, wo, wq)
            return
        ph = phases[:, :, :m]
        ph[...] = 0
        for u in range(kh):
            for v in range(kw):
                at = (u // s) * wq + v // s
                ph[u % s, v % s, :, :, at:at + ho * wq] += dcols[:, u, v].transpose(1, 0, 2)
        for a, t0, t1 in rows:
            for b, q0, q1 in cols:
                if t1 > t0 and q1 > q0:
                    grid = ph[a, b, :, :, :plane].reshape(m, c, hq, wq)
                    dx[n0:n1, :, a + s * t0 - p::s, b + s * q0 - p::s] = grid[:, :, t0:t1, q0:q1]
    each_chunk(xp, len(chunks), buffers, one_chunk, flops=2.0 * n * o * k * ho * wo)
    return dx


def _input_grad_windows(dy, weight, x_shape, stride: int, padding: int):
    """dx by dcols = W_mat.T @ dy_mat and col2im's strided window additions, one per kernel offset
    (:func:`npmask.nn.conv.col2im` chunk by chunk). For a 1x1 kernel (a strided shortcut), whose
    single offset is one strided write: faster than the phases of :func:`input_grad_col2im` there
    (benchmarks/results/code_comment_figures.md)."""
    xp = get_array_module(dy, weight)
    n, c, h, w = x_shape
    o, _, kh, kw = weight.shape
    _, _, ho, wo = dy.shape
    k = c * kh * kw
    w_mat_t = weight.reshape(o, k).T
    dx = xp.empty(x_shape, dtype=dy.dtype)
    nb, chunks = _chunks(xp, n, k * ho * wo)
    kernel = conv_cuda.applies(xp, c, h, w, kh, kw, ho, wo, nb)

    def one_chunk(dxpad, i):
        n0, n1 = chunks[i]
        m = n1 - n0
        dy_mat = dy[n0:n1].transpose(1, 0, 2, 3).reshape(o, m * ho * wo)
        dcols = (w_mat_t @ dy_mat).reshape(c, kh, kw, m, ho, wo)
        if kernel:    # one CUDA kernel instead of the zeroing, the addition and the copy below
            conv_cuda.col2im(dcols, dx[n0:n1], kh, kw, stride, padding, padding, ho, wo, wo)
            return
        out = dxpad[:m]
        out[...] = 0
        for u in range(kh):
            for v in range(kw):
                window = out[:, :, u:u + stride * (ho - 1) + 1:stride, v:v + stride * (wo - 1) + 1:stride]
                window += dcols[:, u, v].transpose(1, 0, 2, 3)
        dx[n0:n1] = out[:, :, padding:padding + h, padding:padding + w]
    each_chunk(xp, len(chunks), lambda: None if kernel else xp.empty((nb, c, h + 2 * padding, w + 2 * padding),
                                                                      dtype=dy.dtype),
               one_chunk, flops=2.0 * n * o * k * ho * wo)
    return dx


def input_grad(dy, weight, x_shape, stride: int, padding: int):
    """dx (N, C, H, W) for dy (N, O, Ho, Wo) and weight (O, C, kh, kw).

    For stride 1 (and padding <= k - 1) the input gradient is itself a convolution, and takes the
    fast forward route instead of col2im's kh*kw read-modify-write passes:
    dxpad[n,c,a,b] = sum_{o,u,v} W[o,c,u,v] dy[n,o,a-u,b-v], a correlation of dy padded by
    k-1-p with the flipped, channel-swapped kernel Wf[c,o,u,v] = W[o,c,kh-1-u,kw-1-v].
    """
    xp = get_array_module(dy, weight)
    _, _, h, w = x_shape
    _, _, kh, kw = weight.shape
    if stride == 1 and padding <= min(kh, kw) - 1:
        w_flip = contiguous(xp, weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        return conv_gemm(dy, w_flip, 1, kh - 1 - padding, kw - 1 - padding, h, w)
    return input_grad_col2im(dy, weight, x_shape, stride, padding)
