"""The top-level ``lmforge`` namespace: the public API only, imported lazily."""

from __future__ import annotations

import subprocess
import sys

import lmforge


def test_namespace_is_the_public_api():
    assert dir(lmforge) == sorted(lmforge.__all__)
    for name in lmforge.__all__:
        assert getattr(lmforge, name) is not None, name
    assert not hasattr(lmforge, "Path") and not hasattr(lmforge, "annotations")
    from lmforge.model import build
    from lmforge.tokenizer import load_tokenizer

    assert lmforge.build is build and lmforge.load_tokenizer is load_tokenizer


def test_import_is_light_and_names_load_on_first_use():
    code = ("import sys, lmforge; assert 'torch' not in sys.modules, 'torch imported'; "
            "lmforge.ModelConfig; assert 'torch' in sys.modules; print(lmforge.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == lmforge.__version__


def test_unknown_names_are_attribute_errors():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        lmforge.nonsense  # noqa: B018
