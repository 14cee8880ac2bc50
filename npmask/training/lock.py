"""One run folder, one process: an exclusive lock file ``<run>/.lock`` holding the owner's pid.

Two processes training into the same folder would interleave metrics.jsonl and overwrite each
other's checkpoints. The lock is taken before a command writes anything into a folder and given
back (the file removed) when it ends.

How: the file is opened (created when missing) and locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``.
The kernel drops a flock when its process dies, however it dies (SIGKILL included), so a lock file
left by a killed run is *stale* by construction: the next process locks it and takes it over. A
lock that is held belongs to a live process, whose pid (written into the file) the refusal names.
The holder removes the file before unlocking; a process that locked a file already removed (it
opened it just before) sees that its inode is no longer the path's and tries again.

Where flock does not exist (not POSIX), the pid alone decides: a lock file whose pid is not a
running process is stale and replaced.
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".lock"


class RunLockError(ConfigError):
    """The run folder is in use by another live process."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except OSError:
        return False
    return True


class RunLock:
    """``with RunLock(folder):`` or ``lock = RunLock(folder).acquire(); ...; lock.release()``."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd = None

    def _owner(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8").split()
        except OSError:
            text = []
        return f"process {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "") if text else \
            "another process"

    def _refuse(self):
        raise RunLockError(f"run folder {self.folder} is in use by {self._owner()} (lock file "
                           f"{self.path}); wait for it to end or stop it, then run again")

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        mode = 0o666  # the umask applies, as for every file npmask writes
        for _ in range(20):
            if fcntl is None:  # pragma: no cover - non-POSIX: pid file only
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
                except FileExistsError:
                    try:
                        pid = int(self.path.read_text(encoding="utf-8").split()[0])
                    except (OSError, ValueError, IndexError):
                        pid = -1
                    if pid > 0 and _pid_alive(pid):
                        self._refuse()
                    self.path.unlink(missing_ok=True)  # stale
                    continue
            else:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, mode)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    os.close(fd)
                    if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        self._refuse()
                    raise
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous holder removed the file between our open and lock
                    os.close(fd)
                    continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunLockError(f"could not take the lock {self.path}: it keeps changing hands")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
