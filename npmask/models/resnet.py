"""torchvision's ResNet-18/34/50 (v1.5), names and forward identical to ``torchvision.models.resnetN``.

    conv1    7x7 stride 2 pad 3, 3 -> w     bn1  relu  maxpool 3x3 stride 2 pad 1
    layer1   blocks[0] blocks, planes w      stride 1
    layer2   blocks[1] blocks, planes 2w     first block stride 2
    layer3   blocks[2] blocks, planes 4w     first block stride 2
    layer4   blocks[3] blocks, planes 8w     first block stride 2
    avgpool  global average pooling (torchvision's AdaptiveAvgPool2d((1, 1)))
    fc       Linear(8w * expansion, num_classes)

with w = 64 for the torchvision models (``width`` makes small test networks), BasicBlock
(expansion 1: resnet18 [2,2,2,2], resnet34 [3,4,6,3]) or Bottleneck (expansion 4: resnet50
[3,4,6,3]). Any input size of at least 32 works (the global pool removes the spatial size).
"""
from __future__ import annotations

import numpy as np

from ..backend import rng as make_rng
from ..nn import BatchNorm2d, GlobalAvgPool2d, Linear, MaxPool2d, ReLU, Sequential
from ..nn.bn_relu import BNReLU
from ..nn.conv import Conv2d
from ..nn.module import Module
from ..nn.resnet_blocks import Bottleneck, ResNetBasicBlock

LAYOUTS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3))}


class ResNet(Module):
    """(N, 3, H, W) -> (N, num_classes). ``block``: "basic" or "bottleneck"; ``layers``: blocks per stage."""

    head_name = "fc"
    input_layer_name = "conv1"

    def __init__(self, block="bottleneck", layers=(3, 4, 6, 3), num_classes: int = 1000,
                 input_size: int = 224, width: int = 64, dtype=np.float32, rng=None):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"ResNet block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4 or min(layers) < 1 or width < 1 or num_classes < 1:
            raise ValueError(f"ResNet needs 4 stages of >= 1 block, width >= 1 and num_classes >= 1, "
                             f"got layers={layers}, width={width}, num_classes={num_classes}")
        if input_size < 32:
            raise ValueError(f"ResNet downsamples by 32: input_size must be >= 32, got {input_size}")
        gen = make_rng(rng)
        cls = Bottleneck if block == "bottleneck" else ResNetBasicBlock
        self.block, self.layers = block, tuple(int(v) for v in layers)
        self.num_classes, self.input_size, self.width = int(num_classes), int(input_size), int(width)
        self.conv1 = Conv2d(3, width, 7, stride=2, padding=3, dtype=dtype, rng=gen)
        self.conv1.followed_by_bn = True
        self.bn1 = BatchNorm2d(width, dtype=dtype)
        self.relu = ReLU(inplace=True)
        self.maxpool = MaxPool2d(3, 2, 1)
        in_planes = width
        for i, n in enumerate(self.layers):
            planes = width * 2 ** i
            blocks = []
            for b in range(n):
                blocks.append(cls(in_planes, planes, stride=2 if (b == 0 and i > 0) else 1, dtype=dtype, rng=gen))
                in_planes = planes * cls.expansion
            setattr(self, f"layer{i + 1}", Sequential(*blocks))
        self.avgpool = GlobalAvgPool2d()
        self.fc = Linear(in_planes, num_classes, dtype=dtype, rng=gen)
        self.fc.followed_by_bn = False
        self._bn1_relu = BNReLU()                      # the stem's relu(bn1(.)), fused or not

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self._bn1_relu.forward(self.bn1, self.relu, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x))

    def backward(self, dy):
        d = self.avgpool.backward(self.fc.backward(dy))
        d = self.layer1.backward(self.layer2.backward(self.layer3.backward(self.layer4.backward(d))))
        d = self.maxpool.backward(d)
        return self.conv1.backward(self._bn1_relu.backward(self.bn1, self.relu, d))

    def extra_repr(self) -> str:
        return f"block={self.block}, layers={self.layers}, width={self.width}, num_classes={self.num_classes}"
