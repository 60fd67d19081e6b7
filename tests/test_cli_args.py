"""Tests for lmforge.cli_args: ``--section.key=value`` overrides become ``section.key=value``."""

from __future__ import annotations

import pytest

from lmforge.cli_args import normalize_override_args
from lmforge.errors import ConfigError


def test_dotted_options_become_overrides():
    argv = ["--config", "c.yaml", "--train.max_steps=500", "--quiet", "model.n_layer=6", "--train.lr", "3e-4"]
    assert normalize_override_args(argv) == ["--config", "c.yaml", "train.max_steps=500", "--quiet",
                                             "model.n_layer=6", "train.lr=3e-4"]


def test_dashes_in_key_names_and_deeper_keys():
    assert normalize_override_args(["--train.max-steps=5"]) == ["train.max_steps=5"]
    assert normalize_override_args(["--a.b.c=1"]) == ["a.b.c=1"]


def test_values_keep_their_text():
    assert normalize_override_args(["--data.sources=[{path: a.txt}]"]) == ["data.sources=[{path: a.txt}]"]
    assert normalize_override_args(["--run.name=a=b"]) == ["run.name=a=b"]
    assert normalize_override_args(["--run.name", "-x"]) == ["run.name=-x"]  # a value may start with one dash


def test_plain_options_and_words_after_double_dash_are_untouched():
    argv = ["-c", "x.yaml", "--quiet", "--", "--train.lr=1"]
    assert normalize_override_args(argv) == argv
    assert normalize_override_args(["--config=x.yaml"]) == ["--config=x.yaml"]


@pytest.mark.parametrize("argv", [["--train.lr"], ["--train.lr", "--quiet"]])
def test_a_dotted_option_without_value_is_named(argv):
    with pytest.raises(ConfigError, match="--train.lr: expected a value"):
        normalize_override_args(argv)
