"""Run one layer's NumPy work on several CPU threads: ``in_parallel(xp, items, floats, fn)``.

NumPy runs an array operation (a copy, a ufunc, a reduction) on one core, and BLAS runs a matrix
product on all of them; on a 2-core machine the one-core parts of a training step (im2col copies,
batch norm) are then a large share of it. NumPy releases the GIL inside an operation on a large
array, so plain Python threads working on *disjoint* slices (a range of channels each) run truly
in parallel. Every element is still computed by exactly one thread with the same arithmetic as the
serial code, so the results are bit-identical to it.

The catch: after each GEMM, OpenBLAS's worker threads keep a core busy for ~0.1 s waiting for the
next GEMM (a busy-wait; OPENBLAS_THREAD_TIMEOUT sets how long), so with OpenBLAS's default the
threads share the cores with spinning BLAS workers and gain ~nothing (measured: a training step of
WRN-28-4 on 2 cores 0-3% faster). npmask sets OPENBLAS_THREAD_TIMEOUT=4 when it is imported before
NumPy (npmask/__init__.py): the workers then sleep at once, and the step is 5-10% faster
(benchmarks/results/conv_cpu.txt, train_step_cpu.txt). Overlapping the copies of one chunk with the
GEMM of another on a helper thread was slower still (1.1-1.3x): the helper takes turns on a core
with a BLAS thread, and the GEMM waits for it.

THREADS = 1 (or the environment variable NPMASK_THREADS=1) gives the plain serial code; CuPy
arrays never use threads (on a GPU each operation is one kernel launch anyway). Work smaller than
PARALLEL_MIN_FLOATS stays serial: handing work to a thread costs ~20-50 microseconds.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np


def _default_threads() -> int:
    env = os.environ.get("NPMASK_THREADS")
    if env:
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))            # the CPUs this process may run on
    except AttributeError:                             # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))                        # memory bandwidth is saturated beyond ~4


THREADS = _default_threads()
PARALLEL_MIN_FLOATS = 1 << 16
_pool = None                                           # (threads, process id, executor), made lazily


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
    THREADS > 1; otherwise this is just ``fn(0, items)``.
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
