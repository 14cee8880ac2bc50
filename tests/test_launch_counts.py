"""npmask's CuPy path on the CPU, every launch counted (tests/cupy_counting.py).

Without a GPU the CuPy path's host code never ran whole: the fused kernels' C runs in other tests,
but the branches taken only for CuPy arrays (``xp is not np``: the column layouts for CuPy, no
threads, batch norm's view of the channel vectors) did not. Here they run with a stand-in for CuPy
that counts what each operation would launch. The tests: the counting rules themselves; a CuPy
training step trains as the NumPy one (float32 rounding); it copies nothing to the device and reads
back only what the loss needs; every step after the first launches the same operations in the same
order (a CUDA graph replays one recorded sequence); and the fused paths are the ones taken.
"""
from __future__ import annotations

import ast
from pathlib import Path

import cuda_on_cpu
import numpy as np
import pytest
from cupy_counting import FACTORIES, counting_cupy
from test_conv_cuda import masked_wrn_training

import npmask
from npmask import config
from npmask.backend import get_backend, to_numpy

pytestmark = pytest.mark.skipif(not cuda_on_cpu.available(), reason=str(cuda_on_cpu.skip_reason()))


# ------------------------------------------------------------------------------------ the rules
def _count(fn):
    """Events of fn(cp, a, b) with a (4, 6), b (6, 5) float32 device arrays made beforehand."""
    with counting_cupy() as log:
        cp = get_backend("cupy")
        a = cp.asarray(np.arange(24, dtype=np.float32).reshape(4, 6))
        b = cp.asarray(np.ones((6, 5), np.float32))
        with log.recording():
            fn(cp, a, b)
        return [(e.kind, e.name) for e in log.events]


@pytest.mark.parametrize("fn, events", [
    (lambda cp, a, b: a + b[:4, :1], [("kernel", "add")]),
    (lambda cp, a, b: cp.exp(a, out=a), [("kernel", "exp")]),
    (lambda cp, a, b: a.reshape(6, 4), []),                                   # a view
    (lambda cp, a, b: a.T.reshape(-1), [("copy", "reshape")]),
    (lambda cp, a, b: cp.ascontiguousarray(a.T), [("copy", "ascontiguousarray")]),
    (lambda cp, a, b: cp.ascontiguousarray(a), []),
    (lambda cp, a, b: a.sum(axis=0), [("reduction", "add.reduce")]),
    (lambda cp, a, b: a.mean(), [("reduction", "mean")]),
    (lambda cp, a, b: a @ b, [("gemm", "matmul")]),
    (lambda cp, a, b: a.T.T @ b, [("gemm", "matmul")]),
    (lambda cp, a, b: a[:, ::2] @ b[:3], [("copy", "copy for cuBLAS"), ("gemm", "matmul")]),
    (lambda cp, a, b: a[:, :3] @ b[::2], [("copy", "copy for cuBLAS")] * 2 + [("gemm", "matmul")]),
    (lambda cp, a, b: a[:2] @ b.T.T, [("gemm", "matmul")]),
    (lambda cp, a, b: cp.zeros((3, 3)), [("memset", "zeros")]),
    (lambda cp, a, b: cp.empty((3, 3)), []),
    (lambda cp, a, b: cp.zeros_like(a), [("memset", "zeros_like")]),
    (lambda cp, a, b: a.fill(0), [("memset", "fill")]),
    (lambda cp, a, b: a[:, :2].fill(0), [("kernel", "fill")]),               # not contiguous
    (lambda cp, a, b: a.__setitem__((slice(None), slice(0, 5)), b[:4]), [("copy", "setitem")]),
    (lambda cp, a, b: a.__setitem__(Ellipsis, 0), [("memset", "fill")]),
    (lambda cp, a, b: a.__setitem__((slice(None), slice(0, 2)), 1.0), [("kernel", "fill")]),
    (lambda cp, a, b: a.__setitem__(slice(0, 2), a[:2].__iadd__(1)), [("kernel", "add")]),  # a[:2] += 1
    (lambda cp, a, b: a.astype(np.float64), [("copy", "astype")]),
    (lambda cp, a, b: a.astype(np.float32, copy=False), []),
    (lambda cp, a, b: float(a.sum()), [("reduction", "add.reduce"), ("to_host", "float")]),
    (lambda cp, a, b: cp.asnumpy(a), [("to_host", "get")]),
    (lambda cp, a, b: cp.asarray(np.ones(3)), [("to_device", "asarray")]),
    (lambda cp, a, b: cp.asarray(a), []),
    (lambda cp, a, b: a[cp.arange(2)], [("kernel", "arange"), ("kernel", "take")]),
    (lambda cp, a, b: cp.concatenate([a, a]), [("copy", "concatenate")] * 2),
    (lambda cp, a, b: cp.concatenate([a] * 9), [("to_device", "concatenate's table of arrays"),
                                                ("kernel", "concatenate")]),
    (lambda cp, a, b: a[cp.arange(2), cp.arange(2)], [("kernel", "arange")] * 2 + [
        ("memset", "index"), ("kernel", "index"), ("kernel", "index"), ("kernel", "take")]),
    (lambda cp, a, b: a[np.arange(2)], [("to_device", "index array"), ("kernel", "take")]),
    (lambda cp, a, b: a.reshape(1, 4, 6) @ b.T.T, [("gemm", "matmul")]),
    (lambda cp, a, b: a.reshape(1, 4, 6) @ cp.ascontiguousarray(b.T).T,
     [("copy", "ascontiguousarray"), ("copy", "copy for cuBLAS"), ("gemm", "matmul")]),
    (lambda cp, a, b: a[:0].copy(), []),
    (lambda cp, a, b: a + cp.empty((0, 6), np.float32)[:0].sum(axis=0), [("reduction", "add.reduce"),
                                                                           ("kernel", "add")]),
])
def test_what_an_operation_counts(fn, events):
    assert _count(fn) == events


def test_a_host_array_where_cupy_takes_device_arrays_is_refused_as_cupy_does():
    for fn in (lambda cp, a, b: a + np.ones(6, np.float32), lambda cp, a, b: np.ones((5, 4)) @ a,
               lambda cp, a, b: cp.concatenate([a, np.ones((1, 6))]),
               lambda cp, a, b: a.__setitem__(0, np.ones(6)),
               lambda cp, a, b: cp.exp(np.ones(3)), lambda cp, a, b: cp.add(a, a, out=np.empty((4, 6))),
               lambda cp, a, b: cp.zeros_like(np.ones(3)), lambda cp, a, b: cp.where(a > 0, a, np.ones(6))):
        with pytest.raises(TypeError, match="NumPy array where CuPy takes device arrays"):
            _count(fn)
    assert _count(lambda cp, a, b: a * np.float32(2)) == [("kernel", "multiply")]     # a scalar is


def test_results_are_device_arrays_and_numbers_are_numpys():
    with counting_cupy() as log:
        cp = get_backend("cupy")
        a = cp.asarray(np.arange(6.0).reshape(2, 3))
        for r in (a + 1, a.sum(), a.sum(axis=1), a.T, cp.exp(a), a.astype(np.float32), cp.zeros(2)):
            assert isinstance(r, cp.ndarray)
        assert type(a.sum()) is cp.ndarray and a.sum().ndim == 0     # CuPy's reductions give arrays
        m = np.arange(6.0).reshape(2, 3)
        np.testing.assert_array_equal(to_numpy(a @ a.T), m @ m.T)
        assert not log.events                                      # nothing recorded outside recording()
    from npmask import backend
    from npmask.masking import cuda as masking_cuda
    assert backend._cupy is None or not isinstance(backend._cupy, type(cp))   # put back
    assert masking_cuda.kernels.cache_info().currsize == 0     # the stand-in's kernels dropped


def test_launches_are_told_by_the_npmask_function_they_come_from():
    from npmask.nn import ReLU
    with counting_cupy() as log:
        cp = get_backend("cupy")
        x = cp.asarray(np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4))
        with log.recording():
            ReLU().forward(x)
            x + 1
    assert [(e.kind, e.name, e.where) for e in log.events] == [
        ("kernel", "greater", "nn/activation.py:rows"), ("kernel", "maximum", "nn/activation.py:rows"),
        ("kernel", "add", "outside npmask")]


def test_every_kernel_factory_of_npmask_is_rebuilt_with_the_stand_in():
    """A module that builds kernels with ``_import_cupy()`` but is missing from FACTORIES would run
    CuPy's own kernel classes on the stand-in's arrays."""
    root = Path(npmask.__file__).parent
    calling = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(n, ast.Call) and getattr(n.func, "id", None) == "_import_cupy"
                    for n in ast.walk(node)):
                module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
                calling.add((module, node.name))
    calling -= {("npmask.backend", "get_backend"), ("npmask.backend", "seed")}
    assert calling == set(FACTORIES)


# ------------------------------------------------------------------------------------ training
def _on_cupy(variant, sizes=(8, 8, 8), **settings):
    """(losses, each step's events, final state, model, optimiser) of training steps of a masked
    WRN-16-1 (test_conv_cuda's) on the counting CuPy, under the npmask ``settings``."""
    from npmask.training.loop import train_step
    events = []
    with config.using(**settings), counting_cupy() as log:
        def recorded(*args):
            log.clear()
            with log.recording():
                out = train_step(*args)
            events.append(list(log.events))
            return out
        losses, state, model, opt = masked_wrn_training(variant, "cupy", sizes, recorded)
    return losses, events, state, model, opt


@pytest.mark.parametrize("variant, settings", [
    ("full", {}), ("full", {"cuda_conv_kernels": True}), ("full", {"fuse_bn_relu": False}),
    ("piggyback", {}), ("finetune", {"cuda_conv_kernels": True}), ("simple", {})])
def test_the_cupy_path_trains_as_the_numpy_path(variant, settings):
    """Every CuPy-only branch, the fused kernels' C included: the same training to float32
    rounding (the NumPy path takes other column layouts and threads, which round differently).
    As on a GPU (tests/test_gpu.py), Adam turns the rounding of a near-zero gradient into up to
    a whole step (lr = 1e-3) on the rare weight: at most 0.5% of an array's values are further
    off, and none by more than 5e-3. Two steps (the second on a smaller batch): from the third, a
    mask bit that rounding put on the other side of the threshold changes everything after it."""
    with config.using(**settings):
        want_losses, want, *_ = masked_wrn_training(variant, "numpy", sizes=(8, 5))
    got_losses, events, got, *_ = _on_cupy(variant, sizes=(8, 5), **settings)
    assert len(events) == 2 and all(any(e.kind == "fused" for e in step) for step in events)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    for name in want:
        off = ~np.isclose(got[name], want[name], rtol=1e-4, atol=1e-5)
        assert off.sum() <= max(1, 0.005 * off.size), f"{name}: {off.sum()} of {off.size} values differ"
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=5e-3, err_msg=name)


@pytest.mark.parametrize("variant", ["full", "piggyback"])
def test_a_step_copies_nothing_to_the_device_and_reads_back_only_for_the_loss(variant):
    """The batch is on the device before the step; inside it the host reads the labels' range
    (softmax_cross_entropy's check) and the loss, nothing else: a read elsewhere would make the
    host wait for the GPU in the middle of the step. Nothing is copied to the device after the
    first step (which makes Adam's table of parameter addresses, and may make the mask
    transform's small index array, once per process)."""
    _, events, *_ = _on_cupy(variant, cuda_conv_kernels=True)
    first = [e.where for e in events[0] if e.kind == "to_device"]
    assert set(first) <= {"masking/cuda.py:_rows",       # made once in a process, then kept
                          "optim/cuda.py:_table"}        # Adam's addresses, once per optimiser
    for step in events:
        assert step is events[0] or not [e for e in step if e.kind == "to_device"]
        host = [(e.name, e.where) for e in step if e.kind == "to_host"]
        assert host == [("int", "nn/loss.py:_check"), ("int", "nn/loss.py:_check"),
                        ("float", "nn/loss.py:softmax_cross_entropy")]


@pytest.mark.parametrize("variant, settings", [("full", {"cuda_conv_kernels": True}),
                                               ("full", {}), ("piggyback", {})])
def test_every_step_after_the_first_launches_the_same_sequence(variant, settings):
    """A CUDA graph records one step's launches and replays them: the step must launch the same
    operations in the same order every time (the first step also allocates the optimiser's state)."""
    _, events, *_ = _on_cupy(variant, **settings)
    assert events[1] == events[2]
    assert len(events[0]) > len(events[1])


def test_the_fused_kernels_are_what_the_cupy_path_takes():
    """Counted per step of a masked WRN-16-1 (`full`): one transform forward per masked
    convolution, one Adam kernel for all the arrays Adam trains, one memset per optimiser's gradients, batch norm's fused forward and backward
    for every batch norm (a shortcut's too, with no ReLU), and with cuda_conv_kernels one im2col kernel per convolution's forward
    (and fewer launches than without)."""
    _, events, _, model, opt = _on_cupy("full", cuda_conv_kernels=True)
    net = model.network()
    layers = [m for _, m in net.named_modules()]
    masked = [m for m in layers if type(m).__name__ == "MaskedConv2d"]
    convs = [m for m in layers if "Conv2d" in type(m).__name__]
    norms = [m for m in layers if type(m).__name__ == "BatchNorm2d"]   # with a ReLU or not
    step = events[2]
    names = [e.name for e in step if e.kind == "fused"]
    assert masked and names.count("npmask_mask_transform_forward") == len(masked)
    assert names.count("npmask_adam_update_all") == 1 and "npmask_adam_update" not in names
    zeroing = [(e.kind, e.name) for e in step if e.where.startswith("optim/grads.py")]
    assert zeroing == [("memset", "fill")] * 2              # one per optimiser (body, head)
    assert len(norms) and sum(names.count(k) for k in ("npmask_bn_forward", "npmask_bn_forward_residual")) \
        == len(norms)
    assert sum(names.count(k) for k in ("npmask_bn_backward", "npmask_bn_backward_d")) == len(norms)
    assert names.count("npmask_conv_im2col") >= len(convs)
    without = _on_cupy("full")[1][2]
    assert "npmask_conv_im2col" not in [e.name for e in without]
    assert len([e for e in step if e.kind != "to_host"]) < len([e for e in without if e.kind != "to_host"])
