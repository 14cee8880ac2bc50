"""Argument checks at the entry of a layer's forward and backward (the public API).

A layer called with a Python list, or a backward pass handed a gradient whose shape differs from
the forward output, would otherwise fail deep inside a GEMM (AttributeError, a broadcasting error)
or, worse, broadcast silently. These checks give a ValueError naming the layer and both shapes.
"""
from __future__ import annotations


def layer_name(layer) -> str:
    """``Conv2d(3, 16, kernel_size=(3, 3), ...)``: the type and its settings."""
    try:
        extra = layer.extra_repr()
    except Exception:
        extra = ""
    return f"{type(layer).__name__}({extra})"


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "ndim")


def _fmt(shape) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def check_array(layer, a, role: str, shape) -> None:
    """``a`` must be a NumPy/CuPy array matching ``shape`` (a tuple; None entries match any size;
    ``shape=None``: any shape).

    role: "input" or "gradient" (named in the message, with the layer)."""
    if not _is_array(a):
        raise ValueError(f"{layer_name(layer)}: the {role} must be a NumPy or CuPy array"
                         + ("" if shape is None else f" of shape {_fmt(shape)}")
                         + f", got a {type(a).__name__}"
                         + (" (convert it with np.asarray(x, dtype=np.float32))"
                            if isinstance(a, (list, tuple)) else ""))
    if shape is None:
        return  # the layer's own function checks the shape
    if a.ndim != len(shape) or any(w is not None and g != w for g, w in zip(a.shape, shape)):
        what = "the forward output's shape" if role == "gradient" else "the expected shape"
        raise ValueError(f"{layer_name(layer)}: the {role} has shape {tuple(a.shape)}, {what} is "
                         f"{_fmt(shape)}")
