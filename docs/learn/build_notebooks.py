"""Write the learning-path notebooks (``NN_name.ipynb``) from their sources in ``_src/``.

Each source is a plain Python file in the "percent" layout: a line ``# %%`` starts a code cell,
``# %% [markdown]`` a markdown cell whose lines are comments (``# `` is stripped). The notebooks
are written without outputs, so the repository holds only what a reader runs.

    python docs/learn/build_notebooks.py            # rewrite every notebook
    python docs/learn/build_notebooks.py --check    # exit 1 if a notebook is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "_src"


def cells_of(source: str) -> list[tuple[str, str]]:
    """``[(kind, text), ...]`` of a percent-layout source, kind ``"code"`` or ``"markdown"``."""
    cells: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        text = "\n".join(lines).strip("\n")
        if text:
            out.append((kind, text))
    return out


def notebook_of(source: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for n, (kind, text) in enumerate(cells_of(source)):
        cell = nbformat.v4.new_code_cell(text) if kind == "code" else nbformat.v4.new_markdown_cell(text)
        cell.id = f"cell-{n:02d}"  # stable ids: rebuilding an unchanged source changes nothing
        nb.cells.append(cell)
    return nb


def render(src: Path) -> str:
    return nbformat.writes(notebook_of(src.read_text(encoding="utf-8"))) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for src in sorted(SOURCES.glob("[0-9][0-9]_*.py")):
        target = HERE / (src.stem + ".ipynb")
        text = render(src)
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(target.name)
        if not check:
            target.write_text(text, encoding="utf-8")
    if stale:
        print(("out of date: " if check else "wrote: ") + ", ".join(stale))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
