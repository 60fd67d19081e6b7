"""lmforge.jax (the package): without the extra, require_jax names the missing package and the install
command, as an ImportError."""

from __future__ import annotations

import sys

import pytest


def test_missing_extra_names_the_install_command(monkeypatch):
    import lmforge.jax as lj

    monkeypatch.setitem(sys.modules, "optax", None)  # import optax now raises ImportError
    with pytest.raises(lj.JaxNotInstalled, match=r"needs optax; install the extra: pip install lmforge\[jax\]"):
        lj.require_jax()
    assert isinstance(lj.JaxNotInstalled("x"), ImportError)
