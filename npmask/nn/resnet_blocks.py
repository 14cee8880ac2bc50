"""The residual blocks of torchvision's ResNets (v1.5), with torchvision's names.

    BasicBlock (resnet18/34)    main(x) = bn2(conv2(relu(bn1(conv1(x)))))          conv1, conv2: 3x3
    Bottleneck (resnet50)       main(x) = bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))
                                conv1: 1x1 -> width, conv2: 3x3 with the block's stride (v1.5: the
                                stride is on the 3x3, not on the first 1x1), conv3: 1x1 -> 4*planes
    shortcut(x) = x, or downsample(x) = BN(conv1x1 with stride(x))  (children ``downsample.0/1``)
    y = relu(main(x) + shortcut(x))

Backward: the final ReLU passes ``d = dy * [sum > 0]`` to both branches and their input gradients
add up at x: ``dx = main.backward(d) + shortcut.backward(d)``. Each ``relu(bn(.) [+ shortcut])``
step goes through a :class:`~npmask.nn.bn_relu.BNReLU`: with the setting ``fuse_bn_relu`` the ReLUs
and the sum run inside the batch norms, as in :class:`~npmask.nn.residual.BasicBlock`.

These differ from npmask's WRN :class:`~npmask.nn.residual.BasicBlock` only in names
(``downsample`` instead of ``shortcut``) and the bottleneck; they are separate classes so that a
torchvision state_dict loads with no renaming.
"""
from __future__ import annotations

import numpy as np

from ..backend import rng as make_rng
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .bn_relu import BNReLU
from .container import Sequential
from .conv import Conv2d
from .module import Module


def _downsample(in_planes, out_planes, stride, dtype, gen):
    ds = Sequential(Conv2d(in_planes, out_planes, 1, stride=stride, dtype=dtype, rng=gen),
                    BatchNorm2d(out_planes, dtype=dtype))
    ds[0].followed_by_bn = True
    return ds


class _ResidualBlock(Module):
    """Shared forward/backward over the main branch's stages ``_STAGES``, the (conv, bn, relu) names
    in order: ``relu1``, ``relu2``, ... after the inner batch norms, ``relu`` after the sum.

        out = relu_i(bn_i(conv_i(out)))             each inner stage, from out = x
        y   = relu(bn(conv(out)) + shortcut(x))     the last stage
    """

    _STAGES = ()

    def __init__(self):
        super().__init__()
        self._bn_relus = [BNReLU() for _ in self._STAGES]   # each stage's relu(bn(.) [+ shortcut])

    def _stages(self):
        """(conv, bn, relu, BNReLU) of each stage, in order."""
        return [(getattr(self, c), getattr(self, b), getattr(self, r), bn_relu)
                for (c, b, r), bn_relu in zip(self._STAGES, self._bn_relus)]

    def forward(self, x):
        *inner, (conv, bn, relu, bn_relu) = self._stages()
        out = x
        for conv_i, bn_i, relu_i, bn_relu_i in inner:         # out = relu_i(bn_i(conv_i(out)))
            out = bn_relu_i.forward(bn_i, relu_i, conv_i(out))
        out = conv(out)
        skip = x if self.downsample is None else self.downsample(x)
        return bn_relu.forward(bn, relu, out, residual=skip)   # relu(bn(out) + skip)

    def backward(self, dy):
        *inner, (conv, bn, relu, bn_relu) = self._stages()
        dmain, d = bn_relu.backward(bn, relu, dy)       # d: the sum's gradient, for both branches
        dmain = conv.backward(dmain)
        for conv_i, bn_i, relu_i, bn_relu_i in reversed(inner):
            dmain = conv_i.backward(bn_relu_i.backward(bn_i, relu_i, dmain))
        dskip = d if self.downsample is None else self.downsample.backward(d)
        return dmain + dskip


class ResNetBasicBlock(_ResidualBlock):
    """torchvision ``BasicBlock``: children ``conv1``, ``bn1``, ``relu``, ``conv2``, ``bn2``, ``downsample``."""

    expansion = 1
    _STAGES = (("conv1", "bn1", "relu1"), ("conv2", "bn2", "relu"))

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

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.planes}, stride={self.stride}"


class Bottleneck(_ResidualBlock):
    """torchvision ``Bottleneck`` (v1.5): ``conv1``/``bn1`` 1x1, ``conv2``/``bn2`` 3x3 stride s,
    ``conv3``/``bn3`` 1x1 to ``4 * planes``, ``relu``, ``downsample``."""

    expansion = 4
    _STAGES = (("conv1", "bn1", "relu1"), ("conv2", "bn2", "relu2"), ("conv3", "bn3", "relu"))

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

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.planes * self.expansion}, stride={self.stride}"
