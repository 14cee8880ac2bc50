"""The training step captured in CUDA graphs, on a GPU (skipped without one).

- captured and uncaptured GraphStep halves give the same bits: the same kernels with the same
  arguments, in the same order, the GEMMs by the same cuBLAS call on the same handle (the graph
  step runs both through npmask.training.cuda_gemm), the changing scalars read from the same
  device arrays;
- against the plain train_step on CuPy (CuPy's own cuBLAS call, another workspace) the numbers
  agree within float32 rounding, as NumPy and CuPy do in tests/test_gpu.py;
- a replayed step moves no data between host and device but the one read of its loss: no memcpy
  node from or to the host in either graph, one ``ndarray.get`` per step (the loss and the number
  correct, 16 bytes), no ``ndarray.set``;
- the graphs' private memory pools and CuPy's pool are reported (to ``$NPMASK_GPU_REPORT`` when
  set: benchmarks/gpu_run.sh writes it beside its logs).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from npmask import models
from npmask.backend import cupy_available, to_device, to_numpy
from npmask.multidomain import MultiDomainModel
from npmask.optim import SGD, Adam, MultiStepLR, Optimizers
from npmask.training.graph_step import GraphStep
from npmask.training.loop import train_step

pytestmark = pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a usable CUDA device")


def _model(variant, net="wrn16_1", size=16):
    backbone = models.create(net, num_classes=5, input_size=size, seed=0)
    model = MultiDomainModel(backbone)
    model.add_domain("d", num_classes=4, variant=variant, seed=1, mask_init=(-1e-4, 2e-4))
    model.set_domain("d").train()
    model.to("cupy")
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=1e-3, weight_decay=1e-4),
                     head=SGD(groups["head"], lr=1e-2, momentum=0.9, weight_decay=5e-4))
    return model, opt, MultiStepLR(opt, milestones=[1], gamma=0.1)


def _epochs(size=16, sizes=(8, 8, 8, 5), n_epochs=2):
    rng = np.random.default_rng(0)
    return [[(to_device(rng.standard_normal((n, 3, size, size)).astype(np.float32), "cupy"),
              to_device(rng.integers(0, 4, n), "cupy")) for n in sizes] for _ in range(n_epochs)]


def _state(model, opt):
    return {**{k: to_numpy(v) for k, v in model.network().state_dict().items()},
            **{"opt/" + k: v for k, v in opt.state_dict().items()}}


def _run(kind, variant, epochs):
    model, opt, sched = _model(variant)
    step = None if kind == "plain" else GraphStep(model, opt, capture=(kind == "graph"))
    out = []
    for batches in epochs:
        for x, y in batches:
            if step is None:
                loss, logits = train_step(model, opt, x, y)
                out.append((loss, int((logits.argmax(axis=1) == y).sum())))
            else:
                out.append(step(x, y))
        sched.step()
    return out, _state(model, opt), step


def _report(line: str) -> None:
    path = os.environ.get("NPMASK_GPU_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


@pytest.mark.parametrize("variant", ["full", "piggyback"])
def test_captured_steps_give_the_uncaptured_halves_bits(variant):
    epochs = _epochs()
    graph, graph_state, step = _run("graph", variant, epochs)
    eager, eager_state, _ = _run("uncaptured", variant, epochs)
    assert step.steps["replayed"] >= 4, step.steps            # lr decayed between the epochs
    assert graph == eager
    for k in eager_state:
        assert np.array_equal(graph_state[k], eager_state[k]), k
    again, again_state, _ = _run("graph", variant, epochs)    # the same seed: the same run
    assert again == graph and all(np.array_equal(again_state[k], graph_state[k]) for k in graph_state)


@pytest.mark.parametrize("variant", ["full", "piggyback"])
def test_graph_step_agrees_with_train_step_within_float32_rounding(variant):
    epochs = _epochs()
    graph, graph_state, _ = _run("graph", variant, epochs)
    plain, plain_state, _ = _run("plain", variant, epochs)
    np.testing.assert_allclose([g[0] for g in graph], [p[0] for p in plain], rtol=2e-3, atol=2e-4)
    same = sum(np.array_equal(graph_state[k], plain_state[k]) for k in plain_state)
    _report(f"graph step vs train_step ({variant}): {same} of {len(plain_state)} state arrays "
            "bit-identical")
    for k in plain_state:
        if plain_state[k].dtype.kind == "f":
            np.testing.assert_allclose(graph_state[k], plain_state[k], rtol=0, atol=5e-3, err_msg=k)
        else:
            assert np.array_equal(graph_state[k], plain_state[k]), k


def test_a_replayed_step_moves_nothing_between_host_and_device_but_its_loss(monkeypatch):
    import cupy as cp
    model, opt, _ = _model("full", net="wrn28_4", size=32)
    step = GraphStep(model, opt)
    (x, y), = _epochs(size=32, sizes=(16,), n_epochs=1)[0]
    step(x, y)
    step(x, y)                                                 # captured
    shape, = step.shapes.values()
    flags = cp.cuda.runtime.cudaGraphDebugDotFlagsVerbose
    for name, half in (("forward", shape.forward), ("backward", shape.backward)):
        dot = half.graph.debug_dot_str(flags)
        lines = dot.splitlines()
        host = [ln for ln in lines if "MEMCPY" in ln.upper()
                and any(w in ln for w in ("HtoD", "DtoH", "HostToDevice", "DeviceToHost", "HtoH"))]
        assert not host, host[:3]
        _report(f"graph of the {name} half: {sum('KERNEL' in ln.upper() for ln in lines)} "
                f"kernel lines, {sum('MEMCPY' in ln.upper() for ln in lines)} memcpy lines, "
                f"{sum('MEMSET' in ln.upper() for ln in lines)} memset lines")
    calls = {"get": 0, "set": 0}
    get, set_ = cp.ndarray.get, cp.ndarray.set

    def counted_get(self, *a, **k):
        calls["get"] += 1
        return get(self, *a, **k)

    def counted_set(self, *a, **k):
        calls["set"] += 1
        return set_(self, *a, **k)
    monkeypatch.setattr(cp.ndarray, "get", counted_get)
    monkeypatch.setattr(cp.ndarray, "set", counted_set)
    for _ in range(3):
        step(x, y)
    assert step.steps["replayed"] == 3
    assert calls == {"get": 3, "set": 0}, calls
    held = step.memory()
    assert held["graph_pools"] > 0
    _report(f"WRN-28-4 full, 32x32, batch 16: graph pools {held['graph_pools'] / 2**20:.1f} MiB, "
            f"default pool {held['default_pool'] / 2**20:.1f} MiB")
