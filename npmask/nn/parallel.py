"""Run one layer's NumPy work on several CPU threads: ``in_parallel(xp, items, floats, fn)``.

NumPy runs an array operation (a copy, a ufunc, a reduction) on one core, and BLAS runs a matrix
product on all of them; on a 2-core machine the one-core parts of a training step (im2col copies,
batch norm) are then a large share of it. NumPy releases the GIL inside an operation on a large
array, so plain Python threads working on *disjoint* slices (a range of channels each) run truly
in parallel. Every element is still computed by exactly one thread with the same arithmetic as the
serial code, so the results are bit-identical to it.

The catch: after each GEMM, OpenBLAS's worker threads keep a core busy for ~0.1 s waiting for the
next GEMM (a busy-wait; OPENBLAS_THREAD_TIMEOUT sets how long), so the threads share the cores
with spinning BLAS workers. Measured on 2 cores in one process, alternating 1 and 2 threads step by
step (benchmarks/results/train_step_cpu.txt, 2026-11-24, run 9): a WRN-28-4 step at 64x64 was 3%
faster with OpenBLAS's default, 9% faster when Python was started with OPENBLAS_THREAD_TIMEOUT=4
(the workers then sleep at once). The small default job (WRN-16-1 at 32x32) seemed slower with that
setting, so it is left to the user (see npmask/__init__.py). Work under PARALLEL_MIN_FLOATS (1M
floats, 4 MB) stays serial: below it, handing work to a thread (~20-50 us) and sharing the core
with a spinning BLAS worker cost more than they save (one epoch of the default job's digits domain,
whole command: 14.9 s with a 64K-float threshold, 13.4 s with 1M, 14.2 s on one thread; single
runs). Overlapping the copies of one chunk with the GEMM of another on a helper thread was slower
still (1.1-1.3x): the helper takes turns on a core with a BLAS thread.

THREADS = 1 (or the environment variable NPMASK_THREADS=1) gives the plain serial code; CuPy
arrays never use threads (on a GPU each operation is one kernel launch anyway).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np


def _default_threads() -> int:
    env = os.environ.get("NPMASK_THREADS")
    if env:
        try:
            threads = int(env)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"NPMASK_THREADS must be a positive integer, got {env!r}")
        return threads
    try:
        cpus = len(os.sched_getaffinity(0))            # the CPUs this process may run on
    except AttributeError:                             # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))                        # memory bandwidth is saturated beyond ~4


THREADS = _default_threads()
PARALLEL_MIN_FLOATS = 1 << 20
_pool = None                                    # (threads, process id, executor), made lazily


def _executor(threads: int) -> ThreadPoolExecutor:
    """The persistent pool of ``threads - 1`` helper threads (the caller is the last thread).

    Re-created when THREADS changes, and in a child process after a fork (threads do not survive a
    fork, and a pool whose threads are gone would wait forever).
    """
    global _pool
    if _pool is None or _pool[:2] != (threads, os.getpid()):
        if _pool is not None and _pool[1] == os.getpid():
            _pool[2].shutdown(wait=False)               # its threads exit once idle
        _pool = (threads, os.getpid(), ThreadPoolExecutor(threads - 1, thread_name_prefix="npmask"))
    return _pool[2]


def in_parallel(xp, items: int, floats: int, fn) -> None:
    """Call ``fn(lo, hi)`` on contiguous parts of ``range(items)`` that together cover it.

    ``fn`` must write only to slices selected by [lo, hi), so the parts may run at the same time.
    They do on NumPy, when ``floats`` (the size of the work) is at least PARALLEL_MIN_FLOATS and
    THREADS > 1; otherwise this is just ``fn(0, items)``. Call it from one thread at a time (the
    training loop's), and never from inside ``fn``: a part waiting for the pool it runs on could
    wait forever.
    """
    parts = min(THREADS, items)
    if xp is not np or parts <= 1 or floats < PARALLEL_MIN_FLOATS:
        fn(0, items)
        return
    bounds = [items * i // parts for i in range(parts + 1)]
    futures = [_executor(THREADS).submit(fn, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    try:
        fn(bounds[0], bounds[1])
    finally:
        wait(futures)                   # also after an error: no part may still be writing
    for future in futures:
        future.result()                 # re-raises a helper thread's exception here
