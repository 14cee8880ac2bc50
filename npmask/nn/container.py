"""Sequential: a chain of modules, run forward in order and backward in reverse order."""
from __future__ import annotations

from .activation import ReLU
from .batchnorm import fuse_relu_into
from .module import Module


class Sequential(Module):
    """``Sequential(m0, m1, ...)``: ``y = m_k(...m1(m0(x)))``; children are named "0", "1", ...

    Backward applies the chain rule in reverse: ``dx = m0.backward(m1.backward(... m_k.backward(dy)))``.
    Parameter names follow PyTorch: ``Sequential(Conv2d(...), BatchNorm2d(...))`` has ``0.weight``,
    ``1.weight``, ``1.bias``, ...

    With the setting ``fuse_bn_relu``, a batch norm directly followed by a ``ReLU`` runs it inside
    its own pass (``forward(x, relu=True)``, npmask/nn/batchnorm.py) and the ReLU module is skipped,
    forward and backward: the same numbers.
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
        self._inside_bn = set()        # positions of ReLUs run inside the batch norm before them
        for i, m in enumerate(mods):
            if i in self._inside_bn:
                continue
            if i + 1 < len(mods) and type(mods[i + 1]) is ReLU and fuse_relu_into(m):
                x = m.forward(x, relu=True)
                self._inside_bn.add(i + 1)
            else:
                x = m.forward(x)
        return x

    def backward(self, dy):
        inside_bn = getattr(self, "_inside_bn", set())
        for i, m in reversed(list(enumerate(self.children.values()))):
            if i not in inside_bn:
                dy = m.backward(dy)
        return dy
