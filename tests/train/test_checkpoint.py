"""Tests for lmforge.train.checkpoint: round trip, atomicity under crashes, corruption, resume, policy."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.model import ModelConfig, build
from lmforge.tokenizer import CharTokenizer
from lmforge.train.checkpoint import (
    CheckpointPolicy,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    step_name,
    verify_checkpoint,
)

DEAD_PID = 99_999_999  # above any pid_max: os.kill says no such process

CFG = dict(vocab_size=50, context_length=16, n_layer=1, n_head=2, n_embd=16)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = build(ModelConfig(**CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 50, (2, 8))
    for _ in range(2):
        loss = model(x).float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _state(opt, step: int) -> dict:
    return {
        "step": step,
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "data": {"epoch": 0, "position": 123 * step},
    }


def _save(root, step, model, opt, name=None, **kw):
    return save_checkpoint(root, name or step_name(step), model, config={"run": {"seed": 1}, "lr": 1e-3},
                           trainer_state=_state(opt, step), step=step, metrics={"val_loss": 1.0 / step}, **kw)


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


# --- round trip ----------------------------------------------------------------------------------


def test_round_trip(tmp_path, tiny):
    model, opt = tiny
    tok = CharTokenizer.train(["hello world, a tiny corpus"])
    root = tmp_path / "checkpoints"
    torch.manual_seed(1234)
    random.seed(99)
    state = _state(opt, 7)
    path = save_checkpoint(root, step_name(7), model, config={"run": {"seed": 1}}, trainer_state=state,
                           tokenizer=tok, step=7, metrics={"val_loss": torch.tensor(2.5), "acc": float("nan")})
    expected_torch, expected_py = torch.rand(5), [random.random() for _ in range(3)]

    assert path == root / "step_00000007" and path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "config.yaml", "tokenizer.json", "trainer_state.pt", "meta.json"])
    assert _leftovers(root) == []

    c = load_checkpoint(path)
    assert c.step == 7 and c.meta["metrics"]["val_loss"] == 2.5 and c.meta["metrics"]["acc"] == "nan"
    assert set(c.meta["files"]) == {"model.safetensors", "config.yaml", "tokenizer.json", "trainer_state.pt"}
    assert c.meta["lmforge_version"] and c.meta["wall_time"] > 0
    assert c.config["run"] == {"seed": 1} and c.config["model"] == model.config.to_dict()
    assert c.tokenizer.fingerprint() == tok.fingerprint()

    m2 = c.build_model()
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)

    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(c.trainer_state["optimizer"])
    _assert_same(opt.state_dict(), opt2.state_dict())
    assert c.trainer_state["data"] == {"epoch": 0, "position": 861}

    torch.set_rng_state(c.trainer_state["rng"]["torch"])
    random.setstate(c.trainer_state["rng"]["python"])
    assert torch.equal(torch.rand(5), expected_torch)
    assert [random.random() for _ in range(3)] == expected_py


def test_non_tensor_state_loads(tmp_path, tiny):
    np = pytest.importorskip("numpy")
    model, opt = tiny
    rs = np.random.get_state()
    path = save_checkpoint(tmp_path, "step_00000001", model, config={}, step=1,
                           trainer_state={"np_rng": rs, "step": 1})
    got = load_checkpoint(path).trainer_state["np_rng"]
    assert got[0] == rs[0] and (got[1] == rs[1]).all()


def test_save_unwraps_compiled_or_ddp_style_wrappers(tmp_path, tiny):
    model, opt = tiny

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    path = _save(tmp_path, 1, Wrapper(model), opt)
    sd1, sd2 = model.state_dict(), load_checkpoint(path).build_model().state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    other = Wrapper(build(ModelConfig(**CFG)))
    load_checkpoint(path).load_weights_into(other)
    sd3 = other.module.state_dict()
    assert all(torch.equal(sd1[k], sd3[k]) for k in sd1)


def test_invalid_name_and_state(tmp_path, tiny):
    model, opt = tiny
    with pytest.raises(CheckpointError, match="invalid checkpoint name"):
        save_checkpoint(tmp_path, "../evil", model, config={}, trainer_state={}, step=1)
    with pytest.raises(CheckpointError, match="trainer_state must be a dict"):
        save_checkpoint(tmp_path, "x", model, config={}, trainer_state=[1], step=1)
    assert list(tmp_path.iterdir()) == []


# --- atomicity -----------------------------------------------------------------------------------


def test_exception_mid_write_leaves_previous(tmp_path, tiny, monkeypatch):
    model, opt = tiny
    root = tmp_path / "checkpoints"
    first = _save(root, 1, model, opt)
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a file")
        raise RuntimeError("boom mid-write")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(CheckpointError, match=r"could not save checkpoint .*step_00000002.*boom mid-write"):
        _save(root, 2, model, opt)
    monkeypatch.setattr(torch, "save", real_save)

    assert not (root / "step_00000002").exists()
    assert _leftovers(root) == []
    assert list_checkpoints(root) == [first]
    assert latest_checkpoint(root) == first
    assert load_checkpoint(first).step == 1


def test_kill_minus_9_mid_save(tmp_path, tiny):
    """A process killed while writing a checkpoint: the folder is half-written, the old one intact."""
    root = tmp_path / "checkpoints"
    script = textwrap.dedent(f"""
        import os, torch
        from lmforge.model import ModelConfig, build
        from lmforge.train.checkpoint import save_checkpoint
        model = build(ModelConfig(**{CFG!r}))
        save_checkpoint({str(root)!r}, "step_00000001", model, config={{}}, trainer_state={{"step": 1}}, step=1)
        def die(obj, f, *a, **k):
            f.write(b"PK partial")
            f.flush()
            os._exit(9)  # like kill -9: no cleanup, no finally
        torch.save = die
        save_checkpoint({str(root)!r}, "step_00000002", model, config={{}}, trainer_state={{"step": 2}}, step=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr

    assert not (root / "step_00000002").exists()
    left = _leftovers(root)
    assert len(left) == 1 and left[0].startswith(".tmp-step_00000002-"), left
    with pytest.raises(CheckpointError, match="partial or unfinished"):
        verify_checkpoint(root / left[0])
    assert latest_checkpoint(root) == root / "step_00000001"
    assert load_checkpoint(root / "step_00000001").step == 1
    assert resolve_resume("auto", tmp_path) == root / "step_00000001"

    removed = CheckpointPolicy(every_steps=1, every_hours=None, keep_last=5).prune(root)
    assert [p.name for p in removed] == left and _leftovers(root) == []
    assert latest_checkpoint(root) == root / "step_00000001"


def test_resave_best_keeps_one_valid_best(tmp_path, tiny, monkeypatch):
    model, opt = tiny
    root = tmp_path / "checkpoints"
    _save(root, 1, model, opt, name="best")
    _save(root, 2, model, opt, name="best")
    assert verify_checkpoint(root / "best")["step"] == 2
    assert _leftovers(root) == [] and [p.name for p in root.iterdir()] == ["best"]

    # the rename that moves the new folder in fails: the old best is put back
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if Path(src).name.startswith(".tmp-"):
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(CheckpointError, match="could not save"):
        _save(root, 3, model, opt, name="best")
    monkeypatch.setattr(os, "rename", real_rename)
    assert len(calls) == 3  # aside, (failed) in, back
    assert verify_checkpoint(root / "best")["step"] == 2 and _leftovers(root) == []

    # killed between the two renames: only the aside copy exists; the next prune/save restores it
    real_rename(root / "best", root / f".old-best-{DEAD_PID}-0")
    with pytest.warns(UserWarning, match="restored checkpoint"):
        CheckpointPolicy(None, None, keep_last=2).prune(root)
    assert verify_checkpoint(root / "best")["step"] == 2 and _leftovers(root) == []


# --- corruption ----------------------------------------------------------------------------------


def _flip(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p: Path):
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


@pytest.mark.parametrize("damage, match", [
    (lambda d: _flip(d / "model.safetensors"), r"model\.safetensors is corrupt: checksum mismatch"),
    (lambda d: _truncate(d / "model.safetensors"), r"model\.safetensors is corrupt: size \d+ bytes, expected"),
    (lambda d: _flip(d / "trainer_state.pt"), r"trainer_state\.pt is corrupt: checksum mismatch"),
    (lambda d: (d / "config.yaml").unlink(), r"config\.yaml is missing"),
    (lambda d: (d / "meta.json").unlink(), r"step_00000002: partial or unfinished checkpoint \(no meta\.json"),
    (lambda d: (d / "meta.json").write_text("{not json"), r"meta\.json is corrupt: not valid JSON"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), r"meta\.json: not an lmforge checkpoint meta file"),
])
def test_corrupt_checkpoint(tmp_path, tiny, damage, match):
    model, opt = tiny
    first, second = _save(tmp_path, 1, model, opt), _save(tmp_path, 2, model, opt)
    damage(second)
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(second)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(second)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000002"):
        assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first).step == 1


def test_verify_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        verify_checkpoint(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="file.txt: not a folder"):
        verify_checkpoint(tmp_path / "file.txt")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.md").write_text("hi")
    with pytest.raises(CheckpointError, match=r"random is not an lmforge checkpoint \(expected meta\.json, "
                                              r"model\.safetensors, trainer_state\.pt\)"):
        verify_checkpoint(tmp_path / "random")


# --- resume --------------------------------------------------------------------------------------


def test_resolve_resume(tmp_path, tiny):
    model, opt = tiny
    run = tmp_path / "run"
    for value in (None, "", "never"):
        assert resolve_resume(value, run) is None
    assert resolve_resume("auto", run) is None  # nothing saved yet
    root = run / "checkpoints"
    _save(root, 5, model, opt)
    _save(root, 10, model, opt)
    _save(root, 10, model, opt, name="best")
    (root / "step_00000020").mkdir()  # a stray, unfinished folder
    with pytest.warns(UserWarning, match="step_00000020"):
        assert resolve_resume("auto", run) == root / "step_00000010"
    assert resolve_resume(str(root / "step_00000005"), run) == root / "step_00000005"
    assert resolve_resume("best", run) == root / "best"

    (tmp_path / "random").mkdir()
    with pytest.raises(CheckpointError, match=r"random is not an lmforge checkpoint \(expected meta\.json"):
        resolve_resume(str(tmp_path / "random"), run)
    with pytest.raises(CheckpointError, match="is not an lmforge checkpoint.*e.g. .*step_00000010"):
        resolve_resume(str(run), run)  # the run folder itself: hint at its checkpoints
    with pytest.raises(CheckpointError, match="no such checkpoint to resume from"):
        resolve_resume(str(tmp_path / "missing"), run)
    _flip(root / "step_00000005" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot resume: .*model\.safetensors is corrupt"):
        resolve_resume(str(root / "step_00000005"), run)


def test_resolve_resume_auto_all_corrupt_refuses_to_start_over(tmp_path, tiny):
    model, opt = tiny
    p = _save(tmp_path / "checkpoints", 1, model, opt)
    _truncate(p / "model.safetensors")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none is valid"):
        resolve_resume("auto", tmp_path)


# --- disk full -----------------------------------------------------------------------------------


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target", ["torch.save", "safetensors", "meta"])
def test_disk_full(tmp_path, tiny, monkeypatch, target):
    import safetensors.torch

    model, opt = tiny
    root = tmp_path / "checkpoints"
    first = _save(root, 1, model, opt)
    best = _save(root, 1, model, opt, name="best")
    if target == "torch.save":
        def partial(obj, f, *a, **k):
            f.write(b"some bytes")
            _enospc()
        monkeypatch.setattr(torch, "save", partial)
    elif target == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_model", _enospc)
    else:
        monkeypatch.setattr(json, "dump", _enospc)
    for name in ("step_00000002", "best"):
        with pytest.raises(CheckpointError, match=rf"disk full while saving checkpoint .*{name}: .*"
                                                  r"the previous checkpoints are untouched"):
            _save(root, 2, model, opt, name=name)
    monkeypatch.undo()
    assert _leftovers(root) == []
    assert not (root / "step_00000002").exists()
    assert verify_checkpoint(first)["step"] == 1 and verify_checkpoint(best)["step"] == 1
    assert latest_checkpoint(root) == first


def test_disk_full_detected_from_safetensors_message(tmp_path, tiny, monkeypatch):
    import safetensors.torch

    model, opt = tiny

    def rust_style(*a, **k):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_model", rust_style)
    with pytest.raises(CheckpointError, match="disk full"):
        _save(tmp_path, 1, model, opt)
    assert list(tmp_path.iterdir()) == []


# --- policy --------------------------------------------------------------------------------------


def test_policy_due_by_steps():
    pol = CheckpointPolicy(every_steps=100, every_hours=None, keep_last=None)
    assert [s for s in range(0, 401) if pol.due(s)] == [100, 200, 300, 400]
    pol.mark_saved(step=200)
    assert not pol.due(200)  # already saved at this step


def test_policy_due_by_hours():
    pol = CheckpointPolicy(every_steps=None, every_hours=0.5, keep_last=None)
    pol.mark_saved(now=1000.0)
    assert not pol.due(1, now=1000.0 + 1799)
    assert pol.due(1, now=1000.0 + 1800)
    pol.mark_saved(now=3000.0)
    assert not pol.due(2, now=3100.0) and pol.due(2, now=3000.0 + 3600)
    both = CheckpointPolicy(every_steps=10, every_hours=1.0, keep_last=None)
    both.mark_saved(now=0.0)
    assert both.due(10, now=1.0) and both.due(11, now=3600.0) and not both.due(11, now=10.0)
    assert not CheckpointPolicy(None, None, None).due(100)


def test_policy_is_best_min_max_and_state():
    pol = CheckpointPolicy(10, None, 3)  # val_loss, min
    assert pol.is_best({"val_loss": 3.0}) and pol.is_best({"val_loss": torch.tensor(2.0)})
    assert not pol.is_best({"val_loss": 2.5}) and not pol.is_best({"val_loss": 2.0})
    assert not pol.is_best({"train_loss": 0.1}) and not pol.is_best({"val_loss": float("nan")})
    assert pol.best == 2.0

    resumed = CheckpointPolicy(10, None, 3)
    resumed.load_state_dict(pol.state_dict())
    assert resumed.best == 2.0 and not resumed.is_best({"val_loss": 2.1}) and resumed.is_best({"val_loss": 1.9})

    acc = CheckpointPolicy(10, None, 3, best_metric="acc", best_mode="max")
    assert acc.is_best({"acc": 0.5}) and acc.is_best({"acc": 0.7}) and not acc.is_best({"acc": 0.6})
    with pytest.warns(UserWarning, match="starting the best over"):
        acc.load_state_dict(pol.state_dict())
    assert acc.best is None
    assert not CheckpointPolicy(10, None, 3, best_metric=None).is_best({"val_loss": 1.0})


def test_policy_rejects_bad_settings():
    with pytest.raises(ConfigError) as e:
        CheckpointPolicy(every_steps=0, every_hours=-1, keep_last=0, best_mode="lowest")
    assert len(e.value.problems) == 4 and "checkpoint.every_steps" in str(e.value)


def test_policy_prune_keeps_newest_and_best(tmp_path, tiny):
    model, opt = tiny
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4, 5):
        _save(root, s, model, opt)
    _save(root, 1, model, opt, name="best")
    (root / f".tmp-step_00000009-{DEAD_PID}-3").mkdir()  # left by a crashed process
    live = root / f".tmp-step_00000010-{os.getpid()}-999"  # ours, in progress: keep
    live.mkdir()
    removed = CheckpointPolicy(every_steps=1, every_hours=None, keep_last=2).prune(root)
    assert sorted(p.name for p in removed) == sorted(
        [f".tmp-step_00000009-{DEAD_PID}-3", "step_00000001", "step_00000002", "step_00000003"])
    assert [p.name for p in list_checkpoints(root)] == ["step_00000004", "step_00000005"]
    assert verify_checkpoint(root / "best")["step"] == 1
    assert _leftovers(root) == [live.name]
    assert CheckpointPolicy(1, None, keep_last=None).prune(root) == []  # keep all


def test_prune_never_drops_the_last_intact_checkpoint(tmp_path, tiny):
    model, opt = tiny
    for s in (1, 2, 3):
        _save(tmp_path, s, model, opt)
    _truncate(tmp_path / "step_00000003" / "model.safetensors")
    CheckpointPolicy(1, None, keep_last=1).prune(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
