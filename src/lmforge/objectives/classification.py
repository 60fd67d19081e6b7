"""Text classification: cross-entropy of the classifier head's logits against the labels.

The model pools its hidden states (mean, CLS or last real token: ``model.pooling``) and a linear
head gives one logit per class (``model(ids, mask, head="cls") -> (B, K)``). Optional class
weights rescale each example's loss; the mean is then over the weights, as in
``torch.nn.functional.cross_entropy(weight=...)``, and ``targets_in`` counts weights so the
trainer's global normalisation stays exact.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from lmforge.objectives.metrics import classification_metrics, confusion_matrix
from lmforge.objectives.base import Objective


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of class logits (B, K) against labels (B,), weighted per class."""
    return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=label_smoothing)


class Classification(Objective):
    name = "classify"

    def __init__(self, num_classes: int, class_weights: list[float] | None = None, label_smoothing: float = 0.0,
                 label_names: list[str] | None = None):
        self.num_classes = num_classes
        self.weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.label_smoothing = label_smoothing
        self.label_names = label_names or [str(i) for i in range(num_classes)]

    def setup(self, model, device: torch.device) -> None:
        if self.weight is not None:
            self.weight = self.weight.to(device)

    def logits(self, model, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], head="cls")  # (B, K)

    def loss(self, model, batch):
        logits = self.logits(model, batch)  # (B, K)
        loss = cross_entropy(logits, batch["labels"], self.weight, self.label_smoothing)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {"accuracy": float(acc)}

    def targets_in(self, batch: dict) -> float:
        if self.weight is None:
            return int(batch["labels"].numel())
        return float(self.weight.to(batch["labels"].device)[batch["labels"]].sum())

    def tokens_in(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def predict(self, model, batches: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Predicted labels, true labels and the summed (weighted) loss over ``batches``."""
        was_training = model.training
        model.eval()
        preds, labels, loss_sum, count = [], [], 0.0, 0.0
        for batch in batches:
            logits = self.logits(model, batch)
            n = self.targets_in(batch)
            loss_sum += float(cross_entropy(logits, batch["labels"], self.weight)) * n
            count += n
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        model.train(was_training)
        if not preds:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), float("nan")
        return torch.cat(preds), torch.cat(labels), loss_sum / max(count, 1e-12)

    def report(self, model, batches: Iterable[dict]) -> dict:
        """Loss, accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
        preds, labels, loss = self.predict(model, batches)
        cm = confusion_matrix(preds, labels, self.num_classes)
        return {"loss": loss, "examples": int(labels.numel()), **classification_metrics(cm, self.label_names)}

    def evaluate(self, model, batches: Iterable[dict]) -> dict[str, float]:
        r = self.report(model, batches)
        if r["examples"] == 0:
            return {}
        return {"loss": r["loss"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
