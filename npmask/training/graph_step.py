"""The training step captured in CUDA graphs and replayed (``--cuda-graphs``).

On CuPy every array operation of a step is a kernel launch from Python, thousands per step of a
masked WRN, and a small batch leaves the GPU waiting for them. A CUDA graph records the launches
of one step once and replays them with one call. :class:`GraphStep` does the work of
:func:`~npmask.training.loop.train_step` in two halves, each captured once per batch shape:

(a) forward and loss: the logits, ``stats`` (the sum of log-likelihoods and the number of correct
    predictions, one small device array) and dlogits;
(b) zero_grad, the backward pass (input gradient skipped) and the optimiser step.

Between them the host reads ``stats``, the one synchronisation of a step (the epoch needs the loss
anyway): a non-finite loss stops before (b) runs, with gradients and parameters untouched, as in
train_step. The first step of each batch shape runs the two halves uncaptured; that makes every
lazily created array (gradients, optimiser state, BN caches) and compiles every kernel, and
checks the labels. The second step captures (a), replays it, and captures and replays (b) once
its loss is known to be finite; later steps replay both. At most ``max_shapes`` shapes are
captured (the epoch's full batches and its last partial one); any further shape runs uncaptured.

What a replay reads that changes between steps lives in device memory: the batch, copied into
the shape's static x/y buffers first, and the optimisers' learning rates and Adam's bias
corrections (:mod:`npmask.optim.device`, filled in by the host before each step). Everything else
was fixed at capture, the addresses of every array included. So the step must

- update every parameter, gradient, buffer and optimiser state *in place* (checked: an array
  replaced during a capture is an error naming it);
- not read anything back to the host inside the halves (CuPy refuses synchronous transfers during
  a capture; the NumPy tests run the halves on arrays that refuse conversion to Python numbers);
- run its GEMMs through cuBLAS called directly (:mod:`npmask.training.cuda_gemm`: CuPy's own
  cuBLAS calls refuse a capture), in the uncaptured halves too, so that both compute alike;
- draw nothing at random (dropout draws its mask on the host: a model with dropout is refused).

Each shape's graphs allocate from their own memory pool, kept alive with them: the intermediate
arrays a replay writes are never handed to anything else. ``memory()`` reports the pools' sizes.

The same class runs on NumPy, where "capture" runs the function and records it, and a "replay"
runs it again and copies its outputs into the recorded ones, with the host step counts restored
(a replay runs no Python). The tests check there, bit for bit, that the graph step trains exactly
as train_step does. ``capture=False`` runs the halves uncaptured on every step (for debugging).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from ..backend import get_array_module, to_numpy
from ..nn import Dropout
from ..nn.loss import _check, log_likelihood_sum
from ..optim import device
from ..optim.optimizers import _leaves
from .cuda_gemm import gemms_capturable
from .errors import GraphStepError
from .loop import input_gradient_skipped


def refuse_random_layers(model) -> None:
    """A GraphStepError when the model has a layer that draws random numbers in training."""
    network = model.network() if callable(getattr(model, "network", None)) else model
    for name, m in network.named_modules():
        if isinstance(m, Dropout) and m.p > 0:
            raise GraphStepError(
                f"--cuda-graphs cannot capture dropout ({name or 'the model'}: p={m.p}): its mask is "
                "drawn on the host and would be the same in every replay; train without "
                "--cuda-graphs")


def state_arrays(model, optimizer) -> dict:
    """``{name: id}`` of every array a step updates (parameters, gradients, buffers, optimiser state)."""
    network = model.network() if callable(getattr(model, "network", None)) else model
    out = {}
    for mname, m in network.named_modules():
        for kind, store in (("param", m.params), ("grad", m.grads), ("buffer", m.buffers)):
            for key, a in store.items():
                out[f"{kind} {mname}.{key}".replace(" .", " ")] = id(a)
    for gname, opt in _leaves(optimizer).items():
        for pname, st in opt.state.items():
            for key, val in st.items():
                if key != "step":
                    out[f"optimiser {gname}/{pname}.{key}".replace(" /", " ")] = id(val)
    return out


def _host_counts(optimizer) -> list:
    return [(st, st["step"]) for opt in _leaves(optimizer).values()
            for st in opt.state.values() if "step" in st]


class _Emulated:
    """A recorded function standing in for a CUDA graph on NumPy (see the module docstring)."""

    def __init__(self, fn, args, optimizer):
        self.fn, self.args, self.optimizer = fn, args, optimizer
        self.outputs = self._run()

    def _run(self):
        return self.fn(*self.args)

    def launch(self) -> None:
        counts = _host_counts(self.optimizer)
        fresh = self._run()
        for st, count in counts:       # a replay runs no Python: the host counts stay as they were
            st["step"] = count
        for kept, new in zip(self.outputs, fresh):
            kept[...] = new             # a graph writes its outputs where the capture put them


class _Cuda:
    """A CUDA graph captured from ``fn(*args)`` on a side stream, allocating from ``pool``."""

    def __init__(self, cp, fn, args, pool, stream):
        self.cp = cp
        with cp.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture()
            try:
                self.outputs = fn(*args)
            except BaseException as err:
                with contextlib.suppress(Exception):
                    stream.end_capture()
                if "captur" in str(err):     # CuPy's refusals name the capture
                    raise GraphStepError(
                        f"an operation of the step cannot be captured in a CUDA graph "
                        f"({type(err).__name__}: {err}); train without --cuda-graphs") from err
                raise
            self.graph = stream.end_capture()
        self.graph.upload(cp.cuda.get_current_stream())

    def launch(self) -> None:
        self.graph.launch(self.cp.cuda.get_current_stream())   # ordered after the batch copy


class _Shape:
    """The static buffers and the two graphs of one batch shape."""

    def __init__(self):
        self.x = self.y = None
        self.forward = self.backward = None      # the graphs (a) and (b)
        self.pool = self.stream = None
        self.version = self.fixed = None


class GraphStep:
    """``step(x, y) -> (loss: float, correct: int)``: train_step's work, captured per batch shape.

    ``model``/``optimizer``: as for train_step; the optimiser's parameters must all live on one
    backend (NumPy: the emulation; CuPy: CUDA graphs). While the GraphStep is used, the model's
    and optimiser's arrays must not be replaced (``load_state_dict`` copies in place and is fine;
    ``model.to`` is not); a changed hyper-parameter other than lr makes the shapes capture again.
    """

    def __init__(self, model, optimizer, *, capture: bool = True, max_shapes: int = 2):
        refuse_random_layers(model)
        refs = [r for opt in _leaves(optimizer).values() for r in opt.refs]
        if not refs:
            raise GraphStepError("the optimiser has no parameters")
        self.xp = get_array_module(refs[0].data)
        self.model, self.optimizer = model, optimizer
        self.capture, self.max_shapes = bool(capture), int(max_shapes)
        self.shapes: dict[tuple, _Shape] = {}
        self.steps = {"eager": 0, "captured": 0, "replayed": 0}
        # CuPy: the GEMMs of captured and uncaptured halves alike by cuBLAS called directly (CuPy's
        # own refuse a capture): the same GEMMs in both, see npmask.training.cuda_gemm
        self._gemms = (lambda: contextlib.nullcontext()) if self.xp is np else (
            lambda: gemms_capturable(self.xp))
        device.attach(optimizer, refs[0].data)

    def close(self) -> None:
        """Drop the graphs and their pools; the optimisers read Python floats again."""
        self.shapes.clear()
        device.detach(self.optimizer)

    # ---------------------------------------------------------------- the two halves
    def forward_half(self, x, y, check: bool = False):
        """(a): ``(stats, dlogits)``; stats = [sum of log-likelihoods, correct predictions].

        ``check``: validate the labels first (a host read: only uncaptured, once per shape)."""
        xp = self.xp
        logits = self.model.forward(x)
        if check:
            _check(logits, y)
        total, dlogits = log_likelihood_sum(logits, y)
        correct = (logits.argmax(axis=1) == y).sum()
        stats = xp.stack([xp.asarray(total, dtype=xp.float64), correct.astype(xp.float64)])
        return stats, dlogits

    def backward_half(self, dlogits):
        """(b): zero_grad, backward (no input gradient), optimiser step."""
        self.optimizer.zero_grad()
        with input_gradient_skipped(self.model):
            self.model.backward(dlogits)
        self.optimizer.step()
        return ()

    # ---------------------------------------------------------------- one step
    def __call__(self, x, y):
        key = (tuple(x.shape), str(x.dtype), tuple(y.shape), str(y.dtype))
        shape = self.shapes.get(key)
        version = device.sync(self.optimizer)
        if shape is None or not self.capture:
            if shape is None and len(self.shapes) < self.max_shapes:
                self.shapes[key] = _Shape()
            return self._eager(x, y, check=shape is None)
        fixed = device.fixed_settings(self.optimizer)
        if shape.forward is not None and (shape.version, shape.fixed) != (version, fixed):
            shape.forward = shape.backward = None            # capture again (see the class)
        shape.version, shape.fixed = version, fixed
        if shape.forward is None:
            self._capture_forward(shape, x, y)
        else:
            shape.x[...] = x
            shape.y[...] = y
            shape.forward.launch()
        n = int(y.shape[0])
        stats, dlogits = shape.forward.outputs
        loss, correct = self._read(stats, n)
        if not math.isfinite(loss):
            return loss, correct
        if shape.backward is None:
            self._capture(shape, "backward", self.backward_half, (dlogits,))
            self.steps["captured"] += 1
        else:
            shape.backward.launch()
            device.count_replayed(self.optimizer)
            self.steps["replayed"] += 1
        return loss, correct

    def _eager(self, x, y, check: bool):
        with self._gemms():
            stats, dlogits = self.forward_half(x, y, check)
        loss, correct = self._read(stats, int(y.shape[0]))
        if math.isfinite(loss):
            with self._gemms():
                self.backward_half(dlogits)
            self.steps["eager"] += 1
        return loss, correct

    @staticmethod
    def _read(stats, n: int):
        host = to_numpy(stats)                         # the step's one device -> host read
        return -float(host[0]) / n, int(host[1])

    # ---------------------------------------------------------------- capture
    def _capture_forward(self, shape, x, y) -> None:
        shape.x = x.copy()                             # the static inputs every replay reads
        shape.y = y.copy()
        self._capture(shape, "forward", self.forward_half, (shape.x, shape.y))

    def _capture(self, shape, half: str, fn, args) -> None:
        before = state_arrays(self.model, self.optimizer)
        if self.xp is np:
            graph = _Emulated(fn, args, self.optimizer)
        else:
            cp = self.xp
            if shape.pool is None:
                shape.pool, shape.stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
            cp.cuda.get_current_stream().synchronize()
            # An allocation that fails during a capture makes the pool free its cached blocks, some
            # of which an earlier graph may still use as scratch: leave the capture room first.
            cp.get_default_memory_pool().free_all_blocks()
            with self._gemms():
                graph = _Cuda(cp, fn, args, shape.pool, shape.stream)
            graph.launch()
        after = state_arrays(self.model, self.optimizer)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            raise GraphStepError(
                f"the {half} half replaced or created arrays while being captured ({', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}): a replay would use the old ones. Every "
                "update of a step must be in place, and its state must exist before the capture")
        setattr(shape, half, graph)

    def memory(self) -> dict:
        """Bytes held: ``{"graph_pools": the shapes' private pools, "default_pool": CuPy's}``."""
        if self.xp is np:
            return {"graph_pools": 0, "default_pool": 0}
        pools = sum(s.pool.total_bytes() for s in self.shapes.values() if s.pool is not None)
        return {"graph_pools": int(pools),
                "default_pool": int(self.xp.get_default_memory_pool().total_bytes())}
