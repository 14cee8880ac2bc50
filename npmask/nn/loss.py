"""Softmax cross-entropy loss (mean over the batch) and classification accuracy.

For logits ``z`` (N, K) and integer labels ``t`` (N,) in [0, K):

    log p[n, k] = z[n, k] - max_j z[n, j] - log sum_j exp(z[n, j] - max_j z[n, j])
    L           = -(1/N) sum_n log p[n, t_n]
    dL/dz[n, k] = (p[n, k] - [k == t_n]) / N

Subtracting the row maximum before ``exp`` changes nothing mathematically (it cancels in the
ratio) but keeps every exponent <= 0, so large logits cannot overflow.
"""
from __future__ import annotations

from ..backend import get_array_module


def _check(logits, labels):
    xp = get_array_module(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, num_classes), got shape {tuple(logits.shape)}")
    if logits.dtype.kind != "f":
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    labels = xp.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers (class indices), got dtype {labels.dtype}")
    if labels.size == 0:
        raise ValueError("softmax cross-entropy of an empty batch is undefined")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}] for {logits.shape[1]} classes, "
                         f"got values in [{lo}, {hi}]")
    return xp, labels


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient: returns ``(loss: float, dlogits (N, K))``.

    ``dlogits`` has the dtype of ``logits`` and already includes the ``1/N`` of the mean.
    """
    _, labels = _check(logits, labels)
    total, dlogits = log_likelihood_sum(logits, labels)
    return -float(total) / logits.shape[0], dlogits


def log_likelihood_sum(logits, labels):
    """The device part of :func:`softmax_cross_entropy`: ``(total, dlogits)``, where ``total`` is
    the 0-d array ``sum_n log p[n, t_n]`` (the loss is ``-float(total) / N``).

    Nothing is read back to the host and nothing is checked: ``labels`` must be an integer array of
    the logits' backend with values in [0, K) (the data loader checks them when it reads a data
    set). A step captured in a CUDA graph uses it; every other caller wants softmax_cross_entropy.
    """
    xp = get_array_module(logits)
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    rows = xp.arange(n)
    log_p_true = shifted[rows, labels] - xp.log(sum_exp[:, 0])
    dlogits = exp / sum_exp  # softmax probabilities
    dlogits[rows, labels] -= 1  # rows are distinct, so this fancy-index update is exact
    dlogits *= logits.dtype.type(1.0 / n)
    return log_p_true.sum(), dlogits


def accuracy(logits, labels) -> float:
    """Fraction of rows whose arg-max logit equals the label (ties: the first maximum)."""
    xp, labels = _check(logits, labels)
    return float((xp.argmax(logits, axis=1) == labels).mean())


class SoftmaxCrossEntropy:
    """Stateful wrapper: ``loss = crit.forward(logits, labels)``, then ``dlogits = crit.backward()``."""

    def __init__(self):
        self._dlogits = None

    def forward(self, logits, labels) -> float:
        loss, self._dlogits = softmax_cross_entropy(logits, labels)
        return loss

    __call__ = forward

    def backward(self):
        if self._dlogits is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return self._dlogits
