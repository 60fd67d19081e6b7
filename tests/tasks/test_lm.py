"""lmforge.tasks.lm: the pretrain/mlm task's batch sources (random training windows that are a
pure function of the step, each micro-step and rank its own slice; the same validation batches
every time) and its config checks (pretrain trains a decoder, mlm an encoder, mask_prob in (0, 1))."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.objectives import CausalLM
from lmforge.tasks import config_from_dict
from lmforge.tasks.lm import WindowBatches, eval_batches

TOKENS = np.arange(600, dtype=np.uint16)  # token i at position i: a window shows where it starts


def _starts(batch) -> list[int]:
    x, y = batch["input_ids"], batch["targets"]
    T = x.shape[1]
    for row_x, row_y in zip(x, y):  # contiguous windows of the stream, targets shifted by one
        s = int(row_x[0])
        assert row_x.tolist() == list(range(s, s + T)) and row_y.tolist() == list(range(s + 1, s + T + 1))
    return [int(r[0]) for r in x]


def test_training_windows_are_a_pure_function_of_the_step():
    a = WindowBatches(TOKENS, context=8, micro_batch=2, grad_accum=3, objective=CausalLM(), seed=1)
    b = WindowBatches(TOKENS, context=8, micro_batch=2, grad_accum=3, objective=CausalLM(), seed=1)
    step5 = [_starts(a.batch(5, m)) for m in range(3)]
    assert [_starts(b.batch(5, m)) for m in (2, 1, 0)] == step5[::-1]  # any order of calls
    assert all(len(s) == 2 for s in step5)
    assert _starts(a.batch(6, 0)) != step5[0]  # another step, other windows
    c = WindowBatches(TOKENS, context=8, micro_batch=2, grad_accum=3, objective=CausalLM(), seed=2)
    assert [_starts(c.batch(5, m)) for m in range(3)] != step5  # another seed


def test_ranks_take_disjoint_slices_of_one_global_batch():
    ranks = [WindowBatches(TOKENS, context=8, micro_batch=2, grad_accum=2, objective=CausalLM(), seed=0,
                           rank=r, world=2) for r in range(2)]
    seen = [s for r in ranks for m in range(2) for s in _starts(r.batch(3, m))]
    assert len(seen) == 2 * 2 * 2
    g = ranks[0].sampler.generator(3)
    assert sorted(seen) == sorted(ranks[0].sampler.global_indices(3, g).tolist())  # together: the global batch


def test_validation_batches_are_the_same_every_time():
    batches = eval_batches(TOKENS, context=8, batch_size=4, max_batches=3, objective=CausalLM())
    first = [_starts(b) for b in batches()]
    assert first == [_starts(b) for b in batches()]
    assert len(first) == 3 and all(len(s) == 4 for s in first)
    flat = [s for b in first for s in b]
    assert flat == sorted(flat) and len(set(flat)) == len(flat)  # strided through the stream, no repeats


def test_validation_shorter_than_a_window_is_named():
    with pytest.raises(DataError, match="val split has 5 tokens, but one window of context 8 needs at least 9"):
        eval_batches(TOKENS[:5], context=8, batch_size=4, max_batches=3, objective=CausalLM())


@pytest.mark.parametrize("sections,match", [
    ({"task": "mlm"}, "task: mlm trains an encoder; model.arch is 'decoder'"),
    ({"task": "mlm", "model": {"preset": "bert-mini", "arch": "encoder"}, "objective": {"mask_prob": 1.5}},
     "objective.mask_prob: got 1.5, expected a number in \\(0, 1\\)"),
])
def test_config_checks(tiny_dict, sections, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(tiny_dict(**sections))
