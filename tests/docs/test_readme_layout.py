"""README layout (issue 24, item 8): every code fence closed before the next heading, the verb
table lists every verb of the CLI, no path tied to one Python version."""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.cli import VERBS

README = Path(__file__).resolve().parents[2] / "README.md"


def _lines() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()


def test_code_fences_are_closed_before_any_heading():
    opened = None
    for n, line in enumerate(_lines(), 1):
        if line.startswith("```"):
            opened = None if opened else n
        elif opened and re.match(r"#{1,6} \S", line) and not line.startswith("# "):
            raise AssertionError(f"README.md:{n}: heading {line!r} inside the code fence opened at line {opened}")
    assert opened is None, f"README.md: the code fence opened at line {opened} is never closed"


def test_verb_table_lists_every_verb():
    rows = {m.group(1) for line in _lines() if (m := re.match(r"\| `(\w+)` \|", line))}
    missing = [v for v in VERBS if v not in rows and v != "pretrain"]  # pretrain: the alias in train's row
    assert not missing, f"README verb table lacks {missing}"


def test_no_path_tied_to_one_python_version():
    hits = [line for line in _lines() if re.search(r"python3\.\d+/site-packages", line)]
    assert not hits, hits
