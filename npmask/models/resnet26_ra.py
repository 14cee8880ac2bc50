"""The ImageNet ResNet-26 released with residual adapters (Rebuffi et al. 2017/2018; the Visual
Decathlon backbone that the paper's table 4 methods share), in its released layout.

Facts read from srebuffi/residual_adapters ``models.py`` and ``config_task.py`` (mode "normal",
factor 1, one task), which differ from npmask's ``wrn28_4`` in every respect that matters for loading:

    pre_layers_conv  conv 3x3 3 -> 32 + BN (``pre_layers_conv.conv``, ``pre_layers_conv.bns.0``),
                     with *no* ReLU after it (the release applies none)
    layer1..3        4 basic blocks each, planes 64 / 128 / 256, first block stride 2; the shortcut
                     that changes shape is parameter-free (2x2 average pool + zero channels), not a
                     1x1 conv; the second conv's ReLU is inside ``conv2`` = Sequential(ReLU, conv_task)
    end_bns.0        BN + ReLU before the pool (``end_bns.0.0``)
    avgpool          global average pooling
    linears.0        Linear(256, num_classes), the head

Not verified here: the released checkpoints (Google Drive links in the repository's README) are
whole pickled PyTorch models, which npmask never unpickles; the names above are those that release
code gives to ``state_dict()`` for one task. Save that state_dict to .safetensors in PyTorch, then
``python -m npmask.convert`` reads it (README, "Starting from PyTorch weights").
"""
from __future__ import annotations

import numpy as np

from ..backend import rng as make_rng
from ..nn import BatchNorm2d, GlobalAvgPool2d, Linear, ReLU, Sequential
from ..nn.module import Module
from ..nn.ra_blocks import ConvTask, RABasicBlock


class ResNet26RA(Module):
    """(N, 3, S, S) -> (N, num_classes); ``head_name = "linears.0"``. ``factor`` scales every width
    (the release's ``config_task.factor``; 1 for the released network), ``nblocks`` per stage."""

    head_name = "linears.0"
    input_layer_name = "pre_layers_conv.conv"

    def __init__(self, num_classes: int = 1000, input_size: int = 64, nblocks=(4, 4, 4), factor: float = 1.0,
                 dtype=np.float32, rng=None):
        super().__init__()
        if len(nblocks) != 3 or min(nblocks) < 1 or num_classes < 1 or factor <= 0:
            raise ValueError(f"ResNet26RA needs 3 stages of >= 1 block, num_classes >= 1 and factor > 0, "
                             f"got nblocks={nblocks}, num_classes={num_classes}, factor={factor}")
        if input_size < 8 or input_size % 8:
            raise ValueError(f"ResNet26RA halves the resolution 3 times with 2x2 average-pool shortcuts: "
                             f"input_size must be a multiple of 8, got {input_size}")
        gen = make_rng(rng)
        self.num_classes, self.input_size = int(num_classes), int(input_size)
        self.nblocks, self.factor = tuple(int(v) for v in nblocks), float(factor)
        in_planes = int(32 * factor)
        self.pre_layers_conv = ConvTask(3, in_planes, 1, dtype=dtype, rng=gen)
        for i, n in enumerate(self.nblocks):
            planes = int((64, 128, 256)[i] * factor)
            blocks = []
            for b in range(n):
                blocks.append(RABasicBlock(in_planes, planes, 2 if b == 0 else 1, dtype=dtype, rng=gen))
                in_planes = planes
            setattr(self, f"layer{i + 1}", Sequential(*blocks))
        self.end_bns = Sequential(Sequential(BatchNorm2d(in_planes, dtype=dtype), ReLU(inplace=True)))
        self.avgpool = GlobalAvgPool2d()
        self.linears = Sequential(Linear(in_planes, num_classes, dtype=dtype, rng=gen))
        self.linears[0].followed_by_bn = False

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet26RA expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        x = self.layer3(self.layer2(self.layer1(self.pre_layers_conv(x))))
        return self.linears(self.avgpool(self.end_bns(x)))

    def backward(self, dy):
        d = self.end_bns.backward(self.avgpool.backward(self.linears.backward(dy)))
        d = self.layer1.backward(self.layer2.backward(self.layer3.backward(d)))
        return self.pre_layers_conv.backward(d)

    def extra_repr(self) -> str:
        return f"nblocks={self.nblocks}, factor={self.factor}, num_classes={self.num_classes}"
