"""The residual blocks of torchvision's ResNets (v1.5), with torchvision's names.

    BasicBlock (resnet18/34)    main(x) = bn2(conv2(relu(bn1(conv1(x)))))          conv1, conv2: 3x3
    Bottleneck (resnet50)       main(x) = bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))
                                conv1: 1x1 -> width, conv2: 3x3 with the block's stride (v1.5: the
                                stride is on the 3x3, not on the first 1x1), conv3: 1x1 -> 4*planes
    shortcut(x) = x, or downsample(x) = BN(conv1x1 with stride(x))  (children ``downsample.0/1``)
    y = relu(main(x) + shortcut(x))

Backward: the final ReLU passes ``d = dy * [sum > 0]`` to both branches and their input gradients
add up at x: ``dx = main.backward(d) + shortcut.backward(d)``. With the setting ``fuse_bn_relu`` the
ReLUs and the sum run inside the batch norms, as in :class:`~npmask.nn.residual.BasicBlock`.

These differ from npmask's WRN :class:`~npmask.nn.residual.BasicBlock` only in names
(``downsample`` instead of ``shortcut``) and the bottleneck; they are separate classes so that a
torchvision state_dict loads with no renaming.
"""
from __future__ import annotations

import numpy as np

from ..backend import rng as make_rng
from .activation import ReLU
from .batchnorm import BatchNorm2d, fuse_relu_into
from .container import Sequential
from .conv import Conv2d
from .module import Module


def _downsample(in_planes, out_planes, stride, dtype, gen):
    ds = Sequential(Conv2d(in_planes, out_planes, 1, stride=stride, dtype=dtype, rng=gen),
                    BatchNorm2d(out_planes, dtype=dtype))
    ds[0].followed_by_bn = True
    return ds


class _ResidualBlock(Module):
    """Shared forward/backward; ``_main_names()`` lists the (conv, bn) pairs of the main branch in
    order, with ``relu1``, ``relu2``, ... between them and ``relu`` after the sum."""

    def _main_names(self):
        raise NotImplementedError

    def forward(self, x):
        names = self._main_names()
        self._fused = all(fuse_relu_into(getattr(self, b)) for _, b in names)
        if self._fused:     # every ReLU, and the sum, inside the batch norms (fuse_bn_relu)
            return self._forward_fused(x, names)
        out = x
        for i, (c, b) in enumerate(names):
            out = getattr(self, b)(getattr(self, c)(out))
            if i < len(names) - 1:
                out = getattr(self, f"relu{i + 1}")(out)
        skip = x if self.downsample is None else self.downsample(x)
        out = out + skip
        return self.relu(out)

    def _forward_fused(self, x, names):
        out = x
        for c, b in names[:-1]:
            out = getattr(self, b).forward(getattr(self, c)(out), relu=True)
        c, b = names[-1]
        out = getattr(self, c)(out)
        skip = x if self.downsample is None else self.downsample(x)
        return getattr(self, b).forward(out, relu=True, residual=skip)

    def backward(self, dy):
        names = self._main_names()
        if getattr(self, "_fused", False):
            c, b = names[-1]
            dmain, d = getattr(self, b).backward(dy)   # d = dy * [y > 0], the sum's gradient
            dmain = getattr(self, c).backward(dmain)
            for c, b in reversed(names[:-1]):
                dmain = getattr(self, c).backward(getattr(self, b).backward(dmain))
        else:
            d = self.relu.backward(dy)
            dmain = d
            for i in reversed(range(len(names))):
                c, b = names[i]
                if i < len(names) - 1:
                    dmain = getattr(self, f"relu{i + 1}").backward(dmain)
                dmain = getattr(self, c).backward(getattr(self, b).backward(dmain))
        dskip = d if self.downsample is None else self.downsample.backward(d)
        return dmain + dskip


class ResNetBasicBlock(_ResidualBlock):
    """torchvision ``BasicBlock``: children ``conv1``, ``bn1``, ``relu``, ``conv2``, ``bn2``, ``downsample``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dtype=np.float32, rng=None):
        super().__init__()
        gen = make_rng(rng)
        self.in_planes, self.planes, self.stride = int(in_planes), int(planes), int(stride)
        self.conv1 = Conv2d(in_planes, planes, 3, stride=stride, padding=1, dtype=dtype, rng=gen)
        self.bn1 = BatchNorm2d(planes, dtype=dtype)
        self.relu = ReLU()
        self.conv2 = Conv2d(planes, planes, 3, padding=1, dtype=dtype, rng=gen)
        self.bn2 = BatchNorm2d(planes, dtype=dtype)
        self.downsample = (_downsample(in_planes, planes, stride, dtype, gen)
                           if stride != 1 or in_planes != planes else None)
        # torchvision applies its one ``relu`` module at every place; npmask's ReLU keeps the mask of
        # its last use for backward, so each inner place has its own (parameter-free: no state names)
        self.relu1 = ReLU()
        for c in (self.conv1, self.conv2):
            c.followed_by_bn = True

    def _main_names(self):
        return (("conv1", "bn1"), ("conv2", "bn2"))

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.planes}, stride={self.stride}"


class Bottleneck(_ResidualBlock):
    """torchvision ``Bottleneck`` (v1.5): ``conv1``/``bn1`` 1x1, ``conv2``/``bn2`` 3x3 stride s,
    ``conv3``/``bn3`` 1x1 to ``4 * planes``, ``relu``, ``downsample``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dtype=np.float32, rng=None):
        super().__init__()
        gen = make_rng(rng)
        self.in_planes, self.planes, self.stride = int(in_planes), int(planes), int(stride)
        out = planes * self.expansion
        self.conv1 = Conv2d(in_planes, planes, 1, dtype=dtype, rng=gen)
        self.bn1 = BatchNorm2d(planes, dtype=dtype)
        self.conv2 = Conv2d(planes, planes, 3, stride=stride, padding=1, dtype=dtype, rng=gen)
        self.bn2 = BatchNorm2d(planes, dtype=dtype)
        self.conv3 = Conv2d(planes, out, 1, dtype=dtype, rng=gen)
        self.bn3 = BatchNorm2d(out, dtype=dtype)
        self.relu = ReLU()
        self.downsample = (_downsample(in_planes, out, stride, dtype, gen)
                           if stride != 1 or in_planes != out else None)
        self.relu1, self.relu2 = ReLU(), ReLU()      # the inner uses of torchvision's ``relu``
        for c in (self.conv1, self.conv2, self.conv3):
            c.followed_by_bn = True

    def _main_names(self):
        return (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.planes * self.expansion}, stride={self.stride}"
