"""DenseNet pieces (Huang et al.), torchvision layout: the dense layer, whose output is the
concatenation of its input and its new features, and the transition between dense blocks.

A dense block with layers f_1 .. f_L keeps every feature map: layer l sees the concatenation of the
block input and the outputs of layers 1 .. l-1. torchvision writes that as a list of tensors
concatenated in each layer; the same function is a chain of layers that each *append* their
features to their input along the channel axis:

    x_0 = block input                  (N, C0, H, W)
    x_l = concat(x_{l-1}, f_l(x_{l-1})) (N, C0 + l*g, H, W)    g = growth rate
    f_l = conv2(relu2(norm2(conv1(relu1(norm1(.))))))  conv1: 1x1 to bn_size*g, conv2: 3x3 to g

(so f_l reads all earlier features, in the same channel order as torchvision's ``torch.cat``).

Backward of the concatenation splits the gradient by channels: the first C channels of dy belong
to the input x directly, the last g channels to f_l's output, and the two paths meet again at x:

    dx = dy[:, :C] + f_l.backward(dy[:, C:])
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, rng as make_rng
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .bn_relu import BNReLU
from .conv import Conv2d
from .module import Module
from .pooling import AvgPool2d


def concat_channels(a, b):
    """``concat([a, b], axis=1)`` for (N, Ca, H, W) and (N, Cb, H, W) -> (N, Ca + Cb, H, W)."""
    xp = get_array_module(a)
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"cannot concatenate feature maps {tuple(a.shape)} and {tuple(b.shape)} along channels")
    return xp.concatenate([a, b], axis=1)


def split_channels(dy, c: int):
    """The gradient of :func:`concat_channels` split back: (dy[:, :c], dy[:, c:]), as views."""
    return dy[:, :c], dy[:, c:]


class DenseLayer(Module):
    """(N, C, H, W) -> (N, C + growth_rate, H, W): the input followed by the new features.

    Children (torchvision names): ``norm1``, ``relu1``, ``conv1`` (1x1, C -> bn_size*growth_rate),
    ``norm2``, ``relu2``, ``conv2`` (3x3 pad 1 -> growth_rate). Convs are bias-free; both are
    ``followed_by_bn``: conv1 feeds norm2, and conv2's channels reach later layers only through a BN
    (norm1 of every later layer, the transition's norm, norm5), which absorbs a scale.
    """

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4, dtype=np.float32, rng=None):
        super().__init__()
        gen = make_rng(rng)
        self.in_channels, self.growth_rate = int(in_channels), int(growth_rate)
        inner = int(bn_size) * int(growth_rate)
        self.norm1 = BatchNorm2d(in_channels, dtype=dtype)
        self.relu1 = ReLU(inplace=True)        # norm1's output is the layer's own
        self.conv1 = Conv2d(in_channels, inner, 1, dtype=dtype, rng=gen)
        self.norm2 = BatchNorm2d(inner, dtype=dtype)
        self.relu2 = ReLU(inplace=True)
        self.conv2 = Conv2d(inner, growth_rate, 3, padding=1, dtype=dtype, rng=gen)
        self.conv1.followed_by_bn = True
        self.conv2.followed_by_bn = True
        self._norm1_relu1 = BNReLU()           # relu1(norm1(.)), fused or not (fuse_bn_relu)
        self._norm2_relu2 = BNReLU()

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DenseLayer expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        new = self.conv1(self._norm1_relu1.forward(self.norm1, self.relu1, x))
        new = self.conv2(self._norm2_relu2.forward(self.norm2, self.relu2, new))
        return concat_channels(x, new)

    def backward(self, dy):
        d_direct, d_new = split_channels(dy, self.in_channels)
        d = self._norm2_relu2.backward(self.norm2, self.relu2, self.conv2.backward(d_new))
        d = self._norm1_relu1.backward(self.norm1, self.relu1, self.conv1.backward(d))
        return d + d_direct

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.in_channels + self.growth_rate}"


class DenseBlock(Module):
    """``num_layers`` DenseLayers in a chain, children ``denselayer1`` .. ``denselayerL`` (torchvision)."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int = 4,
                 dtype=np.float32, rng=None):
        super().__init__()
        gen = make_rng(rng)
        self.out_channels = int(in_channels) + int(num_layers) * int(growth_rate)
        for i in range(int(num_layers)):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_channels + i * growth_rate, growth_rate,
                                                             bn_size, dtype=dtype, rng=gen))

    def forward(self, x):
        for layer in self.children.values():
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(list(self.children.values())):
            dy = layer.backward(dy)
        return dy


class Transition(Module):
    """Between dense blocks: ``norm`` BN, ``relu``, ``conv`` (1x1, halves the channels in DenseNet-121),
    ``pool`` (2x2 average, stride 2). The conv is ``followed_by_bn``: after the (linear) pooling its
    channels enter the next block only through BNs.
    """

    def __init__(self, in_channels: int, out_channels: int, dtype=np.float32, rng=None):
        super().__init__()
        self.norm = BatchNorm2d(in_channels, dtype=dtype)
        self.relu = ReLU(inplace=True)
        self.conv = Conv2d(in_channels, out_channels, 1, dtype=dtype, rng=make_rng(rng))
        self.conv.followed_by_bn = True
        self.pool = AvgPool2d(2, 2)
        self._norm_relu = BNReLU()             # relu(norm(.)), fused or not (fuse_bn_relu)

    def forward(self, x):
        return self.pool(self.conv(self._norm_relu.forward(self.norm, self.relu, x)))

    def backward(self, dy):
        d = self.conv.backward(self.pool.backward(dy))
        return self._norm_relu.backward(self.norm, self.relu, d)
