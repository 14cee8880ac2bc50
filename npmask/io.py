"""Atomic file writes: a reader sees the old complete file or the new complete one, never half.

The bottom of npmask's layers (standard library and NumPy), used by the checkpoints and run
folders of :mod:`npmask.training`, by :mod:`npmask.pretrained`'s backbone files and by the domain
folders of :mod:`npmask.data.format` alike. The file is written to a temporary name in the same
folder, flushed to disk, and renamed over the target: a rename within one file system is atomic,
whenever the process is killed. :func:`open_npz` opens an .npz without pickle, telling a file that
is not an .npz from a corrupt one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    If anything fails (or the process dies) before the rename, ``path`` keeps its old content;
    the temporary file is removed on a Python exception.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes the file private; give it normal rights
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder) -> None:
    """fsync a folder, so that a rename inside it survives a power cut (not only a kill).

    A no-op where folders cannot be opened (Windows) or fsynced (some network file systems).
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_npz(path):
    """``np.load(path, allow_pickle=False)`` for an .npz, with a clear ValueError first when the file
    is not a zip archive, as every .npz is: NumPy reads any other file as a pickle and, with
    ``allow_pickle=False``, blames the pickle. Use it as ``with open_npz(path) as z:``."""
    with open(path, "rb") as f:
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):   # a zip's first entry, or an empty zip
            raise ValueError("not a valid .npz file: it is not a zip archive")
    return np.load(path, allow_pickle=False)


def is_temp_name(name: str) -> bool:
    """Names of the temporary files of an interrupted atomic write: ``.<target>.<random>.tmp``
    (:func:`atomic_write_bytes`) and ``.tmp-<random>.npz`` (npmask.storage.save_domain)."""
    return name.startswith(".") and (name.endswith(".tmp")
                                     or (name.startswith(".tmp-") and name.endswith(".npz")))


def remove_stale_temps(folder, recursive: bool = True) -> list[str]:
    """Delete the temporary files interrupted writes left in ``folder`` (and its sub-folders).

    Call it only while no other process writes there (a run holds its folder's lock). Returns the
    removed paths.
    """
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in files:
            if is_temp_name(name):
                p = os.path.join(root, name)
                try:
                    os.remove(p)
                    removed.append(p)
                except FileNotFoundError:
                    pass
        if not recursive:
            break
    return removed


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def replace_folder(tmp: Path, folder: Path) -> None:
    """Rename the finished folder ``tmp`` to ``folder``, keeping any old ``folder`` until it worked.

    Directories cannot be swapped atomically with os.replace when the target is a non-empty
    folder, so: old -> aside, tmp -> folder, delete aside; on failure move the old one back.
    """
    if not folder.exists():
        os.replace(tmp, folder)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    aside.rmdir()  # only wanted a unique name
    os.replace(folder, aside)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)
