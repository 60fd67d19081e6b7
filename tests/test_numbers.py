"""Tests for lmforge.numbers: metric rounding for one-line JSON reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmforge.numbers import metrics_json, round_floats


def test_significant_digits_whatever_the_scale():
    assert round_floats(3.081234049797058) == 3.0812
    assert round_floats(21.78843411) == 21.788
    assert round_floats(12345.678) == 12346.0
    assert round_floats(0.000123456789) == 0.00012346
    assert round_floats(2.0 / 3.0, digits=3) == 0.667


def test_containers_numbers_and_other_values():
    m = {"loss": 1.23456789, "tokens": 84836, "name": "x", "ok": True, "none": None,
         "cm": [[1, 2], [3, 4]], "per_class": {"a": (0.333333333, 0.9999999)},
         "np": np.float32(0.1234567), "np_int": np.int64(7), "t": torch.tensor(2.345678), "vec": torch.tensor([0.5])}
    r = round_floats(m)
    assert r["loss"] == 1.2346 and r["tokens"] == 84836 and r["name"] == "x" and r["ok"] is True
    assert r["none"] is None and r["cm"] == [[1, 2], [3, 4]] and r["per_class"]["a"] == [0.33333, 1.0]
    assert r["np"] == 0.12346 and r["np_int"] == 7 and isinstance(r["np_int"], int)
    assert r["t"] == 2.3457 and r["vec"] == [0.5]
    assert m["loss"] == 1.23456789  # the input is not modified


def test_non_finite_values_stay_and_json_stays_valid():
    assert math.isnan(round_floats(float("nan")))
    line = metrics_json({"loss": float("nan"), "ppl": float("inf"), "acc": 0.912345678})
    assert json.loads(line) == {"loss": "nan", "ppl": "inf", "acc": 0.91235}
    with pytest.raises(ValueError):
        round_floats(1.0, digits=0)
