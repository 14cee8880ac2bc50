"""CuPy against NumPy, on a GPU: every layer, and a whole masked training step, give the same numbers.

The rest of the suite runs on NumPy; these tests run the same code on CuPy arrays and compare. In
float64 the two backends agree to ~1e-10 (only the order of the additions in sums and GEMMs differs);
in float32 to ~1e-4 after a training step (but see the Adam note below). Without a usable CUDA device every test here is skipped
with the reason (CI has none: ``tests/test_cupy_api.py`` checks the CuPy namespace there instead).
"""
from __future__ import annotations

import numpy as np
import pytest

from npmask import models, nn
from npmask.backend import cupy_available, to_device, to_numpy
from npmask.multidomain import MultiDomainModel
from npmask.optim import SGD, Adam, Optimizers
from npmask.training.loop import train_step

pytestmark = pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a usable CUDA device")


def _layers():
    return {
        "conv3x3": lambda: nn.Conv2d(4, 6, 3, padding=1, bias=True, rng=0),
        "conv3x3_s2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, rng=0),
        "conv1x1_s2": lambda: nn.Conv2d(4, 6, 1, stride=2, rng=0),
        "conv5x5_p0": lambda: nn.Conv2d(4, 3, 5, rng=0),
        "bn2d": lambda: nn.BatchNorm2d(4),
        "relu": lambda: nn.ReLU(),
        "maxpool": lambda: nn.MaxPool2d(2),
        "avgpool": lambda: nn.AvgPool2d(3, 1, 1),
        "gap": lambda: nn.GlobalAvgPool2d(),
        "block": lambda: nn.BasicBlock(4, 8, stride=2, rng=0),
    }


@pytest.mark.parametrize("name", sorted(_layers()))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_forward_and_backward_match_numpy(name, dtype):
    cpu, gpu = _layers()[name](), _layers()[name]()
    cpu.astype(dtype)
    gpu.astype(dtype).to("cupy")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 4, 9, 9)).astype(dtype)
    y_cpu = cpu.forward(x)
    y_gpu = gpu.forward(to_device(x, "cupy"))
    dy = rng.standard_normal(y_cpu.shape).astype(dtype)
    dx_cpu, dx_gpu = cpu.backward(dy), gpu.backward(to_device(dy, "cupy"))
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    assert y_gpu.dtype == dtype and dx_gpu.dtype == dtype
    np.testing.assert_allclose(to_numpy(y_gpu), y_cpu, **tol)
    np.testing.assert_allclose(to_numpy(dx_gpu), dx_cpu, **tol)
    grads_cpu = {ref.name: ref.grad for ref in cpu.parameter_refs(trainable_only=False)}
    for ref in gpu.parameter_refs(trainable_only=False):
        assert (ref.grad is None) == (grads_cpu[ref.name] is None), ref.name
        if ref.grad is not None:
            np.testing.assert_allclose(to_numpy(ref.grad), grads_cpu[ref.name], err_msg=ref.name, **tol)


def _step_model(variant, dtype, backend):
    backbone = models.create("wrn10_1", num_classes=5, input_size=16, seed=0)
    backbone.astype(dtype)
    model = MultiDomainModel(backbone)
    # Some mask bits start off (R ~ U(-1e-4, 2e-4), tau = 0). With every bit on (the default), the
    # gradient of k3 for a conv followed by batch norm is sum(G * W), which BN's scale invariance
    # makes exactly 0: its sign, and so Adam's first step (+-lr), is float32 rounding on either
    # backend (seen on an H100: 3 of 32 channel-wise k3 values differed).
    model.add_domain("d", num_classes=4, variant=variant, seed=1, mask_init=(-1e-4, 2e-4))
    model.set_domain("d").train()
    if backend == "cupy":
        model.to("cupy")
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=1e-3), head=SGD(groups["head"], lr=1e-2, momentum=0.9))
    return model, opt


@pytest.mark.parametrize("variant", ["full", "piggyback", "simple", "full_channelwise", "full_sigmoid",
                                     "finetune", "classifier_only"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_training_steps_match_numpy(variant, dtype):
    """Three steps (forward, loss, backward, Adam/SGD update) on each backend from the same start."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 3, 16, 16)).astype(dtype)
    y = rng.integers(0, 4, 8)
    results = {}
    for backend in ("numpy", "cupy"):
        model, opt = _step_model(variant, dtype, backend)
        xb, yb = (x, y) if backend == "numpy" else (to_device(x, "cupy"), to_device(y, "cupy"))
        losses = []
        for _ in range(3):
            losses.append(float(train_step(model, opt, xb, yb)[0]))
        params = {n: to_numpy(p) for n, p in model.network().named_parameters()}
        results[backend] = losses, params, to_numpy(model.forward(xb))
    (l_cpu, p_cpu, z_cpu), (l_gpu, p_gpu, z_gpu) = results["numpy"], results["cupy"]
    tol = dict(rtol=1e-8, atol=1e-9) if dtype == np.float64 else dict(rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(l_gpu, l_cpu, **tol)
    np.testing.assert_allclose(z_gpu, z_cpu, **tol)
    assert p_gpu.keys() == p_cpu.keys()
    for n in p_cpu:
        assert p_gpu[n].dtype == p_cpu[n].dtype, n
        if dtype == np.float64:
            np.testing.assert_allclose(p_gpu[n], p_cpu[n], err_msg=n, **tol)
        else:
            # Adam divides by sqrt(v): for a weight whose gradient is ~0, float32 rounding in the
            # gradient (sums in another order) moves the update by up to a step (lr = 1e-3). Such
            # weights are rare; a real error would move most of them.
            off = ~np.isclose(p_gpu[n], p_cpu[n], **tol)
            assert off.sum() <= max(1, 0.005 * off.size), f"{n}: {off.sum()} of {off.size} values differ"
            np.testing.assert_allclose(p_gpu[n], p_cpu[n], rtol=0, atol=5e-3, err_msg=n)


def test_adam_in_one_launch_matches_adam_per_parameter_on_the_device(monkeypatch):
    """Adam's one-launch kernel (device addresses, start offsets, flat moments) against its kernel
    per parameter, on the GPU, three steps: the same statements, so the same numbers (to float32
    rounding, should NVRTC contract the two kernels' arithmetic differently)."""
    from npmask.nn.module import Module
    from npmask.optim import cuda as optim_cuda
    rng = np.random.default_rng(7)
    shapes = [(16, 3, 3, 3), (16,), (1,), (10, 16)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    step_all, results = optim_cuda.step_all, []
    for one_launch in (True, False):
        taken = []
        monkeypatch.setattr(optim_cuda, "step_all",
                            lambda *a: taken.append(one_launch and step_all(*a)) or taken[-1])
        m = Module()
        for i, a in enumerate(start):
            m.register_param(f"w{i}", a.copy())
        m.to("cupy")
        opt = Adam(m.parameters(), lr=1e-2, weight_decay=1e-3)
        for step in grads:
            opt.zero_grad()
            for (name, g), value in zip(m.grads.items(), step):
                g += to_device(value, "cupy")
            opt.step()
        assert taken == [one_launch] * 3
        results.append([to_numpy(m.params[f"w{i}"]) for i in range(4)]
                       + [to_numpy(opt.state[f"w{i}"][k]) for i in range(4) for k in ("exp_avg", "exp_avg_sq")])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
