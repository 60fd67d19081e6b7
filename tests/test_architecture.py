"""The README's drawing of the layers is the import contract that ``make test`` checks.

``lint-imports`` (run by ``make test``) enforces ``[tool.importlinter]`` in pyproject.toml; this
test keeps the drawing in the README's "Architecture" section equal to that contract: one band per
layer (the two lowest contract layers, errors and the other base modules, share one band), in the
same order, each band naming every module of its layer.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def contract_layers() -> list[list[str]]:
    """The layers contract, top layer first, as lists of module names without ``lmforge.``;
    optional layers (in parentheses) that do not exist yet are dropped."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in cfg["contracts"] if c["type"] == "layers")["layers"]
    out = []
    for layer in layers:
        names = [n.strip().strip("()").removeprefix("lmforge.") for n in re.split(r"[|:]", layer)]
        out.append([n for n in names if (ROOT / "src/lmforge" / n).exists() or (ROOT / f"src/lmforge/{n}.py").exists()])
    return [names for names in out if names]


def drawing_bands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Architecture"):]
    block = section[section.index("```") + 3:]
    block = block[:block.index("```")]
    return [b for b in re.split(r"\n\s*─{20,}\s*\n", block) if b.strip()]


def _names_column(line: str) -> str:
    """The room names of a drawing line: text before the description column (3+ spaces), on
    lines that start near the left edge (description-only lines start far right)."""
    if len(line) - len(line.lstrip()) >= 10:
        return ""
    return re.split(r"\s{3,}", re.sub(r"\s*\|\s*", " | ", line.strip()))[0]


def test_the_drawing_has_one_band_per_layer_in_the_contracts_order():
    layers = contract_layers()
    layers = layers[:-2] + [layers[-2] + layers[-1]]  # errors sits in the base band
    bands = drawing_bands()
    assert len(bands) == len(layers), (len(bands), layers)
    for band, names in zip(bands, layers):
        left = " ".join(_names_column(line) for line in band.splitlines())
        for name in names:
            assert re.search(rf"(?<![\w/]){re.escape(name)}(/|\b)", left), f"{name} missing from band:\n{band}"


def test_every_package_and_module_is_in_the_contract():
    """A new room must be placed in a layer: every top-level module and subpackage of lmforge."""
    placed = {n for layer in contract_layers() for n in layer}
    src = ROOT / "src/lmforge"
    rooms = {p.stem for p in src.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in src.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms - placed == set(), f"not in any layer of the import contract: {sorted(rooms - placed)}"


def test_benchmarks_use_only_public_names():
    """Benchmarks are users of the library: they import public names only (a needed private
    function is made public instead) and never the removed aliases."""
    import ast

    bad = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmforge"):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
                if any(part.startswith("_") for part in node.module.split(".")):
                    bad.append(f"{path.name}: {node.module}")
    assert bad == []
