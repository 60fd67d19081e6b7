"""Training checkpoints: atomic save, verified load, resume, and when to save / what to keep.

A checkpoint is one folder ``<run_dir>/checkpoints/<name>/`` (``step_00000100``, ..., ``best``)::

    model.safetensors   the weights (the model folder format of lmforge.store)
    config.yaml         the whole run config, with its ``model:`` section
    tokenizer.json      optional
    trainer_state.safetensors  the trainer's dict: step, optimizer, scheduler, scaler, RNG states,
                        data position, ...: tensors as safetensors, the rest as JSON in its header
                        (lmforge.statefile; never a pickle, so loading it cannot run code)
    meta.json           written LAST: step, metrics, time, versions, and every file's size + sha256

A save never overwrites a checkpoint in place. It builds ``<root>/.tmp-<name>-<pid>-<n>``, fsyncs
every file and the folder, then renames it to ``<root>/<name>``. When ``<name>`` exists (``best``),
the old folder is first renamed aside to ``.old-<name>-<pid>-<n>``, the new one renamed in, then the
old one deleted: at every instant a complete checkpoint exists on disk (if a crash lands between the
two renames, the aside copy is renamed back by the next save or prune). ``meta.json`` being the
last file written means a folder without it is an unfinished save, and its checksums catch
truncated or flipped bytes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.fsutil import fsync_path, is_disk_full, one_line, publish_folder, sha256_file
from lmforge.statefile import load_state, save_state
from lmforge.store import (CONFIG, EXPECTED, FILES, FORMAT, LEGACY_TRAINER_STATE, META, REQUIRED, TOKENIZER,
                           TRAINER_STATE, WEIGHTS,
                           build_model_from_folder, latest_checkpoint, list_checkpoints, load_weights, read_config,
                           verify_checkpoint, write_model_files)
from lmforge.tokenizer import load_tokenizer
from lmforge.version import __version__

__all__ = [
    "META", "TRAINER_STATE", "FORMAT", "Checkpoint", "CheckpointPolicy", "step_name", "save_checkpoint",
    "verify_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "resolve_resume",
]

FORMAT_VERSION = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SIDE_RE = re.compile(r"^\.(tmp|old|trash)-(.+)-(\d+)-(\d+)$")  # .<kind>-<name>-<pid>-<n>
_counter = itertools.count()
_PROCESS_START = time.time()  # side folders older than this, left by our pid, are from a dead run


def step_name(step: int) -> str:
    """The folder name of the periodic checkpoint at ``step``: ``step_00000100``."""
    return f"step_{int(step):08d}"


# --- filesystem helpers --------------------------------------------------------------------------

def _side_path(root: Path, kind: str, name: str) -> Path:
    while True:
        p = root / f".{kind}-{name}-{os.getpid()}-{next(_counter)}"
        if not os.path.lexists(p):
            return p


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile (``_orig_mod``) and DDP/FSDP (``module``) wrappers."""
    while True:
        inner = model._modules.get("_orig_mod")
        if inner is None:
            inner = model._modules.get("module")
        if inner is None or hasattr(model, "config") and "_orig_mod" not in model._modules:
            return model
        model = inner


def _jsonable(x: Any) -> Any:
    """Metrics for meta.json: tensors and numpy scalars become numbers, NaN/inf become strings."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    elif hasattr(x, "item") and callable(x.item) and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (TypeError, ValueError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _parse_side(name: str) -> tuple[str, str, int] | None:
    m = _SIDE_RE.match(name)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell): assume alive
    return True


def _is_stale(path: Path) -> bool:
    """A side folder (.tmp/.old/.trash) left by a process that is gone (a crash)."""
    parsed = _parse_side(path.name)
    try:
        mtime = path.lstat().st_mtime
    except OSError:
        return False
    if parsed is None:
        return mtime < _PROCESS_START
    pid = parsed[2]
    if pid == os.getpid():  # ours now; stale only if written before we started (pid reuse)
        return mtime < _PROCESS_START
    return not _pid_alive(pid)


def _recover(root: Path) -> None:
    """Rename back an ``.old-<name>-*`` folder whose replacement never arrived (crash mid-swap)."""
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        parsed = _parse_side(p.name)
        if parsed is None or parsed[0] != "old":
            continue
        if parsed[2] != os.getpid() and not _is_stale(p):
            continue  # another live process is between its two renames
        target = root / parsed[1]
        if os.path.lexists(target):
            continue
        try:
            verify_checkpoint(p, checksums=False)
            os.rename(p, target)
            fsync_path(root)
            warnings.warn(f"restored checkpoint {target} from {p.name} (a save was interrupted mid-swap)",
                          stacklevel=3)
        except (CheckpointError, OSError):
            pass


# --- save ----------------------------------------------------------------------------------------

def save_checkpoint(ckpt_root: str | os.PathLike, name: str, model: nn.Module, *, config: dict,
                    trainer_state: dict, tokenizer=None, step: int,
                    metrics: dict | None = None) -> Path:
    """Atomically write checkpoint ``ckpt_root/name`` and return its path.

    Any failure (disk full included) removes the temporary folder and raises CheckpointError;
    other checkpoints, and the previous ``name`` if there was one, are left as they were.
    """
    root = Path(ckpt_root)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CheckpointError(f"{root}: invalid checkpoint name {name!r}; expected letters, digits, "
                              f"'_', '-', '.' and no leading '.' (e.g. 'step_00000100' or 'best')")
    final = root / name
    if not isinstance(trainer_state, dict):
        raise CheckpointError(f"{final}: trainer_state must be a dict, got {type(trainer_state).__name__}")
    if not isinstance(config, dict):
        raise CheckpointError(f"{final}: config must be a dict (the run config), got {type(config).__name__}")
    model = _unwrap(model)

    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _recover(root)
        tmp = _side_path(root, "tmp", name)
        tmp.mkdir()
        write_model_files(model, tmp, tokenizer=tokenizer, config=config)
        try:
            save_state(trainer_state, tmp / TRAINER_STATE)
        except TypeError as e:
            raise CheckpointError(f"{final}: the trainer state cannot be saved: {e}") from None
        files = {}
        for fname in (WEIGHTS, CONFIG, TOKENIZER, TRAINER_STATE):
            p = tmp / fname
            if p.is_file():
                files[fname] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "step": int(step),
            "metrics": _jsonable(dict(metrics or {})),
            "wall_time": time.time(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "lmforge_version": __version__,
            "torch_version": torch.__version__,
            "files": files,
        }
        with open(tmp / META, "w", encoding="utf-8") as f:  # last: its presence marks a finished save
            json.dump(meta, f, indent=2)
        # an existing checkpoint of this name goes aside as .old-*: if we die mid-publish,
        # _recover renames it back on the next save or prune
        publish_folder(tmp, final, aside=_side_path(root, "old", name) if os.path.lexists(final) else None)
    except BaseException as e:
        if tmp is not None:
            _rmtree(tmp)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: clean up, do not disguise
            raise
        if isinstance(e, CheckpointError):
            raise
        if is_disk_full(e):
            raise CheckpointError(f"disk full while saving checkpoint {final}: {one_line(e)}; "
                                  f"the previous checkpoints are untouched") from e
        raise CheckpointError(f"could not save checkpoint {final}: {one_line(e)}; "
                              f"the previous checkpoints are untouched") from e
    return final


# --- verify / load -------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded checkpoint. ``build_model()`` makes the model with its weights (train mode)."""

    path: Path
    config: dict
    meta: dict
    trainer_state: dict
    tokenizer: Any = None

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def metrics(self) -> dict:
        return dict(self.meta.get("metrics") or {})

    def build_model(self, device: str | torch.device | None = None) -> nn.Module:
        """The checkpoint's model (LoRA adapters rebuilt), as ``lmforge.store.load_model`` builds it."""
        model = build_model_from_folder(self.path, self.config)
        vocab = model.config.vocab_size
        if self.tokenizer is not None and self.tokenizer.vocab_size > vocab:
            raise CheckpointError(f"{self.path / TOKENIZER}: tokenizer has {self.tokenizer.vocab_size} tokens "
                                  f"but the model's vocab_size is {vocab}")
        return model.to(device) if device is not None else model

    def load_weights_into(self, model: nn.Module) -> nn.Module:
        """Load this checkpoint's weights into an existing model (unwrapping DDP/compile wrappers)."""
        load_weights(_unwrap(model), self.path / WEIGHTS)
        return model


def _load_state(path: Path, map_location) -> dict:
    if not path.is_file() and (path.parent / LEGACY_TRAINER_STATE).is_file():
        raise CheckpointError(f"{path.parent / LEGACY_TRAINER_STATE}: a trainer state in the old pickle format, "
                              f"which can run code when loaded, so lmforge does not read it; start a new run "
                              f"from these weights with model.init_from={path.parent} instead of resuming")
    state = load_state(path, device=map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of trainer state, got {type(state).__name__}")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    verified: bool = False) -> Checkpoint:
    """Verify then load a checkpoint: config, meta, trainer state and tokenizer (or None).
    ``verified=True`` skips the checksums when the caller has just checked them (resume)."""
    path = Path(path)
    meta = verify_checkpoint(path, checksums=not verified)
    config = read_config(path)
    state = _load_state(path / TRAINER_STATE, map_location)
    tok = None
    if (path / TOKENIZER).is_file():
        tok = load_tokenizer(path / TOKENIZER)
    return Checkpoint(path=path, config=config, meta=meta, trainer_state=state, tokenizer=tok)


# --- find ----------------------------------------------------------------------------------------

def resolve_resume(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """Which checkpoint a run resumes from.

    ``None``, ``""``, ``"never"``: none. ``"auto"``: the newest valid checkpoint in
    ``run_dir/checkpoints``, or None when there is none (CheckpointError if there are some but none
    is valid, rather than silently starting over). Anything else: a checkpoint path (or a name
    inside ``run_dir/checkpoints``, e.g. ``best``), which must verify.
    """
    if resume is None or resume is False:
        return None
    text = str(resume).strip()
    if text.lower() in ("", "never", "none", "false", "no"):
        return None
    root = Path(run_dir) / "checkpoints"
    if text.lower() == "auto":
        found = list_checkpoints(root)
        latest = latest_checkpoint(root)
        if latest is None and found:
            raise CheckpointError(f"{root}: {len(found)} checkpoint(s) but none is valid (all corrupt or "
                                  f"partial); pass resume=<path> to pick one, or resume=never to start over")
        return latest
    path = Path(text).expanduser()
    if not path.exists() and _NAME_RE.match(text) and (root / text).is_dir():
        path = root / text
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint to resume from; expected an lmforge checkpoint "
                              f"folder ({FILES}) or resume=auto")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        if path.is_dir() and not (path / META).exists() and not any((path / f).exists() for f in REQUIRED):
            hint = ""
            for sub in (path, path / "checkpoints"):
                intact = [p for p in list_checkpoints(sub) if _quick_ok(p)]
                if intact:
                    hint = f"; it holds checkpoints: pass one of them, e.g. {intact[-1]}, or resume=auto"
                    break
            raise CheckpointError(f"{path} is not an lmforge checkpoint ({EXPECTED}){hint}") from None
        raise CheckpointError(f"cannot resume: {e}") from None
    return path


# --- policy --------------------------------------------------------------------------------------

class CheckpointPolicy:
    """When to save (every N steps and/or every H hours) and what to keep (newest N, and the best).

    ``due(step)`` is true every ``every_steps`` steps, or when ``every_hours`` have passed since
    the last ``mark_saved()`` (or since the policy was made). ``is_best(metrics)`` tracks the
    running best of ``best_metric``; ``state_dict()`` carries it across a resume.
    """

    def __init__(self, every_steps: int | None, every_hours: float | None, keep_last: int | None,
                 best_metric: str | None = "val_loss", best_mode: str = "min"):
        problems = []
        if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int)
                                        or every_steps < 1):
            problems.append(f"checkpoint.every_steps: expected a positive integer or null, got {every_steps!r}")
        if every_hours is not None and (isinstance(every_hours, bool) or not isinstance(every_hours, (int, float))
                                        or not every_hours > 0):
            problems.append(f"checkpoint.every_hours: expected a positive number or null, got {every_hours!r}")
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                      or keep_last < 1):
            problems.append(f"checkpoint.keep_last: expected a positive integer or null (keep all), "
                            f"got {keep_last!r}")
        if best_mode not in ("min", "max"):
            problems.append(f"checkpoint.best_mode: expected 'min' or 'max', got {best_mode!r}")
        if problems:
            raise ConfigError(problems)
        self.every_steps = every_steps
        self.every_hours = float(every_hours) if every_hours is not None else None
        self.keep_last = keep_last
        self.best_metric = best_metric or None
        self.best_mode = best_mode
        self.best: float | None = None
        self._last_save_time = time.monotonic()
        self._last_save_step: int | None = None

    def due(self, step: int, now: float | None = None) -> bool:
        """Whether to save at ``step`` (``now`` is a time.monotonic() value, for tests)."""
        if step == self._last_save_step:
            return False
        if self.every_steps and step > 0 and step % self.every_steps == 0:
            return True
        if self.every_hours is not None:
            now = time.monotonic() if now is None else now
            return now - self._last_save_time >= self.every_hours * 3600.0
        return False

    def mark_saved(self, now: float | None = None, step: int | None = None) -> None:
        self._last_save_time = time.monotonic() if now is None else now
        if step is not None:
            self._last_save_step = step

    def is_best(self, metrics: dict) -> bool:
        """True (and the running best updated) if ``metrics[best_metric]`` beats the best so far."""
        if not self.best_metric or not metrics or metrics.get(self.best_metric) is None:
            return False
        value = metrics[self.best_metric]
        try:
            value = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(value):
            return False
        better = self.best is None or (value < self.best if self.best_mode == "min" else value > self.best)
        if better:
            self.best = value
        return better

    def state_dict(self) -> dict:
        return {"best": self.best, "best_metric": self.best_metric, "best_mode": self.best_mode,
                "last_save_step": self._last_save_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the running best (ignored, with a warning, if the metric or mode has changed)."""
        if state.get("best_metric") != self.best_metric or state.get("best_mode") != self.best_mode:
            if state.get("best") is not None:
                warnings.warn(f"checkpoint policy: best was tracked for {state.get('best_metric')!r} "
                              f"({state.get('best_mode')}), now {self.best_metric!r} ({self.best_mode}); "
                              f"starting the best over", stacklevel=2)
            self.best = None
        else:
            self.best = None if state.get("best") is None else float(state["best"])
        self._last_save_step = state.get("last_save_step")
        self._last_save_time = time.monotonic()

    def prune(self, ckpt_root: str | os.PathLike) -> list[Path]:
        """Delete all but the newest ``keep_last`` step_* checkpoints (never ``best``, and never the
        newest one whose files are intact), and stale temp/aside folders left by a crashed process.
        Returns the paths removed."""
        root = Path(ckpt_root)
        if not root.is_dir():
            return []
        _recover(root)
        removed = []
        for p in sorted(root.iterdir()):
            parsed = _parse_side(p.name)
            if p.name.startswith((".tmp-", ".old-", ".trash-")) and p.is_dir() and _is_stale(p):
                if parsed is not None and parsed[0] == "old" and not (root / parsed[1]).exists():
                    continue  # the only copy of that checkpoint (could not be restored): keep it
                _rmtree(p)
                removed.append(p)
        steps = list_checkpoints(root)
        if self.keep_last is None or len(steps) <= self.keep_last:
            return removed
        keep = steps[-self.keep_last:]
        drop = steps[:-self.keep_last]
        if not any(_quick_ok(p) for p in keep):  # keep the newest intact one even beyond keep_last
            for p in reversed(drop):
                if _quick_ok(p):
                    drop.remove(p)
                    break
        for p in drop:
            trash = _side_path(root, "trash", p.name)
            try:
                os.rename(p, trash)  # a crash mid-delete leaves a .trash-* folder, never half a step_*
            except OSError:
                continue
            _rmtree(trash)
            removed.append(p)
        return removed


def _quick_ok(path: Path) -> bool:
    try:
        verify_checkpoint(path, checksums=False)
        return True
    except CheckpointError:
        return False
