"""Layers with hand-written forward and backward passes."""
from .module import Module, ParamRef
from .linear import Linear, linear_forward, linear_backward
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d
from .activation import Dropout, Flatten, ReLU
from .pooling import AvgPool2d, GlobalAvgPool2d, MaxPool2d
from .container import Sequential
from .conv import Conv2d, col2im, conv2d_backward, conv2d_forward, im2col
from .residual import BasicBlock
from .loss import SoftmaxCrossEntropy, accuracy, softmax_cross_entropy

__all__ = [
    "Module", "ParamRef",
    "Linear", "linear_forward", "linear_backward",
    "BatchNorm", "BatchNorm1d", "BatchNorm2d",
    "ReLU", "Dropout", "Flatten",
    "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d",
    "Sequential",
    "Conv2d", "conv2d_forward", "conv2d_backward", "im2col", "col2im",
    "BasicBlock",
    "softmax_cross_entropy", "SoftmaxCrossEntropy", "accuracy",
]
