"""The step ``y = relu(bn(x) [+ residual])`` of the blocks, stems and Sequential, in one place.

With the setting ``fuse_bn_relu`` the batch norm runs the ReLU, and the sum before it, inside its
own pass (:func:`~npmask.nn.batchnorm.fuse_relu_into`; on CuPy batch norm picks its fused kernels
itself); otherwise the batch norm, the sum and the ReLU module run one after another. Both give
the same bits on NumPy. Each place that takes the step keeps one :class:`BNReLU`, which makes that
choice and remembers it for the backward pass, so that the callers' forward and backward read like
the math.
"""
from __future__ import annotations

from ..backend import get_array_module
from .batchnorm import fuse_relu_into
from .parallel import add_into


class BNReLU:
    """One place in a block where ``y = relu(bn(x) [+ residual])`` is computed; it remembers how its
    last forward ran (fused or not, with a residual or not) so that its backward goes the same way,
    even if the setting has changed in between.

        y = bn_relu.forward(bn, relu, x)                    # relu(bn(x))
        y = bn_relu.forward(bn, relu, x, residual=skip)     # relu(bn(x) + skip)
        dx = bn_relu.backward(bn, relu, dy)                 # after relu(bn(x))
        dx, d = bn_relu.backward(bn, relu, dy)              # after a residual: d = dy * [y > 0]

    ``d``, the gradient of the sum, is what the block hands to the residual's branch.

    Not a Module: ``bn`` and ``relu`` stay the block's own children under their own names (state
    dicts and PyTorch names depend on them) and are passed in at every call, so that a module
    swapped in later (a domain's batch norm, a shared one) is the one that runs.

    Fused (:func:`fuse_relu_into`: the setting is on and ``bn`` takes the fused call), it is one
    call, ``bn.forward(x, relu=True, residual=residual)``, whose backward returns dx or (dx, d).
    Otherwise ``bn``, the sum and ``relu`` run as separate modules. The sum is then made in place in
    bn's output (:func:`~npmask.nn.parallel.add_into`, on npmask's threads) when ``relu`` works in
    place too (the block owns that output), and into a new array otherwise. ``bn`` may be any
    module: one that does not take the fused call (a convolution followed by a ReLU in a
    Sequential) always runs unfused.
    """

    def __init__(self):
        self.fused = False          # how the last forward ran
        self.residual = False       # whether it added a residual

    def forward(self, bn, relu, x, residual=None):
        self.fused, self.residual = fuse_relu_into(bn), residual is not None
        if self.fused:
            return bn.forward(x, relu=True, residual=residual)
        y = bn(x)
        if residual is not None:
            if relu.inplace:
                add_into(get_array_module(y), y, residual)
            else:
                y = y + residual
        return relu(y)

    def backward(self, bn, relu, dy):
        if self.fused:
            return bn.backward(dy)      # dx, or (dx, d) after a residual
        d = relu.backward(dy)
        dx = bn.backward(d)
        return (dx, d) if self.residual else dx
