"""The numbers of an optimiser step that change between steps, kept in device memory.

A CUDA graph replays its kernels with the arguments they had when it was captured. Most numbers
of an optimiser step are fixed for a run (momentum, betas, eps, weight decay) and may be baked
into the graph; two kinds are not:

- the learning rate, which a scheduler changes between epochs;
- Adam's bias corrections ``lr / (1 - beta1**t)`` and ``sqrt(1 - beta2**t)``, which change at
  every step with the step count ``t``.

:func:`attach` gives every optimiser of a group a :class:`DeviceScalars`: 0-d arrays of the
parameters' dtype and backend holding those numbers. Its steps then read the arrays instead of
Python floats. :func:`sync` writes the values of the coming step into them before each step,
outside any capture: a fill is a kernel launch with the value as its argument, not a host-device
copy. The values are computed on the host exactly as the plain step computes them (the same
Python float, rounded once to the parameters' dtype), so a step gives the same bits either way.

A replayed graph runs none of the Python of the step, so it does not advance the host's step
counts (``state[name]["step"]``, saved in checkpoints): :func:`count_replayed` does, after each
replay. SGD's first step, which makes the momentum buffer, is never captured: the graph step runs
the first step of every batch shape uncaptured.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from .optimizers import Adam, _leaves


class DeviceScalars:
    """The device-side scalars of one optimiser (``opt.device`` while attached).

    ``lr``: a 0-d array. ``adam[name]``: the pair (step size, bias2) of 0-d arrays that parameter
    ``name`` reads; parameters with the same step count share a pair. ``stepped``: the names the
    next step updates. ``version`` changes whenever a parameter is given another pair: a graph
    captured before then reads arrays that are no longer written, and must be captured again.
    """

    def __init__(self, like):
        self.like, self.dtype = like, np.dtype(like.dtype)
        self.lr = self._zero()
        self.adam: dict[str, tuple] = {}
        self.stepped: tuple = ()
        self.version = 0
        self._pairs: dict[tuple, tuple] = {}      # the names sharing a step count -> their pair
        self._written: dict[int, float] = {}      # id of a 0-d array -> the value last filled in

    def _zero(self):
        """A 0-d array of the parameters' dtype and backend (and array type).

        Made as shape (1,) and reshaped: CuPy's zeros_like reads ``shape=()`` as no shape given
        (cupy/_creation/basic.py, ``shape = shape if shape else a.shape``) and would return an
        array of the parameter's shape."""
        return get_array_module(self.like).zeros_like(self.like, shape=(1,), order="C").reshape(())

    def _fill(self, array, value: float) -> None:
        if self._written.get(id(array)) != value:   # an unchanged value costs no launch
            array.fill(self.dtype.type(value))
            self._written[id(array)] = value

    def sync(self, opt) -> None:
        """Write the values of ``opt``'s coming step (its lr, step counts + 1) into the arrays."""
        self._fill(self.lr, opt.lr)
        self.stepped = tuple(r.name for r in opt.refs if r.grad is not None)
        if not isinstance(opt, Adam):
            return
        by_count: dict[int, list] = {}
        for name in self.stepped:
            by_count.setdefault(opt.state.get(name, {}).get("step", 0), []).append(name)
        b1, b2 = opt.betas
        for count, names in by_count.items():
            pair = self._pairs.get(tuple(names))
            if pair is None:
                pair = self._pairs[tuple(names)] = (self._zero(), self._zero())
            t = count + 1
            self._fill(pair[0], opt.lr / (1 - b1 ** t))   # the floats of Adam._scalars, exactly
            self._fill(pair[1], math.sqrt(1 - b2 ** t))
            for name in names:
                if self.adam.get(name) is not pair:
                    self.adam[name] = pair
                    self.version += 1

    def count_replayed(self, opt) -> None:
        """Advance the host step counts of the parameters a replayed step updated."""
        for name in self.stepped:
            state = opt.state.get(name)
            if state is not None and "step" in state:
                state["step"] += 1


def attach(optimizer, like) -> None:
    """Make every optimiser of ``optimizer`` (an Optimizer or Optimizers) read device scalars,
    0-d arrays like the array ``like`` (a parameter: its dtype and backend)."""
    for opt in _leaves(optimizer).values():
        if opt.device is None:
            opt.device = DeviceScalars(like)


def detach(optimizer) -> None:
    """Back to Python floats (the plain step)."""
    for opt in _leaves(optimizer).values():
        opt.device = None


def sync(optimizer) -> tuple:
    """:meth:`DeviceScalars.sync` for every optimiser; returns their versions (see the class)."""
    leaves = _leaves(optimizer).values()
    for opt in leaves:
        opt.device.sync(opt)
    return tuple(opt.device.version for opt in leaves)


def count_replayed(optimizer) -> None:
    for opt in _leaves(optimizer).values():
        opt.device.count_replayed(opt)


def fixed_settings(optimizer) -> tuple:
    """Every hyper-parameter but the learning rate: a graph bakes them in (a change needs a new one)."""
    return tuple((name, h, getattr(opt, h)) for name, opt in _leaves(optimizer).items()
                 for h in opt.hyper if h != "lr") + tuple(
        (name, "nesterov", getattr(opt, "nesterov", None)) for name, opt in _leaves(optimizer).items())
