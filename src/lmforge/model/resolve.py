"""Where the model is, when a user names a folder: ``resolve_model_path("runs/demo")``.

Inference verbs (``generate``, ``info``, ``export``, ``eval``, ``classify``) take a model folder:
an lmforge checkpoint (``runs/demo/checkpoints/best``), a saved model folder, or a Hugging Face
folder. Users naturally pass the *run* folder instead (``runs/demo``), whose ``config.yaml`` is a
run config with no weights beside it. :func:`resolve_model_path` recognises a run folder (or its
``checkpoints/`` folder) and picks its ``checkpoints/best``, else its newest complete
``step_*`` checkpoint, and returns a note saying so; ``hf:ORG/NAME[@REVISION]`` becomes its
snapshot folder in the Hugging Face cache (:mod:`lmforge.hub`, downloaded once); any other path
comes back unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge import hub
from lmforge.errors import CheckpointError

__all__ = ["resolve_model_path"]

_MODEL_FILES = ("model.safetensors", "config.json")  # lmforge weights / a Hugging Face folder
_RUN_FILES = ("run_info.json", "metrics.jsonl")  # what a run folder holds from its first steps
CHECKPOINTS = "checkpoints"
BEST = "best"


def resolve_model_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``(folder to load, note or None)``.

    A model/checkpoint folder (it has ``model.safetensors`` or a Hugging Face ``config.json``),
    a file, or a path that does not exist is returned as is (the loader reports what is wrong).
    A run folder, or its ``checkpoints/`` folder, becomes its ``best`` checkpoint when that one
    is complete, else its newest complete ``step_*`` one, with a note naming the choice; a run
    folder without any complete checkpoint is a :class:`CheckpointError`.
    """
    if hub.is_hf_spec(path):  # a model by name: its folder in the Hugging Face cache
        return hub.resolve_hf_model(str(path)), None
    p = Path(path)
    if not p.is_dir() or any((p / f).is_file() for f in _MODEL_FILES):
        return p, None
    if (p / CHECKPOINTS).is_dir() or any((p / f).is_file() for f in _RUN_FILES):
        run, root = p, p / CHECKPOINTS
    elif p.name == CHECKPOINTS or (p / BEST).is_dir() or _step_folders(p):
        run, root = p.parent, p
    else:
        return p, None
    best = root / BEST
    if _complete(best):
        return best, f"{p} is a run folder; using its best checkpoint {best}{_step_of(best)}"
    for ckpt in reversed(_step_folders(root) if root.is_dir() else []):
        if _complete(ckpt):
            why = "has no complete best checkpoint" if best.exists() else "has no best checkpoint"
            return ckpt, f"{p} is a run folder that {why}; using its newest checkpoint {ckpt}"
    raise CheckpointError(f"{p}: a run folder without a complete checkpoint under {root} (has the run "
                          f"saved one yet?); expected a checkpoint or model folder such as "
                          f"{run / CHECKPOINTS / BEST}")


def _step_folders(root: Path) -> list[Path]:
    """``step_*`` folders, oldest step first."""
    from lmforge.train.checkpoint import list_checkpoints

    return list_checkpoints(root)


def _complete(ckpt: Path) -> bool:
    """A finished save: its meta.json is valid and every listed file has its size (no checksums:
    the loader verifies those)."""
    from lmforge.train.checkpoint import verify_checkpoint

    if not ckpt.is_dir():
        return False
    try:
        verify_checkpoint(ckpt, checksums=False)
    except CheckpointError:
        return False
    return True


def _step_of(ckpt: Path) -> str:
    import json

    try:
        step = json.loads((ckpt / "meta.json").read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (step {step})" if isinstance(step, int) else ""
