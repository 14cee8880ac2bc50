"""The Module base class: parameters, gradients, buffers and children, PyTorch-style names.

Every layer and model in npmask is a :class:`Module`. A module

- holds its trainable arrays in ``params`` and their gradients in ``grads`` (same keys, shapes and
  dtypes; a frozen parameter has no entry in ``grads``), non-trained state such as batch-norm
  running statistics in ``buffers``, and sub-modules in ``children`` -- all ordered dicts, so the
  order of parameters never depends on hashing;
- computes ``y = forward(x)``, caching what its backward pass needs, and ``dx = backward(dy)``,
  which *accumulates* parameter gradients into ``grads[name]`` (``+=``, as PyTorch does, so
  :meth:`zero_grad` must be called between steps) and never writes into ``dy``;
- is updated in place: optimisers and ``load_state_dict`` write into the existing arrays
  (``p[...] = ...``), so references held elsewhere stay valid.

Sub-modules assigned as attributes (``self.conv1 = Conv2d(...)``) are registered as children
automatically, in assignment order; dotted names follow PyTorch (``layer1.0.conv1.weight``).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from ..backend import backend_name, get_array_module, get_backend, to_device


class ParamRef(NamedTuple):
    """A handle on one parameter: its dotted name, the module that owns it and its local key.

    Optimisers keep ParamRefs rather than arrays, so they always see the module's current array and
    gradient (``ref.data``, ``ref.grad``; ``grad`` is None while the parameter is frozen).
    """

    name: str
    module: "Module"
    key: str

    @property
    def data(self):
        return self.module.params[self.key]

    @property
    def grad(self):
        return self.module.grads.get(self.key)

    # The attributes a PyTorch user reads on a ``torch.nn.Parameter``.
    @property
    def requires_grad(self) -> bool:
        """True when the parameter is trained (not frozen)."""
        return self.key in self.module.grads

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    def numel(self) -> int:
        """Number of scalars, as ``torch.Tensor.numel``."""
        return int(self.data.size)


class NamedParameter(tuple):
    """One ``(name, array)`` pair of :meth:`Module.named_parameters`; it unpacks, compares and
    prints as the plain pair, and also carries its :class:`ParamRef` (``.ref``) so that an optimiser
    given ``model.named_parameters()`` can find the gradient of each array."""

    def __new__(cls, ref: ParamRef):
        self = super().__new__(cls, (ref.name, ref.data))
        self.ref = ref
        return self


class Module:
    """Base class of layers and models. Subclasses implement ``forward`` and ``backward``."""

    def __init__(self):
        object.__setattr__(self, "params", {})
        object.__setattr__(self, "grads", {})
        object.__setattr__(self, "buffers", {})
        object.__setattr__(self, "children", {})
        object.__setattr__(self, "frozen", set())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self.children[name] = value
        elif name in self.__dict__.get("children", {}):
            del self.children[name]  # a child replaced by a non-module
        object.__setattr__(self, name, value)

    def register_param(self, name: str, value) -> None:
        """Add a trainable array; its gradient buffer is allocated now (zeros, same dtype)."""
        xp = get_array_module(value)
        self.params[name] = value
        if name not in self.frozen:
            self.grads[name] = xp.zeros_like(value)

    def register_buffer(self, name: str, value) -> None:
        """Add a non-trainable array that is part of the state (saved by ``state_dict``)."""
        self.buffers[name] = value

    def add_module(self, name: str, module: "Module") -> "Module":
        """Register ``module`` as child ``name`` (for names that are not identifiers, e.g. "0")."""
        self.children[name] = module
        if name.isidentifier():
            object.__setattr__(self, name, module)
        return module

    # ------------------------------------------------------------------ freezing
    def requires_grad(self, name: str) -> bool:
        """True when parameter ``name`` is trained (a gradient is computed and stored for it)."""
        return name in self.grads

    def freeze(self, *names: str, recurse: bool = True) -> "Module":
        """Stop computing and storing gradients for ``names`` (all parameters when none given).

        With no names and ``recurse=True`` the whole subtree is frozen.
        """
        targets = names or tuple(self.params)
        for n in targets:
            if n not in self.params:
                raise KeyError(f"{type(self).__name__} has no parameter {n!r}; it has {list(self.params)}")
            self.frozen.add(n)
            self.grads.pop(n, None)
        if not names and recurse:
            for child in self.children.values():
                child.freeze(recurse=True)
        return self

    def unfreeze(self, *names: str, recurse: bool = True) -> "Module":
        """Undo :meth:`freeze`: gradient buffers are allocated again (zeros)."""
        targets = names or tuple(self.params)
        for n in targets:
            if n not in self.params:
                raise KeyError(f"{type(self).__name__} has no parameter {n!r}; it has {list(self.params)}")
            self.frozen.discard(n)
            if n not in self.grads:
                self.grads[n] = get_array_module(self.params[n]).zeros_like(self.params[n])
        if not names and recurse:
            for child in self.children.values():
                child.unfreeze(recurse=True)
        return self

    def accumulate_grad(self, name: str, value) -> None:
        """``grads[name] += value`` when ``name`` is trained; nothing when it is frozen."""
        g = self.grads.get(name)
        if g is not None:
            g += value

    # ------------------------------------------------------------------ computation
    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def __call__(self, x):
        return self.forward(x)

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """Yield ``(dotted_name, module)`` for this module and every descendant, depth first."""
        yield prefix, self
        for name, child in self.children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def parameter_refs(self, trainable_only: bool = True, include=None, exclude=None) -> list[ParamRef]:
        """ParamRefs of the parameters of the subtree, in a stable order.

        ``include``/``exclude``: optional tuples of dotted-name prefixes to keep or drop, e.g.
        ``model.parameter_refs(exclude=("fc",))`` for everything but the classifier.
        """
        refs = []
        for mname, m in self.named_modules():
            for key in m.params:
                if trainable_only and key not in m.grads:
                    continue
                name = f"{mname}.{key}" if mname else key
                if include is not None and not _matches(name, include):
                    continue
                if exclude is not None and _matches(name, exclude):
                    continue
                refs.append(ParamRef(name, m, key))
        return refs

    def named_parameters(self, trainable_only: bool = False) -> list[tuple[str, object]]:
        """``[(dotted_name, array), ...]`` of every parameter (frozen ones too unless asked).

        As in PyTorch, the list can be given to an optimiser: ``SGD(model.named_parameters(), lr=0.1)``
        (each pair is a :class:`NamedParameter` that remembers where its gradient lives).
        """
        return [NamedParameter(r) for r in self.parameter_refs(trainable_only=trainable_only)]

    def parameters(self, trainable_only: bool = False) -> list[ParamRef]:
        """Every parameter of the subtree (frozen ones too unless asked), as PyTorch's ``parameters()``.

        Each item is a :class:`ParamRef`: like a ``torch.nn.Parameter`` it has ``.data`` (the array),
        ``.grad`` (its gradient, None while frozen), ``.requires_grad``, ``.shape`` and ``numel()``.
        Give them to an optimiser as in PyTorch: ``Adam(model.parameters(), lr=1e-3)``; frozen
        parameters are skipped at each step, as PyTorch skips parameters whose ``grad`` is None.
        """
        return self.parameter_refs(trainable_only=trainable_only)

    def named_buffers(self) -> list[tuple[str, object]]:
        out = []
        for mname, m in self.named_modules():
            for key, v in m.buffers.items():
                out.append((f"{mname}.{key}" if mname else key, v))
        return out

    def num_parameters(self) -> int:
        """Number of scalar parameters (frozen included, buffers excluded)."""
        return int(sum(p.size for _, p in self.named_parameters()))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Ordered ``{dotted_name: array}`` of parameters and buffers (references, not copies)."""
        sd = dict(self.named_parameters())
        sd.update(self.named_buffers())
        return sd

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays from ``state`` into this module's arrays, in place.

        Shapes must match exactly; values are cast to the existing dtype and backend. With
        ``strict`` a missing or unexpected key is an error listing them.
        """
        own = {}
        for mname, m in self.named_modules():
            for store in (m.params, m.buffers):
                for key in store:
                    own[f"{mname}.{key}" if mname else key] = (store, key)
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
        for name, (store, key) in own.items():
            if name not in state:
                continue
            dst = store[key]
            src = state[name]
            if tuple(np.shape(src)) != tuple(dst.shape):
                raise ValueError(f"state_dict entry {name!r} has shape {tuple(np.shape(src))}, "
                                 f"the module expects {tuple(dst.shape)}")
            # to dst's backend first: NumPy refuses a CuPy array (its __array__ raises TypeError)
            xp = get_array_module(dst)
            dst[...] = xp.asarray(to_device(src, backend_name(dst)), dtype=dst.dtype)

    def train(self, mode: bool = True) -> "Module":
        """Set training mode on the whole subtree (batch statistics, dropout active)."""
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every gradient of the subtree to zero, in place."""
        for m in self.modules():
            for g in m.grads.values():
                g.fill(0)

    def _map_arrays(self, fn) -> "Module":
        for m in self.modules():
            for store in (m.params, m.grads, m.buffers):
                for key in list(store):
                    store[key] = fn(store[key])
            m._after_map_arrays(fn)
        return self

    def _after_map_arrays(self, fn) -> None:
        """Hook for modules that keep other arrays (e.g. shared weights): convert them with fn."""

    def to(self, backend: str) -> "Module":
        """Move every array of the subtree to ``backend`` ("numpy" or "cupy"). Create optimisers after."""
        get_backend(backend)  # fail early with a clear error
        return self._map_arrays(lambda a: to_device(a, backend))

    def astype(self, dtype) -> "Module":
        """Cast every floating array of the subtree to ``dtype`` (float64 for gradient checks)."""
        def cast(a):
            return a.astype(dtype) if a.dtype.kind == "f" else a
        return self._map_arrays(cast)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self.children.items():
            sub = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


def _matches(name: str, prefixes) -> bool:
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(name == p or name.startswith(p + ".") for p in prefixes)
