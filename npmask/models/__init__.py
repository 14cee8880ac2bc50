"""Model zoo: Wide ResNets and VGGs created by name, and helpers to reach sub-modules by path.

    model = create("wrn28_4", num_classes=100, input_size=64)
    model.head_name                        # "fc": dotted path of the final Linear classifier
    get_submodule(model, "layer1.0.conv1") # the first conv of the first block
    set_submodule(model, "layer1.0.conv1", new_conv)   # e.g. swap in a masked conv

Names: ``wrn<depth>_<k>`` (depth = 6n + 4: wrn10_1, wrn16_1, wrn16_2, wrn28_4, ...), ``vgg11``,
``vgg11_bn``, ``vgg16``, ``vgg16_bn``. The VGG classifier's hidden width is 4096 for inputs of
224 pixels or more (as torchvision), 512 below (the CIFAR-style VGG).
"""
from __future__ import annotations

import re

import numpy as np

from ..backend import rng as make_rng
from ..nn.module import Module
from .vgg import VGG
from .wrn import WRN

__all__ = ["WRN", "VGG", "create", "available", "get_submodule", "set_submodule"]

_PATTERNS = [
    "wrn<depth>_<k> (depth = 6n+4, e.g. wrn10_1, wrn16_1, wrn16_2, wrn28_4)",
    "vgg11", "vgg11_bn", "vgg16", "vgg16_bn",
]


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
        hidden = 4096 if input_size >= 224 else 512
        return VGG(m.group(1), batch_norm=bool(m.group(2)), num_classes=num_classes,
                   input_size=input_size, hidden=hidden, dtype=dtype, rng=gen)
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
