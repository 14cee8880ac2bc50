"""One epoch of training and one pass of evaluation, shared by train, pretrain and compare.

A training step is the textbook sequence, with the backward pass written by hand in every layer::

    logits = model.forward(x)                       # (B, K), caches what backward needs
    loss, dlogits = softmax_cross_entropy(logits, y)
    optimizer.zero_grad()
    model.backward(dlogits)                         # accumulates grads of every trained param
    optimizer.step()                                # updates them in place

The loss is checked after every step: a NaN or infinite loss raises :class:`NonFiniteLossError`
*before* the epoch's checkpoint is written, so the checkpoint on disk stays the last good one.

Nobody needs the gradient of the images, so the backward pass of a training step skips it: the
layer that takes the images (the model's ``input_layer_name``, e.g. WRN's ``conv1``) computes
its weight gradient only (:func:`input_gradient_skipped`).
"""
from __future__ import annotations

import contextlib
import math
import time

from ..models import get_submodule
from ..nn.loss import softmax_cross_entropy
from .errors import NonFiniteLossError


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, unit="batch")


@contextlib.contextmanager
def input_gradient_skipped(model):
    """Inside the block, the layer that takes the model's input does not compute its input gradient.

    ``model``: a Module, or a :class:`npmask.multidomain.MultiDomainModel` (its active domain's
    network). The layer is the one named by the network's ``input_layer_name``; a network without
    one, or whose layer has no ``need_input_grad`` switch, is left as it is. The switch is restored
    on exit, so ``model.backward`` outside the block still returns dL/dx (as the gradient checks
    need). Skipping it saves one GEMM of the first convolution's backward and changes no other
    number: the weight gradients are computed exactly as before.
    """
    network = model.network() if callable(getattr(model, "network", None)) else model
    name = getattr(network, "input_layer_name", None)
    layer = get_submodule(network, name) if name else None
    if layer is None or not hasattr(layer, "need_input_grad"):
        yield
        return
    before = layer.need_input_grad
    layer.need_input_grad = False
    try:
        yield
    finally:
        layer.need_input_grad = before


def train_step(model, optimizer, x, y):
    """One optimisation step on the batch (x, y): the sequence in the module docstring.

    Returns ``(loss, logits)``. A non-finite loss is returned before the backward pass, with the
    gradients and parameters left untouched, so the caller can stop without a corrupted update.
    """
    logits = model.forward(x)
    loss, dlogits = softmax_cross_entropy(logits, y)
    if math.isfinite(loss):
        optimizer.zero_grad()
        with input_gradient_skipped(model):
            model.backward(dlogits)
        optimizer.step()
    return loss, logits


def train_epoch(model, batches, optimizer, *, num_batches: int | None = None, desc: str = "train",
                progress: bool = True, where: str = "") -> dict:
    """Train ``model`` on every ``(x, y)`` of ``batches`` once; returns the epoch's statistics.

    model:     a Module with forward(x) -> logits (B, K) and backward(dlogits).
    optimizer: anything with zero_grad() and step() (an Optimizer or Optimizers).
    Returns ``{"train_loss": mean loss, "train_acc": accuracy in %, "train_seconds": s,
    "steps": number of steps}``; the means are over images (weighted by batch size).
    Raises NonFiniteLossError when a loss is NaN or infinite (``where`` names the run position).
    """
    model.train()
    start = time.perf_counter()
    total_loss = 0.0
    correct = 0
    seen = 0
    steps = 0
    bar = _progress(batches, num_batches, desc, progress)
    for x, y in (bar if bar is not None else batches):
        loss, logits = train_step(model, optimizer, x, y)
        if not math.isfinite(loss):
            if bar is not None:
                bar.close()
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) {where} at step {steps + 1}; the last good checkpoint is "
                "kept on disk. Start a new run (another --out) with lower learning rates "
                "(--lr-body/--lr-head; --lr when pretraining): --resume keeps the saved rates")
        n = int(y.shape[0])
        total_loss += loss * n
        correct += int((logits.argmax(axis=1) == y).sum())
        seen += n
        steps += 1
        if bar is not None:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValueError("training epoch saw no batch (fewer images than one batch with drop_last?)")
    return {"train_loss": total_loss / seen, "train_acc": 100.0 * correct / seen,
            "train_seconds": time.perf_counter() - start, "steps": steps}


def evaluate(model, batches, *, num_batches: int | None = None, desc: str = "test",
             progress: bool = False) -> dict:
    """Loss and accuracy of ``model`` (in eval mode: running BN statistics) over ``batches``.

    Returns ``{"loss": mean loss, "acc": accuracy in %, "n": images, "seconds": s}``.
    """
    was_training = getattr(model, "training", True)
    model.eval()
    start = time.perf_counter()
    total_loss = 0.0
    correct = 0
    seen = 0
    bar = _progress(batches, num_batches, desc, progress)
    for x, y in (bar if bar is not None else batches):
        logits = model.forward(x)
        loss, _ = softmax_cross_entropy(logits, y)
        n = int(y.shape[0])
        total_loss += loss * n
        correct += int((logits.argmax(axis=1) == y).sum())
        seen += n
    if bar is not None:
        bar.close()
    model.train(was_training)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan"), "n": 0, "seconds": 0.0}
    return {"loss": total_loss / seen, "acc": 100.0 * correct / seen, "n": seen,
            "seconds": time.perf_counter() - start}

