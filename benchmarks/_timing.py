"""Timing shared by the benchmark scripts: a clock (wall, process CPU time, or CUDA events) and the
float32 GEMM rate that every figure is compared with."""
from __future__ import annotations

import time

import numpy as np


class Clock:
    """Wall time on NumPy (perf_counter); GPU time between CUDA events on CuPy.

    ``cpu=True`` (NumPy only) measures the CPU time of this process instead (``process_time``, all
    threads summed): on a machine shared with other jobs it is far less noisy than wall time, and
    with ``NPMASK_THREADS=1 OPENBLAS_NUM_THREADS=1`` it is what the step would take on one idle core.
    """

    def __init__(self, xp, cpu: bool = False, stat: str = "median"):
        self.xp = xp
        self.stat = stat
        self.gpu = xp is not np
        self.now = time.process_time if cpu else time.perf_counter

    def time(self, fn) -> float:
        if self.gpu:
            start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return self.xp.cuda.get_elapsed_time(start, stop) / 1e3
        t0 = self.now()
        fn()
        return self.now() - t0

    def repeat(self, fn, repeats: int) -> float:
        """Median (or minimum, with stat="min") time of ``repeats`` calls after one warm-up call."""
        fn()  # warm-up: buffers allocated, BLAS threads up, CUDA kernels compiled
        times = [self.time(fn) for _ in range(repeats)]
        return float(np.min(times) if self.stat == "min" else np.median(times))


def settle(xp) -> None:
    """Wait until BLAS's worker threads have stopped spinning (NumPy only).

    After a multi-threaded GEMM, OpenBLAS's workers busy-wait for ~0.1 s (OPENBLAS_THREAD_TIMEOUT)
    on the cores; whatever is timed next would share the cores with them. npmask's convolutions
    never wake them (npmask/nn/parallel.py), but the yardstick GEMM below and a large fully
    connected layer do, so the scripts call this before timing anything else.
    """
    if xp is np:
        time.sleep(0.25)


def gemm_rate(xp, clock: Clock, n: int = 2048, repeats: int = 7) -> float:
    """float32 GEMM rate in GFLOP/s: 2*n^3 flops per n x n matmul (median, or best with stat=min).

    Returns after :func:`settle`: BLAS's workers are no longer spinning.
    """
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n)), dtype=xp.float32)
    b = xp.asarray(rng.standard_normal((n, n)), dtype=xp.float32)
    out = xp.empty((n, n), dtype=xp.float32)
    rate = 2 * n**3 / clock.repeat(lambda: xp.matmul(a, b, out=out), repeats) / 1e9
    settle(xp)
    return rate


def take_turns(step, settings, rounds: int, clock: Clock):
    """Time ``step`` under each setting, taking turns: ``(times, rates)`` (NumPy only).

    ``settings`` are functions that switch to a setting. Each is warmed up with one step; then every
    round measures the GEMM rate and times one step per setting, in reversed order every other
    round, each after :func:`settle`. ``times[i]`` lists setting i's step times, one per round: on a
    machine whose speed drifts within minutes, compare settings by their ratio within a round.
    """
    for switch in settings:
        switch()
        step()
    order = list(range(len(settings)))
    times, rates = [[] for _ in settings], []
    for r in range(rounds):
        rates.append(gemm_rate(np, clock, repeats=3))
        for i in order if r % 2 == 0 else order[::-1]:
            settings[i]()
            settle(np)
            times[i].append(clock.time(step))
    return times, rates
