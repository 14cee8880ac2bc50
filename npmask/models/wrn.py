"""Wide Residual Network (WRN-d-k), the Visual Decathlon backbone (docs/design.md, section 5).

    stem     conv3x3 3->16, stride 1   BN  ReLU                  (N, 16, S, S)
    layer1   n basic blocks, width 16k, first block stride 2     (N, 16k, S/2, S/2)
    layer2   n basic blocks, width 32k, first block stride 2     (N, 32k, S/4, S/4)
    layer3   n basic blocks, width 64k, first block stride 2     (N, 64k, S/8, S/8)
    pool     global average pooling                              (N, 64k)
    fc       linear classifier                                   (N, num_classes)

with ``n = (depth - 4) / 6`` (two convs per block, plus the stem and the classifier, plus the
projection convs counted as in the WRN paper: depth 28 -> n = 4, 16 -> 2, 10 -> 1). The first block
of every stage halves the resolution (64 -> 32 -> 16 -> 8 for 64x64 Decathlon images) and has a
1x1 stride-2 conv + BN projection shortcut. All convs are bias-free (each is followed by BN).
"""
from __future__ import annotations

import numpy as np

from ..backend import rng as make_rng
from ..nn import BatchNorm2d, GlobalAvgPool2d, Linear, ReLU, Sequential
from ..nn.bn_relu import BNReLU
from ..nn.conv import Conv2d
from ..nn.module import Module
from ..nn.residual import BasicBlock


class WRN(Module):
    """WRN-``depth``-``width``: (N, 3, S, S) images -> (N, num_classes) logits.

    Parameter names follow PyTorch: ``conv1.weight``, ``bn1.weight``, ``layer1.0.conv1.weight``,
    ``layer1.0.shortcut.0.weight``, ``fc.weight``. ``head_name = "fc"``. Every Conv2d/Linear has
    ``followed_by_bn`` (True for the convs, False for ``fc``). ``input_layer_name = "conv1"``: the
    layer that takes the images, whose input gradient training skips
    (:func:`npmask.training.loop.train_step`).
    """

    head_name = "fc"
    input_layer_name = "conv1"

    def __init__(self, depth: int = 28, width: int = 4, num_classes: int = 10, input_size: int = 64,
                 dtype=np.float32, rng=None):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if width < 1 or num_classes < 1 or input_size < 1:
            raise ValueError(f"WRN needs width, num_classes and input_size >= 1, got {width}, "
                             f"{num_classes}, {input_size}")
        gen = make_rng(rng)
        self.depth, self.width = int(depth), int(width)
        self.num_classes, self.input_size = int(num_classes), int(input_size)
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)

        self.conv1 = Conv2d(3, 16, 3, stride=1, padding=1, dtype=dtype, rng=gen)
        self.conv1.followed_by_bn = True
        self.bn1 = BatchNorm2d(16, dtype=dtype)
        self.relu = ReLU(inplace=True)                 # bn1's output, needed no more
        in_planes = 16
        for i, planes in enumerate(widths, start=1):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if b == 0 else 1, dtype=dtype, rng=gen))
                in_planes = planes
            setattr(self, f"layer{i}", Sequential(*blocks))
        self.pool = GlobalAvgPool2d()
        self.fc = Linear(in_planes, num_classes, dtype=dtype, rng=gen)
        self.fc.followed_by_bn = False
        self._bn1_relu = BNReLU()                      # the stem's relu(bn1(.)), fused or not

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"WRN expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        x = self._bn1_relu.forward(self.bn1, self.relu, self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))

    def backward(self, dy):
        d = self.pool.backward(self.fc.backward(dy))
        d = self.layer1.backward(self.layer2.backward(self.layer3.backward(d)))
        return self.conv1.backward(self._bn1_relu.backward(self.bn1, self.relu, d))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, num_classes={self.num_classes}"
