"""What a hand-off to a second thread costs, against the work a small network's layer gives it.

A developer's tool (benchmarks/dev/). Run:
      .venv/bin/python benchmarks/dev/thread_handoff.py [--batch 32] [--rounds 16]

It changes nothing in npmask. Three measurements, each taking turns in one process:

1. round trip of an empty task through a one-thread ThreadPoolExecutor (the pool npmask's
   ``parallel._run`` uses), right after the previous one and after 0.2, 1 and 5 ms of the calling
   thread's own work: how long a helper thread takes to wake up, run a trivial task and hand back;
2. the same GEMMs, and the same short copies, on two threads at once against one after the other:
   whether the two cores can work side by side at all at these sizes;
3. the forward pass of one convolution of each kind in WRN-16-1 at 32x32 (the layers of a
   batch-32 step), three ways: one thread (npmask's own, the
   whole batch), one thread on each half of the batch after the other, and the two halves on two
   threads at once (the coarsest split a layer allows: one hand-off, each thread the layer's whole
   im2col, GEMM and output copy for its half, no shared buffer). Whether the halves' output is
   bit-identical to the whole batch's is printed (a half has other chunks, so other GEMM shapes).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from npmask.config import settings  # noqa: E402
from npmask.nn import conv_fast  # noqa: E402
from npmask.nn.parallel import blas_threads_limited_to_one  # noqa: E402


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def round_trips(pool, gap: float, count: int = 200) -> np.ndarray:
    times = []
    for _ in range(count):
        busy(gap)
        t0 = time.perf_counter()
        pool.submit(int).result()
        times.append(time.perf_counter() - t0)
    return np.array(times)


def side_by_side(fn_a, fn_b) -> float:
    """(time of fn_a then fn_b) / (time of fn_a and fn_b on two threads at once)."""
    t0 = time.perf_counter()
    fn_a()
    fn_b()
    serial = time.perf_counter() - t0
    threads = [threading.Thread(target=fn_a), threading.Thread(target=fn_b)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return serial / (time.perf_counter() - t0)


def take_turns(fns, rounds: int, inner: int = 5):
    """{name: per-round times} for fns = [(name, fn)], alternating order round by round."""
    times = {name: [] for name, _ in fns}
    for r in range(rounds):
        for name, fn in (fns if r % 2 == 0 else fns[::-1]):
            fn()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: np.array(t) for name, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=16)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    settings.threads = 1                       # npmask's own pool stays out of it

    pool = ThreadPoolExecutor(1)
    pool.submit(int).result()
    print("1. round trip of an empty task to a pool thread (median, 90th percentile):")
    for gap in (0.0, 0.0002, 0.001, 0.005):
        t = round_trips(pool, gap) * 1e6
        print(f"   after {gap * 1e3:.1f} ms of own work: {np.median(t):.0f} us, {np.percentile(t, 90):.0f} us")

    print("2. two threads at once against one after the other (speed-up, 3 tries):")
    with blas_threads_limited_to_one():
        for m, k, n, reps in ((64, 576, 256, 1000), (16, 144, 2048, 500), (64, 576, 1024, 300)):
            a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
            a2, b2 = a.copy(), b.copy()
            ups = [side_by_side(lambda: [a @ b for _ in range(reps)], lambda: [a2 @ b2 for _ in range(reps)])
                   for _ in range(3)]
            print(f"   GEMM ({m}, {k}) @ ({k}, {n}): " + ", ".join(f"{u:.2f}" for u in ups))
        src = [rng.standard_normal((8, 64, 6, 6), dtype=np.float32) for _ in range(2)]
        dst = [np.empty((64, 8, 4, 4), dtype=np.float32) for _ in range(2)]

        def windows(i):
            def fn():
                for _ in range(2000):
                    for u in range(3):
                        for v in range(3):
                            dst[i][...] = src[i][:, :, u:u + 4, v:v + 4].transpose(1, 0, 2, 3)
            return fn
        ups = [side_by_side(windows(0), windows(1)) for _ in range(3)]
        print("   im2col-like window copies of 8K floats: " + ", ".join(f"{u:.2f}" for u in ups))

    print(f"3. one convolution's forward, batch {args.batch}, {args.rounds} rounds "
          "(median time; median and quartiles of the paired ratio to one thread):")
    n, half = args.batch, args.batch // 2
    for name, c, h, o, s in (("3x3 16 -> 16, 16x16 (folded rows)", 16, 16, 16, 1),
                             ("3x3 16 -> 32, 16x16, stride 2", 16, 16, 32, 2),
                             ("3x3 32 -> 32, 8x8 (shifted rows)", 32, 8, 32, 1),
                             ("3x3 64 -> 64, 4x4 (shifted rows)", 64, 4, 64, 1)):
        x = rng.standard_normal((n, c, h, h), dtype=np.float32)
        w = rng.standard_normal((o, c, 3, 3), dtype=np.float32)
        ho = (h - 1) // s + 1

        def conv(part):
            with blas_threads_limited_to_one():
                return conv_fast.conv_gemm(x[part], w, s, 1, 1, ho, ho)
        lo, hi = slice(0, half), slice(half, n)

        def both():                            # the pool's thread, as npmask's parallel._run
            second = pool.submit(conv, hi)
            first = conv(lo)
            return first, second.result()
        same = np.array_equal(np.concatenate(both()), conv(slice(0, n)))
        times = take_turns([("one thread", lambda: conv(slice(0, n))),
                            ("halves, one after the other", lambda: (conv(lo), conv(hi))),
                            ("halves, two threads at once", both)], args.rounds)
        base = times["one thread"]
        print(f"   {name} (halves' output bit-identical to the whole batch's: {same}):")
        for label, t in times.items():
            q1, med, q3 = np.percentile(t / base, [25, 50, 75])
            print(f"      {label:30s} {np.median(t) * 1e6:6.0f} us, ratio {med:.3f} ({q1:.3f}-{q3:.3f})")
    pool.shutdown()


if __name__ == "__main__":
    main()
