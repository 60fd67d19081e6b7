"""One run per folder: an advisory lock that a second ``lmforge train`` on the same folder sees.

Two runs writing one ``run.out_dir`` lose work (the second moves the first's metrics and
checkpoints aside, then overwrites them). ``RunLock(folder)`` holds ``fcntl.flock`` on
``folder/.lmforge.lock`` for the whole run and writes its pid there; a second run's lock attempt
fails at once and says which process holds the folder. The kernel drops the lock when its process
ends, however it ends (kill -9 included), so a lock left by a crash is never in the way: the file
stays, but nobody holds it. The file is never deleted (deleting a lock file while another process
opens it would let two runs hold two different files).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from lmforge.errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks; runs are not guarded
    fcntl = None

__all__ = ["LOCK_FILE", "RunLock", "unwritable_folder_error"]

LOCK_FILE = ".lmforge.lock"


def unwritable_folder_error(folder: Path, e: OSError, what: str = "run.out_dir") -> ConfigError:
    """One line for a folder that cannot be created or written (read-only, no permission)."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    where = Path(e.filename) if getattr(e, "filename", None) else folder
    return ConfigError(f"{what}: cannot write to {where} ({reason}); choose a folder you can write to, "
                       f"or make this one writable")


class RunLock:
    """``with RunLock(folder): ...`` -- the folder is this process's until the block ends."""

    def __init__(self, folder: str | os.PathLike, what: str = "run.out_dir"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def holder(self) -> str:
        """The pid written by the process holding the lock (or '?' when unreadable)."""
        try:
            return self.path.read_text(encoding="utf-8").strip() or "?"
        except OSError:
            return "?"

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise unwritable_folder_error(self.folder, e, self.what) from None
            raise
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"{self.what}: {self.folder} is in use by another lmforge run (pid "
                                      f"{self.holder()}); wait for it to finish, stop it, or choose another "
                                      f"{self.what}") from None
                raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # nobody's now
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
