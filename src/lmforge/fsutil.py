"""Crash-safe writes of files and folders: build beside the target, fsync, then rename into place.

A crash at any instant leaves either the old file (folder) or the new one, never half of one.
``atomic_write`` does it for one file; ``publish_folder`` for a folder built in a temporary
place (model folders, checkpoints and the token store all go through it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``content`` (text, bytes, or a function that writes to the path it is given) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        if isinstance(content, str):
            tmp_path.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp_path.write_bytes(content)
        else:
            content(tmp_path)
        fsync_path(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def publish_folder(tmp: Path, final: Path, aside: Path | None = None) -> None:
    """Make the finished folder ``tmp`` become ``final``, crash-safely.

    Every file in ``tmp`` and ``tmp`` itself are fsynced first. An existing ``final`` is renamed to
    ``aside`` (required then), ``tmp`` is renamed to ``final``, and ``aside`` is removed; if the
    second rename fails, ``aside`` is renamed back. A crash between the renames leaves ``aside``
    whole (callers that name it predictably can recover it). The parent folder is fsynced so the
    renames are durable.
    """
    import shutil

    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    fsync_path(tmp)
    moved = False
    if os.path.lexists(final):
        if aside is None:
            raise FileExistsError(f"{final} exists; publish_folder needs an aside path to replace it")
        os.rename(final, aside)
        moved = True
    try:
        os.rename(tmp, final)
    except BaseException:
        if moved and not os.path.lexists(final):
            try:
                os.rename(aside, final)
            except OSError:
                pass  # aside stays whole on disk for the caller's recovery
        raise
    try:
        fsync_path(final.parent)
    except OSError:
        pass
    if moved:
        shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes its renames and new entries durable)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():  # some platforms cannot open folders; nothing more we can do there
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or quota is full."""
    import errno

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "StorageFull" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most ~200 characters (for error messages that wrap another)."""
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
