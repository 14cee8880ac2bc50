"""CuPy reductions that the training step uses, timed with CUDA events (GPU only).

Run:  python benchmarks/cupy_reductions.py
Checks two suspicions about where a CuPy step loses time:
1. a ReductionKernel with a single output (sum over a whole weight, for a learned scalar k) runs in
   one thread block; reducing per output channel first (one block per channel) and then summing the
   (O,) vector uses the whole GPU;
2. the batch-norm channel sums sum_{n,h,w} a*b: einsum against a fused ReductionKernel and against
   (a*b).sum(axis=(0, 2)).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cupy as cp  # noqa: E402

from _timing import Clock  # noqa: E402

clock = Clock(cp)
rng = np.random.default_rng(0)
full = cp.ReductionKernel("T G, T W", "T out", "G * W", "a + b", "out = a", "0", "bench_sum_gw")
for shape in [(64, 64, 3, 3), (256, 256, 3, 3)]:
    G = cp.asarray(rng.standard_normal(shape), dtype=cp.float32)
    W = cp.asarray(rng.standard_normal(shape), dtype=cp.float32)
    t_one = clock.repeat(lambda: full(G, W), 50)
    t_two = clock.repeat(lambda: full(G, W, axis=(1, 2, 3)).sum(), 50)
    print(f"sum G*W over {shape}: single-output ReductionKernel {1e6 * t_one:8.1f} us, "
          f"per-channel then sum {1e6 * t_two:8.1f} us")
dot = cp.ReductionKernel("T a, T b", "T out", "a * b", "a + b", "out = a", "0", "bench_channel_dot")
for shape in [(32, 64, 32 * 32), (32, 256, 8 * 8), (128, 64, 32 * 32)]:
    a = cp.asarray(rng.standard_normal(shape), dtype=cp.float32)
    b = cp.asarray(rng.standard_normal(shape), dtype=cp.float32)
    t_e = clock.repeat(lambda: cp.einsum("ncl,ncl->c", a, b), 50)
    t_k = clock.repeat(lambda: dot(a, b, axis=(0, 2)), 50)
    t_s = clock.repeat(lambda: (a * b).sum(axis=(0, 2)), 50)
    t_m = clock.repeat(lambda: a.mean(axis=(0, 2)), 50)
    print(f"channel sums over {shape}: einsum {1e6 * t_e:8.1f} us, ReductionKernel {1e6 * t_k:8.1f} us, "
          f"(a*b).sum {1e6 * t_s:8.1f} us, a.mean {1e6 * t_m:8.1f} us")
