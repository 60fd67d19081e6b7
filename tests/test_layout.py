"""The tests mirror the source: every module of src/lmforge that defines a function or a class
has a test file of its name in the mirrored folder (``lmforge/data/sources.py`` ->
``tests/data/test_sources.py``; a package's own ``__init__.py`` -> ``tests/<package>/test_<package>.py``),
except the modules listed below with the reason. Test folders exist only where the source has one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lmforge"
TESTS = ROOT / "tests"

# Modules whose tests live in a file of another name (module -> that file), each with its reason.
ELSEWHERE = {
    # the package's public names (lazy imports, __all__, __version__) are what a user sees first
    "__init__.py": "test_public_api.py",
    # load_model_for_serving is lmforge.store.load_for_inference plus the serve options, used by
    # the server tests on a tiny model and on the real SmolLM2 GGUF
    "serve/loading.py": "serve/test_app.py",
}

# Test folders that mirror no source folder.
NOT_MIRRORS = {
    "golden",  # reference curves read by the golden-curve tests
    "docs",  # the learning-path notebooks of docs/learn, executed
}


def expected_test(module: Path) -> Path:
    rel = module.relative_to(SRC)
    if rel.name == "__init__.py":
        return TESTS / rel.parent / f"test_{rel.parent.name}.py"
    return TESTS / rel.parent / f"test_{rel.stem}.py"


def has_behaviour(module: Path) -> bool:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_with_behaviour_has_its_test_file():
    missing = []
    for m in modules():
        rel = m.relative_to(SRC).as_posix()
        if not has_behaviour(m) or rel in ELSEWHERE:
            continue
        want = expected_test(m)
        if not want.is_file():
            missing.append(f"{rel} -> {want.relative_to(ROOT)}")
    assert not missing, "modules without a test file of their name:\n  " + "\n  ".join(missing)


def test_the_exceptions_are_still_true():
    for rel, test in ELSEWHERE.items():
        module = SRC / rel
        assert module.is_file(), f"ELSEWHERE lists {rel}, which no longer exists"
        assert not expected_test(module).is_file(), f"{rel} now has {expected_test(module).name}: drop it from ELSEWHERE"
        assert (TESTS / test).is_file(), f"ELSEWHERE points {rel} to {test}, which does not exist"


def test_test_folders_mirror_source_folders():
    folders = {p.relative_to(TESTS) for p in TESTS.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    strays = sorted(str(f) for f in folders
                    if f.parts[0] not in NOT_MIRRORS and not (SRC / f).is_dir() and any((TESTS / f).glob("test_*.py")))
    assert not strays, f"test folders with no source folder of that name: {strays}"


def test_expected_test_names():
    assert expected_test(SRC / "data" / "sources.py") == TESTS / "data" / "test_sources.py"
    assert expected_test(SRC / "model" / "__init__.py") == TESTS / "model" / "test_model.py"
    assert expected_test(SRC / "store.py") == TESTS / "test_store.py"
    assert has_behaviour(SRC / "fsutil.py")
