"""lmforge.inspect.common: layer/head index lists parsed, bad ones named."""

from __future__ import annotations

import pytest

from lmforge.errors import InputError
from lmforge.inspect import common


def test_parse_indices():
    assert common.parse_indices("0,2,5-7") == [0, 2, 5, 6, 7]
    assert common.parse_indices("-1") == [-1]
    assert common.parse_indices(None) is None
    with pytest.raises(InputError, match="expected indices"):
        common.parse_indices("a,b")
