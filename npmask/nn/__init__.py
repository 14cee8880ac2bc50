"""Layers with hand-written forward and backward passes."""
from .module import Module, ParamRef

__all__ = ["Module", "ParamRef"]
