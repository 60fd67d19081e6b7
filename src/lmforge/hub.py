"""Models by name from the Hugging Face Hub: ``--model hf:ORG/NAME[@REVISION]``.

:func:`resolve_hf_model` turns the name into a local folder through ``huggingface_hub``'s
``snapshot_download``, into its usual cache (``HF_HUB_CACHE``, default
``~/.cache/huggingface/hub``), fetching only what lmforge loads: ``config.json``, the
safetensors weights (and their index), the tokenizer files, the chat template and
``generation_config.json``. A model already in the cache is not fetched again.

With ``HF_HUB_OFFLINE=1`` only the cache is read: a model that is not there is one line naming
it, at once (no network attempt, no retries). ``lmforge download hf:ORG/NAME`` fetches ahead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmforge.errors import CheckpointError

__all__ = ["PREFIX", "ALLOW_PATTERNS", "is_hf_spec", "parse_hf_spec", "resolve_hf_model"]

PREFIX = "hf:"
# What a model folder needs for lmforge.from_pretrained; nothing else is downloaded.
ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "1_Pooling/config.json",  # sentence-transformers pooling (mean vs CLS)
]
_REPO = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")  # ORG/NAME, or a legacy NAME (gpt2)
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_hf_spec(spec) -> bool:
    return str(spec).startswith(PREFIX)


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """``hf:ORG/NAME[@REVISION]`` -> ``(ORG/NAME, REVISION or None)``; anything else is one line."""
    body = str(spec)[len(PREFIX):] if is_hf_spec(spec) else str(spec)
    repo, at, revision = body.partition("@")
    if not _REPO.fullmatch(repo) or (at and not revision) or ".." in repo:
        raise CheckpointError(f"{spec}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION "
                              f"(e.g. hf:HuggingFaceTB/SmolLM2-135M-Instruct)")
    return repo, revision or None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now (huggingface_hub reads it at import)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in _OFFLINE_VARS)


def resolve_hf_model(spec: str, progress: bool = True) -> Path:
    """The local snapshot folder of ``hf:ORG/NAME[@REVISION]``, downloaded into the Hugging Face
    cache when it is not there yet (only :data:`ALLOW_PATTERNS`).

    Raises :class:`CheckpointError` in one line for a malformed name, a model missing from the
    cache when offline, an unknown or gated repository, or a snapshot without config.json or
    safetensors weights.
    """
    repo, revision = parse_hf_spec(spec)
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{spec}: models by name need huggingface_hub; pip install huggingface_hub") from None
    local_only = offline()
    if not progress:
        huggingface_hub.utils.disable_progress_bars()
    try:
        folder = huggingface_hub.snapshot_download(
            repo, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=local_only,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None)  # read now, like the offline switch
    except Exception as e:  # the client's own types differ between releases: named by class below
        raise CheckpointError(_why(spec, e, local_only)) from None
    return _check_snapshot(spec, Path(folder))


def _why(spec: str, e: Exception, local_only: bool) -> str:
    kinds = {c.__name__ for c in type(e).__mro__}
    where = f"the Hugging Face cache ({os.environ.get('HF_HUB_CACHE') or _default_cache()})"
    if "RevisionNotFoundError" in kinds:
        return f"{spec}: no such revision on the Hugging Face Hub"
    if "GatedRepoError" in kinds:
        return f"{spec}: a gated model; accept its terms on huggingface.co and log in (hf auth login)"
    if "RepositoryNotFoundError" in kinds:
        return f"{spec}: no such model on the Hugging Face Hub (or it is private: log in with hf auth login)"
    if "IncompleteSnapshotError" in kinds:
        return f"{spec}: the cached snapshot in {where} misses files; download it again online"
    if local_only or "OfflineModeIsEnabled" in kinds:
        return (f"{spec}: not in {where} and HF_HUB_OFFLINE=1 forbids downloads; fetch it first with "
                f"`lmforge download {spec}` online, or point HF_HUB_CACHE at a cache that holds it")
    if "LocalEntryNotFoundError" in kinds:
        return f"{spec}: cannot reach the Hugging Face Hub and the model is not in {where}"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{spec}: download failed: {type(e).__name__}: {first}"


def _default_cache() -> str:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _check_snapshot(spec: str, folder: Path) -> Path:
    """A loadable folder: config.json and safetensors weights (lmforge does not fetch .bin files)."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{spec}: the snapshot {folder} has no config.json; expected a transformers model")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{spec}: the snapshot {folder} has no .safetensors weights (lmforge fetches "
                              f"safetensors only; download a folder by hand for .bin weights)")
    return folder
