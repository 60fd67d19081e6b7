"""Are these weights what was saved, and are they numbers? Checks every loader makes.

Two checks, cheap next to reading the bytes:

* **finite** -- a weight holding NaN or inf (a flipped exponent bit, a GGUF block whose scale is
  inf, a run that diverged before it was saved) makes every output NaN: generate answers nothing,
  eval reports ``"loss": "nan"``. Loaders refuse it with one line naming the tensor; set
  ``LMFORGE_ALLOW_NONFINITE=1`` to load it anyway (to look at it while debugging).
* **checksums** -- a model or adapter folder carries ``checksums.json``, every file's size and
  sha256 (what ``meta.json`` is to a training checkpoint), written last and checked on load: a
  flipped byte, a truncated file or an edited ``adapter.json`` is one line, never a silent change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from lmforge.errors import CheckpointError
from lmforge.fsutil import atomic_write, sha256_file

__all__ = ["ALLOW_NONFINITE_ENV", "CHECKSUMS", "allow_nonfinite", "check_finite", "check_finite_model",
           "write_checksums", "verify_checksums"]

ALLOW_NONFINITE_ENV = "LMFORGE_ALLOW_NONFINITE"
CHECKSUMS = "checksums.json"
_FORMAT = "lmforge-checksums"


def allow_nonfinite() -> bool:
    """Whether ``LMFORGE_ALLOW_NONFINITE`` is set to a true value (1, true, yes)."""
    return os.environ.get(ALLOW_NONFINITE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where) -> None:
    """CheckpointError naming the first floating-point tensor holding NaN or inf (unless allowed)."""
    if allow_nonfinite():
        return
    for name, t in named:
        if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
            continue
        total = t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        if bool(torch.isfinite(total)):  # one NaN or inf makes the sum non-finite: the fast common case
            continue
        finite = torch.isfinite(t)  # a non-finite sum: NaN/inf inside, or finite values that overflowed
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise CheckpointError(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or inf) of "
                                  f"{t.numel()}; the weights are corrupt. Set {ALLOW_NONFINITE_ENV}=1 to load "
                                  f"them anyway for debugging")


def check_finite_model(model: nn.Module, where) -> nn.Module:
    """:func:`check_finite` over the model's saved tensors (parameters and persistent buffers)."""
    check_finite(model.state_dict().items(), where)
    return model


def write_checksums(folder: str | os.PathLike, names: Iterable[str]) -> Path:
    """Write ``folder/checksums.json`` listing the size and sha256 of each named file that exists."""
    folder = Path(folder)
    files = {}
    for name in names:
        p = folder / name
        if p.is_file():
            files[name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    body = {"format": _FORMAT, "files": files}
    return atomic_write(folder / CHECKSUMS, json.dumps(body, indent=2) + "\n")


def verify_checksums(folder: str | os.PathLike, required: Iterable[str] = ()) -> bool:
    """Check ``folder`` against its ``checksums.json``: False when it has none (an older folder),
    True when every listed file is there with its size and sha256, else CheckpointError. Files in
    ``required`` must be listed when a checksums.json exists."""
    folder = Path(folder)
    path = folder / CHECKSUMS
    if not path.is_file():
        return False
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: not valid JSON ({type(e).__name__})") from None
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("format") != _FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{path}: expected a JSON object with \"format\": \"{_FORMAT}\" and a \"files\" table")
    for name in required:
        if name not in files:
            raise CheckpointError(f"{path}: does not list {name}; the folder was changed after it was saved")
    for name, info in files.items():
        p = folder / name
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{path}: entry for {name} lacks size and sha256")
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {CHECKSUMS})")
        if p.stat().st_size != info["size"]:
            raise CheckpointError(f"{p} is corrupt: size {p.stat().st_size} bytes, expected {info['size']} "
                                  f"(truncated or overwritten)")
        if sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{p} is corrupt: checksum mismatch (sha256 differs from {CHECKSUMS}); "
                                  f"the file was changed after it was saved")
    return True
