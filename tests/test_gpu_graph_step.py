"""The training step captured in CUDA graphs, on a GPU (skipped without one).

- captured and uncaptured GraphStep halves give the same bits: the same kernels with the same
  arguments, in the same order, the GEMMs by the same cuBLAS call on the same handle (the graph
  step runs both through npmask.training.cuda_gemm), the changing scalars read from the same
  device arrays;
- against the plain train_step on CuPy (CuPy's own cuBLAS call, another workspace) the numbers
  agree within float32 rounding, as NumPy and CuPy do in tests/test_gpu.py;
- a replayed step moves no data between host and device but the one read of its loss: no memcpy
  node from or to the host in either graph, one ``ndarray.get`` per step (the loss and the number
  correct, 16 bytes), no ``ndarray.set``. The graphs' nodes are read from
  ``cudaGraphDebugDotPrint``'s DOT text, where a node's label spans several lines (its type,
  ``MEMCPY``, on the first, its parameters on the next ones): the nodes are split out whole, and
  what marks a copy from or to the host is learnt first from control graphs, device-to-device
  copies and a host-to-device one (CuPy itself refuses host transfers while capturing:
  cupy/cuda/memory.pyx ``copy_from_host_async``; the controls call the runtime directly);
- the graphs' private memory pools and CuPy's pool are reported (to ``$NPMASK_GPU_REPORT`` when
  set: benchmarks/gpu_run.sh writes it beside its logs).
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from npmask import models
from npmask.backend import cupy_available, to_device
from npmask.multidomain import MultiDomainModel
from npmask.optim import SGD, Adam, MultiStepLR, Optimizers
from npmask.training.graph_step import GraphStep
from test_graph_step import _train

needs_gpu = pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a usable CUDA device")

# a memcpy node's text naming the host (the directions' usual spellings, or a memory type "host")
_HOST_COPY = re.compile(r"htod|dtoh|htoh|host", re.IGNORECASE)


def _dot_nodes(dot: str) -> list[tuple[str, str]]:
    """``[(type, whole node text)]`` of a cudaGraphDebugDotPrint graph: each node statement
    ``"graph_0_node_3"[... label="{MEMCPY ... }"];`` may span several lines; the type is the first
    word of its label (KERNEL, MEMCPY, MEMSET, ...). Edges (``"a" -> "b" [...]``) are not nodes."""
    nodes = []
    for m in re.finditer(r'^\s*"[^"\n]*_node_\d+"\s*\[(.*?)\]\s*;', dot, re.DOTALL | re.MULTILINE):
        label = re.search(r'label="\{?\s*([A-Za-z_]+)', m.group(1))
        nodes.append(((label.group(1).upper() if label else ""), m.group(0)))
    return nodes


def _tokens(text: str) -> set:
    """The words of a node's text, without its name, addresses and numbers."""
    return set(re.findall(r"[A-Za-z_]+", re.sub(r'"[^"\n]*_node_\d+"|0x[0-9A-Fa-f]+', " ", text)))


def _host_copies(dot: str, benign=frozenset(), markers=frozenset()) -> list[str]:
    """The memcpy nodes that name the host: a word of ``markers`` (what only a control host copy
    printed), or a word matching _HOST_COPY, words of a control device copy (``benign``: field
    names such as a ``srcHost`` column) aside."""
    found = []
    for kind, text in _dot_nodes(dot):
        own = _tokens(text) - benign
        if "MEMCPY" in kind and (own & markers or any(_HOST_COPY.search(w) for w in own)):
            found.append(text)
    return found


def _calibrated(device_dots, host_dot):
    """(benign, markers) for _host_copies from control graphs: copies between device arrays
    (cudaMemcpyDeviceToDevice, and cudaMemcpyDefault as CuPy's copy_from_device_async passes), a
    copy from pinned host memory (cudaMemcpyHostToDevice)."""
    benign = set().union(*(_tokens(t) for d in device_dots for k, t in _dot_nodes(d) if "MEMCPY" in k))
    markers = set().union(*(_tokens(t) for k, t in _dot_nodes(host_dot) if "MEMCPY" in k)) - benign
    return frozenset(benign), frozenset(markers)


def test_dot_nodes_are_read_whole_across_lines():
    """Without a GPU: the DOT parser on text shaped as CUDA writes it (multi-line record labels)."""
    dot = ('digraph dot {\nsubgraph cluster_1 {\nlabel="graph_1" graph[style="dashed"];\n'
           '"graph_1_node_0"[style="solid" shape="record" label="{MEMSET\n| {{ID | node handle | dptr}'
           ' | {0 (topoId: 2) | 0x0A | 0x7F}}}"];\n\n'
           '"graph_1_node_1"[style="solid" shape="record" label="{MEMCPY\n| {{ID | node handle} | {1 | 0x0B}}'
           '\n| {{kind | size} | {HtoD | 16}}}"];\n\n'
           '"graph_1_node_2"[style="bold" shape="record" label="{KERNEL\n| {ID | 2 (topoId: 0) | '
           'cupy_copy\\<\\<\\<1,128,0\\>\\>\\>}\n| {{node handle | func handle} | {0x0C | 0x0D}}\n}"];\n'
           '"graph_1_node_0" -> "graph_1_node_1" [style="solid"];\n}\n}\n')
    assert [k for k, _ in _dot_nodes(dot)] == ["MEMSET", "MEMCPY", "KERNEL"]
    host = _host_copies(dot)
    assert len(host) == 1 and "HtoD" in host[0]
    # the old check, line by line, never sees MEMCPY and the direction on one line
    assert not [ln for ln in dot.splitlines() if "MEMCPY" in ln and "HtoD" in ln]
    assert not _host_copies(dot.replace("HtoD", "DtoD"))
    # calibrated on controls: a srcHost column in every memcpy is benign, a HOST memory type is not
    row = '"g_node_{}"[label="{{MEMCPY\n| {{{{srcHost | srcMemoryType | size}} | {{0x0 | {} | {}}}}}}}"];\n'
    device, host = row.format(0, "DEVICE", 16), row.format(0, "HOST", 16)
    benign, markers = _calibrated([device], host)
    assert markers == {"HOST"} and "srcHost" in benign
    assert not _host_copies(row.format(5, "DEVICE", 4096), benign, markers)
    assert _host_copies(row.format(5, "HOST", 4096), benign, markers)
    assert _host_copies(device)                          # uncalibrated, srcHost alone would flag it


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


def _run(kind, variant, epochs):
    """test_graph_step's training loop (plain, graph or uncaptured) on the GPU model above."""
    return _train(kind, variant, epochs, make_model=_model)


def _report(line: str) -> None:
    path = os.environ.get("NPMASK_GPU_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


@needs_gpu
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


@needs_gpu
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


def _control_dots(cp) -> list[str]:
    """DOT texts of three captured one-copy graphs: device to device (DeviceToDevice, Default),
    host (pinned) to device."""
    rt = cp.cuda.runtime
    a, b = cp.arange(4, dtype=cp.float32), cp.empty(4, dtype=cp.float32)
    pinned = cp.cuda.alloc_pinned_memory(a.nbytes)
    stream, dots = cp.cuda.Stream(non_blocking=True), []
    for kind, src in ((rt.memcpyDeviceToDevice, a.data.ptr), (rt.memcpyDefault, a.data.ptr),
                      (rt.memcpyHostToDevice, pinned.ptr)):
        with stream:
            stream.begin_capture()
            rt.memcpyAsync(b.data.ptr, src, a.nbytes, kind, stream.ptr)
            graph = stream.end_capture()
        dots.append(graph.debug_dot_str(rt.cudaGraphDebugDotFlagsVerbose))
    return dots


@needs_gpu
def test_a_replayed_step_moves_nothing_between_host_and_device_but_its_loss(monkeypatch):
    import cupy as cp
    *device_copies, host_copy = _control_dots(cp)
    for dot in device_copies + [host_copy]:
        kinds = [k for k, _ in _dot_nodes(dot)]
        assert len(kinds) == 1 and "MEMCPY" in kinds[0], f"the DOT parser misreads a memcpy:\n{dot}"
    benign, markers = _calibrated(device_copies, host_copy)
    assert _host_copies(host_copy, benign, markers), (
        f"a host-to-device copy prints nothing a device copy does not:\n{host_copy}\n{device_copies[0]}")
    _report(f"DOT words only a host copy printed: {sorted(markers)}")
    model, opt, _ = _model("full", net="wrn28_4", size=32)
    step = GraphStep(model, opt)
    (x, y), = _epochs(size=32, sizes=(16,), n_epochs=1)[0]
    step(x, y)
    step(x, y)                                                 # captured
    shape, = step.shapes.values()
    flags = cp.cuda.runtime.cudaGraphDebugDotFlagsVerbose
    for name, half in (("forward", shape.forward), ("backward", shape.backward)):
        dot = half.graph.debug_dot_str(flags)
        kinds = [k for k, _ in _dot_nodes(dot)]
        assert kinds.count("KERNEL") > 10, kinds[:20]        # the parser read this graph's nodes
        host = _host_copies(dot, benign, markers)
        assert not host, host[:3]
        _report(f"graph of the {name} half: {kinds.count('KERNEL')} kernel nodes, "
                f"{kinds.count('MEMCPY')} memcpy nodes, {kinds.count('MEMSET')} memset nodes, "
                f"{len(kinds)} nodes in all")
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
