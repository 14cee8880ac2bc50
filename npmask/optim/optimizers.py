"""Optimisers (SGD, Adam) and named groups of optimisers (learning-rate schedulers: schedulers.py).

An optimiser holds a list of :class:`~npmask.nn.module.ParamRef` and reads ``ref.data`` / ``ref.grad`` at every step, so it always sees the module's current arrays.
Parameters are updated **in place** (``p -= ...``), so every other reference to them stays valid.
A parameter whose gradient is ``None`` (frozen) is skipped: no update, no state.

It takes its parameters as PyTorch's optimisers do, from ``model.parameters()`` or
``model.named_parameters()`` (or ``model.parameter_refs(...)``, the same ParamRefs with name
filters, and ``MultiDomainModel.parameter_groups()``)::

    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)

The update rules follow PyTorch's ``torch.optim.SGD`` and ``torch.optim.Adam`` exactly. With
gradient ``g``, parameter ``p``, learning rate ``lr`` and weight decay ``wd``:

SGD (momentum ``mu``, dampening ``d``)::

    g   <- g + wd * p                          (L2 weight decay, added to the gradient)
    buf <- g                                   (first step: the buffer starts at the gradient)
    buf <- mu * buf + (1 - d) * g              (later steps)
    g   <- g + mu * buf   (Nesterov)   or   g <- buf   (classical momentum)
    p   <- p - lr * g

Adam (``beta1``, ``beta2``, ``eps``; ``t`` counts this parameter's steps, starting at 1)::

    g <- g + wd * p
    m <- beta1 * m + (1 - beta1) * g           (first moment, starts at 0)
    v <- beta2 * v + (1 - beta2) * g**2        (second moment, starts at 0)
    p <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

The bias corrections undo the pull of the zero initialisation of ``m`` and ``v`` towards 0 in the
first steps. Optimiser state lives on the parameter's backend and in its dtype (float32 parameters
get float32 moments).

Two optimisers for two parts of a model, as in the paper's protocol, are one line::

    opt = Optimizers(body=Adam(model.parameter_refs(exclude=("fc",)), lr=1e-4),
                     head=SGD(model.parameter_refs(include=("fc",)), lr=1e-3, momentum=0.9))
    opt["head"].lr = 1e-2          # each group's learning rate can be changed by hand
    sched = MultiStepLR(opt, milestones=[45], gamma=0.1)   # scales every group's base lr

``state_dict()`` of an optimiser, a group of optimisers or a scheduler is a flat
``{str: numpy.ndarray}`` dict (scalars as 0-d arrays), ready for ``numpy.savez`` and loadable with
``allow_pickle=False``.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import backend_name, get_array_module, to_device, to_numpy
from ..nn.module import Module, NamedParameter, ParamRef
from ..nn.parallel import each_chunk
from . import cuda, grads


class Optimizer:
    """Base class: a list of ParamRefs, hyper-parameters, and per-parameter state.

    ``state[param_name]`` is a dict of arrays (and the int ``"step"`` where used). Subclasses
    list their scalar hyper-parameters in ``hyper`` and implement :meth:`_update`.
    """

    hyper: tuple = ("lr",)
    buffers: tuple = ()  # names of the per-parameter state arrays, for state_dict validation
    # None: a step reads lr (and Adam's bias corrections) as Python floats. A step captured in a
    # CUDA graph reads them from device memory instead (npmask.optim.device.attach).
    device = None

    def __init__(self, refs, lr: float):
        self.refs = _as_refs(refs, type(self).__name__)
        names = [r.name for r in self.refs]
        if len(set(names)) != len(names):
            raise ValueError("an optimiser was given the same parameter twice: "
                             f"{sorted({n for n in names if names.count(n) > 1})}")
        if not lr >= 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.lr = float(lr)
        self.state: dict[str, dict] = {}

    # ------------------------------------------------------------------ stepping
    def step(self) -> None:
        """Update every parameter that has a gradient, in place.

        The parameters are independent, so on NumPy they are shared out over npmask's threads
        (:func:`npmask.nn.parallel.each_chunk`, one parameter per item; the same bits as serially),
        unless two of them are the same array (then one after the other, as updates of one array).
        """
        self._step_each([ref for ref in self.refs if ref.grad is not None])  # None: frozen

    def _step_each(self, todo) -> None:
        """:meth:`step` for the parameters ``todo`` (each has a gradient), one update each."""
        for ref in todo:
            self.state.setdefault(ref.name, {})

        def update(_, i):
            ref = todo[i]
            self._update(ref.name, ref.data, ref.grad, self.state[ref.name])
        if len({id(ref.data) for ref in todo}) < len(todo):   # one array under two names (tied
            for i in range(len(todo)):                          # weights): its updates must not
                update(None, i)                                 # run at the same time
            return
        xp = get_array_module(todo[0].data) if todo else np
        each_chunk(xp, len(todo), lambda: None, update, floats=sum(ref.data.size for ref in todo))

    def _update(self, name, p, g, state) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Set the gradients of this optimiser's parameters to zero: one fill per flat array that
        holds them (:mod:`npmask.optim.grads`), on a GPU one launch instead of one per parameter."""
        self._grads = grads.zero(self.refs, getattr(self, "_grads", None))

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict:
        """Flat ``{key: numpy array}``: hyper-parameters and per-parameter state, as copies.

        Keys: ``"lr"`` (and the other hyper-parameters, e.g. ``"momentum"``, ``"betas"``) and
        ``"state.<param name>.<buffer>"`` (e.g. ``"state.fc.weight.exp_avg"``,
        ``"state.fc.weight.step"``). Arrays are NumPy copies in the parameter's dtype.
        """
        out = {}
        for h in self.hyper:
            out[h] = np.asarray(getattr(self, h), dtype=np.float64)
        for pname, st in self.state.items():
            for key, val in st.items():
                if key == "step":
                    out[f"state.{pname}.{key}"] = np.asarray(val, dtype=np.int64)
                else:
                    out[f"state.{pname}.{key}"] = np.array(to_numpy(val), copy=True)
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Restore hyper-parameters and state saved by :meth:`state_dict` (values are copied).

        State arrays are cast to each parameter's dtype and moved to its backend. A key naming a
        parameter this optimiser does not hold, an unknown buffer, or a wrong shape is an error.
        """
        missing = [h for h in self.hyper if h not in sd]
        if missing:
            raise KeyError(f"{type(self).__name__} state_dict lacks hyper-parameters {missing}")
        refs = {r.name: r for r in self.refs}
        new_state: dict[str, dict] = {}
        for key, val in sd.items():
            if key in self.hyper:
                continue
            if not key.startswith("state."):
                raise KeyError(f"unexpected key {key!r} in a {type(self).__name__} state_dict")
            pname, _, buf = key[len("state."):].rpartition(".")
            if pname not in refs:
                raise KeyError(f"state_dict key {key!r}: this optimiser holds no parameter {pname!r}")
            if buf != "step" and buf not in self.buffers:
                raise KeyError(f"state_dict key {key!r}: {type(self).__name__} keeps no buffer "
                               f"{buf!r} (it keeps {list(self.buffers)} and 'step')")
            p = refs[pname].data
            if buf == "step":
                new_state.setdefault(pname, {})[buf] = int(np.asarray(val))
                continue
            if tuple(np.shape(val)) != tuple(p.shape):
                raise ValueError(f"state_dict key {key!r} has shape {tuple(np.shape(val))}, "
                                 f"parameter {pname!r} has shape {tuple(p.shape)}")
            arr = to_device(np.asarray(val), backend_name(p))
            new_state.setdefault(pname, {})[buf] = arr.astype(p.dtype, copy=True)
        for h in self.hyper:
            value = np.asarray(sd[h], dtype=np.float64)
            setattr(self, h, float(value) if value.ndim == 0 else tuple(float(v) for v in value))
        self.state = new_state

    def extra_repr(self) -> str:
        return ", ".join(f"{h}={getattr(self, h)}" for h in self.hyper)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.refs)} params, {self.extra_repr()})"


def _as_refs(params, who: str = "an optimiser") -> list:
    """The ParamRefs in ``params``: ``model.parameters()``, ``model.named_parameters()`` or
    ``model.parameter_refs()``. Anything else is a TypeError that says what to pass instead."""
    hint = ("pass model.parameters() or model.named_parameters() (the arrays alone do not know "
            "where their gradients are); for a part of the model filter model.parameters() by "
            "p.name, or use model.parameter_refs(include=(...))")
    if isinstance(params, Module) or hasattr(params, "parameter_groups"):
        raise TypeError(f"{who} got the model itself; {hint}")
    if isinstance(params, dict) or hasattr(params, "shape") or isinstance(params, (str, bytes)):
        raise TypeError(f"{who} got a {type(params).__name__}; {hint}")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"{who} got a {type(params).__name__}, not a list of parameters; "
                        f"{hint}") from None
    refs = []
    for i, item in enumerate(items):
        if isinstance(item, ParamRef):
            refs.append(item)
        elif isinstance(item, NamedParameter):
            refs.append(item.ref)
        elif isinstance(item, dict):
            raise TypeError(f"{who}: item {i} is a dict; PyTorch-style parameter groups are not "
                            "supported -- give each group its own optimiser and step them together "
                            "with Optimizers(body=Adam(...), head=SGD(...))")
        else:
            raise TypeError(f"{who}: item {i} is a {type(item).__name__}, not a parameter; {hint}")
    return refs


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    See the module docstring for the update; it matches ``torch.optim.SGD``.
    """

    hyper = ("lr", "momentum", "dampening", "weight_decay")
    buffers = ("momentum_buffer",)

    def __init__(self, refs, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0):
        super().__init__(refs, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.dampening = float(dampening)

    def _update(self, name, p, g, state):
        if self.weight_decay != 0:
            g = g + self.weight_decay * p  # a new array: the module's gradient is left untouched
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= (self.lr if self.device is None else self.device.lr) * g

    def extra_repr(self) -> str:
        return super().extra_repr() + (", nesterov=True" if self.nesterov else "")


class Adam(Optimizer):
    """Adam with bias correction and optional L2 weight decay, as ``torch.optim.Adam``.

    See the module docstring for the update. ``state[name]["step"]`` counts the steps this
    parameter has taken (a parameter frozen for a while does not advance its count).
    """

    hyper = ("lr", "betas", "eps", "weight_decay")
    buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, refs, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(refs, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"Adam betas must lie in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    @staticmethod
    def _counted(state, p):
        """(m, v, t): the moments (zeros at the first step) and the step count, advanced by one."""
        if "step" not in state:
            xp = get_array_module(p)
            state.update(step=0, exp_avg=xp.zeros_like(p), exp_avg_sq=xp.zeros_like(p))
        state["step"] += 1
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    def _scalars(self, name, t: int):
        """(step size, bias2) of step ``t``: ``lr / (1 - beta1**t)`` and ``sqrt(1 - beta2**t)``, as
        floats, or as the 0-d device arrays a captured step reads (npmask.optim.device)."""
        if self.device is not None:
            return self.device.adam[name]
        b1, b2 = self.betas
        return self.lr / (1 - b1 ** t), math.sqrt(1 - b2 ** t)

    def _update(self, name, p, g, state):
        m, v, t = self._counted(state, p)
        step_size, bias2 = self._scalars(name, t)
        if get_array_module(p) is not np:
            # CuPy: the 13 array operations of _arithmetic (15 with weight decay) are as many
            # kernel launches per parameter, and a masked WRN-28-4 trains 168 small arrays with
            # Adam: one fused kernel does the same update.
            (b1, b2), T = self.betas, p.dtype.type
            if self.device is None:          # floats as scalars of p's dtype; else 0-d arrays
                step_size, bias2 = T(step_size), T(bias2)
            cuda.adam_kernel()(g, step_size, T(b1), T(b2), T(1 - b1), T(1 - b2),
                               bias2, T(self.eps), T(self.weight_decay), p, m, v)
            return
        self._arithmetic(np, p, g, m, v, step_size, bias2)

    def _arithmetic(self, xp, p, g, m, v, step_size, bias2) -> None:
        """p, m and v updated in place, elementwise (an entry's bits depend on that entry only)."""
        b1, b2 = self.betas
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        denom = xp.sqrt(v)
        denom /= bias2
        denom += self.eps
        # p -= step_size * m / denom, reusing denom's memory for the update
        xp.divide(m, denom, out=denom)
        denom *= step_size
        p -= denom

    # NumPy parameters of at most this many entries (k's, batch-norm vectors: ~90 of a masked WRN-16-1's
    # ~100) are updated together, per step count and dtype: 13 operations of microseconds each. 0: off.
    together_max = 4096

    def step(self) -> None:
        todo = [ref for ref in self.refs if ref.grad is not None]
        if todo and get_array_module(todo[0].data) is not np and cuda.step_all(self, todo):
            return                                      # CuPy: every parameter in one launch
        if (not todo or self.together_max <= 0 or get_array_module(todo[0].data) is not np
                or len({id(ref.data) for ref in todo}) < len(todo)):
            return self._step_each(todo)                # CuPy, tied arrays, or switched off
        groups: dict = {}
        for ref in todo:
            if ref.data.size <= self.together_max:
                groups.setdefault((ref.data.dtype.str, self.state.get(ref.name, {}).get("step", 0)), []).append(ref)
        together = [refs for refs in groups.values() if len(refs) > 1]
        for refs in together:
            self._update_together(refs)
        done = {id(ref) for refs in together for ref in refs}
        self._step_each([ref for ref in todo if id(ref) not in done])   # one by one, on threads

    def _update_together(self, refs) -> None:
        """One update of ``refs`` concatenated (one dtype, one step count): each one's bits."""
        counted = [self._counted(self.state.setdefault(r.name, {}), r.data) for r in refs]
        arrays = [(r.data, r.grad, m, v) for r, (m, v, _) in zip(refs, counted)]
        p, g, m, v = (np.concatenate([a[j].reshape(-1) for a in arrays]) for j in range(4))
        self._arithmetic(np, p, g, m, v, *self._scalars(refs[0].name, counted[0][2]))
        for (data, _, m_ref, v_ref), end in zip(arrays, np.cumsum([a[0].size for a in arrays])):
            for dest, src in ((data, p), (m_ref, m), (v_ref, v)):
                dest[...] = src[end - data.size:end].reshape(data.shape)


class Optimizers:
    """Named optimisers stepped together: ``Optimizers(body=Adam(...), head=SGD(...))``.

    ``opt["head"]`` (or ``opt.groups["head"]``) is one optimiser; its ``lr`` can be set by hand or
    by a scheduler built on the whole group. The named optimisers must not share parameters.
    """

    def __init__(self, **groups: Optimizer):
        if not groups:
            raise ValueError("Optimizers needs at least one named optimiser")
        seen: dict[str, str] = {}
        for gname, opt in groups.items():
            if not isinstance(opt, Optimizer):
                raise TypeError(f"group {gname!r} is a {type(opt).__name__}, not an Optimizer")
            for r in opt.refs:
                if r.name in seen:
                    raise ValueError(f"parameter {r.name!r} is in both groups {seen[r.name]!r} "
                                     f"and {gname!r}")
                seen[r.name] = gname
        self.groups: dict[str, Optimizer] = dict(groups)

    def __getitem__(self, name: str) -> Optimizer:
        try:
            return self.groups[name]
        except KeyError:
            raise KeyError(f"no optimiser group {name!r}; groups are {list(self.groups)}") from None

    @property
    def lr(self) -> dict:
        """``{group name: learning rate}`` (read-only view; set ``opt[name].lr`` to change one)."""
        return {k: o.lr for k, o in self.groups.items()}

    def step(self) -> None:
        for opt in self.groups.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.groups.values():
            opt.zero_grad()

    def state_dict(self) -> dict:
        """Flat dict: each group's keys prefixed with ``"<group>/"`` (e.g. ``"head/lr"``)."""
        out = {}
        for gname, opt in self.groups.items():
            for key, val in opt.state_dict().items():
                out[f"{gname}/{key}"] = val
        return out

    def load_state_dict(self, sd: dict) -> None:
        parts: dict[str, dict] = {g: {} for g in self.groups}
        for key, val in sd.items():
            gname, sep, rest = key.partition("/")
            if not sep or gname not in parts:
                raise KeyError(f"state_dict key {key!r} names no group of {list(self.groups)}")
            parts[gname][rest] = val
        for gname, opt in self.groups.items():
            opt.load_state_dict(parts[gname])

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={o!r}" for k, o in self.groups.items())
        return f"Optimizers({inner})"


def _leaves(optimizer) -> dict[str, Optimizer]:
    """``{group name: Optimizer}``; a single optimiser is the group ``""``."""
    if isinstance(optimizer, Optimizers):
        return optimizer.groups
    if isinstance(optimizer, Optimizer):
        return {"": optimizer}
    raise TypeError(f"a scheduler needs an Optimizer or Optimizers, got {type(optimizer).__name__}")
