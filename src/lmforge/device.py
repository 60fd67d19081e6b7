"""Which device to run on: ``resolve_device("cuda:1")`` -> ``torch.device``, checked up front.

torch accepts a device string lazily and fails later, deep inside the first allocation, with a
traceback (``cuda`` without a CUDA build, ``cuda:3`` on a 2-GPU box, a typo). This checks the name
once, before anything is built, and raises one clear line instead:

* an unknown or malformed name is an :class:`~lmforge.errors.ConfigError`;
* a known kind this machine does not have (no CUDA, no MPS, a GPU index past the count) is an
  :class:`~lmforge.errors.InputError`.

``"auto"`` picks CUDA, then MPS, then CPU.
"""

from __future__ import annotations

import torch

from lmforge.errors import ConfigError, InputError

__all__ = ["resolve_device", "available_devices"]

_KINDS = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """The device names usable here, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device | None = "cpu", *, key: str = "device") -> torch.device:
    """The ``torch.device`` for ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``;
    None means cpu), or an error naming ``key`` and the devices this machine has."""
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ConfigError(f"{key}: got {name!r}, expected a device name such as cpu, cuda, cuda:0, mps or auto")
    text = name.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in _KINDS:
        raise ConfigError(f"{key}: unknown device {name!r}; expected cpu, cuda, cuda:N, mps or auto")
    have = ", ".join(available_devices())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{key}: {name!r} requested but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); available: {have}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{key}: {name!r} requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); available: {have}")
    if dev.type == "mps" and not _mps_available():
        raise InputError(f"{key}: 'mps' requested but Apple MPS is not available here; available: {have}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ConfigError(f"{key}: got {name!r}; the CPU has no device index (expected cpu)")
    return dev


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
