"""Benchmarks write where the user says (default: the git-ignored runs/bench/results), never over
the committed figures, and committed results carry no machine paths (issue 24, item 6)."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from _common import portable, write_json  # noqa: E402

ABSOLUTE = re.compile(r'"(/(?:work|home|Users|tmp|root|mnt|data|opt|srv)/[^"]*)"')


def _out_defaults(path: Path) -> list[str]:
    """The default of every --out/--out-dir argument a benchmark script declares."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                and isinstance(node.args[0], ast.Constant) and node.args[0].value in ("--out", "--out-dir"):
            for kw in node.keywords:
                if kw.arg == "default":
                    found.append(ast.unparse(kw.value))
    return found


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")))
def test_no_benchmark_writes_into_the_committed_results_by_default(script):
    for default in _out_defaults(BENCH / script):
        assert "benchmarks/results" not in default and '"benchmarks"' not in default, (script, default)


def test_eval_arithmetic_defaults_to_runs_bench():
    assert _out_defaults(BENCH / "eval_arithmetic.py") == ["f'{RESULTS}/eval_arithmetic.json'"]


def test_committed_results_hold_no_absolute_paths():
    files = sorted((BENCH / "results").glob("*.json*"))
    assert files
    for f in files:
        hits = ABSOLUTE.findall(f.read_text(encoding="utf-8"))
        assert not hits, (f.name, hits[:3])


def test_portable_rewrites_paths_under_the_repository_only(tmp_path):
    root = tmp_path / "repo"
    obj = {"config": f"{root}/configs/x.yaml", "runs": [Path(root / "runs" / "a"), "elsewhere/b"],
           "overrides": [f"run.out_dir={root}/runs/bench"], "n": 3, "other": "/opt/data/x"}
    assert portable(obj, root) == {"config": "configs/x.yaml", "runs": ["runs/a", "elsewhere/b"],
                                   "overrides": ["run.out_dir=runs/bench"], "n": 3, "other": "/opt/data/x"}
    out = write_json(tmp_path / "deep" / "r.json", {"p": str(BENCH.parent / "runs" / "x")})
    assert json.loads(out.read_text()) == {"p": "runs/x"}
