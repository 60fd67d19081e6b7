"""lmforge.statefile: nested state (tensors, numpy arrays, numbers, strings, tuples, int-keyed
dicts) round-trips exactly through safetensors + JSON, and a pickle is refused without being run."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.statefile import load_state, save_state
from tests.faults import faultkit


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a loader ran code from a file"


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_state_file_refuses_pickles(tmp_path, marker, how):
    path = faultkit.plant(tmp_path / "state.safetensors", marker, how)
    with pytest.raises(CheckpointError, match="pickle .*can run code"):
        load_state(path)


def test_state_file_round_trips_what_the_trainer_saves(tmp_path):
    import random

    import numpy as np

    state = {"step": 3, "opt": {"state": {0: {"exp_avg": torch.randn(3, 2), "step": torch.tensor(3.0)}},
                                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
             "best": float("nan"), "none": None, "__odd": {"__tensor__": "not a tensor"}}
    save_state(state, tmp_path / "s.safetensors")
    got = load_state(tmp_path / "s.safetensors")
    assert list(got["opt"]["state"]) == [0] and got["opt"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(got["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert torch.equal(got["rng"]["torch"], state["rng"]["torch"])
    assert got["rng"]["python"] == state["rng"]["python"]
    n1, n2 = got["rng"]["numpy"], state["rng"]["numpy"]
    assert n1[0] == n2[0] and (n1[1] == n2[1]).all() and n1[1].dtype == n2[1].dtype and n1[2:] == n2[2:]
    assert got["best"] != got["best"] and got["none"] is None and got["__odd"] == state["__odd"]
    with pytest.raises(TypeError, match="cannot be stored"):
        save_state({"f": print}, tmp_path / "bad.safetensors")


def test_state_file_whose_header_length_starts_like_a_pickle_still_loads(tmp_path):
    """A safetensors header length is little-endian: its first byte may be 0x80 (a pickle's first
    opcode); such a file is still read as the state it is."""
    for k in range(256):
        path = tmp_path / "s.safetensors"
        save_state({"pad": "x" * k, "t": torch.ones(2)}, path)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    assert load_state(path)["pad"] == "x" * k


