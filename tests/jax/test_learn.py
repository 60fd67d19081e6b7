"""lmforge.jax.learn: the docs/jax learning-path scripts run a few steps."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest


# These tests spend most of their time compiling tiny programs: XLA's cheapest optimisation level
# compiles them in about 2/3 of the CPU time (the models are too small to notice at run time).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
jax = pytest.importorskip("jax")  # the extra is part of `make test`'s install; skipped only without it
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[2]
# ------------------------------------------------------------------------------ the learning path
SCRIPTS = ["01_bigram.py", "02_head.py", "03_multihead.py", "04_block.py", "05_gpt.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_learning_path_script_runs(script, tmp_path, monkeypatch, capsys):
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40)
    (tmp_path / "tiny.txt").write_text(text)
    monkeypatch.setenv("LMFORGE_JAX_DATA", str(tmp_path / "tiny.txt"))
    monkeypatch.setenv("LMFORGE_JAX_STEPS", "3")
    monkeypatch.setenv("LMFORGE_JAX_SAMPLE", "20")
    runpy.run_path(str(REPO / "docs" / "jax" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "step 3/3: train loss" in out and "val loss" in out
    assert len(out.strip().splitlines()[-1]) > 0  # the sample
    assert os.environ["LMFORGE_JAX_STEPS"] == "3"
