"""Setup shared by the training benchmarks: output/work folders, working directory, threads, and
results written without machine paths.

Results go to ``runs/bench/results`` (git-ignored) unless ``--out``/``--out-dir`` says otherwise:
running a benchmark never overwrites the committed figures in ``benchmarks/results`` (those were
written with ``--out-dir benchmarks/results``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = "runs/bench/results"  # the default output folder (git-ignored)


def portable(obj: Any, root: Path = REPO) -> Any:
    """``obj`` with every string naming a path inside ``root`` rewritten relative to it: results
    that can be committed without the machine's absolute paths (``/home/me/lmforge/runs/x`` -> ``runs/x``)."""
    if isinstance(obj, dict):
        return {k: portable(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, root) for v in obj]
    if isinstance(obj, Path):
        obj = str(obj)
    if isinstance(obj, str):
        prefix = str(root).rstrip("/") + "/"
        return obj.replace(prefix, "") if prefix in obj else obj
    return obj


def write_json(path: str | os.PathLike, obj: Any, **dump: Any) -> Path:
    """Write ``portable(obj)`` as indented JSON (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(obj), indent=2, **dump) + "\n", encoding="utf-8")
    return path


def prepare(out_dir: str, work_dir: str, threads: int) -> tuple[Path, Path]:
    """Resolve the folders (work_dir relative to the repository), move to the repository root
    (the configs' paths are relative to it; their data is named catalog:NAME), set torch's threads,
    create out_dir."""
    out = Path(out_dir).resolve()
    work = Path(work_dir).resolve() if os.path.isabs(work_dir) else REPO / work_dir
    os.chdir(REPO)
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    return out, work
