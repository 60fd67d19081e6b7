"""Tests for lmforge.device: names checked up front, one clear error per bad name."""

from __future__ import annotations

import pytest
import torch

from lmforge.device import available_devices, resolve_device
from lmforge.errors import ConfigError, InputError


def test_cpu_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert "cpu" in available_devices()


@pytest.mark.parametrize("name", ["bogus", "gpu", "cuda:x", "cpu:3", "", 3])
def test_unknown_or_malformed_names_are_config_errors(name):
    with pytest.raises(ConfigError, match="run.device"):
        resolve_device(name, key="run.device")


def test_auto_picks_what_exists():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        want = "mps"
    assert resolve_device("auto").type == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_an_input_error_naming_what_exists():
    with pytest.raises(InputError, match=r"--device: 'cuda' requested but CUDA is not available.*available: cpu"):
        resolve_device("cuda", key="--device")


def test_a_gpu_index_past_the_count_is_an_input_error():
    with pytest.raises(InputError, match="'cuda:99' requested"):
        resolve_device("cuda:99")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resolves_on_a_gpu_machine():
    assert resolve_device("cuda").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
