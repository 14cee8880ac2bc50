"""Atomic file writes: a reader sees the old complete file or the new complete one, never half.

The bottom of npmask's layers (standard library only), used by the checkpoints and run folders of
:mod:`npmask.training` and by :mod:`npmask.pretrained`'s backbone files alike. The file is written
to a temporary name in the same folder, flushed to disk, and renamed over the target: a rename
within one file system is atomic, whenever the process is killed.
"""
from __future__ import annotations

import os
import tempfile


def atomic_write_bytes(path: str, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    If anything fails (or the process dies) before the rename, ``path`` keeps its old content;
    the temporary file is removed on a Python exception.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it normal rights
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
