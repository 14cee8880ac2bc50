"""How fast NumPy runs the per-channel passes of batch norm, written two ways, at WRN-28-4's shapes.

Run:  .venv/bin/python benchmarks/elementwise.py [--batch 32] [--rounds 100]

Batch norm (npmask/nn/batchnorm.py) works on the (N, C, L) view of an activation (L = H*W) and
makes two kinds of pass over it:

1. per-channel sums over the images and positions (the mean, dbias):
   ``a.sum(axis=(0, 2))`` against ``np.einsum("ncl->c", a)``;
2. an activation combined with a per-channel vector v (subtract the mean, scale, shift):
   ``x * v.reshape(C, 1)`` (a view whose stride along L is 0) against ``x * v_spread`` with
   ``v_spread = np.repeat(v.reshape(C, 1), L, axis=1)``, a contiguous (C, L) array (building it is
   timed too).

Then one copy of the fast convolution (npmask/nn/conv_fast.py): the weight gradient's final
transpose (K, O) -> (O, K), ``np.ascontiguousarray(a.T)`` against ``conv_fast._transposed`` (bands
of 32 rows),
at the (K, O) of WRN-28-4's convolutions that are not "folded rows".

The two ways take turns, round by round, on one thread; the script prints each one's rate in
elements per second and the median over the rounds of the paired time ratio (new / old).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from npmask.nn import conv_fast  # noqa: E402

SHAPES = [(16, 64, 64), (64, 32, 32), (128, 16, 16), (256, 8, 8)]   # (C, H, W) of WRN-28-4 at 64x64


def paired(old, new, rounds: int):
    """(median old seconds, median new seconds, median of new/old over the rounds)."""
    t_old, t_new = [], []
    for r in range(rounds):
        turns = ((old, t_old), (new, t_new))
        for fn, times in turns if r % 2 == 0 else turns[::-1]:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    t_old, t_new = np.array(t_old), np.array(t_new)
    return float(np.median(t_old)), float(np.median(t_new)), float(np.median(t_new / t_old))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"float32, batch {args.batch}, {args.rounds} rounds, one thread; rates in G elements/s")
    for c, h, w in SHAPES:
        n, length = args.batch, h * w
        x = rng.standard_normal((n, c, length), dtype=np.float32)
        out = np.empty_like(x)
        v = rng.standard_normal(c).astype(np.float32)

        def spread():
            return np.repeat(v.reshape(c, 1), length, axis=1)
        cases = {
            "sum over (0, 2)": (lambda: x.sum(axis=(0, 2)), lambda: np.einsum("ncl->c", x)),
            "x * v per channel": (lambda: np.multiply(x, v.reshape(c, 1), out=out),
                                  lambda: np.multiply(x, spread(), out=out)),
            "out += v per channel": (lambda: np.add(out, v.reshape(c, 1), out=out),
                                     lambda: np.add(out, spread(), out=out)),
        }
        for name, (old, new) in cases.items():
            t_old, t_new, ratio = paired(old, new, args.rounds)
            print(f"  {f'({n}, {c}, {h}x{w})':<17} {name:<21} old {x.size / t_old / 1e9:5.2f}  "
                  f"new {x.size / t_new / 1e9:5.2f}  new/old {ratio:.3f}")
        np.testing.assert_allclose(np.einsum("ncl->c", x), x.sum(axis=(0, 2)), rtol=1e-4, atol=1e-2)
    print("the weight gradient's transpose (K, O) -> (O, K): ascontiguousarray(a.T) (old) against "
          "bands of 32 rows (new); G elements/s")
    for k, o in [(2304, 256), (1152, 256), (576, 128), (144, 64)]:
        a = rng.standard_normal((k, o), dtype=np.float32)
        assert np.array_equal(conv_fast._transposed(np, a), a.T)
        t_old, t_new, ratio = paired(lambda: np.ascontiguousarray(a.T), lambda: conv_fast._transposed(np, a),
                                     args.rounds)
        print(f"  {f'({k}, {o})':<17} {'transpose':<21} old {a.size / t_old / 1e9:5.2f}  "
              f"new {a.size / t_new / 1e9:5.2f}  new/old {ratio:.3f}  ({t_old * 1e3:.2f} -> {t_new * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
