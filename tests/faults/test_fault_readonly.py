"""Read-only places: every writing verb says in one line which path it cannot write (exit 2, no
traceback); the reading verbs keep working on a read-only run.

Root ignores permission bits, so as root the CLI runs as ``nobody`` through ``setpriv`` (skipped
when that is not possible); as another user the folders are simply made read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_dict
from tests.faults import faultkit

NOBODY = 65534


def _user():
    if os.geteuid() != 0:
        return None
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot run the CLI as a user that permissions apply to")
    probe = subprocess.run([shutil.which("setpriv"), "--reuid", str(NOBODY), "--regid", str(NOBODY),
                            "--clear-groups", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot switch to uid {NOBODY}: {probe.stderr.decode()[:100]}")
    return NOBODY


def _lock_down(top: Path, ro: Path, w: Path, user) -> None:
    for p in [top, *top.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    if user is None:  # not root: permission bits apply to us
        for p in [ro, *ro.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o555)
    else:
        for p in [w, *w.rglob("*")]:
            os.chown(p, user, user)


@pytest.fixture(scope="module")
def places():
    """``ro/`` (read-only for the CLI's user) and ``w/`` (writable by it)."""
    user = _user()
    top = Path(tempfile.mkdtemp(prefix="lmforge-ro-"))
    ro, w = top / "ro", top / "w"
    ro.mkdir()
    w.mkdir()
    (w / "text.txt").write_text(faultkit.TEXT)
    _lock_down(top, ro, w, user)
    yield {"top": top, "ro": ro, "w": w, "user": user, "run": ro / "run"}
    for p in [ro, *ro.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o755)
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def ro_run(places):
    """A trained run ``ro/run`` (trained by the test process, then read-only for the CLI's user)."""
    if not places["run"].is_dir():
        for p in [places["ro"], *places["ro"].rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o755)
        cfg = tiny_run_dict(places["run"], places["w"] / "cache")
        cfg["train"].update(max_steps=3, checkpoint_every=3)
        (places["w"] / "train.yaml").write_text(yaml.safe_dump(cfg))
        r = faultkit.cli("train", "-c", places["w"] / "train.yaml", "--quiet", cwd=places["w"])
        assert r.returncode == 0, r.stderr
        _lock_down(places["top"], places["ro"], places["w"], places["user"])
    return places["run"]


def _cli(places, *args):
    return faultkit.cli(*args, cwd=places["w"], user=places["user"])


def _config(places, name: str, out_dir: Path, cache: Path | None = None) -> Path:
    cfg = tiny_run_dict(out_dir, cache or places["w"] / "cache")
    cfg["train"]["max_steps"] = 2
    path = places["w"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    os.chmod(path, 0o644)
    return path


def test_fresh_train_into_a_read_only_folder(places):
    r = _cli(places, "train", "-c", _config(places, "a", places["ro"]), "--quiet")
    faultkit.assert_one_line_error(r, str(places["ro"]), "choose a folder you can write to")


@pytest.mark.slow
def test_train_into_a_new_subfolder_of_a_read_only_folder(places):
    r = _cli(places, "train", "-c", _config(places, "b", places["ro"] / "new" / "run"), "--quiet")
    faultkit.assert_one_line_error(r, str(places["ro"] / "new"), "choose a folder you can write to")


@pytest.mark.slow
def test_read_only_cache_dir(places):
    r = _cli(places, "train", "-c", _config(places, "c", places["w"] / "run-c", places["ro"] / "cache"), "--quiet")
    faultkit.assert_one_line_error(r, str(places["ro"] / "cache"), "choose a place you can write to")


@pytest.mark.slow
def test_multi_stage_recipe_into_a_read_only_folder(places):
    stage = tiny_run_dict(places["w"] / "unused", places["w"] / "cache")
    stage.pop("run")
    recipe = {"run": {"name": "pipe", "out_dir": str(places["ro"] / "pipe")}, **stage,
              "stages": [{"name": "one"}, {"name": "two"}]}
    path = places["w"] / "pipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    os.chmod(path, 0o644)
    r = _cli(places, "train", "-c", path, "--quiet")
    faultkit.assert_one_line_error(r, str(places["ro"] / "pipe"))


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["report", "export", "tokenizer", "inspect"])
def test_writing_verbs_into_read_only_places(places, ro_run, verb):
    ro, run = places["ro"], ro_run
    args = {"report": ["report", run, "--no-model"],
            "export": ["export", "--model", run, "--out", ro / "hf"],
            "tokenizer": ["tokenizer", "train", "--kind", "char", "--input", places["w"] / "text.txt",
                          "--out", ro / "tok.json"],
            "inspect": ["inspect", "weights", "--model", run, "--out", ro / "insp"]}[verb]
    r = _cli(places, *args)
    where = {"report": run, "export": ro / "hf", "tokenizer": ro, "inspect": ro / "insp"}[verb]
    faultkit.assert_one_line_error(r, f"{where}: Permission denied", "choose a place you can write to")


@pytest.mark.slow
def test_reading_verbs_work_on_a_read_only_run(places, ro_run):
    run = ro_run
    for args in (["eval", "--model", run, "--data", places["w"] / "text.txt", "--cache-dir", places["w"] / "c",
                  "--quiet"],
                 ["generate", "--model", run, "--prompt", "the", "--max-new-tokens", "3"],
                 ["info", run]):
        r = _cli(places, *args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
