"""Tests for lmforge.store: a run folder where a model is expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmforge.errors import CheckpointError
from lmforge.model import build
from lmforge.store import resolve_model_path
from lmforge.train.checkpoint import save_checkpoint

TINY = {"vocab_size": 20, "context_length": 8, "n_layer": 1, "n_head": 1, "n_embd": 8}


def _run(tmp_path: Path, steps=(2, 4), best: int | None = 2) -> Path:
    """A run folder as training leaves it: config.yaml, metrics, checkpoints/step_*, best."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: t}\n")
    (run / "metrics.jsonl").write_text("")
    model = build(TINY)
    cfg = {"model": dict(TINY)}
    for s in steps:
        save_checkpoint(run / "checkpoints", f"step_{s:08d}", model, config=cfg, trainer_state={}, step=s)
    if best is not None:
        save_checkpoint(run / "checkpoints", "best", model, config=cfg, trainer_state={}, step=best,
                        metrics={"val_loss": 1.0})
    return run


def test_model_folders_and_other_paths_pass_through(tmp_path):
    run = _run(tmp_path)
    ckpt = run / "checkpoints" / "step_00000004"
    assert resolve_model_path(ckpt) == (ckpt, None)
    assert resolve_model_path(tmp_path / "nothing") == (tmp_path / "nothing", None)
    (tmp_path / "plain").mkdir()
    assert resolve_model_path(tmp_path / "plain") == (tmp_path / "plain", None)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_path(str(hf)) == (hf, None)


def test_a_run_folder_resolves_to_its_best_checkpoint(tmp_path):
    run = _run(tmp_path)
    path, note = resolve_model_path(run)
    assert path == run / "checkpoints" / "best"
    assert note == f"{run} is a run folder; using its best checkpoint {path} (step 2)"
    path, note = resolve_model_path(run / "checkpoints")  # the checkpoints folder too
    assert path == run / "checkpoints" / "best" and "run folder" in note


def test_without_a_complete_best_the_newest_complete_step_is_taken(tmp_path):
    run = _run(tmp_path, best=None)
    path, note = resolve_model_path(run)
    assert path == run / "checkpoints" / "step_00000004" and "has no best checkpoint" in note
    (path / "meta.json").unlink()  # an unfinished save is skipped
    shutil.copytree(path.parent / "step_00000002", path.parent / "best")
    (path.parent / "best" / "model.safetensors").write_bytes(b"x")  # a broken best is skipped too
    path, note = resolve_model_path(run)
    assert path == run / "checkpoints" / "step_00000002" and "no complete best" in note


def test_a_run_folder_without_any_checkpoint_is_a_checkpoint_error(tmp_path):
    run = _run(tmp_path, steps=(), best=None)
    with pytest.raises(CheckpointError, match="run folder without a complete checkpoint.*checkpoints/best"):
        resolve_model_path(run)


def test_from_pretrained_loads_a_run_folder_with_a_warning(tmp_path):
    import lmforge

    run = _run(tmp_path)
    with pytest.warns(UserWarning, match="is a run folder; using its best checkpoint"):
        model = lmforge.from_pretrained(run)
    assert model.config.n_embd == TINY["n_embd"]
