"""Setup shared by the training benchmarks: output/work folders, working directory, threads."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


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
