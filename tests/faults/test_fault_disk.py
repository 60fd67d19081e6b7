"""A full disk: a run whose checkpoint no longer fits ends with one line (exit 2) and its earlier
checkpoints intact and resumable. Uses a size-limited tmpfs (root only; skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_dict
from tests.faults import faultkit


@pytest.fixture
def small_disk():
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a size-limited tmpfs needs root (mount)")
    mnt = Path(tempfile.mkdtemp(prefix="lmforge-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:120]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


@pytest.mark.slow
def test_disk_full_mid_run_keeps_earlier_checkpoints(small_disk, tmp_path, token_cache):
    from lmforge.train.checkpoint import load_checkpoint, resolve_resume, verify_checkpoint

    cfg = tiny_run_dict(small_disk / "run", token_cache)
    cfg["train"].update(max_steps=12, checkpoint_every=2, keep_last=None)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = faultkit.cli("train", "-c", path, "--quiet", cwd=tmp_path)
    line = faultkit.assert_one_line_error(r, "disk full while saving checkpoint", "the previous checkpoints are untouched")
    assert str(small_disk / "run" / "checkpoints") in line
    root = small_disk / "run" / "checkpoints"
    saved = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    assert saved and not [p for p in root.iterdir() if p.name.startswith(".")]  # no half-written leftovers
    for p in saved:
        verify_checkpoint(p)
    newest = resolve_resume("auto", small_disk / "run")
    assert newest == saved[-1] and load_checkpoint(newest).step == int(saved[-1].name[5:])
