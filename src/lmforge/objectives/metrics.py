"""Metrics that are not a loss: confusion matrices, accuracy, precision/recall/F1.

Plain functions of predictions and labels, so they are tested against hand-computed matrices
and shared by the training-time evaluation, ``lmforge eval`` and the benchmarks.
"""

from __future__ import annotations

import torch


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true label, column = predicted label."""
    idx = labels.long() * num_classes + preds.long()  # (N,)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(cm: torch.Tensor, names: list[str] | None = None) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix.

    A class that is never predicted has precision 0 (and never present: recall 0), as in
    scikit-learn's ``zero_division=0``.
    """
    cm = cm.double()
    k = cm.shape[0]
    names = names or [str(i) for i in range(k)]
    tp = cm.diag()  # (K,)
    predicted = cm.sum(0)  # column sums
    actual = cm.sum(1)  # row sums
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    total = float(cm.sum())
    return {
        "accuracy": float(tp.sum()) / total if total else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": {names[i]: {"precision": float(precision[i]), "recall": float(recall[i]),
                                 "f1": float(f1[i]), "support": int(actual[i])} for i in range(k)},
        "confusion_matrix": cm.long().tolist(),
        "labels": list(names),
    }
