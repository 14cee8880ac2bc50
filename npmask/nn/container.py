"""Sequential: a chain of modules, run forward in order and backward in reverse order."""
from __future__ import annotations

from .module import Module


class Sequential(Module):
    """``Sequential(m0, m1, ...)``: ``y = m_k(...m1(m0(x)))``; children are named "0", "1", ...

    Backward applies the chain rule in reverse: ``dx = m0.backward(m1.backward(... m_k.backward(dy)))``.
    Parameter names follow PyTorch: ``Sequential(Conv2d(...), BatchNorm2d(...))`` has ``0.weight``,
    ``1.weight``, ``1.bias``, ...
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
        for m in self.children.values():
            x = m.forward(x)
        return x

    def backward(self, dy):
        for m in reversed(list(self.children.values())):
            dy = m.backward(dy)
        return dy
