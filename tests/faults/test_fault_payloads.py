"""Planted pickle payloads: no loader in lmforge may run code from a file.

Each case puts a live payload (unpickling it creates a marker file: checked to work in
``test_the_payload_is_live``) where a loader reads, with the folder's checksums updated as anyone
who can write the folder could do, then loads: the marker must never appear, and the loader
either refuses with one CheckpointError line or (verbs that never read that file) works.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.statefile import save_state
from tests.faults import faultkit


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a loader ran code from a file"


def test_the_payload_is_live(tmp_path):
    m = tmp_path / "live"
    pickle.loads(pickle.dumps(faultkit.Payload(m)))
    assert m.exists()


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def one_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note")]
    assert code == 2 and len(lines) == 1, (code, err)
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def _payload_checkpoint(tmp_path, marker, name: str = "trainer_state.safetensors"):
    ck = faultkit.checkpoint(tmp_path / "run" / "checkpoints")
    (ck / "trainer_state.safetensors").unlink()
    faultkit.plant(ck / name, marker)
    meta = json.loads((ck / "meta.json").read_text())
    meta["files"].pop("trainer_state.safetensors")
    meta["files"][name] = {"size": 0, "sha256": ""}
    (ck / "meta.json").write_text(json.dumps(meta))
    faultkit.reseal(ck)
    return ck


@pytest.mark.parametrize("name", ["trainer_state.safetensors", "trainer_state.pt"])
def test_resume_path_and_auto_refuse_a_payload(tmp_path, marker, name):
    from lmforge.train.checkpoint import load_checkpoint, resolve_resume

    ck = _payload_checkpoint(tmp_path, marker, name)
    for resume in ("auto", str(ck)):
        path = resolve_resume(resume, tmp_path / "run")
        assert path == ck
        with pytest.raises(CheckpointError, match="pickle") as e:
            load_checkpoint(path, verified=True)
        assert "\n" not in str(e.value)


def test_train_resume_auto_refuses_a_payload_cli(tmp_path, marker, tiny_yaml, capsys):
    cfg = tiny_yaml("run", train={"max_steps": 2, "checkpoint_every": 2})
    code, err = run_cli(capsys, "train", "-c", cfg, "--quiet")
    assert code == 0, err
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    faultkit.plant(ck / "trainer_state.safetensors", marker)
    faultkit.reseal(ck)
    code, err = run_cli(capsys, "train", "-c", cfg, "--quiet", "train.max_steps=4")
    one_line(code, err, "trainer_state.safetensors", "pickle")
    code, err = run_cli(capsys, "train", "-c", cfg, "--quiet", "train.max_steps=4", f"train.resume={ck}")
    one_line(code, err, "pickle")


def test_reading_verbs_never_read_the_trainer_state(tmp_path, marker, capsys):
    """generate / info / export / init_from read the weights of a checkpoint, never its state."""
    from lmforge.store import from_pretrained

    ck = _payload_checkpoint(tmp_path, marker, "trainer_state.safetensors")
    assert from_pretrained(ck) is not None  # what model.init_from does
    code, err = run_cli(capsys, "generate", "--model", ck, "--prompt", "the", "--max-new-tokens", "3")
    assert code == 0, err
    code, err = run_cli(capsys, "info", ck)
    assert code == 0, err
    code, err = run_cli(capsys, "export", "--model", ck, "--out", tmp_path / "hf")
    assert code == 0, err


def _model_folder_with_pickled_weights(tmp_path, marker):
    folder = faultkit.model_folder(tmp_path / "model")
    faultkit.plant(folder / "model.safetensors", marker)
    faultkit.reseal(folder, "checksums.json")
    return folder


def _hf_folder_with_pickled_bin(tmp_path, marker):
    folder = faultkit.hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    faultkit.plant(folder / "pytorch_model.bin", marker)
    return folder


@pytest.mark.parametrize("make", [_model_folder_with_pickled_weights, _hf_folder_with_pickled_bin],
                         ids=["lmforge-folder", "hf-bin"])
def test_every_reading_verb_refuses_pickled_weights(tmp_path, marker, capsys, make):
    folder = make(tmp_path, marker)
    data = tmp_path / "d.txt"
    data.write_text(faultkit.TEXT)
    for args in (["generate", "--model", folder, "--prompt", "the", "--max-new-tokens", "2"],
                 ["eval", "--model", folder, "--data", data, "--cache-dir", tmp_path / "c", "--quiet"],
                 ["info", folder],
                 ["export", "--model", folder, "--out", tmp_path / "out"]):
        code, err = run_cli(capsys, *args)
        one_line(code, err, "corrupt")


def test_init_from_refuses_pickled_weights(tmp_path, marker, tiny_config):
    from lmforge.tasks.common import model_from_init

    folder = _hf_folder_with_pickled_bin(tmp_path, marker)
    with pytest.raises(CheckpointError, match="corrupt"):
        model_from_init(str(folder), {}, None, None)


def test_dpo_reference_cache_refuses_a_payload(tmp_path, marker):
    from lmforge.tasks.dpo import precompute_reference

    path = faultkit.plant(tmp_path / "reference_logps.safetensors", marker)
    with pytest.raises(CheckpointError, match="pickle"):
        precompute_reference(None, None, "cpu", {"train": {"size": 3}}, path)


def test_grpo_rollout_cache_refuses_a_payload(tmp_path, marker):
    from lmforge.tasks.grpo import RolloutBatches

    faultkit.plant(tmp_path / "rollouts_rank0.safetensors", marker)
    batches = RolloutBatches.__new__(RolloutBatches)  # only the cache's path is needed
    batches.run_dir, batches.rank = tmp_path, 0
    with pytest.raises(CheckpointError, match="pickle"):
        batches._load(0)


def test_adapter_refuses_a_payload_and_stays_off(tmp_path, marker):
    from lmforge.model.lora import LoraConfig, apply_lora, has_lora, load_adapter, save_adapter

    model, _ = faultkit.tiny_model()
    apply_lora(model, LoraConfig(rank=2))
    folder = save_adapter(model, tmp_path / "adapter")
    faultkit.plant(folder / "adapter.safetensors", marker)
    faultkit.reseal(folder, "checksums.json")
    base, _ = faultkit.tiny_model()
    with pytest.raises(CheckpointError, match="corrupt"):
        load_adapter(base, folder)
    assert not has_lora(base)
    shutil.rmtree(folder)


def test_chat_template_from_a_file_runs_in_a_sandbox(tmp_path, marker):
    """A tokenizer's chat template is code from a file: rendered in Jinja's immutable sandbox,
    reaching for Python internals is refused with one InputError line."""
    from lmforge.chat import render
    from lmforge.errors import InputError

    tok = faultkit.tiny_tokenizer()
    tok.chat_template = ("{{ ''.__class__.__mro__[1].__subclasses__() }}"
                         "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}")
    with pytest.raises(InputError, match="chat template"):
        render([{"role": "user", "content": "hi"}], tok, add_generation_prompt=True)


@pytest.mark.parametrize("state", [{"step": 2}, {"step": 2, "optimizer": {"state": {}, "param_groups": []}}],
                         ids=["no-optimizer", "no-groups"])
def test_resume_from_a_state_of_another_shape_is_one_line(tmp_path, tiny_yaml, capsys, state):
    """A trainer state that is valid safetensors + JSON but not what the trainer wrote (resealed)."""
    cfg = tiny_yaml("run", train={"max_steps": 2, "checkpoint_every": 2})
    code, err = run_cli(capsys, "train", "-c", cfg, "--quiet")
    assert code == 0, err
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    save_state(state, ck / "trainer_state.safetensors")
    faultkit.reseal(ck)
    code, err = run_cli(capsys, "train", "-c", cfg, "--quiet", "train.max_steps=4")
    one_line(code, err, "trainer state does not fit this run")
