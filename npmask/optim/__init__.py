"""Optimisers (SGD, Adam), named groups of them (Optimizers) and learning-rate schedulers.

``optimizers.py`` holds the update rules with their formulas (PyTorch's, exactly);
``schedulers.py`` the epoch-wise step decays. Both are re-exported here::

    from npmask.optim import SGD, Adam, Optimizers, MultiStepLR
"""
from .optimizers import SGD, Adam, Optimizer, Optimizers
from .schedulers import LRScheduler, MultiStepLR, StepLR

__all__ = ["Optimizer", "SGD", "Adam", "Optimizers", "LRScheduler", "StepLR", "MultiStepLR"]
