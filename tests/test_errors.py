"""lmforge.errors: one base class for everything lmforge raises on bad input (the CLI turns it into
exit code 2), ValueError where the standard library would raise one, and ConfigError carrying
every problem at once."""

from __future__ import annotations

import pytest

from lmforge import errors
from lmforge.errors import ConfigError, InputError, LMForgeError


def test_every_error_is_an_lmforge_error():
    kinds = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert {k.__name__ for k in kinds} >= {"LMForgeError", "ConfigError", "InputError", "TokenizerError",
                                          "CheckpointError", "DataError", "InteropError", "TrainingError"}
    assert all(issubclass(k, LMForgeError) for k in kinds)
    assert issubclass(ConfigError, ValueError) and issubclass(InputError, ValueError)


def test_config_error_holds_every_problem_and_joins_them():
    e = ConfigError(["train.lr: expected > 0, got -1", "model.n_head: expected an int, got 'x'"])
    assert e.problems == ["train.lr: expected > 0, got -1", "model.n_head: expected an int, got 'x'"]
    assert str(e) == "train.lr: expected > 0, got -1; model.n_head: expected an int, got 'x'"
    one = ConfigError("run.out_dir: is a file")
    assert one.problems == ["run.out_dir: is a file"] and str(one) == "run.out_dir: is a file"
    with pytest.raises(ValueError, match="run.out_dir"):
        raise one
