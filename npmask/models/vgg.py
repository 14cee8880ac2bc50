"""VGG-11 / VGG-16 (Simonyan & Zisserman), with or without batch norm, torchvision-style names.

    features     [conv3x3 pad 1 (+ BN) + ReLU] x k, max-pool 2x2 ... (the cfg below)
    flatten      (N, 512, S/32, S/32) -> (N, 512 * (S/32)^2)
    classifier   Linear(., hidden) ReLU Dropout  Linear(hidden, hidden) ReLU Dropout  Linear(hidden, K)

Parameter names: ``features.0.weight``, ``classifier.0.weight``, ..., the head is
``classifier.6``. With ``adaptive_pool=7`` (what :func:`npmask.models.create` builds for inputs of
224 pixels or more) the features go through torchvision's adaptive 7x7 average pool (``avgpool``)
first, so the classifier always takes 512*7*7 inputs and torchvision's ``vgg16``/``vgg16_bn``
weights load and compute the same logits at any input size. Without it (the CIFAR-style VGG) the
classifier takes the flattened feature map directly, so ``input_size`` fixes its input width. Convs keep their bias as in
torchvision (with BN that bias is redundant: BN subtracts the channel mean and its gradient is 0).
The hidden fully-connected layers are masked as the linear special case of the method
(``followed_by_bn = False``, so their k0 is learned).
"""
from __future__ import annotations

import numpy as np

from ..backend import rng as make_rng
from ..nn import BatchNorm2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential
from ..nn.adaptive import AdaptiveAvgPool2d
from ..nn.conv import Conv2d
from ..nn.module import Module

CFGS = {
    "11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(Module):
    """VGG: (N, 3, S, S) -> (N, num_classes).

    ``cfg``: "11", "16", or an explicit list of channel counts and "M" (max-pool), e.g.
    ``[8, "M", 16, "M"]`` for a tiny test network. ``hidden``: width of the two hidden
    fully-connected layers (512 suits 32x32 inputs, torchvision uses 4096 at 224x224).
    ``dropout``: probability of the two dropout layers. ``input_layer_name`` is "features.0", the
    first conv, whose input gradient training skips (None when ``cfg`` starts with a max-pool).
    """

    head_name = "classifier.6"

    def __init__(self, cfg="16", batch_norm: bool = False, num_classes: int = 10, input_size: int = 32,
                 hidden: int = 512, dropout: float = 0.5, adaptive_pool: int | None = None,
                 dtype=np.float32, rng=None):
        super().__init__()
        layers = CFGS[cfg] if isinstance(cfg, str) and cfg in CFGS else cfg
        if isinstance(layers, str) or not all(v == "M" or (isinstance(v, int) and v > 0) for v in layers):
            raise ValueError(f"VGG cfg must be one of {list(CFGS)} or a list of positive ints and 'M', got {cfg!r}")
        n_pool = sum(v == "M" for v in layers)
        side = int(input_size)
        for _ in range(n_pool):
            side //= 2
        if side < 1:
            raise ValueError(f"VGG with {n_pool} max-pools needs input_size >= {2 ** n_pool}, got {input_size}")
        if num_classes < 1 or hidden < 1:
            raise ValueError(f"VGG needs num_classes and hidden >= 1, got {num_classes}, {hidden}")
        gen = make_rng(rng)
        self.cfg = cfg if isinstance(cfg, str) else list(cfg)
        self.batch_norm = bool(batch_norm)
        self.num_classes, self.input_size, self.hidden = int(num_classes), int(input_size), int(hidden)

        self.features = Sequential()
        self.input_layer_name = None if layers[0] == "M" else "features.0"
        channels = 3
        for v in layers:
            if v == "M":
                self.features.append(MaxPool2d(2, 2))
                continue
            conv = Conv2d(channels, v, 3, stride=1, padding=1, bias=True, dtype=dtype, rng=gen)
            conv.followed_by_bn = self.batch_norm
            self.features.append(conv)
            if self.batch_norm:
                self.features.append(BatchNorm2d(v, dtype=dtype))
            self.features.append(ReLU())
            channels = v
        self.adaptive_pool = None if adaptive_pool is None else int(adaptive_pool)
        if self.adaptive_pool is not None:
            self.avgpool = AdaptiveAvgPool2d(self.adaptive_pool)
            side = self.adaptive_pool
        self.flatten = Flatten()
        self.classifier = Sequential(
            Linear(channels * side * side, hidden, dtype=dtype, rng=gen), ReLU(),
            Dropout(dropout, rng=gen.integers(2 ** 63)),
            Linear(hidden, hidden, dtype=dtype, rng=gen), ReLU(),
            Dropout(dropout, rng=gen.integers(2 ** 63)),
            Linear(hidden, num_classes, dtype=dtype, rng=gen))
        for m in self.classifier:
            if isinstance(m, Linear):
                m.followed_by_bn = False

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        if self.adaptive_pool is not None:
            return self.classifier(self.flatten(self.avgpool(self.features(x))))
        if x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(f"this VGG was built for {self.input_size}x{self.input_size} inputs "
                             f"(its classifier width depends on it), got {x.shape[2]}x{x.shape[3]}")
        return self.classifier(self.flatten(self.features(x)))

    def backward(self, dy):
        d = self.flatten.backward(self.classifier.backward(dy))
        if self.adaptive_pool is not None:
            d = self.avgpool.backward(d)
        return self.features.backward(d)

    def extra_repr(self) -> str:
        return f"cfg={self.cfg!r}, batch_norm={self.batch_norm}, num_classes={self.num_classes}"
