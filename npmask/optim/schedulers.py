"""Epoch-wise learning-rate schedulers (StepLR, MultiStepLR) for an optimiser or a group of them.

A scheduler scales every group's base learning rate by a factor of the epoch, in closed form
(``lr = base_lr * factor(last_epoch)``), like ``torch.optim.lr_scheduler``. Its ``state_dict()``
is a flat ``{str: numpy.ndarray}`` dict, like the optimisers'.
"""
from __future__ import annotations

import bisect

import numpy as np

from .optimizers import _leaves

class LRScheduler:
    """Base of the epoch-wise schedulers: ``lr = base_lr * factor(last_epoch)`` for every group.

    ``base_lrs`` are the learning rates when the scheduler is created (epoch 0). Call
    :meth:`step` once at the end of every epoch; ``last_epoch`` counts those calls. The rate is
    recomputed from ``base_lr`` (closed form), so a rate set by hand is overwritten at the next step.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.base_lrs = {k: o.lr for k, o in _leaves(optimizer).items()}
        self.last_epoch = 0

    def factor(self, epoch: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> dict:
        """``{group name: lr}`` at ``last_epoch`` (group ``""`` for a single optimiser)."""
        f = self.factor(self.last_epoch)
        return {k: b * f for k, b in self.base_lrs.items()}

    def _apply(self) -> None:
        leaves = _leaves(self.optimizer)
        for k, lr in self.get_lr().items():
            leaves[k].lr = lr

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict:
        """``{"last_epoch": ..., "base_lr/<group>": ...}`` as NumPy scalars."""
        out = {"last_epoch": np.asarray(self.last_epoch, dtype=np.int64)}
        for k, b in self.base_lrs.items():
            out[f"base_lr/{k}"] = np.asarray(b, dtype=np.float64)
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Restore the epoch counter and base rates, and set the optimiser's rates accordingly."""
        expected = {f"base_lr/{k}" for k in self.base_lrs} | {"last_epoch"}
        if set(sd) != expected:
            raise KeyError(f"scheduler state_dict keys {sorted(sd)} do not match {sorted(expected)}")
        self.last_epoch = int(np.asarray(sd["last_epoch"]))
        self.base_lrs = {k: float(np.asarray(sd[f"base_lr/{k}"])) for k in self.base_lrs}
        self._apply()


class StepLR(LRScheduler):
    """``lr = base_lr * gamma ** (epoch // step_size)``: decay by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def factor(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """``lr = base_lr * gamma ** (number of milestones <= epoch)``, e.g. milestones=[45], gamma=0.1
    for the Decathlon protocol (x0.1 after 45 epochs)."""

    def __init__(self, optimizer, milestones, gamma: float = 0.1):
        ms = [int(m) for m in milestones]
        if ms != sorted(ms):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        self.milestones = ms
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def factor(self, epoch: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)
