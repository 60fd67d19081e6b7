"""lmforge.data.sampler: the step sampler (a pure function of the step, every example once per epoch,
rank and micro slices) and example batches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


from lmforge.data.sampler import ExampleBatches, StepSampler


# ------------------------------------------------------------------------------ sampler
def test_sampler_is_a_pure_function_of_the_step():
    a = StepSampler(37, micro_batch=4, grad_accum=2, world=1, seed=5)
    b = StepSampler(37, micro_batch=4, grad_accum=2, world=1, seed=5)
    assert [a.global_indices(s).tolist() for s in (9, 3, 0)] == [b.global_indices(s).tolist() for s in (9, 3, 0)]
    assert a.global_indices(3).tolist() != StepSampler(37, 4, 2, 1, seed=6).global_indices(3).tolist()


def test_sampler_sees_every_example_once_per_epoch():
    s = StepSampler(30, micro_batch=5, grad_accum=1, world=2, seed=1)  # 10 per step, 3 steps per epoch
    first = torch.cat([s.global_indices(i) for i in range(3)]).tolist()
    second = torch.cat([s.global_indices(i) for i in range(3, 6)]).tolist()
    assert sorted(first) == sorted(second) == list(range(30))
    assert first != second  # a fresh permutation per epoch
    odd = StepSampler(7, micro_batch=3, seed=2)  # steps straddle epoch boundaries
    stream = torch.cat([odd.global_indices(i) for i in range(7)]).tolist()  # 21 = 3 epochs
    for e in range(3):
        assert sorted(stream[7 * e:7 * e + 7]) == list(range(7))


def test_rank_and_micro_slices_tile_the_global_batch():
    s = StepSampler(100, micro_batch=3, grad_accum=2, world=2, seed=0)
    g = s.global_indices(4)
    parts = [s.indices(4, m, r) for m in range(2) for r in range(2)]
    assert torch.cat(parts).tolist() == g.tolist()
    # 2 ranks x B/2 see the same examples as 1 rank x B
    one = StepSampler(100, micro_batch=6, grad_accum=2, world=1, seed=0)
    assert sorted(one.global_indices(4).tolist()) == sorted(g.tolist())


def test_example_batches_collate_this_ranks_slice():
    s = StepSampler(10, micro_batch=2, grad_accum=1, world=2, seed=0)
    seen = []
    src = ExampleBatches(s, lambda idx: seen.append(idx) or {"n": len(idx)}, rank=1)
    src.batch(0, 0)
    assert seen == [s.indices(0, 0, 1).tolist()]
