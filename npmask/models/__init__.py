"""Model zoo: Wide ResNets, VGGs, torchvision's ResNets and DenseNet-121, and the residual-adapters
ResNet-26, created by name, and helpers to reach sub-modules by path.

    model = create("wrn28_4", num_classes=100, input_size=64)
    model.head_name                        # "fc": dotted path of the final Linear classifier
    get_submodule(model, "layer1.0.conv1") # the first conv of the first block
    set_submodule(model, "layer1.0.conv1", new_conv)   # e.g. swap in a masked conv

Names: ``wrn<depth>_<k>`` (depth = 6n + 4: wrn10_1, wrn16_1, wrn16_2, wrn28_4, ...), ``vgg11``,
``vgg11_bn``, ``vgg16``, ``vgg16_bn``, ``resnet18``, ``resnet34``, ``resnet50``, ``densenet121``
(torchvision's layouts: a torchvision state_dict loads with no renaming) and ``resnet26_ra`` (the
ImageNet ResNet-26 of srebuffi/residual_adapters, in its released layout). The VGG classifier's
hidden width is 4096 for inputs of 224 pixels or more, with torchvision's adaptive 7x7 average pool
before it (torchvision's vgg16), 512 below (the CIFAR-style VGG, no pool).
"""
from __future__ import annotations

import re

import numpy as np

from ..backend import rng as make_rng
from ..nn.module import Module
from .densenet import DenseNet
from .resnet import LAYOUTS as RESNET_LAYOUTS, ResNet
from .resnet26_ra import ResNet26RA
from .vgg import VGG
from .wrn import WRN

__all__ = ["WRN", "VGG", "ResNet", "DenseNet", "ResNet26RA", "create", "available", "default_input_size", "head_name",
           "get_submodule", "set_submodule"]

_PATTERNS = [
    "wrn<depth>_<k> (depth = 6n+4, e.g. wrn10_1, wrn16_1, wrn16_2, wrn28_4)",
    "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50", "densenet121",
    "resnet26_ra",
]


def default_input_size(name: str) -> int:
    """The input size a model is usually pretrained at: 224 for the torchvision ImageNet models,
    64 for the residual-adapters ResNet-26 (the Decathlon's 64x64 images), 32 otherwise."""
    if name in RESNET_LAYOUTS or name == "densenet121" or re.fullmatch(r"vgg(11|16)(_bn)?", name):
        return 224
    return 64 if name == "resnet26_ra" else 32


def available() -> list[str]:
    """The model names :func:`create` understands (the WRN entry is a pattern)."""
    return list(_PATTERNS)


def create(name: str, num_classes: int, input_size: int = 32, dtype=np.float32, seed=0) -> Module:
    """Build model ``name`` with freshly initialised weights drawn from ``seed``.

    Raises ValueError for an unknown name (listing the known ones) or an impossible configuration.
    """
    gen = make_rng(seed)
    m = re.fullmatch(r"wrn(\d+)_(\d+)", name)
    if m:
        return WRN(int(m.group(1)), int(m.group(2)), num_classes, input_size, dtype=dtype, rng=gen)
    m = re.fullmatch(r"vgg(11|16)(_bn)?", name)
    if m:
        big = input_size >= 224
        return VGG(m.group(1), batch_norm=bool(m.group(2)), num_classes=num_classes,
                   input_size=input_size, hidden=4096 if big else 512, adaptive_pool=7 if big else None,
                   dtype=dtype, rng=gen)
    if name in RESNET_LAYOUTS:
        block, layers = RESNET_LAYOUTS[name]
        return ResNet(block, layers, num_classes=num_classes, input_size=input_size, dtype=dtype, rng=gen)
    if name == "densenet121":
        return DenseNet(32, (6, 12, 24, 16), 64, 4, num_classes=num_classes, input_size=input_size,
                        dtype=dtype, rng=gen)
    if name == "resnet26_ra":
        return ResNet26RA(num_classes=num_classes, input_size=input_size, dtype=dtype, rng=gen)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(_PATTERNS)}")


def head_name(name: str) -> str:
    """The dotted path of the classifier of model ``name`` (without building it)."""
    if re.fullmatch(r"wrn(\d+)_(\d+)", name):
        return WRN.head_name
    if re.fullmatch(r"vgg(11|16)(_bn)?", name):
        return VGG.head_name
    if name in RESNET_LAYOUTS:
        return ResNet.head_name
    if name == "densenet121":
        return DenseNet.head_name
    if name == "resnet26_ra":
        return ResNet26RA.head_name
    raise ValueError(f"unknown model {name!r}; known: {', '.join(_PATTERNS)}")


def get_submodule(model: Module, path: str) -> Module:
    """The module at dotted ``path`` ("layer1.0.conv1"; "" is the model itself)."""
    module = model
    if not path:
        return module
    walked = []
    for part in path.split("."):
        if part not in module.children:
            where = ".".join(walked) or "the model"
            raise KeyError(f"no sub-module {path!r}: {where} has children {list(module.children)}")
        module = module.children[part]
        walked.append(part)
    return module


def set_submodule(model: Module, path: str, new: Module) -> Module:
    """Replace the module at dotted ``path`` with ``new`` (same place in the parent's child order).

    Returns the module that was replaced. The parent's forward reaches its children by attribute
    (``self.conv1``) or, for Sequential, by position, so the new module is used from now on.
    """
    if not path:
        raise ValueError("set_submodule needs a non-empty path (the model itself cannot be replaced)")
    if not isinstance(new, Module):
        raise TypeError(f"set_submodule needs a Module, got {type(new).__name__}")
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    old = get_submodule(model, path)
    parent.add_module(name, new)  # keeps the key's position in the ordered children dict
    return old
