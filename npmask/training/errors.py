"""Errors of the training commands, and how the command-line tools report them.

A user mistake (an unknown model, a missing data folder, no GPU for ``--backend cupy``) or a
diverging run must stop the command with *one* clear line, not a traceback from deep inside
NumPy. The library raises ordinary exceptions with full messages; :func:`exit_on_error` is the one
place that turns the expected ones into ``SystemExit("<prog>: error: <message>")``.
"""
from __future__ import annotations

import contextlib
import errno
import sys

from ..backend import BackendError
from ..data.format import DataFormatError
from .checkpoint import CheckpointError


class TrainingError(RuntimeError):
    """Base class of the errors the training commands report as one line."""


class ConfigError(TrainingError, ValueError):
    """An invalid setting: unknown model/variant/domain, a bad value, a config that does not match."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept on disk."""


class GraphStepError(TrainingError):
    """The model or step cannot be captured in CUDA graphs (dropout, state replaced during a
    capture, a CuPy refusal, no usable cuBLAS); the commands report it in one line."""


# What exit_on_error reports as one line; anything else is a bug and keeps its traceback.
_EXPECTED = (TrainingError, BackendError, CheckpointError, DataFormatError)


def _expected() -> tuple:
    """_EXPECTED plus the file errors of modules loaded lazily (imported here only if already
    loaded, so importing this module never pulls in the networks)."""
    types = list(_EXPECTED)
    for module, name in (("npmask.storage", "DomainFileError"),
                         ("npmask.pretrained", "BackboneError")):
        m = sys.modules.get(module)
        if m is not None and hasattr(m, name):
            types.append(getattr(m, name))
    return tuple(types)


# Failures of the machine rather than of npmask: reported as one line naming the path.
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EIO, errno.ENAMETOOLONG,
                errno.ENODEV, errno.ENXIO, errno.ESTALE, errno.ELOOP, errno.EMFILE}


def os_error_message(err: OSError) -> str:
    """``<what went wrong>: <path>`` for an OSError of the file system."""
    where = err.filename if err.filename is not None else "a file of the run"
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    text = f"{err.strerror or type(err).__name__}: {where}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (free some space; what was saved before is kept)"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += " (check the folder's permissions, or pick another --out / --data-root)"
    return text


class _Context:
    """What ``exit_on_error`` yields: set ``resume`` to the command that continues the run, so an
    interruption (Ctrl-C) or a full disk can say how to go on; ``on_exit(fn)`` runs ``fn`` when the
    block ends, however it ends (e.g. giving back a run folder's lock)."""

    def __init__(self):
        self.resume: str | None = None
        self._on_exit: list = []

    def on_exit(self, fn) -> None:
        self._on_exit.append(fn)

    def close(self) -> None:
        while self._on_exit:
            self._on_exit.pop()()


def one_line(err: BaseException) -> str | None:
    """The one-line message :func:`exit_on_error` would print for ``err`` (without the program's
    name), or None when ``err`` is not an expected error (a bug, which keeps its traceback)."""
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT:
        return os_error_message(err)
    if not isinstance(err, _expected()):
        return None
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # KeyError quotes its message
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def exit_on_error(prog: str):
    """Turn expected errors inside the block into ``SystemExit`` with a one-line message.

    Also one line: Ctrl-C (with the ``--resume`` command when the block set ``ctx.resume``) and
    file-system failures (disk full, permission denied, read-only, missing drive: the message names
    the path). Unexpected exceptions (bugs) keep their traceback, on purpose.
    """
    ctx = _Context()
    try:
        yield ctx
    except KeyboardInterrupt:
        hint = (f"; continue with: {ctx.resume}" if ctx.resume
                else " before the run started")
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as err:
        if err.errno not in _ENVIRONMENT:
            raise
        hint = f"; then continue with: {ctx.resume}" if ctx.resume else ""
        raise SystemExit(f"{prog}: error: {os_error_message(err)}{hint}") from None
    except Exception as err:
        message = one_line(err)
        if message is None:
            raise
        raise SystemExit(f"{prog}: error: {message}") from None
    finally:
        ctx.close()
