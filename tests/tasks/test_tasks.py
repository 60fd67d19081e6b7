"""lmforge.tasks (the registry and config validation): every task has options and a builder; config
problems name the user's key."""

from __future__ import annotations

import os

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.tasks import config_from_dict, TASKS, get_task


# ------------------------------------------------------------------------------ registry
def test_every_registered_task_has_options_and_a_builder():
    for name in TASKS:
        task = get_task(name)
        assert task.name == name and callable(task.build) and task.summary
        task.options()  # defaults construct


@pytest.mark.parametrize("bad,needle", [
    ({"task": "translate"}, "task: got 'translate'"),
    ({"task": "classify", "objective": {"max_len": 3}}, "objective.max_len: unknown key for task classify"),
    ({"task": "pretrain", "objective": {"mask_prob": 0.2}}, "objective.mask_prob: unknown key for task pretrain"),
    ({"train": {"eps": -1}}, "train.eps"),
    ({"train": {"checkpoint_every_hours": -1}}, "train.checkpoint_every_hours"),
    ({"train": {"trainable": "some"}}, "train.trainable"),
    ({"sample": {"temperature": -1}}, "sample.temperature"),
    ({"sample": {"top_p": 2}}, "sample.top_p"),
    ({"sample": {"top_k": 0}}, "sample.top_k"),
    ({"run": {"device": "bogus"}}, "run.device"),
    ({"model": {"init_from": "/nonexistent/model"}}, "model.init_from"),
])
def test_config_problems_name_the_users_key(tiny_dict, bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        config_from_dict({**tiny_dict(), **{k: {**tiny_dict().get(k, {}), **v} if isinstance(v, dict) else v
                                            for k, v in bad.items()}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error(tiny_dict):
    d = tiny_dict()
    d["run"]["device"] = "cuda"
    with pytest.raises(ConfigError, match="run.device: got 'cuda' but no CUDA device"):
        config_from_dict(d)


def test_out_dir_naming_a_file_is_a_config_error(tiny_dict, tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    d = tiny_dict()
    d["run"]["out_dir"] = str(f)
    with pytest.raises(ConfigError, match="run.out_dir"):
        config_from_dict(d)
    assert f.read_text() == "keep me"


os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

