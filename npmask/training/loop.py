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

Progress: in a terminal a tqdm bar shows the batches of the running epoch. When the output is not a
terminal (a log file, a notebook, CI) there is no bar -- its carriage returns would glue every
update into one long line -- and :func:`epoch_line` gives one plain line per epoch instead.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time

from tqdm import tqdm  # bars only in a terminal; tqdm.auto would warn in a notebook without ipywidgets

from ..models import get_submodule
from ..nn.loss import softmax_cross_entropy
from .errors import NonFiniteLossError


def is_terminal(stream=None) -> bool:
    """True when ``stream`` (default: sys.stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def _progress(iterable, total, desc, enabled):
    """A tqdm bar over ``iterable`` in a terminal; None when disabled or not in a terminal."""
    if not enabled or not is_terminal():
        return None
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
                progress: bool = True, where: str = "", stepper=None) -> dict:
    """Train ``model`` on every ``(x, y)`` of ``batches`` once; returns the epoch's statistics.

    model:     a Module with forward(x) -> logits (B, K) and backward(dlogits).
    optimizer: anything with zero_grad() and step() (an Optimizer or Optimizers).
    stepper:   None (train_step), or a :class:`~npmask.training.graph_step.GraphStep` of this
               model and optimiser (``--cuda-graphs``): the same numbers, the steps replayed.
    Returns ``{"train_loss": mean loss, "train_acc": accuracy in %, "train_seconds": s,
    "steps": number of steps, "train_images": images seen}``; the means are over images (weighted by batch size).
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
        if stepper is None:
            loss, logits = train_step(model, optimizer, x, y)
        else:
            loss, right = stepper(x, y)      # the number correct, counted on the device
        if not math.isfinite(loss):
            if bar is not None:
                bar.close()
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) {where} at step {steps + 1}; the last good checkpoint is "
                "kept on disk. Start a new run (another --out) with lower learning rates "
                "(--lr-body/--lr-head; --lr when pretraining): --resume keeps the saved rates")
        n = int(y.shape[0])
        total_loss += loss * n
        correct += int((logits.argmax(axis=1) == y).sum()) if stepper is None else right
        seen += n
        steps += 1
        if bar is not None:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValueError("training epoch saw no batch (fewer images than one batch with drop_last?)")
    return {"train_loss": total_loss / seen, "train_acc": 100.0 * correct / seen,
            "train_seconds": time.perf_counter() - start, "steps": steps, "train_images": seen}


def evaluate(model, batches, *, num_batches: int | None = None, desc: str = "test",
             progress: bool = False) -> dict:
    """Loss and accuracy of ``model`` (in eval mode: running BN statistics) over ``batches``.

    Returns ``{"loss": mean loss, "acc": accuracy in %, "n": images, "seconds": s}``.
    """
    was_training = model.training  # a Module's, or a MultiDomainModel's active domain's
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


def epoch_line(desc: str, record: dict, epochs: int | None = None) -> str:
    """One plain line for a finished epoch (no carriage return), e.g.::

        digits (full) epoch 2/5: train loss 1.234 acc 56.7% | test loss 1.100 acc 60.1% | 12.3 s, 410 img/s | lr body 0.0001 head 0.001

    ``record``: the epoch record of :func:`npmask.training.fit.fit` (train_loss, train_acc,
    train_seconds, train_images, optional test_loss/test_acc/test_seconds, lr).
    """
    def num(key, fmt):
        v = record.get(key)
        return "n/a" if v is None else format(v, fmt)
    ep = record.get("epoch", "?")
    head = f"{desc} epoch {ep}/{epochs}" if epochs else f"{desc} epoch {ep}"
    parts = [f"{head.strip()}: train loss {num('train_loss', '.3f')} acc {num('train_acc', '.1f')}%"]
    if "test_acc" in record:
        parts.append(f"test loss {num('test_loss', '.3f')} acc {num('test_acc', '.1f')}%")
    secs = (record.get("train_seconds") or 0.0) + (record.get("test_seconds") or 0.0)
    timing = f"{secs:.1f} s"
    if record.get("train_images") and record.get("train_seconds"):
        timing += f", {record['train_images'] / record['train_seconds']:.0f} img/s"
    parts.append(timing)
    lr = record.get("lr") or {}
    if lr:
        parts.append("lr " + " ".join(f"{k} {v:.3g}" if k else f"{v:.3g}" for k, v in lr.items()))
    return " | ".join(parts)
