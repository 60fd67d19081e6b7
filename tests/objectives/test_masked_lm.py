"""lmforge.objectives.masked_lm: the MLM collate masks 15% of tokens with the 80/10/10 rule, seeded."""

from __future__ import annotations

import pytest
import torch

from lmforge.objectives import MaskedLM


def test_mlm_collate_masks_15_percent_with_80_10_10():
    vocab, mask_id, specials = 100, 1, (0, 1, 2)
    obj = MaskedLM(mask_id=mask_id, vocab_size=vocab, mask_prob=0.15, special_ids=specials)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, vocab, (256, 513), generator=g)
    windows[:, ::7] = 0  # special tokens sprinkled in
    windows[:, 3::11] = 2
    batch = obj.collate(windows, torch.Generator().manual_seed(1))
    original = windows[:, :-1]
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == targets.shape == original.shape

    special = torch.isin(original, torch.tensor(specials))
    chosen = targets != -100
    assert not (chosen & special).any()  # never a special token
    assert torch.equal(ids[special], original[special])
    assert torch.equal(targets[chosen], original[chosen])  # the target is the original token
    assert torch.equal(ids[~chosen], original[~chosen])  # untouched elsewhere

    rate = chosen.sum().item() / (~special).sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = chosen.sum().item()
    masked = (ids[chosen] == mask_id).sum().item() / n
    kept = (ids[chosen] == original[chosen]).sum().item() / n
    replaced = 1 - masked - kept
    assert masked == pytest.approx(0.80, abs=0.02)
    assert kept == pytest.approx(0.10, abs=0.02)
    assert replaced == pytest.approx(0.10, abs=0.02)


def test_mlm_collate_is_seeded():
    obj = MaskedLM(mask_id=1, vocab_size=50, special_ids=(0, 1))
    w = torch.randint(2, 50, (4, 33))
    a = obj.collate(w, torch.Generator().manual_seed(3))
    b = obj.collate(w, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
