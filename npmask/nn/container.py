"""Sequential: a chain of modules, run forward in order and backward in reverse order."""
from __future__ import annotations

from .activation import ReLU
from .bn_relu import BNReLU
from .module import Module


class Sequential(Module):
    """``Sequential(m0, m1, ...)``: ``y = m_k(...m1(m0(x)))``; children are named "0", "1", ...

    Backward applies the chain rule in reverse: ``dx = m0.backward(m1.backward(... m_k.backward(dy)))``.
    Parameter names follow PyTorch: ``Sequential(Conv2d(...), BatchNorm2d(...))`` has ``0.weight``,
    ``1.weight``, ``1.bias``, ...

    A module directly followed by a ``ReLU`` runs with it as one :class:`~npmask.nn.bn_relu.BNReLU`
    step: with the setting ``fuse_bn_relu``, a batch norm runs the ReLU inside its own pass
    (npmask/nn/batchnorm.py) and the ReLU module is skipped, forward and backward: the same numbers.
    Any other module, and every module with the setting off, runs before its ReLU as written.
    """

    def __init__(self, *modules: Module):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> "Sequential":
        if not isinstance(module, Module):
            raise TypeError(f"Sequential holds Modules, got {type(module).__name__}")
        self.add_module(str(len(self.children)), module)
        return self

    def __len__(self) -> int:
        return len(self.children)

    def __iter__(self):
        return iter(self.children.values())

    def __getitem__(self, index):
        mods = list(self.children.values())
        if isinstance(index, slice):
            return Sequential(*mods[index])  # shares the modules, as PyTorch does
        try:
            return mods[index]
        except IndexError:
            raise IndexError(f"Sequential index {index} out of range for length {len(mods)}") from None

    def forward(self, x):
        mods = list(self.children.values())
        self._bn_relus = {}            # position of a module run with the ReLU after it: its BNReLU
        for i, m in enumerate(mods):
            if i - 1 in self._bn_relus:
                continue               # this ReLU ran in the step before it
            if i + 1 < len(mods) and type(mods[i + 1]) is ReLU:
                self._bn_relus[i] = BNReLU()
                x = self._bn_relus[i].forward(m, mods[i + 1], x)
            else:
                x = m.forward(x)
        return x

    def backward(self, dy):
        mods = list(self.children.values())
        bn_relus = getattr(self, "_bn_relus", {})
        for i in reversed(range(len(mods))):
            if i in bn_relus:
                dy = bn_relus[i].backward(mods[i], mods[i + 1], dy)
            elif i - 1 not in bn_relus:
                dy = mods[i].backward(dy)
        return dy
