"""The captured training step (npmask.training.graph_step) and the optimisers' device scalars, on NumPy.

There is no CUDA graph on NumPy: GraphStep's emulation records each half at "capture" and runs it
again at every "replay", copying its outputs into the recorded ones and undoing the host step
counts a replay would not advance. So these tests check the graph step's own logic (static
buffers, device-side lr and bias corrections, the loss read between the halves, lazy capture per
batch shape, host step counts) bit for bit against the plain train_step loop, and that nothing in
the captured halves reads a value back to the host. The CuPy captures are tested in
tests/test_gpu_graph_step.py, on a GPU.
"""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest

from npmask import models, nn
from npmask.backend import to_numpy
from npmask.multidomain import MultiDomainModel
from npmask.nn.loss import softmax_cross_entropy
from npmask.optim import SGD, Adam, MultiStepLR, Optimizers
from npmask.optim import device
from npmask.training import cuda_gemm, graph_step
from npmask.training.graph_step import GraphStep, GraphStepError
from npmask.training.loop import evaluate, train_epoch, train_step


def _model(variant="full", net="wrn16_1"):
    backbone = models.create(net, num_classes=5, input_size=16, seed=0)
    model = MultiDomainModel(backbone)
    model.add_domain("d", num_classes=4, variant=variant, seed=1, mask_init=(-1e-4, 2e-4))
    model.set_domain("d").train()
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=1e-3, weight_decay=1e-4),
                     head=SGD(groups["head"], lr=1e-2, momentum=0.9, weight_decay=5e-4))
    return model, opt, MultiStepLR(opt, milestones=[1], gamma=0.1)


def _epochs(n_epochs=2, sizes=(8, 8, 5), seed=0):
    """Batches of two shapes: full ones and the epoch's last, partial one."""
    rng = np.random.default_rng(seed)
    return [[(rng.standard_normal((n, 3, 16, 16)).astype(np.float32), rng.integers(0, 4, n))
             for n in sizes] for _ in range(n_epochs)]


def _state(model, opt) -> dict:
    """Parameters, BN running statistics, and the optimisers' state (moments, buffers, step counts),
    as NumPy copies (from either backend)."""
    return {**{k: np.array(to_numpy(v)) for k, v in model.network().state_dict().items()},
            **{"opt/" + k: v for k, v in opt.state_dict().items()}}


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def _train(kind, variant="full", epochs=None, make_model=None):
    """(per-step (loss, correct), final state, the GraphStep or None) for kind plain/graph/uncaptured;
    ``make_model(variant) -> (model, optimiser, scheduler)`` (default :func:`_model`)."""
    model, opt, sched = (make_model or _model)(variant)
    step = None if kind == "plain" else GraphStep(model, opt, capture=(kind == "graph"))
    out = []
    for batches in epochs or _epochs():
        for x, y in batches:
            if step is None:
                loss, logits = train_step(model, opt, x, y)
                out.append((loss, int((logits.argmax(axis=1) == y).sum())))
            else:
                out.append(step(x, y))
        sched.step()                         # lr x0.1 after the first epoch: read from device memory
    return out, _state(model, opt), step


@pytest.mark.parametrize("variant", ["full", "piggyback"])
def test_graph_step_trains_bit_for_bit_as_train_step(variant):
    plain, plain_state, _ = _train("plain", variant)
    for kind in ("graph", "uncaptured"):
        steps, state, step = _train(kind, variant)
        assert steps == plain, kind                      # losses (floats) and correct counts
        _assert_same_state(state, plain_state)           # incl. Adam's host step counts
    assert step.steps == {"eager": 6, "captured": 0, "replayed": 0}
    assert _train("graph", variant)[2].steps == {"eager": 2, "captured": 2, "replayed": 2}


def test_train_epoch_returns_the_same_numbers_through_the_graph_step():
    epoch = _epochs(1, sizes=(8, 8, 8, 5))[0]
    results = []
    for use_graphs in (False, True):
        model, opt, _ = _model()
        stepper = GraphStep(model, opt) if use_graphs else None
        stats = train_epoch(model, epoch, opt, progress=False, stepper=stepper)
        stats.pop("train_seconds")
        results.append((stats, _state(model, opt)))
    assert results[0][0] == results[1][0]
    _assert_same_state(results[0][1], results[1][1])


def _random_steps(opt, refs, steps, rng, change_lr_at=None):
    for i in range(steps):
        if i == change_lr_at:
            for o in opt.groups.values():
                o.lr *= 0.3
        for r in refs:
            r.grad[...] = rng.standard_normal(r.grad.shape).astype(r.grad.dtype)
        if opt["a"].device is not None:
            device.sync(opt)
        opt.step()


@pytest.mark.parametrize("size", [3, 5000])             # Adam's grouped update and the one by one
def test_device_scalars_give_the_plain_optimisers_bits(size):
    """lr and Adam's bias corrections read from 0-d arrays: the same bits as the Python floats,
    also with an lr changed mid-run and parameters at different step counts (two groups)."""
    results = []
    for on_device in (False, True):
        layers = [nn.Linear(size, 2, rng=i) for i in range(3)]
        named = [r._replace(name=f"{i}.{r.name}") for i, m in enumerate(layers)
                 for r in m.parameter_refs()]
        opt = Optimizers(a=Adam(named[:4], lr=1e-3, weight_decay=1e-2),
                         b=SGD(named[4:], lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3))
        opt["a"].state[named[0].name] = {"step": 5, "exp_avg": np.full_like(named[0].data, 0.1),
                                         "exp_avg_sq": np.full_like(named[0].data, 0.2)}
        if on_device:
            device.attach(opt, named[0].data)
        _random_steps(opt, named, 6, np.random.default_rng(0), change_lr_at=3)
        results.append(({r.name: r.data.copy() for r in named}, opt.state_dict()))
    (p0, s0), (p1, s1) = results
    for k in p0:
        assert np.array_equal(p0[k], p1[k]), k
    _assert_same_state(s0, s1)
    assert s1["a/state.0.weight.step"] == 11 and s1["a/state.0.bias.step"] == 6


def test_device_scalars_are_0d_under_cupys_zeros_like(monkeypatch):
    """CuPy's zeros_like (14.2, cupy/_creation/basic.py: ``shape = shape if shape else a.shape``)
    takes shape=() for "no shape" and returns an array of the parameter's shape; the device
    scalars must be 0-d there too (an lr of a weight's shape cannot multiply another gradient)."""
    class CupyLike:                                   # NumPy with CuPy's reading of shape
        @staticmethod
        def zeros_like(a, dtype=None, order="K", subok=None, shape=None):
            return np.zeros_like(a, dtype=dtype, order=order, shape=shape if shape else a.shape)
    monkeypatch.setattr(device, "get_array_module", lambda *arrays: CupyLike)
    scalars = device.DeviceScalars(np.ones((4, 3), dtype=np.float32))
    assert scalars.lr.shape == () and scalars.lr.dtype == np.float32
    pair = scalars._zero(), scalars._zero()
    assert [a.shape for a in pair] == [(), ()]


def test_device_scalars_follow_step_counts_that_part_when_a_parameter_is_frozen():
    """A parameter frozen for a step (no gradient) is not stepped, so its step count falls behind
    the others': each group of equal counts is given its own (step size, bias2) pair, sync's
    versions change exactly then (a graph captured before reads arrays no longer written), the
    updates keep the plain optimiser's bits, and a replay advances only the stepped counts."""
    results = []
    for on_device in (False, True):
        lin = nn.Linear(3, 2, rng=0)
        refs = lin.parameter_refs()
        opt = Optimizers(a=Adam(refs, lr=1e-2))
        if on_device:
            device.attach(opt, refs[0].data)
        rng, versions = np.random.default_rng(0), []
        for i in range(4):
            for r in refs:
                r.grad[...] = rng.standard_normal(r.grad.shape).astype(r.grad.dtype)
            frozen = lin.grads.pop("bias") if i == 1 else None
            if on_device:
                versions.append(device.sync(opt))
            opt.step()
            if frozen is not None:
                lin.grads["bias"] = frozen
        results.append({r.name: r.data.copy() for r in refs})
    for k in results[0]:
        assert np.array_equal(results[0][k], results[1][k]), k
    # one pair for both, then one for the weight alone, then one for the bias alone; then none new
    assert versions[0] < versions[1] < versions[2] == versions[3]
    frozen = lin.grads.pop("bias")
    device.sync(opt)
    assert opt["a"].device.stepped == ("weight",)
    device.count_replayed(opt)                       # a replay of a step with the bias frozen
    assert (opt["a"].state["weight"]["step"], opt["a"].state["bias"]["step"]) == (5, 3)
    lin.grads["bias"] = frozen


def test_device_scalars_are_rounded_once_to_the_parameters_dtype():
    """float64 parameters read the lr and Adam's bias corrections with float64's bits, the Python
    floats of the plain step exactly (not the floats rounded to float32 first)."""
    lin = nn.Linear(3, 2, dtype=np.float64, rng=0)
    opt = Adam(lin.parameter_refs(), lr=0.1, betas=(0.9, 0.999))
    device.attach(opt, lin.params["weight"])
    device.sync(opt)
    step_size, bias2 = opt.device.adam["weight"]
    assert opt.device.lr.dtype == np.float64 and float(opt.device.lr) == 0.1
    assert float(step_size) == 0.1 / (1 - 0.9) and float(bias2) == math.sqrt(1 - 0.999)


def test_attach_keeps_the_scalars_already_attached():
    """A second attach (another GraphStep on the same optimiser) must not replace the arrays that
    graphs captured before read; detach drops them."""
    lin = nn.Linear(3, 2, rng=0)
    opt = Optimizers(a=Adam(lin.parameter_refs(), lr=1e-3))
    device.attach(opt, lin.params["weight"])
    scalars = opt["a"].device
    device.attach(opt, lin.params["weight"])
    assert opt["a"].device is scalars
    device.detach(opt)
    assert opt["a"].device is None


class HostRead(AssertionError):
    pass


class Guarded(np.ndarray):
    """An array that refuses to become a Python number (or list) while ``armed``: a host read."""
    armed = False

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return super().__array_wrap__(arr, context, False)        # 0-d results stay guarded

    def __getitem__(self, index):
        out = super().__getitem__(index)
        return out if isinstance(out, np.ndarray) else np.asarray(out).view(Guarded)


def _refusing(name):
    base = getattr(np.ndarray, name)

    def method(self, *args, **kwargs):
        if Guarded.armed:
            raise HostRead(f"{name} of a device array inside a captured half")
        return base(self, *args, **kwargs)
    return method


for _name in ("__float__", "__int__", "__bool__", "__index__", "__complex__", "item", "tolist"):
    setattr(Guarded, _name, _refusing(_name))


def test_the_guard_refuses_host_reads():
    a = np.arange(4.0, dtype=np.float32).view(Guarded)
    Guarded.armed = True
    try:
        for read in (lambda: float(a.sum()), lambda: int(a[1]), lambda: bool(a[0] < 1),
                     lambda: a.max().item(), lambda: math.isfinite(a.sum()), lambda: a.tolist()):
            with pytest.raises(HostRead):
                read()
    finally:
        Guarded.armed = False


@pytest.mark.parametrize("variant", ["full", "piggyback"])
def test_the_captured_halves_read_nothing_back_to_the_host(variant, monkeypatch):
    """Every array of the model, the optimisers' scalars, the batch, and every array NumPy makes
    inside the halves (np.empty & co. made to return guarded arrays there) refuse conversion to
    Python numbers while a half is captured or replayed; the steps still give plain's numbers."""
    run = graph_step._Emulated._run
    makers = {name: getattr(np, name) for name in ("empty", "zeros", "ones", "full", "empty_like",
                                                    "zeros_like", "ones_like", "concatenate",
                                                    "ascontiguousarray", "array", "stack")}

    def guarding(make):
        return lambda *a, **k: np.asanyarray(make(*a, **k)).view(Guarded)

    def armed(self):
        Guarded.armed = True
        with monkeypatch.context() as m:
            for name, make in makers.items():
                m.setattr(np, name, guarding(make))
            try:
                return run(self)
            finally:
                Guarded.armed = False
    monkeypatch.setattr(graph_step._Emulated, "_run", armed)
    model, opt, sched = _model(variant)
    model.network()._map_arrays(lambda a: a.view(Guarded))
    step = GraphStep(model, opt)                    # its device scalars: Guarded, as the parameters
    out = []
    for batches in _epochs():
        for x, y in batches:
            out.append(step(x.view(Guarded), y.view(Guarded)))
        sched.step()
    assert step.steps == {"eager": 2, "captured": 2, "replayed": 2}
    assert out == _train("plain", variant)[0]


def test_a_state_array_replaced_during_a_capture_is_refused(monkeypatch):
    def rebinding(self, name, p, g, state):                 # SGD that replaces its buffer
        state["momentum_buffer"] = self.momentum * state.get("momentum_buffer", 0) + g
        p -= self.device.lr * state["momentum_buffer"]
    monkeypatch.setattr(SGD, "_update", rebinding)
    model, opt, _ = _model()
    step = GraphStep(model, opt)
    (x, y), = _epochs(1, sizes=(8,))[0]
    step(x, y)                                               # uncaptured: fine
    with pytest.raises(GraphStepError, match=r"backward half replaced .*momentum_buffer"):
        step(x, y)


def test_dropout_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, rng=0), nn.Dropout(0.5, rng=0))
    with pytest.raises(GraphStepError, match="dropout"):
        GraphStep(model, SGD(model.parameters(), lr=0.1))


def test_a_non_finite_loss_stops_before_the_backward_half():
    model, opt, _ = _model()
    step = GraphStep(model, opt)
    (x, y), = _epochs(1, sizes=(8,))[0]
    step(x, y)
    step(x, y)                                               # captured

    def trained():        # (the forward pass moves BN's running statistics, as in train_step)
        return {k: v for k, v in _state(model, opt).items() if "running_" not in k}
    before = trained()
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    loss, _ = step(bad, y)                                   # a replay of the forward half only
    assert math.isnan(loss)
    _assert_same_state(trained(), before)
    assert step.steps == {"eager": 1, "captured": 1, "replayed": 0}


def test_another_hyper_parameter_captures_again_the_lr_does_not():
    model, opt, _ = _model()
    step = GraphStep(model, opt)
    (x, y), = _epochs(1, sizes=(8,))[0]
    for _ in range(3):
        step(x, y)
    opt["head"].lr = 0.5
    step(x, y)
    assert step.steps == {"eager": 1, "captured": 1, "replayed": 2}
    opt["head"].momentum = 0.5
    step(x, y)
    assert step.steps == {"eager": 1, "captured": 2, "replayed": 2}


def test_a_changed_nesterov_captures_again():
    """nesterov is not one of SGD's scalar hyper-parameters, but a graph bakes it in as well."""
    model, opt, _ = _model()
    step = GraphStep(model, opt)
    (x, y), = _epochs(1, sizes=(8,))[0]
    for _ in range(3):
        step(x, y)
    opt["head"].nesterov = True
    step(x, y)
    assert step.steps == {"eager": 1, "captured": 2, "replayed": 1}


def test_shapes_beyond_max_shapes_run_uncaptured():
    model, opt, _ = _model()
    step = GraphStep(model, opt, max_shapes=1)
    for x, y in _epochs(1, sizes=(8, 8, 5, 5, 8))[0]:
        step(x, y)
    assert step.steps == {"eager": 3, "captured": 1, "replayed": 1} and len(step.shapes) == 1


def test_train_step_with_a_non_finite_loss_changes_no_parameter_and_no_optimiser_state():
    """The plain step's rule, as the graph step's above: the update is skipped, not applied."""
    model, opt, _ = _model()
    (x, y), = _epochs(1, sizes=(8,))[0]
    train_step(model, opt, x, y)                             # gradients and Adam moments exist

    def trained():
        return {k: v for k, v in _state(model, opt).items() if "running_" not in k}
    before = trained()
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    loss, _ = train_step(model, opt, bad, y)
    assert math.isnan(loss)
    _assert_same_state(trained(), before)


def test_train_epoch_means_are_per_image_and_its_accuracy_in_percent():
    """Batches of 8, 8 and 5 images: each step's loss and hits count with its batch's size."""
    epoch = _epochs(1, sizes=(8, 8, 5))[0]
    model, opt, _ = _model()
    steps = [train_step(model, opt, x, y) for x, y in epoch]
    twin, twin_opt, _ = _model()
    stats = train_epoch(twin, epoch, twin_opt, progress=False)
    losses = [loss * len(y) for (loss, _), (_, y) in zip(steps, epoch)]
    hits = sum(int((logits.argmax(axis=1) == y).sum()) for (_, logits), (_, y) in zip(steps, epoch))
    assert 0 < hits < 21 and len({loss for loss, _ in steps}) == 3
    assert stats["train_loss"] == pytest.approx(sum(losses) / 21, rel=1e-12)
    assert stats["train_acc"] == pytest.approx(100.0 * hits / 21, rel=1e-12)
    assert (stats["steps"], stats["train_images"]) == (3, 21)


def test_evaluate_gives_per_image_means_of_the_eval_mode_logits():
    """Batches of 8 and 3 images, the model in training mode: running BN statistics are used, and
    each batch's loss and hits count with its size."""
    model, _, _ = _model()
    batches = _epochs(1, sizes=(8, 3))[0]
    net = model.network()
    per_batch = []
    for x, y in batches:
        logits = net.eval().forward(x)
        hits = int((logits.argmax(axis=1) == y).sum())
        per_batch.append((softmax_cross_entropy(logits, y)[0] * len(y), hits))
    net.train()
    ev = evaluate(model, batches)
    assert ev["n"] == 11 and 0 < sum(h for _, h in per_batch) < 11
    assert ev["loss"] == pytest.approx(sum(l for l, _ in per_batch) / 11, rel=1e-12)
    assert ev["acc"] == pytest.approx(100.0 * sum(h for _, h in per_batch) / 11, rel=1e-12)


def test_train_epoch_trains_in_training_mode():
    """A model left in eval mode (after a test pass, say) trains with batch statistics, as
    train_step in training mode does."""
    epoch = _epochs(1, sizes=(8, 5))[0]
    model, opt, _ = _model()
    steps = [train_step(model, opt, x, y)[0] for x, y in epoch]
    twin, twin_opt, _ = _model()
    twin.eval()
    stats = train_epoch(twin, epoch, twin_opt, progress=False)
    assert twin.network().training
    assert stats["train_loss"] == pytest.approx((steps[0] * 8 + steps[1] * 5) / 13, rel=1e-12)


def test_train_epoch_without_a_batch_is_a_clear_error():
    model, opt, _ = _model()
    with pytest.raises(ValueError, match="training epoch saw no batch"):
        train_epoch(model, [], opt, progress=False)


@pytest.mark.parametrize("label", [-1, 4])
def test_the_graph_step_checks_the_labels_as_train_step_does(label):
    """Checked in the first, uncaptured step of a shape: -1 would silently pick the last class."""
    model, opt, _ = _model()
    (x, y), = _epochs(1, sizes=(8,))[0]
    y = y.copy()
    y[3] = label
    with pytest.raises(ValueError, match="label") as plain:
        train_step(model, opt, x, y)
    with pytest.raises(ValueError) as graph:
        GraphStep(model, opt)(x, y)
    assert str(graph.value) == str(plain.value)


# ---------------------------------------------------------------------------------- cuBLAS calls
def _column_major_gemm(transa, transb, m, n, k, A, lda, B, ldb, ldc):
    """What cuBLAS computes, on flat NumPy buffers: C (m x n, column-major, ldc) = op(A) op(B)."""
    def operand(buf, trans, rows, cols, ld):      # op(X) of shape (rows, cols)
        stored = (rows, cols) if trans == cuda_gemm.OP_N else (cols, rows)
        x = np.array([[buf[i + j * ld] for j in range(stored[1])] for i in range(stored[0])])
        return x if trans == cuda_gemm.OP_N else x.T
    c = operand(A, transa, m, k, lda) @ operand(B, transb, k, n, ldb)
    out = np.zeros(ldc * n)
    for j in range(n):
        out[j * ldc:j * ldc + m] = c[:, j]
    return out


def _flat(view):
    """The view's buffer from its first element, and the view's element strides."""
    base = view
    while base.base is not None:
        base = base.base
    start = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // view.itemsize
    return base.reshape(-1)[start:]


@pytest.mark.parametrize("a_kind", ["c", "t", "rows", "t_rows", "one_row", "one_col", "step"])
@pytest.mark.parametrize("b_kind", ["c", "t", "rows", "t_rows", "one_col"])
def test_gemm_arguments_give_the_row_major_product(a_kind, b_kind):
    """The column-major call built from a view's strides (contiguous, transposed, a slice of wider
    rows, a single row or column; a stepped view must be copied) computes A @ B."""
    rng = np.random.default_rng(0)

    def view(kind, r, c):
        big = rng.standard_normal((r + 3, c + 4))
        return {"c": np.ascontiguousarray(big[:r, :c]), "t": np.ascontiguousarray(big[:c, :r]).T,
                "rows": big[1:r + 1, 2:c + 2], "t_rows": big[1:c + 1, :r].T,
                "one_row": big[:1, :c] if r == 1 else big[:r, :c], "one_col": big[:r, :1] if c == 1
                else big[:r, :c], "step": big[:r, :2 * c:2]}[kind]
    m, k, n = 3, 4, 5
    a = view(a_kind, 1 if a_kind == "one_row" else m, k)
    b = view(b_kind, k, 1 if b_kind == "one_col" else n)
    args = cuda_gemm.gemm_arguments(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    if a_kind == "step":
        assert args is None                     # copied to a contiguous array first
        return
    transa, transb, m_, n_, k_, first, lda, second, ldb, ldc = args
    ops = {"a": _flat(a), "b": _flat(b)}
    c = _column_major_gemm(transa, transb, m_, n_, k_, ops[first], lda, ops[second], ldb, ldc)
    np.testing.assert_allclose(c[:a.shape[0] * b.shape[1]].reshape(a.shape[0], b.shape[1]), a @ b,
                               rtol=1e-12)


def test_cublas_compute_type_is_cupys():
    """The compute type of CuPy 14's tensordot_core_v11 for each of CuPy's settings; the enum
    values are cuBLAS's (cupy_backends/cuda/libs/cublas.pxd)."""
    ct = cuda_gemm.cublas_compute_type
    assert (ct("f", 1), ct("f", 0), ct("f", 4), ct("f", 7), ct("f", 2)) == (68, 68, 68, 77, 69)
    assert (ct("d", 1), ct("d", 7), ct("d", 2)) == (70, 70, 71)
    pytest.importorskip("cupy")
    try:
        from cupy_backends.cuda.libs import cublas
    except ImportError:
        return                                   # libcublas not installed: the literals stand
    assert (cuda_gemm.COMPUTE_32F, cuda_gemm.COMPUTE_32F_PEDANTIC, cuda_gemm.COMPUTE_32F_FAST_TF32,
            cuda_gemm.COMPUTE_64F, cuda_gemm.COMPUTE_64F_PEDANTIC) == (
        cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_COMPUTE_32F_PEDANTIC,
        cublas.CUBLAS_COMPUTE_32F_FAST_TF32, cublas.CUBLAS_COMPUTE_64F,
        cublas.CUBLAS_COMPUTE_64F_PEDANTIC)


def test_gemms_capturable_patches_and_restores_cupy_matmul():
    cp = pytest.importorskip("cupy")
    before = cp.ndarray.__matmul__
    assert "__matmul__" not in cp.ndarray.__dict__
    with cuda_gemm.gemms_capturable(cp):
        assert cp.ndarray.__dict__["__matmul__"] is not before
    assert "__matmul__" not in cp.ndarray.__dict__ and cp.ndarray.__matmul__ is before


def test_cublas_that_cannot_be_loaded_is_one_line(monkeypatch):
    """No libcublas (CuPy's lookup raises ImportError, cupy_backends/cuda/libs/__init__.py) or no
    handle: a GraphStepError, which the commands print as one line, not a traceback."""
    from npmask.training.errors import one_line

    def missing(cp):
        raise ImportError('Failure finding "libcublasLt.so.13 or libcublasLt.so.12"')
    monkeypatch.setattr(cuda_gemm, "_Cublas", missing)
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setattr(cuda_gemm, "_state", {})
    a = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(GraphStepError, match="libcublasLt.so.13") as err:
        cuda_gemm.matmul(a, a.T, None)
    assert "--cuda-graphs" in one_line(err.value)


@pytest.mark.parametrize("kind", ["new_axis_row", "stepped_column"])
def test_gemm_arguments_take_a_single_row_or_column_of_any_stride(kind):
    """The stride along an axis of length 1 is never used: a row made by a new axis (stride 0) or
    a column of a stepped view needs no copy, and the call computes the product."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal((4, 8))
    if kind == "new_axis_row":
        a, b = big[0][None, :4], big[:, :5]                 # a: (1, 4), strides (0, 8)
    else:
        a, b = big[:3, :4], big[:, :2:2]                    # b: (4, 1), strides (64, 16)
    args = cuda_gemm.gemm_arguments(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    assert args is not None
    transa, transb, m_, n_, k_, first, lda, second, ldb, ldc = args
    ops = {"a": _flat(a), "b": _flat(b)}
    c = _column_major_gemm(transa, transb, m_, n_, k_, ops[first], lda, ops[second], ldb, ldc)
    np.testing.assert_allclose(c[:a.shape[0] * b.shape[1]].reshape(a.shape[0], b.shape[1]), a @ b,
                               rtol=1e-12)


@pytest.mark.parametrize("transposed", [False, True])
def test_gemm_arguments_copy_views_whose_rows_overlap(transposed):
    """cuBLAS requires a leading dimension of at least the stored rows (lda >= max(1, rows)); a
    view whose rows overlap (a sliding window) has none, so it must be copied first."""
    base = np.arange(12.0)
    window = np.lib.stride_tricks.as_strided(base, shape=(4, 3), strides=(8, 8))   # rows overlap
    a = window.T if transposed else window
    b = np.ones((a.shape[1], 2))
    assert cuda_gemm.gemm_arguments(a.shape, a.strides, b.shape, b.strides, 8) is None
    assert cuda_gemm.gemm_arguments(b.T.shape, b.T.strides, a.T.shape, a.T.strides, 8) is None


class _FakeCublas:
    """Records the products cuda_gemm.matmul hands to cuBLAS."""
    made = 0

    def __init__(self, cp=None):
        type(self).made += 1
        self.calls = []

    def matmul(self, a, b):
        self.calls.append((a.shape, b.shape))
        return "cublas"


@pytest.mark.parametrize("shapes, dtypes, to_cublas", [
    (((2, 3), (3, 4)), ("float32", "float32"), True),
    (((2, 3), (3, 4)), ("float64", "float64"), True),
    (((2, 3), (3, 4)), ("float16", "float16"), False),     # cublasGemmEx is called for f/d only
    (((2, 3), (3, 4)), ("float32", "float64"), False),     # mixed dtypes: CuPy promotes
    (((5, 2, 3), (3, 4)), ("float32", "float32"), False),   # batched products
    (((2, 3), (3, 3, 4)), ("float32", "float32"), False),   # (its first axis is k)
    (((2, 3), (4, 5)), ("float32", "float32"), False),     # mismatched: CuPy's own error
])
def test_matmul_hands_cublas_only_2d_float_products_that_fit(monkeypatch, shapes, dtypes, to_cublas):
    """Anything cublasGemmEx is not called for goes to CuPy's product (``fallback``); a product of
    mismatched shapes must reach CuPy's error, not a GEMM that reads past an operand."""
    fake = _FakeCublas()
    monkeypatch.setattr(cuda_gemm, "_state", {"cublas": fake})
    a, b = (np.ones(s, dtype=d) for s, d in zip(shapes, dtypes))
    out = cuda_gemm.matmul(a, b, lambda a, b: "fallback")
    assert out == ("cublas" if to_cublas else "fallback")
    assert fake.calls == ([shapes] if to_cublas else [])


def test_matmul_sets_up_cublas_once(monkeypatch):
    """One handle and one workspace per process: set up anew for each product, a capture would
    allocate a workspace and create a handle inside the graph."""
    monkeypatch.setattr(_FakeCublas, "made", 0)
    monkeypatch.setattr(cuda_gemm, "_Cublas", _FakeCublas)
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setattr(cuda_gemm, "_state", {})
    a = np.ones((2, 3), dtype=np.float32)
    for _ in range(3):
        assert cuda_gemm.matmul(a, a.T, None) == "cublas"
    assert _FakeCublas.made == 1


@pytest.mark.parametrize("error", [OSError("libcublas.so.12: cannot open shared object file"),
                                   RuntimeError("cublasCreate_v2 failed with cuBLAS status 1")])
def test_cublas_without_a_library_or_a_handle_is_one_line(monkeypatch, error):
    """A libcublas that ctypes cannot open, or cublasCreate failing (_Cublas._check): the same
    one-line GraphStepError as a missing library."""
    def failing(cp):
        raise error
    monkeypatch.setattr(cuda_gemm, "_Cublas", failing)
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setattr(cuda_gemm, "_state", {})
    a = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(GraphStepError, match=str(error).split(":")[0]):
        cuda_gemm.matmul(a, a.T, None)
