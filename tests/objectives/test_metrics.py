"""lmforge.objectives.metrics: classification metrics against a hand-computed confusion matrix."""

from __future__ import annotations

import pytest
import torch

from lmforge.objectives.metrics import classification_metrics, confusion_matrix


def test_metrics_match_a_hand_computed_confusion_matrix():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2, 1])
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    m = classification_metrics(cm, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(6 / 9)
    p = {"a": 2 / 3, "b": 2 / 4, "c": 2 / 2}
    r = {"a": 2 / 3, "b": 2 / 2, "c": 2 / 4}
    for k in "abc":
        assert m["per_class"][k]["precision"] == pytest.approx(p[k])
        assert m["per_class"][k]["recall"] == pytest.approx(r[k])
    f1 = [2 * p[k] * r[k] / (p[k] + r[k]) for k in "abc"]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["per_class"]["c"]["support"] == 4


def test_a_never_predicted_class_has_zero_precision():
    m = classification_metrics(confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 1]), 2))
    assert m["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
