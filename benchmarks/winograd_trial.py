"""A tried and rejected idea, kept so that it can be measured again: Winograd F(2x2, 3x3) convolutions.

Run:  .venv/bin/python benchmarks/winograd_trial.py [--rounds 8] [--min-channels 1000000,256,128,16]

Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
CVPR 2016) computes each 2x2 block of a 3x3 convolution's output from a 4x4 input tile with 16
products per channel instead of 36, so the 3x3 stride-1 layers of WRN-28-4 would do 2.25x fewer
multiplications:

    V = B^T d B (each 4x4 input tile)   U = G g G^T (each 3x3 kernel)   M[xi] = U[xi] @ V[xi] (16 GEMMs)
    y = A^T M A (each 2x2 output block); dW = G^T (sum over tiles of (A dY A^T) * V) G; dx is the
    forward with the flipped kernel, as in npmask.nn.conv.

Implemented here in NumPy with every transform as a few whole-array operations on a parity-split
padded image (so that "pixel (a, b) of every tile" is one contiguous block), chunked over threads
like npmask's im2col. It is correct (the script checks it against npmask's convolution: ~1e-16
relative in float64, ~1e-6 in float32), but slower: the transforms write about 7 values per input
pixel and channel and 7 more per output pixel and channel, each from an arithmetic ufunc (np.add on
float32 arrays of 16K-4M elements ran at 2.1-3.6 G elements/s on one core of this machine on
2026-11-24), so they cost more than the GEMM time they save. Measured with this script on the
2-core machine (steps alternating in one process, paired ratio to the im2col step), Winograd on the
layers of at least 256, 128 or 16 channels: 1.102x, 1.120x and 1.224x (8 rounds; an earlier run of
the same code as a module of npmask: 1.076x, 1.107x and 1.134x); on one core (NPMASK_THREADS=1
OPENBLAS_NUM_THREADS=1 ... --min-channels 1000000,128,16 --rounds 5) 1.067x for both 128 and 16.
The threshold 1000000 (never) is the im2col baseline.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from npmask.nn import conv  # noqa: E402
from npmask.nn.parallel import each_chunk  # noqa: E402

from _timing import Clock, take_turns  # noqa: E402
from train_step import add_step_arguments, build_step, print_floor  # noqa: E402

MIN_CHANNELS = 16        # Winograd for 3x3 stride-1 padding-1 layers with at least this many channels
CHUNK_FLOATS = 1 << 20   # transformed-input floats per chunk of images
SIGNS = np.outer([1, 1, 1, -1], [1, 1, 1, -1]).reshape(16)   # see _Tiles.transformed_grad


def _g(t, axis):
    """G along ``axis`` (3 -> 4): g0, (g0 + g1 + g2)/2, (g0 - g1 + g2)/2, g2 (no BLAS call: a BLAS
    call would wake OpenBLAS's spinning workers, see npmask.nn.parallel)."""
    g0, g1, g2 = (t.take(i, axis=axis) for i in range(3))
    half_sum, half_g1 = (g0 + g2) * 0.5, g1 * 0.5
    return np.stack([g0, half_sum + half_g1, half_sum - half_g1, g2], axis=axis)


def _g_t(t, axis):
    """G^T along ``axis`` (4 -> 3), the adjoint of _g."""
    d0, d1, d2, d3 = (t.take(i, axis=axis) for i in range(4))
    half_sum, half_diff = (d1 + d2) * 0.5, (d1 - d2) * 0.5
    return np.stack([d0 + half_sum, half_diff, d3 + half_sum], axis=axis)


class _Tiles:
    """One thread's buffers for chunks of up to nb images (c channels in, o out, h x w even).

    The padded image is split by row and column parity, x6[n, c, cp, rp, R, j] = xpad[2R + rp,
    2j + cp]; tile positions are (n, ty, tx) with tx = tw a junk column (``length`` per image)."""

    def __init__(self, dtype, nb, c, o, h, w):
        self.c, self.o, self.th, self.tw = c, o, h // 2, w // 2
        self.cols = self.tw + 1
        self.sub = (self.th + 1) * self.cols                 # one (cp, rp) plane
        self.length = self.th * self.cols
        self.nb, self.dtype = nb, dtype
        self.x6 = np.zeros((nb, c, 2, 2, self.th + 1, self.cols), dtype=dtype)  # zeros: padding
        self.flat = {}

    def buffer(self, name, per_image, m, shape):
        if name not in self.flat:
            self.flat[name] = np.empty(per_image * self.nb, dtype=self.dtype)
        return self.flat[name][:per_image * m].reshape(shape)

    def transformed_input(self, x):
        """V (16, C, m * length), V[4a + b] = (B^T d B)[a, b] of every tile d."""
        m, c, th, tw, cols, q = x.shape[0], self.c, self.th, self.tw, self.cols, self.sub
        x6 = self.x6[:m]
        x6[:, :, 1, 1, :th, :tw] = x[:, :, 0::2, 0::2]      # pixel (r, s) -> padded (r + 1, s + 1)
        x6[:, :, 0, 1, :th, 1:] = x[:, :, 0::2, 1::2]
        x6[:, :, 1, 0, 1:, :tw] = x[:, :, 1::2, 0::2]
        x6[:, :, 0, 0, 1:, 1:] = x[:, :, 1::2, 1::2]
        flat, p = x6.reshape(m * c, 4 * q), 2 * q
        # d B along the columns (tile columns b = 0..3: planes cp 0, 1 at j, then at j + 1).
        t03 = self.buffer("t03", c * 2 * p, m, (m * c, 2 * p))   # t0 (cp = 0 half), t3 (cp = 1)
        np.subtract(flat[:, :-1], flat[:, 1:], out=t03[:, :-1])
        t03[:, -1] = 0
        t1, t2 = (self.buffer(n, c * p, m, (m * c, p)) for n in ("t1", "t2"))
        np.add(flat[:, p:], flat[:, 1:p + 1], out=t1)
        np.subtract(flat[:, 1:p + 1], flat[:, p:], out=t2)
        # B^T (d B) along the rows (tile rows a = 0..3: offsets 0, q, cols, q + cols in a plane).
        length = self.length
        v = self.buffer("v", 16 * c * length, m, (4, 4, c, m, length))
        for b, t in enumerate((t03[:, :p], t1, t2, t03[:, p:])):
            d0, d1, d2, d3 = (t[:, s:s + length].reshape(m, c, length) for s in (0, q, cols, q + cols))
            out = [v[a, b].transpose(1, 0, 2) for a in range(4)]
            np.subtract(d0, d2, out=out[0])
            np.add(d1, d2, out=out[1])
            np.subtract(d2, d1, out=out[2])
            np.subtract(d1, d3, out=out[3])
        return v.reshape(16, c, m * length)

    def write_output(self, u, v, y):
        """y (m, O, H, W) = A^T (U @ V) A for every tile, the junk column dropped."""
        m, o, th, tw = y.shape[0], self.o, self.th, self.tw
        n = m * self.length
        mm = np.matmul(u, v, out=self.buffer("m", 16 * o * self.length, m, (16, o, n))).reshape(4, 4, o, n)
        s = self.buffer("s", 8 * o * self.length, m, (2, 4, o, n))
        np.add(mm[0], mm[1], out=s[0])
        s[0] += mm[2]
        np.subtract(mm[1], mm[2], out=s[1])
        s[1] -= mm[3]
        y6, tmp = y.reshape(m, o, th, 2, tw, 2), self.buffer("tmp", o * self.length, m, (o, n))

        def tiles(a):
            return a.reshape(o, m, th, self.cols)[:, :, :, :tw].transpose(1, 0, 2, 3)
        for i in range(2):
            np.add(s[i, 0], s[i, 1], out=tmp)
            np.add(tiles(tmp), tiles(s[i, 2]), out=y6[:, :, :, i, :, 0])
            np.subtract(s[i, 1], s[i, 2], out=tmp)
            np.subtract(tiles(tmp), tiles(s[i, 3]), out=y6[:, :, :, i, :, 1])

    def transformed_grad(self, dy):
        """SIGNS * (A dY A^T) for every 2x2 block dY of dy, (16, O, m * length), 0 in the junk
        column: with c'_3 = -c_3 every entry is a sum or difference of the four corners."""
        m, o, th, tw = dy.shape[0], self.o, self.th, self.tw
        dm = self.buffer("dm", 16 * o * self.length, m, (4, 4, o, m * self.length))
        dy6 = dy.reshape(m, o, th, 2, tw, 2)
        for a, i in ((0, 0), (3, 1)):
            for b, j in ((0, 0), (3, 1)):
                corner = dm[a, b].reshape(o, m, th, self.cols)
                corner[:, :, :, :tw] = dy6[:, :, :, i, :, j].transpose(1, 0, 2, 3)
                corner[:, :, :, tw] = 0
        for a in (0, 3):
            np.add(dm[a, 0], dm[a, 3], out=dm[a, 1])
            np.subtract(dm[a, 0], dm[a, 3], out=dm[a, 2])
        np.add(dm[0], dm[3], out=dm[1])
        np.subtract(dm[0], dm[3], out=dm[2])
        return dm.reshape(16, o, m * self.length)


def _plan(x, o):
    n, c, h, w = x.shape
    length = (h // 2) * (w // 2 + 1)
    per_image = 16 * max(c, o) * length
    fewest = -(-n // max(1, CHUNK_FLOATS // per_image)) if n else 1
    count = max(1, min(n, -(-fewest // 4) * 4))
    chunks = [(n * i // count, n * (i + 1) // count) for i in range(count)]
    nb = max(n1 - n0 for n0, n1 in chunks)
    return chunks, 32.0 * o * c * length * n, (lambda: _Tiles(x.dtype, nb, c, o, h, w))


def winograd_forward(x, weight):
    o, c = weight.shape[:2]
    u = np.ascontiguousarray(_g(_g(weight, 2), 3).transpose(2, 3, 0, 1)).reshape(16, o, c)
    y = np.empty((x.shape[0], o) + x.shape[2:], dtype=x.dtype)
    chunks, flops, make = _plan(x, o)

    def one_chunk(tiles, i):
        n0, n1 = chunks[i]
        tiles.write_output(u, tiles.transformed_input(x[n0:n1]), y[n0:n1])
    each_chunk(np, len(chunks), make, one_chunk, flops=flops)
    return y


def winograd_weight_grad(dy, x):
    o, c = dy.shape[1], x.shape[1]
    chunks, flops, make = _plan(x, o)
    du = conv._InOrderSum()

    def one_chunk(tiles, i):
        n0, n1 = chunks[i]
        v = tiles.transformed_input(x[n0:n1])
        du.add(i, np.matmul(tiles.transformed_grad(dy[n0:n1]), v.transpose(0, 2, 1)))
    each_chunk(np, len(chunks), make, one_chunk, flops=flops)
    total = (du.total * SIGNS.astype(x.dtype).reshape(16, 1, 1)).reshape(4, 4, o, c)
    return np.ascontiguousarray(_g_t(_g_t(total, 0), 1).transpose(2, 3, 0, 1))


def _usable(x_shape, weight_shape, stride, ph, pw):
    _, c, h, w = x_shape
    o, _, kh, kw = weight_shape
    return ((kh, kw, stride, ph, pw) == (3, 3, 1, 1, 1) and h % 2 == 0 and w % 2 == 0
            and min(c, o) >= MIN_CHANNELS)


def install():
    """Route npmask's 3x3 stride-1 convolutions (forward, input and weight gradients) through
    Winograd where _usable says so; returns a function that restores the im2col routines."""
    gemm, wgrad = conv._conv_gemm, conv._weight_grad

    def conv_gemm(x, weight, stride, ph, pw, ho, wo):
        if _usable(x.shape, weight.shape, stride, ph, pw):
            return winograd_forward(x, weight)
        return gemm(x, weight, stride, ph, pw, ho, wo)

    def weight_grad(dy, x, kh, kw, stride, padding):
        if _usable(x.shape, (dy.shape[1], x.shape[1], kh, kw), stride, padding, padding):
            return winograd_weight_grad(dy, x)
        return wgrad(dy, x, kh, kw, stride, padding)
    conv._conv_gemm, conv._weight_grad = conv_gemm, weight_grad

    def restore():
        conv._conv_gemm, conv._weight_grad = gemm, wgrad
    return restore


def check() -> None:
    """Winograd against npmask's im2col convolution, float64 and float32; raises if they differ."""
    rng = np.random.default_rng(0)
    for n, c, o, h, w in [(2, 16, 24, 8, 6), (3, 20, 16, 4, 10), (5, 16, 16, 2, 2), (4, 64, 64, 32, 32)]:
        for dtype in (np.float64, np.float32):
            x, dy = (rng.standard_normal(s).astype(dtype) for s in ((n, c, h, w), (n, o, h, w)))
            g = rng.standard_normal((o, c, 3, 3)).astype(dtype)
            y, y_ref = winograd_forward(x, g), conv._conv_gemm(x, g, 1, 1, 1, h, w)
            dw, dw_ref = winograd_weight_grad(dy, x), conv._weight_grad(dy, x, 3, 3, 1, 1)
            errors = (np.abs(y - y_ref).max() / np.abs(y_ref).max(),
                      np.abs(dw - dw_ref).max() / np.abs(dw_ref).max())
            print(f"check {(n, c, o, h, w)} {np.dtype(dtype).name}: forward {errors[0]:.1e}, weight "
                  f"gradient {errors[1]:.1e} (max error / max value)")
            if max(errors) > (1e-12 if dtype == np.float64 else 1e-5):
                raise AssertionError("Winograd disagrees with npmask's convolution")


def _use_from(channels: int) -> None:
    global MIN_CHANNELS
    MIN_CHANNELS = channels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-channels", default="1000000,256,128,16")
    add_step_arguments(ap, rounds=8)
    args = ap.parse_args(argv)
    check()
    settings = [int(s) for s in args.min_channels.split(",")]
    step, flops = build_step(args.model, args.size, args.batch, args.variant)
    restore = install()
    try:
        times, rates = take_turns(step, [lambda s=s: _use_from(s) for s in settings], args.rounds, Clock(np))
    finally:
        restore()
    floor = print_floor(args, flops, rates)
    base = np.array(times[0])
    for s, t in zip(settings, times):
        t = np.array(t)
        print(f"Winograd from {s:>7} channels: median step {np.median(t):.3f} s = "
              f"{np.median(t) / floor:.2f}x floor, paired ratio to the first setting "
              f"{np.median(t / base):.3f}")


if __name__ == "__main__":
    main()
