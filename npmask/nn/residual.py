"""The post-activation basic block of Wide ResNets (docs/design.md, architectures).

    main(x)     = BN2(conv2(ReLU(BN1(conv1(x)))))      conv1: 3x3, stride s; conv2: 3x3, stride 1
    shortcut(x) = x                                     when s = 1 and the channel count is kept
                = BN_s(conv_s(x))                       otherwise (conv_s: 1x1, stride s)
    y           = ReLU(main(x) + shortcut(x))

Backward: the final ReLU lets the gradient through where its input was positive,
``d = dy * [main + shortcut > 0]``; the addition then hands the *same* ``d`` to both branches, and
the two input gradients add up where the branches meet again, at ``x``:

    dx = main.backward(d) + shortcut.backward(d)        (shortcut.backward(d) = d for the identity)

Both sums are made in place, in arrays the block owns (the output of bn2, the input gradient of
conv1: new arrays of those layers, which keep no reference to them), on npmask's threads
(:func:`~npmask.nn.parallel.add_into`), and relu2 rectifies the sum in place: no new
activation-sized array for either (new arrays cost more than the additions themselves:
benchmarks/results/train_step_cpu.txt).

The steps ``relu1(bn1(.))`` and ``relu2(bn2(.) + shortcut)`` each go through a
:class:`~npmask.nn.bn_relu.BNReLU` (which makes the forward sum in place, as relu2 works in place).
With the setting ``fuse_bn_relu`` (the default) relu1 runs inside bn1, and the sum and relu2 inside
bn2, whose backward returns both the main branch's gradient and d: the same numbers, fewer passes
over the activations (npmask/nn/batchnorm.py).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, rng as make_rng
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .bn_relu import BNReLU
from .container import Sequential
from .conv import Conv2d
from .module import Module
from .parallel import add_into


class BasicBlock(Module):
    """WRN basic block: (N, in_planes, H, W) -> (N, out_planes, ceil(H/s), ceil(W/s)).

    Children (PyTorch-like names): ``conv1``, ``bn1``, ``relu1``, ``conv2``, ``bn2``, ``shortcut``
    (``Sequential(Conv2d 1x1, BatchNorm2d)``, so ``shortcut.0.weight``; ``None`` for the identity),
    ``relu2``. Every conv is bias-free (the BN after it has the bias) and has
    ``followed_by_bn = True``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dtype=np.float32, rng=None):
        super().__init__()
        gen = make_rng(rng)
        self.in_planes, self.out_planes, self.stride = int(in_planes), int(out_planes), int(stride)
        self.conv1 = Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, dtype=dtype, rng=gen)
        self.bn1 = BatchNorm2d(out_planes, dtype=dtype)
        self.relu1 = ReLU(inplace=True)                # bn1's output is the block's own
        self.conv2 = Conv2d(out_planes, out_planes, 3, stride=1, padding=1, dtype=dtype, rng=gen)
        self.bn2 = BatchNorm2d(out_planes, dtype=dtype)
        if stride != 1 or in_planes != out_planes:
            # the projection makes x's shape match the main branch's output
            self.shortcut = Sequential(Conv2d(in_planes, out_planes, 1, stride=stride, dtype=dtype, rng=gen),
                                       BatchNorm2d(out_planes, dtype=dtype))
            self.shortcut[0].followed_by_bn = True
        else:
            self.shortcut = None
        self.relu2 = ReLU(inplace=True)                # in place: so is the sum before it (BNReLU)
        self.conv1.followed_by_bn = True
        self.conv2.followed_by_bn = True
        self._bn1_relu1 = BNReLU()                     # relu1(bn1(.)), fused or not
        self._bn2_relu2 = BNReLU()                     # relu2(bn2(.) + shortcut), fused or not

    def forward(self, x):
        out = self.conv2(self._bn1_relu1.forward(self.bn1, self.relu1, self.conv1(x)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self._bn2_relu2.forward(self.bn2, self.relu2, out, residual=skip)

    def backward(self, dy):
        dmain, d = self._bn2_relu2.backward(self.bn2, self.relu2, dy)  # d: the sum's gradient
        dmain = self._bn1_relu1.backward(self.bn1, self.relu1, self.conv2.backward(dmain))
        dmain = self.conv1.backward(dmain)
        dskip = d if self.shortcut is None else self.shortcut.backward(d)
        add_into(get_array_module(dmain), dmain, dskip)  # dmain: conv1's new array
        return dmain

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"
