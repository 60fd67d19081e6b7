"""lmforge.integrity: the finiteness check (fast path and exact count agree with torch.isfinite)
and checksums.json (written, verified, and every kind of change refused with one line)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.integrity import check_finite, verify_checksums, write_checksums


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_check_counts_exactly_and_large_finite_values_pass(dtype):
    big = torch.full((10,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite, but their sum overflows
    check_finite([("big", big)], "here")
    t = torch.randn(100).to(dtype)
    t[[3, 50]] = torch.tensor([float("inf"), float("nan")]).to(dtype)
    assert int((~torch.isfinite(t)).sum()) == 2
    with pytest.raises(CheckpointError, match=r"here: tensor w holds 2 non-finite value\(s\) \(NaN or inf\) of 100"):
        check_finite([("w", t)], "here")
    check_finite([("ids", torch.tensor([1, 2]))], "here")  # integer tensors are not weights to check


def test_allow_nonfinite_env(monkeypatch):
    t = torch.tensor([1.0, float("nan")])
    monkeypatch.setenv("LMFORGE_ALLOW_NONFINITE", "1")
    check_finite([("w", t)], "here")
    monkeypatch.setenv("LMFORGE_ALLOW_NONFINITE", "0")
    with pytest.raises(CheckpointError):
        check_finite([("w", t)], "here")


def _folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(bytes(range(256)))
    (tmp_path / "b.json").write_text('{"alpha": 8}')
    write_checksums(tmp_path, ["a.bin", "b.json", "absent.txt"])
    return tmp_path


def test_checksums_round_trip_and_absent_folder(tmp_path):
    assert verify_checksums(_folder(tmp_path), required=["a.bin"]) is True
    assert set(json.loads((tmp_path / "checksums.json").read_text())["files"]) == {"a.bin", "b.json"}
    assert verify_checksums(tmp_path / "nothing-here") is False  # an older folder: nothing to check


@pytest.mark.parametrize("damage,msg", [
    (lambda d: (d / "a.bin").write_bytes(bytes(range(255))), "size 255 bytes, expected 256"),
    (lambda d: (d / "b.json").write_text('{"alpha": 9}'), "b.json is corrupt: checksum mismatch"),
    (lambda d: (d / "a.bin").unlink(), "a.bin is missing"),
    (lambda d: (d / "checksums.json").write_text("{"), "checksums.json is corrupt: not valid JSON"),
    (lambda d: (d / "checksums.json").write_text('{"files": {}}'), "expected a JSON object"),
])
def test_every_change_is_one_line(tmp_path, damage, msg):
    folder = _folder(tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError, match=msg) as e:
        verify_checksums(folder)
    assert "\n" not in str(e.value)


def test_required_file_must_be_listed(tmp_path):
    with pytest.raises(CheckpointError, match="does not list c.bin"):
        verify_checksums(_folder(tmp_path), required=["c.bin"])
