"""Run a layer's NumPy work on several CPU threads: ``in_parallel`` (slices) and ``each_chunk`` (chunks).

NumPy runs an array operation (a copy, a ufunc, a reduction) on one core; on a 2-core machine the
one-core parts of a training step would then be a large share of it. NumPy and BLAS release the
GIL inside an operation on a large array, so plain Python threads working on *disjoint* data run
truly in parallel. Two ways of splitting the work:

- :func:`in_parallel` (batch norm, ReLU): ranges of an axis (channels, batch rows), one per
  thread. Every element is computed by exactly one thread with the same arithmetic as the serial
  code, so the results are bit-identical.
- :func:`each_chunk` (convolution; also the optimisers, one parameter per item): chunks of a few
  images, each a complete piece of work (im2col copy, GEMM, output copy), handed to whichever
  thread is free next, with BLAS on ONE thread. Each core runs its own GEMMs on data in its own
  cache, instead of every core sharing one GEMM with one-core copies in between; and one-thread
  GEMMs are fastest on small chunks (see ``npmask.nn.conv.CHUNK_FLOATS``). The chunks are the same
  whatever the number of threads, every chunk's GEMMs run on one BLAS thread (also with
  THREADS = 1), and the caller combines per-chunk results in chunk order: the results do not
  depend on THREADS, on any BLAS (tested). One BLAS thread in every case matters: OpenBLAS's
  multi-threaded sgemm gives other bits than its one-thread sgemm on some CPUs (on an AMD EPYC
  with its Haswell kernels, about 20% of the entries of a (64, 192) @ (192, 256) product differ
  in the last bits; on the Intel machines measured before, none did).

Why BLAS is held at one thread even where a convolution runs serially: after every
multi-threaded GEMM, OpenBLAS's worker threads busy-wait for ~0.1 s (OPENBLAS_THREAD_TIMEOUT)
for the next one, on the cores npmask's threads need. So on NumPy every ``each_chunk`` call holds
BLAS at one thread, also when it runs serially (a single chunk, work under PARALLEL_MIN_FLOPS, or
THREADS = 1), and the convolutions never wake the workers (a large fully connected layer's
product, e.g. VGG's classifier, still uses BLAS's threads, whatever THREADS is). Measured on 2
cores, one process, settings alternating step by step (benchmarks/results/train_step_cpu.txt,
run 11): a masked WRN-28-4 step at 64x64 took 0.771x the time of the previous scheme (copies split
by channel between multi-threaded GEMMs); the small default job (WRN-16-1 at 32x32) was unchanged
(1.002x). BLAS's thread count is set through threadpoolctl (OpenBLAS, MKL, BLIS)
and restored on exit; without it BLAS keeps its threads (same results, slower).

THREADS = 1 (or the environment variable NPMASK_THREADS=1) gives the plain serial code, the
convolutions on one core (their GEMMs on one BLAS thread, as above); CuPy arrays never use
threads (on a GPU each operation is one kernel launch anyway). Work under PARALLEL_MIN_FLOATS (256K floats, 1 MB) or PARALLEL_MIN_FLOPS (64M, ~0.5 ms
on one core) stays on the calling thread: handing work to a thread costs ~20-50 us. Measured on 2
cores, one process, thresholds alternating step by step: 256K floats against 1M (where it was while
BLAS's workers still spun, see above), WRN-28-4 0.952x and 0.969x the step time, the small default
job 0.980x and 0.994x; 128K made the small job 1.09x slower. For GEMM work, a 16M-flop threshold
made the small job 1.13x slower than 64M, and 256M 1.02x, while serial convolutions still used
BLAS's threads; re-measured since they hold BLAS at one thread too (benchmarks/step_ab.py, 40
rounds), 16M, 4M and 1G flops were within the noise of 64M (1.019, 0.996, 0.962).
A part that calls in_parallel/each_chunk again runs that call serially (no nesting).
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

try:
    from threadpoolctl import ThreadpoolController
except ImportError:                                    # a declared dependency; without it BLAS
    ThreadpoolController = None                        # keeps its threads (slower, same results)


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
PARALLEL_MIN_FLOATS = 1 << 18                  # elementwise work, in floats
PARALLEL_MIN_FLOPS = 1 << 26                   # each_chunk: GEMM work (~0.5 ms on one core)
_pool = None                                    # (threads, process id, executor), made lazily
_local = threading.local()                      # .inside: this thread is running a part
_blas = None                                    # the threadpoolctl controller, made lazily


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


def _serial(xp, items: int, small: bool) -> bool:
    """True when the work is done on the calling thread alone."""
    return (xp is not np or THREADS <= 1 or min(THREADS, items) <= 1 or small
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
    futures = [_executor(THREADS).submit(_as_part(p)) for p in parts[1:]]
    try:
        _as_part(parts[0])()
    finally:
        wait(futures)                   # also after an error: no part may still be writing
    for future in futures:
        future.result()                 # re-raises a helper thread's exception here


def blas_threads_limited_to_one():
    """Context manager: BLAS runs each matrix product on the calling thread only, until exit.

    The controller is made once, and knows the BLAS libraries loaded at that moment (NumPy's); one
    loaded later (say, by another package) keeps its threads: slower, same results.
    """
    global _blas
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def in_parallel(xp, items: int, floats: int, fn) -> None:
    """Call ``fn(lo, hi)`` on contiguous parts of ``range(items)`` that together cover it.

    ``fn`` must write only to slices selected by [lo, hi), so the parts may run at the same time.
    They do on NumPy, when ``floats`` (the size of the work) is at least PARALLEL_MIN_FLOATS and
    THREADS > 1; otherwise this is just ``fn(0, items)``. Call it from one thread at a time (the
    training loop's).
    """
    if _serial(xp, items, floats < PARALLEL_MIN_FLOATS):
        fn(0, items)
        return
    parts = min(THREADS, items)
    bounds = [items * i // parts for i in range(parts + 1)]
    _run([lambda lo=lo, hi=hi: fn(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])])


def each_chunk(xp, count: int, setup, fn, *, flops: float = 0.0, floats: float = 0.0) -> None:
    """Call ``fn(state, i)`` for every i in ``range(count)``; each thread has ``state = setup()``.

    On NumPy, BLAS runs on one thread for the duration (so that its workers are never woken and
    a chunk's GEMMs give the same bits whatever THREADS is, see the module docstring), and with
    THREADS > 1, at least two chunks and enough work (GEMM
    ``flops`` at least PARALLEL_MIN_FLOPS, or elementwise work on ``floats`` at least
    PARALLEL_MIN_FLOATS), THREADS threads take the chunks in order, each the next one as it becomes
    free (uneven chunks still keep every core busy). ``fn`` must write only what belongs to chunk
    i; ``setup`` makes a thread's private buffers. Otherwise: ``state = setup()`` and the loop, here.
    """
    owner = xp is np and not getattr(_local, "inside", False)
    with blas_threads_limited_to_one() if owner else contextlib.nullcontext():
        if _serial(xp, count, flops < PARALLEL_MIN_FLOPS and floats < PARALLEL_MIN_FLOATS):
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
        _run([worker] * min(THREADS, count))


# ---------------------------------------------------------------------------------- helpers
def add_into(xp, out, other) -> None:
    """``out += other`` (same shape), split over the threads along the first axis.

    Every element is one addition, as in the serial ``+=``: the same bits. In place, because a new
    array costs more than the addition: on 2 cores, for WRN-28-4's (32, 64, 32, 32) residual sums,
    ``a + b`` took 0.92 ms and this 0.39 ms (benchmarks/results/train_step_cpu.txt, run 35).
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
    if a.ndim > 1 and a.shape[0] < 4 * THREADS:
        in_parallel(xp, a.shape[1], a.size, lambda lo, hi: np.copyto(out[:, lo:hi], a[:, lo:hi]))
    else:
        in_parallel(xp, a.shape[0], a.size, lambda lo, hi: np.copyto(out[lo:hi], a[lo:hi]))
    return out
