"""Errors of the training commands, and how the command-line tools report them.

A user mistake (an unknown model, a missing data folder, no GPU for ``--backend cupy``) or a
diverging run must stop the command with *one* clear line, not a traceback from deep inside
NumPy. The library raises ordinary exceptions with full messages; :func:`exit_on_error` is the one
place that turns the expected ones into ``SystemExit("<prog>: error: <message>")``.
"""
from __future__ import annotations

import contextlib

from ..backend import BackendError
from ..data.format import DataFormatError
from .checkpoint import CheckpointError


class TrainingError(RuntimeError):
    """Base class of the errors the training commands report as one line."""


class ConfigError(TrainingError, ValueError):
    """An invalid setting: unknown model/variant/domain, a bad value, a config that does not match."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept on disk."""


# What exit_on_error reports as one line; anything else is a bug and keeps its traceback.
_EXPECTED = (TrainingError, BackendError, CheckpointError, DataFormatError)


@contextlib.contextmanager
def exit_on_error(prog: str):
    """Turn expected errors inside the block into ``SystemExit`` with a one-line message.

    Unexpected exceptions (bugs) keep their traceback, on purpose.
    """
    try:
        yield
    except _EXPECTED as err:
        text = str(err).strip() or type(err).__name__
        if isinstance(err, KeyError) and text.startswith(("'", '"')):
            text = text[1:-1]  # KeyError quotes its message
        message = " ".join(line.strip() for line in text.splitlines() if line.strip())
        raise SystemExit(f"{prog}: error: {message}") from None
