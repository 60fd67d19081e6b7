"""lmforge.fsutil: crash-safe writes (a failure at any point leaves the old file or folder whole and
no temporary behind), the sha256 of a file, disk-full detection through exception chains, and
one-line error text."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest

from lmforge.fsutil import atomic_write, is_disk_full, one_line, publish_folder, sha256_file


def test_atomic_write_text_bytes_and_callable(tmp_path):
    p = atomic_write(tmp_path / "sub" / "a.txt", "héllo\n")  # parent folders are created
    assert p == tmp_path / "sub" / "a.txt" and p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    seen = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("from a function")

    atomic_write(p, writer)
    assert p.read_text() == "from a function"
    assert seen[0] != p and seen[0].parent == p.parent  # written beside the target, then renamed
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]  # no temporary left


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write(p, "old")

    def crash(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise KeyboardInterrupt  # BaseException too: a Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, crash)
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's 0600


def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_publish_folder_new_and_replacing(tmp_path):
    final = tmp_path / "model"
    publish_folder(_folder(tmp_path / ".tmp-1", a="1"), final)
    assert (final / "a").read_text() == "1" and not (tmp_path / ".tmp-1").exists()
    publish_folder(_folder(tmp_path / ".tmp-2", b="2"), final, aside=tmp_path / ".old")
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # the new folder, not a merge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # temporary and aside gone


def test_publish_folder_over_an_existing_one_needs_an_aside(tmp_path):
    final = _folder(tmp_path / "model", a="old")
    tmp = _folder(tmp_path / ".tmp", a="new")
    with pytest.raises(FileExistsError, match="needs an aside"):
        publish_folder(tmp, final)
    assert (final / "a").read_text() == "old" and (tmp / "a").read_text() == "new"


def test_publish_folder_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = _folder(tmp_path / "model", a="old")
    tmp = _folder(tmp_path / ".tmp", a="new")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == tmp:
            raise OSError(errno.EIO, "simulated failure of the second rename")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        publish_folder(tmp, final, aside=tmp_path / ".old")
    assert (final / "a").read_text() == "old"  # renamed back from the aside
    assert not (tmp_path / ".old").exists() and (tmp / "a").read_text() == "new"


def test_sha256_file_equals_hashlib_across_blocks(tmp_path):
    data = os.urandom((1 << 20) + 12345)  # more than one 1 MiB block
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_is_disk_full_by_errno_message_and_cause():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("safetensors: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))
    try:  # a wrapper raised from the real cause
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("could not save the checkpoint") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    a, b = RuntimeError("a"), RuntimeError("b")  # a cycle of causes ends
    a.__cause__, b.__cause__ = b, a
    assert not is_disk_full(a)


def test_one_line():
    assert one_line(ValueError("two\n  lines\tand  spaces")) == "ValueError: two lines and spaces"
    assert one_line(KeyError()) == "KeyError"
    long = one_line(RuntimeError("x" * 500))
    assert long.startswith("RuntimeError: xxx") and long.endswith("...") and len(long) == len("RuntimeError: ") + 200
