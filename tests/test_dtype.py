"""No silent float64: a float32 training step allocates no float64 array of activation or weight size.

NumPy promotes to float64 quietly: ``np.zeros(shape)`` without ``dtype=``, a ``np.float64`` scalar
(``np.sqrt(2.0)``) multiplied into a float32 array, ``np.asarray`` of a Python list. The step still
works, only twice as slow and twice as large. Two detectors look for it:

1. :class:`Float64Watch` traces every line of npmask (``sys.settrace``) and, at each line and each
   ``return``, inspects the frame's local variables and the returned value for float64 arrays of at
   least ``min_size`` elements. It therefore sees any such array that is bound to a name, passed to
   or returned from a function. (A float64 temporary created and consumed inside one expression and
   written back into a float32 array is not seen; it cannot reach a parameter or an activation.)
2. after the step, every array held by the model (parameters, gradients, buffers, layer caches) and
   by the optimisers is checked to be float32.

``test_watch_catches_*`` inject exactly those mistakes into a layer and show that detector 1 fails
the step, so the clean runs are evidence, not a test that cannot fail.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import npmask
from npmask import config, models
from npmask.multidomain import MultiDomainModel
from npmask.nn.loss import softmax_cross_entropy
from npmask.optim import SGD, Adam, Optimizers

NPMASK_DIR = str(Path(npmask.__file__).resolve().parent)
THIS_FILE = str(Path(__file__).resolve())


def _float64_arrays(value, depth=0):
    """Yield the float64 ndarrays in ``value`` (an array, or tuples/lists/dicts of them)."""
    if isinstance(value, np.ndarray):
        if value.dtype == np.float64:
            yield value
    elif depth < 3 and isinstance(value, (tuple, list)):
        for v in value:
            yield from _float64_arrays(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _float64_arrays(v, depth + 1)


class Float64Watch:
    """``with Float64Watch(min_size) as w: ...`` records float64 arrays seen in npmask frames.

    ``w.found`` lists ``(file:line, variable, shape)`` for every float64 array of at least
    ``min_size`` elements bound to a local variable or returned from a function of npmask (or of
    this test file) while the block ran.
    """

    def __init__(self, min_size: int):
        self.min_size = min_size
        self.found = []

    def _watched(self, frame) -> bool:
        f = frame.f_code.co_filename
        return f.startswith(NPMASK_DIR) or f == THIS_FILE

    def _scan(self, frame, items):
        for name, value in items:
            for a in _float64_arrays(value):
                if a.size >= self.min_size:
                    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                    self.found.append((where, name, a.shape))

    def _local(self, frame, event, arg):
        if event == "line":
            self._scan(frame, frame.f_locals.items())
        elif event == "return":
            self._scan(frame, list(frame.f_locals.items()) + [("<returned>", arg)])
        return self._local

    def _global(self, frame, event, arg):
        return self._local if self._watched(frame) else None

    def __enter__(self):
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous)
        return False


def _make_step(variant: str, model_name: str = "wrn10_1", size: int = 16, batch: int = 4):
    """A float32 domain network of ``variant`` with the paper's optimisers, and one step on it."""
    backbone = models.create(model_name, num_classes=5, input_size=size, dtype=np.float32, seed=0)
    model = MultiDomainModel(backbone)
    model.add_domain("d", num_classes=3, variant=variant, seed=1)
    model.set_domain("d").train()
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=1e-4), head=SGD(groups["head"], lr=1e-3, momentum=0.9))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 3, batch)

    def step():
        logits = model.forward(x)
        loss, dlogits = softmax_cross_entropy(logits, y)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()
        return logits, dlogits

    return model, opt, step


def _min_size(model) -> int:
    """The smallest weight of the network (elements): anything that large counts."""
    return min(p.size for n, p in model.backbone.named_parameters() if n.endswith("weight") and p.ndim > 1)


def _held_arrays(model, opt):
    """(name, array) of everything the domain network and the optimisers keep after a step."""
    net = model.network()
    out = []
    for mname, m in net.named_modules():
        for attr, value in vars(m).items():
            for i, a in enumerate(_all_arrays(value)):
                out.append((f"{mname}.{attr}[{i}]", a))
    for gname, o in opt.groups.items():
        for pname, st in o.state.items():
            for key, val in st.items():
                if isinstance(val, np.ndarray):
                    out.append((f"{gname}:{pname}.{key}", val))
    return out


def _all_arrays(value, depth=0):
    if isinstance(value, np.ndarray):
        yield value
    elif depth < 3 and isinstance(value, (tuple, list)):
        for v in value:
            yield from _all_arrays(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _all_arrays(v, depth + 1)


@pytest.mark.parametrize("variant", ["full", "full_channelwise", "simple_sigmoid", "piggyback",
                                     "piggyback_bn_k1", "finetune", "classifier_only"])
def test_float32_step_makes_no_float64(variant):
    model, opt, step = _make_step(variant)
    step()  # first step: optimiser state created
    with Float64Watch(_min_size(model)) as watch:
        logits, dlogits = step()
    assert watch.found == [], f"float64 arrays in a float32 {variant} step: {watch.found[:10]}"
    assert logits.dtype == dlogits.dtype == np.float32
    wrong = [(n, a.dtype) for n, a in _held_arrays(model, opt) if a.dtype.kind == "f" and a.dtype != np.float32]
    assert wrong == [], f"non-float32 arrays held after a {variant} step: {wrong[:10]}"


def test_masked_linear_step_makes_no_float64():
    """VGG-11 with BN: masked fully-connected layers, dropout, max pooling."""
    model, opt, step = _make_step("full", model_name="vgg11_bn", size=32, batch=2)
    step()
    with Float64Watch(_min_size(model)) as watch:
        step()
    assert watch.found == [], f"float64 arrays in a float32 VGG step: {watch.found[:10]}"
    wrong = [(n, a.dtype) for n, a in _held_arrays(model, opt) if a.dtype.kind == "f" and a.dtype != np.float32]
    assert wrong == []


# ---------------------------------------------------------------------------------- the detector works
def test_watch_catches_a_float64_scalar_in_an_activation(monkeypatch):
    """A np.float64 scalar is not 'weak' under NEP 50: float32 array * np.float64 -> float64."""
    from npmask.nn.activation import ReLU

    model, _, step = _make_step("full")
    step()
    original = ReLU.forward

    def leaky(self, x):
        return original(self, x) * np.float64(1.0)    # the kind of slip that goes unnoticed
    monkeypatch.setattr(ReLU, "forward", leaky)
    # the ReLU modules themselves run only on the unfused path (fuse_bn_relu runs them inside BN)
    with config.using(fuse_bn_relu=False), Float64Watch(_min_size(model)) as watch:
        try:
            step()
        except Exception:  # a float64 activation may also trip a dtype check further on
            pass
    assert any("<returned>" == name for _, name, _ in watch.found), watch.found


def test_watch_catches_zeros_without_dtype(monkeypatch):
    """An accumulator created with np.zeros(shape) (float64 by default) for a weight gradient."""
    from npmask.masking import layers

    model, _, step = _make_step("full")
    step()
    original = layers._MaskedLayer._backward_weight

    def careless(self, G):
        acc = np.zeros(G.shape)                        # forgot dtype=G.dtype
        acc += G
        return original(self, acc.astype(G.dtype))
    monkeypatch.setattr(layers._MaskedLayer, "_backward_weight", careless)
    with Float64Watch(_min_size(model)) as watch:
        step()
    assert any(name == "acc" for _, name, _ in watch.found), watch.found


def test_watch_ignores_small_and_float32_arrays():
    with Float64Watch(100) as watch:
        _helper_binding(np.zeros(99), np.zeros(1000, dtype=np.float32))
    assert watch.found == []
    with Float64Watch(100) as watch:
        _helper_binding(np.zeros(100), None)
    assert [name for _, name, _ in watch.found][:1] == ["a"]


def _helper_binding(a, b):
    c = a
    return c
