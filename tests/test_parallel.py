"""npmask's thread pool (npmask/nn/parallel.py) and the settings object that steers it (npmask/config.py)."""
import contextlib
import threading

import numpy as np
import pytest

from npmask import config
from npmask.nn import parallel


@pytest.fixture
def use():
    """``use(name=value, ...)``: npmask settings (npmask.config.using) until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(config.using(**overrides))


# ------------------------------------------------------------------ the settings object
def test_using_sets_and_restores_also_after_an_error():
    before = config.settings.as_dict()
    with config.using(threads=3, conv_chunk_floats=7, folded_rows=False) as s:
        assert s is config.settings
        assert (s.threads, s.conv_chunk_floats, s.folded_rows) == (3, 7, False)
        with config.using(threads=1):                            # nested: restores in turn
            assert config.settings.threads == 1
        assert config.settings.threads == 3
    assert config.settings.as_dict() == before
    with pytest.raises(RuntimeError, match="inside"):
        with config.using(threads=2, conv_impl="readable"):
            raise RuntimeError("inside")
    assert config.settings.as_dict() == before


@pytest.mark.parametrize("overrides, error, message", [
    (dict(thread=2), AttributeError, "no setting 'thread'"),
    (dict(threads=0), ValueError, "threads must be a positive integer"),
    (dict(threads=2.0), ValueError, "threads must be a positive integer"),
    (dict(threads=True), ValueError, "threads must be a positive integer"),  # bool is an int subclass
    (dict(parallel_min_floats=False), ValueError, "non-negative integer"),
    (dict(parallel_min_floats=-1), ValueError, "non-negative integer"),
    (dict(folded_rows=1), TypeError, "True or False"),
    (dict(conv_impl="slow"), ValueError, "one of"),
])
def test_using_rejects_unknown_names_and_bad_values_before_changing_anything(overrides, error, message):
    before = config.settings.as_dict()
    with pytest.raises(error, match=message):
        with config.using(shifted_rows=False, **overrides):
            pass
    assert config.settings.as_dict() == before
    with pytest.raises(error, match=message):
        for name, value in overrides.items():
            setattr(config.settings, name, value)               # plain assignment is checked too
    assert config.settings.as_dict() == before


def test_defaults_that_are_decisions():
    """cuda_conv_kernels stays off until it has run on a GPU; the fused step and the fast
    convolution are the defaults the documentation describes."""
    fresh = config.Settings()
    assert fresh.cuda_conv_kernels is False
    assert fresh.fuse_bn_relu is True and fresh.conv_impl == "fast"


def test_every_setting_is_documented():
    text = config.Settings.describe()
    for name in config.settings.as_dict():
        assert f"{name}: " in text


# ------------------------------------------------------------------ in_parallel
@pytest.mark.parametrize("items, threads", [(7, 3), (2, 4), (1, 2), (10, 1)])
def test_in_parallel_covers_the_range_in_disjoint_parts(items, threads, use):
    use(threads=threads)
    parts = []
    parallel.in_parallel(np, items, 1 << 30, lambda lo, hi: parts.append((lo, hi)))
    assert len(parts) == min(threads, items)
    assert sorted(i for lo, hi in parts for i in range(lo, hi)) == list(range(items))


def test_in_parallel_stays_serial_off_numpy_small_or_one_thread(use):
    use(threads=4)
    calls = []

    def record(lo, hi):
        calls.append((lo, hi))
    parallel.in_parallel(object(), 8, 1 << 30, record)       # not NumPy (e.g. CuPy): serial
    parallel.in_parallel(np, 8, config.settings.parallel_min_floats - 1, record)  # small copy
    use(threads=1)
    parallel.in_parallel(np, 8, 1 << 30, record)
    assert calls == [(0, 8)] * 3


def test_npmask_threads_must_be_a_positive_integer(monkeypatch):
    for bad in ("abc", "0", "-2", "1.5"):
        monkeypatch.setenv("NPMASK_THREADS", bad)
        with pytest.raises(ValueError, match="NPMASK_THREADS must be a positive integer"):
            config.default_threads()
    monkeypatch.setenv("NPMASK_THREADS", "3")
    assert config.default_threads() == 3
    assert config.Settings().threads == 3                        # a fresh settings object reads it


def test_default_threads_is_the_usable_cpus_at_most_four(monkeypatch):
    """An empty NPMASK_THREADS counts as unset; the CPUs this process may use, at most 4; where
    there is no sched_getaffinity (not Linux), os.cpu_count(), 1 when that is unknown."""
    monkeypatch.setenv("NPMASK_THREADS", "")
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert config.default_threads() == 4
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert config.default_threads() == 3
    monkeypatch.delattr(config.os, "sched_getaffinity")
    monkeypatch.setattr(config.os, "cpu_count", lambda: 2)
    assert config.default_threads() == 2
    monkeypatch.setattr(config.os, "cpu_count", lambda: None)
    assert config.default_threads() == 1


def test_npmask_threads_is_read_at_first_use_not_when_the_settings_are_made(monkeypatch):
    """A bad value reaches the user when the thread count is first needed, as the commands'
    one-line error, not as a traceback from importing npmask."""
    monkeypatch.setenv("NPMASK_THREADS", "abc")
    fresh = config.Settings()
    with pytest.raises(ValueError, match="NPMASK_THREADS must be a positive integer"):
        fresh.threads


def test_in_parallel_runs_its_parts_at_the_same_time_after_the_thread_count_changed(use):
    """Every part on a thread of its own, all running at once, also after settings.threads grew (a
    pool kept from a smaller count would run them one after another: the barrier would break)."""
    for threads in (2, 6, 3):
        use(threads=threads)
        barrier = threading.Barrier(threads, timeout=30)
        seen = []
        parallel.in_parallel(np, threads, 1 << 30,
                             lambda lo, hi: seen.append(threading.get_ident()) or barrier.wait())
        assert len(set(seen)) == threads


def test_a_new_thread_count_shuts_the_old_pool_down(use):
    """The old pool's idle threads exit rather than pile up with every change of the count."""
    use(threads=2)
    old = parallel._executor(2)
    use(threads=3)
    assert parallel._executor(3) is not old
    with pytest.raises(RuntimeError, match="shutdown"):
        old.submit(lambda: None)


def test_in_parallel_waits_for_every_part_also_when_the_callers_part_fails(use, monkeypatch):
    """The caller's own part raising must not return while a helper part may still be writing."""
    use(threads=3)
    waited, real_wait = [], parallel.wait

    def recorded_wait(futures, *args, **kwargs):
        result = real_wait(futures, *args, **kwargs)
        waited.append((len(futures), all(f.done() for f in futures)))
        return result
    monkeypatch.setattr(parallel, "wait", recorded_wait)

    def fn(lo, hi):
        if lo == 0:
            raise RuntimeError("the caller's part failed")
    with pytest.raises(RuntimeError, match="the caller's part failed"):
        parallel.in_parallel(np, 3, 1 << 30, fn)
    assert waited == [(2, True)]


def test_in_parallel_reraises_a_helper_threads_error_after_all_parts_ended(use):
    use(threads=2)
    done = []

    def fn(lo, hi):
        if lo > 0:
            raise RuntimeError("boom")
        done.append(lo)
    with pytest.raises(RuntimeError, match="boom"):
        parallel.in_parallel(np, 4, 1 << 30, fn)
    assert done == [0]


def test_thread_pool_is_recreated_in_a_forked_child(monkeypatch, use):
    use(threads=2)
    pool = parallel._executor(2)
    assert parallel._executor(2) is pool                      # persistent
    monkeypatch.setattr(parallel.os, "getpid", lambda: -1)    # as seen from a child process
    child_pool = parallel._executor(2)
    assert child_pool is not pool
    child_pool.shutdown(wait=True)       # made under a fake pid: the next call makes a new pool


# ------------------------------------------------------------------ each_chunk
@pytest.fixture
def three_threads(use):
    use(threads=3)
    use(parallel_min_flops=0)


@pytest.mark.parametrize("count", [1, 2, 7, 40])
def test_each_chunk_does_every_chunk_once_with_one_state_per_thread(count, three_threads):
    done, states = [], []

    def setup():
        state = {"thread": threading.get_ident(), "chunks": []}
        states.append(state)
        return state

    def fn(state, i):
        assert state["thread"] == threading.get_ident()          # a thread's own buffers
        state["chunks"].append(i)
        done.append(i)
    parallel.each_chunk(np, count, setup, fn, flops=1 << 40)
    assert sorted(done) == list(range(count))
    assert len(states) == min(3, count)                          # one worker per thread
    for s in states:
        assert s["chunks"] == sorted(s["chunks"])                # each thread takes them in order


def test_each_chunk_is_serial_off_numpy_small_or_one_thread(use):
    use(threads=4)
    me = threading.get_ident()
    small = dict(flops=config.settings.parallel_min_flops - 1, floats=config.settings.parallel_min_floats - 1)
    for xp, work in ((object(), dict(flops=1 << 40)), (np, small)):
        seen = []
        parallel.each_chunk(xp, 5, lambda: [], lambda state, i: seen.append((threading.get_ident(), i)),
                            **work)
        assert seen == [(me, i) for i in range(5)]
    for work in (dict(flops=config.settings.parallel_min_flops), dict(floats=config.settings.parallel_min_floats)):
        workers, seen = [], []
        parallel.each_chunk(np, 5, lambda: workers.append(1), lambda state, i: seen.append(i), **work)
        assert sorted(seen) == list(range(5)) and len(workers) == 4  # either kind of work: threads
    use(threads=1)
    seen = []
    parallel.each_chunk(np, 5, lambda: None, lambda state, i: seen.append(threading.get_ident()),
                        flops=1 << 40)
    assert seen == [me] * 5


def test_work_inside_a_chunk_does_not_nest_threads(three_threads, use):
    use(parallel_min_floats=0)
    inner = []
    parallel.each_chunk(np, 6, lambda: None,
                        lambda state, i: parallel.in_parallel(np, 9, 1 << 40,
                                                              lambda lo, hi: inner.append((lo, hi))),
                        flops=1 << 40)
    assert inner == [(0, 9)] * 6                                 # each inner call ran whole, in its part
    outer = []
    parallel.in_parallel(np, 9, 1 << 40, lambda lo, hi: outer.append((lo, hi)))
    assert len(outer) == 3                                       # and the flag does not outlive the region


def test_a_single_chunk_is_no_parallel_region(three_threads, use):
    """One chunk runs on the calling thread as the plain loop: work inside it still uses the threads
    (only a part of a parallel region runs its inner calls serially)."""
    use(parallel_min_floats=0)
    inner = []
    parallel.each_chunk(np, 1, lambda: None,
                        lambda state, i: parallel.in_parallel(np, 9, 1 << 40,
                                                              lambda lo, hi: inner.append((lo, hi))),
                        flops=1 << 40)
    assert sorted(inner) == [(0, 3), (3, 6), (6, 9)]


def test_each_chunk_reraises_an_error_after_every_thread_stopped(three_threads):
    running = []

    def fn(state, i):
        running.append(i)
        if i == 3:
            raise RuntimeError("chunk 3 failed")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]
    with pytest.raises(RuntimeError, match="chunk 3 failed"):
        parallel.each_chunk(np, 8, lambda: None, fn, flops=1 << 40)
    assert 3 in running
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info()] == before  # BLAS restored
    assert not getattr(parallel._local, "inside", False)         # and this thread is no part
    outer = []
    parallel.in_parallel(np, 6, 1 << 40, lambda lo, hi: outer.append(lo))
    assert len(outer) == 3                                       # threads work after the error


@pytest.mark.parametrize("threads", [1, 3])
def test_each_chunk_runs_blas_on_one_thread_and_restores_it(threads, use):
    """Also with threads=1: a chunk's GEMMs run on one BLAS thread whatever the thread count."""
    use(threads=threads)
    use(parallel_min_flops=0)
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    before = blas_threads()
    if not before:
        pytest.skip("threadpoolctl sees no BLAS library in this process")
    inside = []
    parallel.each_chunk(np, 4, lambda: None, lambda state, i: inside.append(blas_threads()), flops=1 << 40)
    assert inside == [[1] * len(before)] * 4
    assert blas_threads() == before


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_contiguous_is_a_plain_copy(threads, use):
    """parallel.contiguous, a strided view copied with its first or second axis split over threads:
    the view's numbers in a C-contiguous array of its shape."""
    use(threads=threads)
    use(parallel_min_floats=0)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)
    views = [w.transpose(2, 0, 1, 3),                           # first axis short: split on the second
             w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1],
             w.reshape(3, 5, 3, 7).transpose(3, 1, 0, 2), w[:, 0, 0, 0], w[:0], w[0, 0, 0, 0]]
    for v in views:
        c = parallel.contiguous(np, v)
        assert c.flags.c_contiguous and c.dtype == v.dtype and c.shape == v.shape
        np.testing.assert_array_equal(c, v)


@pytest.mark.parametrize("threads", [1, 3])
def test_each_chunk_restores_a_blas_thread_count_above_one(threads, use):
    """BLAS at 2 threads before (the test session may start it at 1): one thread inside every chunk,
    2 again after, also after a chunk's error."""
    use(threads=threads)
    use(parallel_min_flops=0)
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    if not blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library in this process")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert set(before) == {2}
        inside = []
        parallel.each_chunk(np, 4, lambda: None, lambda state, i: inside.append(blas_threads()), flops=1 << 40)
        assert inside == [[1] * len(before)] * 4
        assert blas_threads() == before

        def fail(state, i):
            raise RuntimeError("chunk failed")
        with pytest.raises(RuntimeError, match="chunk failed"):
            parallel.each_chunk(np, 4, lambda: None, fail, flops=1 << 40)
        assert blas_threads() == before
