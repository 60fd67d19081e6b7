"""lmforge.inspect (the package): each public name is found lazily in the module that defines it,
importing the package imports none of them (nor matplotlib), and an unknown name is an
AttributeError naming it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import lmforge.inspect as inspect_pkg


def test_every_public_name_is_the_function_of_its_module():
    assert inspect_pkg.__all__
    for name in inspect_pkg.__all__:
        where = importlib.import_module(f"lmforge.inspect.{inspect_pkg._WHERE[name]}")
        assert getattr(inspect_pkg, name) is getattr(where, name), name


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'lmforge.inspect' has no attribute 'nonsense'"):
        inspect_pkg.nonsense  # noqa: B018


def test_importing_the_package_stays_light():
    code = ("import sys, lmforge.inspect; "
            "print(sorted(m for m in sys.modules if m.startswith(('lmforge.inspect.', 'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
