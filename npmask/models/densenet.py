"""torchvision's DenseNet-121, names and forward identical to ``torchvision.models.densenet121``
(``memory_efficient=False``; the two compute the same function).

    features.conv0   7x7 stride 2 pad 3, 3 -> num_init_features   features.norm0  relu0
    features.pool0   max-pool 3x3 stride 2 pad 1
    features.denseblock1 .. denseblockB   dense blocks (npmask.nn.dense), block_config layers each;
    features.transition1 .. transition(B-1) between them: BN ReLU conv1x1 (halves channels) avgpool 2
    features.norm5   BN
    relu, global average pool (torchvision's F.relu + adaptive_avg_pool2d((1, 1)), no parameters)
    classifier       Linear(channels, num_classes)

DenseNet-121: growth_rate 32, block_config (6, 12, 24, 16), num_init_features 64, bn_size 4.
"""
from __future__ import annotations

import numpy as np

from ..backend import rng as make_rng
from ..nn import BatchNorm2d, GlobalAvgPool2d, Linear, MaxPool2d, ReLU, Sequential
from ..nn.conv import Conv2d
from ..nn.dense import DenseBlock, Transition
from ..nn.module import Module


class DenseNet(Module):
    """(N, 3, H, W) -> (N, num_classes); ``head_name = "classifier"``."""

    head_name = "classifier"
    input_layer_name = "features.conv0"

    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, num_classes: int = 1000, input_size: int = 224, dtype=np.float32, rng=None):
        super().__init__()
        if min(growth_rate, num_init_features, bn_size, num_classes) < 1 or not block_config \
                or min(block_config) < 1:
            raise ValueError(f"DenseNet needs positive sizes, got growth_rate={growth_rate}, "
                             f"block_config={block_config}, num_init_features={num_init_features}, "
                             f"bn_size={bn_size}, num_classes={num_classes}")
        min_size = 4 * 2 ** (len(block_config) - 1)
        if input_size < min_size:
            raise ValueError(f"this DenseNet downsamples by {min_size}: input_size must be >= {min_size}, "
                             f"got {input_size}")
        gen = make_rng(rng)
        self.growth_rate, self.block_config = int(growth_rate), tuple(int(v) for v in block_config)
        self.num_classes, self.input_size = int(num_classes), int(input_size)
        f = Sequential()
        f.add_module("conv0", Conv2d(3, num_init_features, 7, stride=2, padding=3, dtype=dtype, rng=gen))
        f.conv0.followed_by_bn = True
        f.add_module("norm0", BatchNorm2d(num_init_features, dtype=dtype))
        f.add_module("relu0", ReLU(inplace=True))
        f.add_module("pool0", MaxPool2d(3, 2, 1))
        channels = int(num_init_features)
        for i, n in enumerate(self.block_config):
            block = DenseBlock(n, channels, growth_rate, bn_size, dtype=dtype, rng=gen)
            f.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            if i != len(self.block_config) - 1:
                f.add_module(f"transition{i + 1}", Transition(channels, channels // 2, dtype=dtype, rng=gen))
                channels //= 2
        f.add_module("norm5", BatchNorm2d(channels, dtype=dtype))
        self.features = f
        self.relu = ReLU(inplace=True)
        self.pool = GlobalAvgPool2d()
        self.classifier = Linear(channels, num_classes, dtype=dtype, rng=gen)
        self.classifier.followed_by_bn = False

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DenseNet expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return self.classifier(self.pool(self.relu(self.features(x))))

    def backward(self, dy):
        return self.features.backward(self.relu.backward(self.pool.backward(self.classifier.backward(dy))))

    def extra_repr(self) -> str:
        return f"growth_rate={self.growth_rate}, block_config={self.block_config}, num_classes={self.num_classes}"
