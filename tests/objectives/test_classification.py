"""lmforge.objectives.classification: the loss against a hand-computed value."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.objectives.classification import Classification


# ------------------------------------------------------------------------------ classification
def test_classification_loss_matches_a_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.5]])  # the last one is wrong
    labels = torch.tensor([0, 1, 0])

    def nll(row, y):  # -log softmax(row)[y]
        return -(row[y] - math.log(sum(math.exp(v) for v in row)))

    rows = logits.tolist()
    want = sum(nll(r, y) for r, y in zip(rows, labels.tolist())) / 3
    obj = Classification(2)

    class Fixed(torch.nn.Module):
        def forward(self, ids, mask, head=None):
            return logits

    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2), "labels": labels}
    loss, m = obj.loss(Fixed(), batch)
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert m["accuracy"] == pytest.approx(2 / 3)
    # class weights: a weighted mean, over the weights (as torch's cross_entropy)
    w = [1.0, 3.0]
    obj_w = Classification(2, class_weights=w)
    lw, _ = obj_w.loss(Fixed(), batch)
    want_w = sum(w[y] * nll(r, y) for r, y in zip(rows, labels.tolist())) / sum(w[y] for y in labels.tolist())
    assert float(lw) == pytest.approx(want_w, abs=1e-6)
    assert obj_w.targets_in(batch) == pytest.approx(5.0)
