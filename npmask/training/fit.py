"""The epoch loop with a checkpoint after every epoch, and resuming from it bit for bit.

:func:`fit` is used for pretraining a backbone and for training each domain. After epoch ``e``
it writes, atomically, one checkpoint holding

- ``epoch``: the number of completed epochs,
- ``model``: the arrays being trained and the BN running statistics (``state_fn()``),
- ``optimizer`` and ``scheduler``: their ``state_dict()`` (Adam moments and step counts, SGD
  momentum buffers, the scheduler's epoch counter),
- ``history``: the per-epoch records so far.

The epoch's line is appended to metrics.jsonl just *before* that checkpoint is written. A process
killed between the two writes leaves a line for an epoch the checkpoint does not hold yet; on
resume the run folder drops such lines (``npmask.train``/``npmask.pretrain``) and the epoch is
run again. The other order would lose the line for good: the resumed run starts after it.

Everything random in an epoch (the sample order, crops, flips) comes from the loader's
``(seed, epoch)`` generator, so a run resumed from the checkpoint of epoch ``e`` runs epoch
``e + 1`` exactly as the uninterrupted run did: the final numbers are identical, not just close.
"""
from __future__ import annotations

import math
import os
import sys

from .checkpoint import CheckpointError, checkpoint_epoch, load_checkpoint, save_checkpoint
from .errors import ConfigError
from .graph_step import GraphStep
from .loop import epoch_line, train_epoch


class StopRequested(Exception):
    """Raised by :func:`fit` after ``stop_after`` epochs (simulates a kill; used to test resume)."""


def fit(*, model, optimizer, scheduler, batches_for_epoch, num_batches: int, epochs: int,
        checkpoint_path, state_fn, load_state_fn, evaluate_fn=None, log_fn=None,
        desc: str = "", progress: bool = True, extra: dict | None = None,
        epoch_budget=None, echo=None, cuda_graphs: bool = False) -> list[dict]:
    """Train for ``epochs`` epochs, resuming from ``checkpoint_path`` when it exists.

    batches_for_epoch(e): the iterable of ``(x, y)`` batches of epoch ``e`` (0-based).
    state_fn(): ``{name: array}`` of the model state to checkpoint; load_state_fn(d) restores it.
    evaluate_fn(): optional ``{"loss", "acc", ...}`` on held-out data after every epoch.
    log_fn(record): called with each epoch's record just before its checkpoint is written.
    extra: plain values stored in the checkpoint and checked on resume (e.g. the variant), so a
        checkpoint of another configuration is never continued by mistake.
    epoch_budget: a one-element list counting the epochs this process may still run; at 0,
        StopRequested is raised after the checkpoint (``--stop-after-epochs``, for tests).
    echo: where the one-line summary of every epoch goes (:func:`~npmask.training.loop.epoch_line`);
        default: standard error when ``progress`` is on (in a terminal and in a log file alike),
        nowhere when it is off (``--quiet``).
    cuda_graphs: train through a :class:`~npmask.training.graph_step.GraphStep` (made after the
        checkpoint is loaded, dropped at the end): the same numbers, each step replayed.

    Returns the list of per-epoch records (the resumed ones included).
    """
    extra = dict(extra or {})
    if echo is None and progress:
        def echo(line):
            print(line, file=sys.stderr, flush=True)
    start, history = 0, []
    if os.path.isfile(checkpoint_path):
        state = load_checkpoint(str(checkpoint_path))
        checkpoint_epoch(checkpoint_path, epochs, state)  # an int in [0, epochs], else one line
        saved_extra = state.get("extra", {})
        if not isinstance(saved_extra, dict):
            saved_extra = {"extra": saved_extra}
        if saved_extra != extra:
            diff = sorted(k for k in set(extra) | set(saved_extra)
                          if extra.get(k) != saved_extra.get(k))
            raise ConfigError(f"checkpoint {checkpoint_path} was written with other settings "
                              f"({', '.join(diff)}); delete it or use another --out")
        try:
            load_state_fn(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = int(state["epoch"])
            history = list(state.get("history", []))
            if not all(isinstance(r, dict) for r in history):
                raise TypeError("field 'history' must be a list of per-epoch records")
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            # A readable file whose content does not fit this run (edited by hand, or from an
            # incompatible npmask): one clear line, not a traceback from load_state_dict.
            raise CheckpointError(
                f"checkpoint {checkpoint_path} does not fit this run ({type(err).__name__}: "
                f"{err}); delete it to train this part again from epoch 0") from None
    stepper = GraphStep(model, optimizer) if cuda_graphs else None
    try:
        for epoch in range(start, epochs):
            lrs = {k: float(v) for k, v in _lrs(optimizer).items()}
            stats = train_epoch(model, batches_for_epoch(epoch), optimizer, num_batches=num_batches,
                                desc=f"{desc} epoch {epoch + 1}/{epochs}".strip(), progress=progress,
                                where=f"in {desc} epoch {epoch + 1}".replace("  ", " "),
                                stepper=stepper)
            scheduler.step()
            record = {"kind": "epoch", "epoch": epoch + 1, **stats, "lr": lrs}
            if evaluate_fn is not None:
                ev = evaluate_fn()
                record.update({"test_loss": ev["loss"], "test_acc": ev["acc"],
                               "test_seconds": ev.get("seconds")})
            record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                      for k, v in record.items()}
            history.append(record)
            if echo:
                echo(epoch_line(desc, record, epochs))
            if log_fn is not None:  # first the log line, then the checkpoint: see the docstring
                log_fn(record)
            save_checkpoint(str(checkpoint_path), {
                "epoch": epoch + 1, "model": state_fn(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": history, "extra": extra})
            if epoch_budget is not None:
                epoch_budget[0] -= 1
                if epoch_budget[0] <= 0:
                    raise StopRequested(f"stopped after epoch {epoch + 1} as requested")
    finally:
        if stepper is not None:
            stepper.close()               # the graphs and their memory go; plain steps again
    return history


def _lrs(optimizer) -> dict:
    lr = optimizer.lr
    return lr if isinstance(lr, dict) else {"": lr}
