"""Blocks of the ResNet-26 released with residual adapters (Rebuffi et al., srebuffi/residual_adapters,
``models.py``, mode "normal", one task), with its parameter names.

    ConvTask      y = bns.0(conv(x))                 conv: 3x3, pad 1, bias-free    (``conv_task``)
    RABasicBlock  main(x) = conv2.1(relu(conv1(x)))  conv1 carries the block's stride
                  shortcut(x) = x, or with a change of shape the parameter-free "type A" shortcut
                  [avgpool2x2(x), 0 * avgpool2x2(x)] (2x2 average pool, then as many zero channels)
                  y = relu(main(x) + shortcut(x))

``conv2`` is ``Sequential(ReLU, ConvTask)`` as in the release (names ``conv2.1.conv.weight``,
``conv2.1.bns.0.*``). The release keeps one BN per task in ``bns`` (a ModuleList); one task gives
``bns.0``. Backward of the zero-channel shortcut: the zero channels do not depend on x, so only
the first C channels of dy flow back, through the average pool.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, rng as make_rng
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .container import Sequential
from .conv import Conv2d
from .module import Module
from .pooling import AvgPool2d


class ConvTask(Module):
    """``conv`` (3x3, pad 1, stride s, no bias) then ``bns.0`` (BN): the release's ``conv_task``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dtype=np.float32, rng=None):
        super().__init__()
        self.conv = Conv2d(in_planes, planes, 3, stride=stride, padding=1, dtype=dtype, rng=make_rng(rng))
        self.conv.followed_by_bn = True
        self.bns = Sequential(BatchNorm2d(planes, dtype=dtype))

    def forward(self, x):
        return self.bns(self.conv(x))

    def backward(self, dy):
        return self.conv.backward(self.bns.backward(dy))


class ZeroPadShortcut(Module):
    """(N, C, H, W) -> (N, out_channels, H//2, W//2): 2x2 average pool, then zero channels appended."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut cannot shrink {in_channels} channels to {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.pool = AvgPool2d(2, 2)

    def forward(self, x):
        p = self.pool(x)
        xp = get_array_module(p)
        out = xp.zeros((p.shape[0], self.out_channels) + p.shape[2:], dtype=p.dtype)
        out[:, :self.in_channels] = p
        return out

    def backward(self, dy):
        return self.pool.backward(dy[:, :self.in_channels])

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


class RABasicBlock(Module):
    """The release's ``BasicBlock``: children ``conv1`` (ConvTask), ``conv2`` (Sequential(ReLU,
    ConvTask)), ``avgpool`` (the zero-pad shortcut, only when the shape changes), ``relu``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dtype=np.float32, rng=None):
        super().__init__()
        gen = make_rng(rng)
        self.in_planes, self.planes, self.stride = int(in_planes), int(planes), int(stride)
        self.conv1 = ConvTask(in_planes, planes, stride, dtype=dtype, rng=gen)
        self.conv2 = Sequential(ReLU(), ConvTask(planes, planes, 1, dtype=dtype, rng=gen))
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes < in_planes:
                raise ValueError("the release's shortcut halves the resolution and pads channels: "
                                 f"stride 2 and planes >= in_planes, got stride {stride}, {in_planes} -> {planes}")
            self.avgpool = ZeroPadShortcut(in_planes, planes)
        else:
            self.avgpool = None
        self.relu = ReLU()

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        skip = x if self.avgpool is None else self.avgpool(x)
        return self.relu(out + skip)

    def backward(self, dy):
        d = self.relu.backward(dy)
        dmain = self.conv1.backward(self.conv2.backward(d))
        dskip = d if self.avgpool is None else self.avgpool.backward(d)
        return dmain + dskip

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.planes}, stride={self.stride}"
