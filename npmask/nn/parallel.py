"""Run a layer's NumPy work on several CPU threads: ``in_parallel`` (slices) and ``each_chunk`` (chunks).

NumPy runs an array operation on one core, but NumPy and BLAS release the GIL inside an operation
on a large array, so plain Python threads working on *disjoint* data run truly in parallel. This
module keeps one persistent pool of helper threads and two ways of sharing work out over it:

- :func:`in_parallel` (batch norm, ReLU, copies): ranges of an axis, one per thread. Every element
  is computed by exactly one thread with the same arithmetic as the serial code: the same bits.
- :func:`each_chunk` (convolution, optimisers): chunks of work (a few images: im2col copy, GEMM,
  output copy), each taken by whichever thread is free next. The chunks do not depend on the number
  of threads and the caller combines per-chunk results in chunk order, so the results do not
  depend on ``threads`` either (tested).

On NumPy every ``each_chunk`` call holds BLAS at one thread (threadpoolctl), also when it runs
serially: each core then runs its own GEMMs on data in its own cache; OpenBLAS's worker threads,
which busy-wait after a multi-threaded GEMM, never take the cores npmask's threads use; and a
chunk's GEMM gives the same bits on every thread count (multi-threaded sgemm rounds differently on
some CPUs). Without threadpoolctl BLAS keeps its threads: slower, same results on most CPUs.

The thread count and the thresholds under which work stays on the calling thread are settings
(:mod:`npmask.config`: ``threads``, ``parallel_min_floats``, ``parallel_min_flops``; the environment
variable ``NPMASK_THREADS`` sets the default thread count, 1 gives the plain serial code). CuPy
arrays never use the threads (on a GPU each operation is one kernel launch anyway), and a part that
calls in_parallel/each_chunk again runs that call serially (no nesting). The measurements behind
this design are in ``benchmarks/results/train_step_cpu.txt``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ..config import settings

try:
    from threadpoolctl import ThreadpoolController
except ImportError:                                    # a declared dependency; without it BLAS
    ThreadpoolController = None                        # keeps its threads (slower, same results)


_pool = None                                    # (threads, process id, executor), made lazily
_local = threading.local()                      # .inside: this thread is running a part
_blas = None                                    # threadpoolctl's BLAS controllers, found lazily


def _executor(threads: int) -> ThreadPoolExecutor:
    """The persistent pool of ``threads - 1`` helper threads (the caller is the last thread).

    Re-created when the thread count changes, and in a child process after a fork (threads do not
    survive a fork, and a pool whose threads are gone would wait forever).
    """
    global _pool
    if _pool is None or _pool[:2] != (threads, os.getpid()):
        if _pool is not None and _pool[1] == os.getpid():
            _pool[2].shutdown(wait=False)               # its threads exit once idle
        _pool = (threads, os.getpid(), ThreadPoolExecutor(threads - 1, thread_name_prefix="npmask"))
    return _pool[2]


def _serial(xp, items: int, small: bool) -> bool:
    """True when the work is done on the calling thread alone."""
    threads = settings.threads
    return (xp is not np or threads <= 1 or min(threads, items) <= 1 or small
            or getattr(_local, "inside", False))


def _as_part(fn):
    """fn, marked while it runs as a part of a parallel region (so that it does not nest one)."""
    def part(*args):
        _local.inside = True
        try:
            return fn(*args)
        finally:
            _local.inside = False
    return part


def _run(parts) -> None:
    """Call every function of ``parts`` (no arguments): the first here, the others on the pool."""
    futures = [_executor(settings.threads).submit(_as_part(p)) for p in parts[1:]]
    try:
        _as_part(parts[0])()
    finally:
        wait(futures)                   # also after an error: no part may still be writing
    for future in futures:
        future.result()                 # re-raises a helper thread's exception here


@contextlib.contextmanager
def _one_blas_thread(libs):
    """Each BLAS library of ``libs`` (threadpoolctl's controllers) at one thread until exit, then
    back at the count it had."""
    saved = [lib.num_threads for lib in libs]
    for lib, n in zip(libs, saved):
        if n != 1:
            lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, saved):
            if n != 1:
                lib.set_num_threads(n)


def blas_threads_limited_to_one():
    """Context manager: BLAS runs each matrix product on the calling thread only, until exit.

    The BLAS libraries are looked up once (threadpoolctl), those loaded at that moment (NumPy's);
    one loaded later (say, by another package) keeps its threads: slower, same results. Each use
    then reads and sets their thread counts directly, not through threadpoolctl's ``limit``, which
    re-selects the libraries every time and costs several times more: every convolution pass makes
    one such call, about 50 per WRN-16-1 step (benchmarks/results/code_comment_figures.md).
    """
    global _blas
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _one_blas_thread(_blas)


def in_parallel(xp, items: int, floats: int, fn) -> None:
    """Call ``fn(lo, hi)`` on contiguous parts of ``range(items)`` that together cover it.

    ``fn`` must write only to slices selected by [lo, hi), so the parts may run at the same time.
    They do on NumPy, when ``floats`` (the size of the work) is at least
    ``settings.parallel_min_floats`` and ``settings.threads`` > 1; otherwise this is just
    ``fn(0, items)``. Call it from one thread at a time (the training loop's).
    """
    if _serial(xp, items, floats < settings.parallel_min_floats):
        fn(0, items)
        return
    parts = min(settings.threads, items)
    bounds = [items * i // parts for i in range(parts + 1)]
    _run([lambda lo=lo, hi=hi: fn(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])])


def each_chunk(xp, count: int, setup, fn, *, flops: float = 0.0, floats: float = 0.0) -> None:
    """Call ``fn(state, i)`` for every i in ``range(count)``; each thread has ``state = setup()``.

    On NumPy, BLAS runs on one thread for the duration (so that its workers are never woken and
    a chunk's GEMMs give the same bits whatever the thread count, see the module docstring), and
    with ``settings.threads`` > 1, at least two chunks and enough work (GEMM ``flops`` at least
    ``settings.parallel_min_flops``, or elementwise work on ``floats`` at least
    ``settings.parallel_min_floats``), that many threads take the chunks in order, each the next one as it becomes
    free (uneven chunks still keep every core busy). ``fn`` must write only what belongs to chunk
    i; ``setup`` makes a thread's private buffers. Otherwise: ``state = setup()`` and the loop, here.
    """
    owner = xp is np and not getattr(_local, "inside", False)
    with blas_threads_limited_to_one() if owner else contextlib.nullcontext():
        if _serial(xp, count, flops < settings.parallel_min_flops
                   and floats < settings.parallel_min_floats):
            state = setup()
            for i in range(count):
                fn(state, i)
            return
        lock, following = threading.Lock(), iter(range(count))

        def worker():
            state = setup()
            while True:
                with lock:
                    i = next(following, None)
                if i is None:
                    return
                fn(state, i)
        _run([worker] * min(settings.threads, count))


# ---------------------------------------------------------------------------------- helpers
def add_into(xp, out, other) -> None:
    """``out += other`` (same shape), split over the threads along the first axis.

    Every element is one addition, as in the serial ``+=``: the same bits. In place, because a new
    array costs more than the addition (benchmarks/results/train_step_cpu.txt).
    """
    if xp is not np or out.ndim == 0:
        out += other
        return
    in_parallel(xp, out.shape[0], out.size,
                lambda lo, hi: np.add(out[lo:hi], other[lo:hi], out=out[lo:hi]))


def contiguous(xp, a):
    """A C-contiguous copy of ``a`` (of its shape, also 0-d), typically a transposed or flipped
    weight; the copy is split over the threads along the first axis, or the second where the first
    is too short to share out evenly (under 4 entries per thread)."""
    if a.ndim == 0 or xp is not np:
        return xp.array(a, copy=True, order="C")
    out = np.empty(a.shape, dtype=a.dtype)
    if a.ndim > 1 and a.shape[0] < 4 * settings.threads:
        in_parallel(xp, a.shape[1], a.size, lambda lo, hi: np.copyto(out[:, lo:hi], a[:, lo:hi]))
    else:
        in_parallel(xp, a.shape[0], a.size, lambda lo, hi: np.copyto(out[lo:hi], a[lo:hi]))
    return out
