"""Self-describing model folders: weights (safetensors) + config (YAML) + tokenizer (JSON).

A folder written by ``save_model`` (or a training checkpoint, which adds its own files) holds::

    model.safetensors   the weights (tied weights stored once)
    config.yaml         at least a ``model:`` section (a run's checkpoint keeps the whole run config)
    tokenizer.json      optional, an lmforge tokenizer file

``load_model`` checks that the tokenizer's vocabulary fits the model before returning.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from lmforge.errors import CheckpointError
from lmforge.fsutil import publish_folder

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"


def write_model_files(model: nn.Module, folder: str | Path, tokenizer=None,
                      config: dict[str, Any] | None = None) -> None:
    """Write weights, config and tokenizer into ``folder`` (which must exist).

    Not atomic by itself: callers write into a temporary folder and publish it with
    ``lmforge.fsutil.publish_folder`` (see ``save_model`` and ``lmforge.train.checkpoint``).
    """
    from safetensors.torch import save_model as st_save_model

    folder = Path(folder)
    cfg = dict(config or {})
    cfg["model"] = model.config.to_dict()
    lora = getattr(model, "lora_config", None)
    if lora is not None:  # adapters are part of the weights: rebuilt from this section on load
        cfg["lora"] = lora.to_dict()
    if tokenizer is not None:  # ties the tokenizer to these weights: a swapped one is refused on load
        cfg["tokenizer_fingerprint"] = tokenizer.fingerprint()
    st_save_model(model, str(folder / WEIGHTS), metadata={"format": "pt", "lmforge": "1"})
    with open(folder / CONFIG, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER)


def save_model(model: nn.Module, folder: str | Path, tokenizer=None, config: dict[str, Any] | None = None) -> Path:
    """Atomically (re)write a model folder: build it beside the target, then rename into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_model_files(model, tmp, tokenizer, config)
        publish_folder(tmp, folder, aside=folder.parent / f".{folder.name}.old-{os.getpid()}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected an lmforge model folder with {CONFIG} and {WEIGHTS}")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: expected a mapping with a 'model:' section")
    return cfg


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors file into ``model``; a missing, truncated or mismatched file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing; expected {WEIGHTS}")
    try:
        missing, unexpected = st_load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable weights file ({str(e).splitlines()[0][:120]})") from None
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model config ({str(e).splitlines()[0][:160]})") from None
    if missing or unexpected:
        what = f"missing {sorted(missing)[:5]}" if missing else f"unexpected {sorted(unexpected)[:5]}"
        raise CheckpointError(f"{path}: weights do not match the model config: {what}")
    return model


def load_model(folder: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = False):
    """Build the model described by ``folder/config.yaml`` and load its weights (eval mode).

    With ``with_tokenizer`` returns ``(model, tokenizer_or_None)``; a tokenizer whose vocabulary is
    larger than the model's is a CheckpointError.
    """
    from lmforge.model import ModelConfig, build

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; expected an lmforge checkpoint or model folder")
    if (folder / "meta.json").is_file():  # a training checkpoint: its files must match their checksums
        from lmforge.train.checkpoint import verify_checkpoint

        verify_checkpoint(folder)
    cfg = read_config(folder)
    model = build(ModelConfig.from_dict(cfg["model"]))
    if cfg.get("lora"):
        from lmforge.model.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(**cfg["lora"]))
    load_weights(model, folder / WEIGHTS)
    model.to(device).eval()
    tok = None
    if (folder / TOKENIZER).is_file():
        from lmforge.tokenizer import load_tokenizer

        tok = load_tokenizer(folder / TOKENIZER)
        check_tokenizer(tok, model.config.vocab_size, cfg.get("tokenizer_fingerprint"), folder / TOKENIZER)
    return (model, tok) if with_tokenizer else model


def check_tokenizer(tok, vocab_size: int, fingerprint: str | None, where) -> None:
    """The tokenizer must be the model's: its ids fit the embedding table, and when the model
    folder recorded the tokenizer's fingerprint, the two agree."""
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    if fingerprint and tok.fingerprint() != fingerprint:
        raise CheckpointError(f"{where}: this tokenizer is not the one the model was trained with (fingerprint "
                              f"{tok.fingerprint()} != {fingerprint}); restore the model's own tokenizer.json")
