"""The learning path (docs/learn/*.ipynb) runs top to bottom, and is committed without outputs.

Each notebook asserts inside itself that its hand-written PyTorch matches lmforge's module or
loss (logits / losses within 1e-6), so executing it is the check. The kernel is the venv's
``python3``; it imports lmforge from this repository's ``src`` (prepended to PYTHONPATH) and runs
in the notebook's own folder, as a reader's Jupyter would.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
LEARN = REPO / "docs" / "learn"
NOTEBOOKS = sorted(LEARN.glob("[0-9][0-9]_*.ipynb"))
# Notebooks that take more than ~10 s on the shared 2-core machine (the training ones).
SLOW = {"08_pretraining.ipynb", "09_classification.ipynb", "10_instruction_tuning.ipynb",
        "11_dpo.ipynb", "12_grpo.ipynb"}
CELL_TIMEOUT_S = 300


def test_the_path_is_complete():
    names = [p.name for p in NOTEBOOKS]
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(1, 13)], names
    readme = (LEARN / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert name in readme, f"docs/learn/README.md does not list {name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for n, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {n} has outputs; strip them before committing"
            assert cell.execution_count is None, f"{path.name} cell {n} has an execution count"


def test_notebooks_match_their_sources():
    spec = importlib.util.spec_from_file_location("build_notebooks", LEARN / "build_notebooks.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    sources = sorted((LEARN / "_src").glob("[0-9][0-9]_*.py"))
    assert [s.stem for s in sources] == [p.stem for p in NOTEBOOKS]
    for src in sources:
        committed = (LEARN / (src.stem + ".ipynb")).read_text(encoding="utf-8")
        assert committed == build.render(src), (f"{src.stem}.ipynb is out of date with _src/{src.name}; "
                                                f"run python docs/learn/build_notebooks.py")


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in SLOW else [])
                                  for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", shutdown_kernel="immediate",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=_kernel_env())  # raises CellExecutionError naming the failing cell


@pytest.mark.slow
@pytest.mark.parametrize("name", ["02_bigram.ipynb", "08_pretraining.ipynb"])
def test_notebook_runs_without_shakespeare(name, tmp_path):
    """A clone without shared/data/tinyshakespeare: the notebook says so and trains on the
    built-in stories (run from a temporary folder, which has no shared/ above it)."""
    nb = nbformat.read(LEARN / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", shutdown_kernel="immediate",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=_kernel_env())
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "tiny shakespeare not found" in printed, printed[:500]
