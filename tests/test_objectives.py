"""Objectives against hand-computed values, and the trainer's contract with a toy objective:
global target normalisation (8x1 == 4x2 == 1x8 with uneven padding), setup, callbacks,
best_metric checked against the real metric names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import TrainSection
from lmforge.data.sampler import ExampleBatches, StepSampler
from lmforge.errors import ConfigError
from lmforge.objectives.metrics import classification_metrics, confusion_matrix
from lmforge.model import ModelConfig, build
from lmforge.objectives.base import Objective
from lmforge.objectives.classification import Classification
from lmforge.train.callbacks import Callback
from lmforge.train.trainer import Trainer


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


# ------------------------------------------------------------------------------ toy objective
class MaskedTokens(Objective):
    """A toy masked-label objective: next-token loss on the real (unpadded) targets only."""

    name = "toy"

    def __init__(self):
        self.setup_calls = 0

    def setup(self, model, device):
        self.setup_calls += 1

    def loss(self, model, batch):
        logits = model(batch["input_ids"])  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1),
                               ignore_index=-100), {}

    def evaluate(self, model, batches):
        return {"toy_metric": 1.0}


def _examples(n=16, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _collate(examples):
    def collate(idx):
        rows = [examples[i] for i in idx]
        T = max(len(r) for r in rows) - 1
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        tgt = torch.full((len(rows), T), -100, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: padded targets are -100
            ids[i, :len(r) - 1] = torch.tensor(r[:-1])
            tgt[i, :len(r) - 1] = torch.tensor(r[1:])
        return {"input_ids": ids, "targets": tgt}
    return collate


def _fit(tmp_path, batch, accum, steps=3, callbacks=None, best_metric=None):
    torch.manual_seed(0)
    model = build(ModelConfig(vocab_size=11, context_length=16, n_layer=1, n_head=2, n_embd=16, bias=False))
    ex = _examples()
    cfg = TrainSection(max_steps=steps, batch_size=batch, grad_accum=accum, lr=1e-2, warmup_steps=0,
                       checkpoint_every=None, best_metric=best_metric, eval_every=steps, progress=False)
    src = ExampleBatches(StepSampler(len(ex), batch, accum, 1, seed=3), _collate(ex))
    obj = MaskedTokens()
    trainer = Trainer(model, obj, src, cfg, run_dir=tmp_path / f"r{batch}x{accum}", callbacks=callbacks,
                      eval_data=lambda: [{}])
    result = trainer.fit()
    return model, result, obj


def test_global_target_normalisation_makes_accumulation_exact(tmp_path):
    runs = [_fit(tmp_path, b, a) for b, a in ((8, 1), (4, 2), (1, 8))]
    ref_model, ref, obj = runs[0]
    assert obj.setup_calls == 1
    for model, result, _ in runs[1:]:
        for a, b in zip(ref.history, result.history):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        for (k, p), q in zip(ref_model.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")


def test_callbacks_see_every_step_and_evaluation(tmp_path):
    class Record(Callback):
        def __init__(self):
            self.events = []

        def on_fit_start(self, trainer):
            self.events.append("start")

        def on_step_end(self, trainer, metrics):
            self.events.append(f"step{trainer.step}")
            if trainer.step == 2:
                trainer.request_stop()

        def on_evaluate(self, trainer, metrics):
            self.events.append(f"eval{sorted(metrics)}")

        def on_fit_end(self, trainer, result):
            self.events.append(f"end{result.step}")

    rec = Record()
    _, result, _ = _fit(tmp_path, 4, 1, steps=5, callbacks=[rec])
    assert result.stopped_early and result.step == 2
    assert rec.events == ["start", "step1", "step2", "end2"]
    rec2 = Record()
    _fit(tmp_path / "b", 4, 1, steps=1, callbacks=[rec2])
    assert rec2.events == ["start", "step1", "eval['val_toy_metric']", "end1"]


def test_best_metric_typo_lists_the_real_metric_names(tmp_path):
    with pytest.raises(ConfigError, match="train.best_metric: got 'val_acc'.*val_toy_metric"):
        _fit(tmp_path, 4, 1, steps=1, best_metric="val_acc")


@pytest.mark.parametrize("arch", ["decoder", "bigram"])
def test_masked_targets_skip_the_lm_head_and_give_the_same_loss_and_gradients(arch):
    """Fine-tuning targets (-100 at prompt and padding): the LM head runs only where a target is,
    and the loss and every gradient equal the full-logits cross-entropy with ignore_index."""
    from lmforge.objectives.causal_lm import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=37, context_length=16, n_layer=2, n_head=2, n_embd=16) \
        if arch != "bigram" else ModelConfig(arch="bigram", vocab_size=37, context_length=16)
    model = build(cfg).double()
    ids = torch.randint(0, 37, (3, 12))
    targets = torch.randint(0, 37, (3, 12))
    targets[:, :5] = -100  # prompts
    targets[2, 9:] = -100  # padding
    loss, _ = CausalLM().loss(model, {"input_ids": ids, "targets": targets})
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids)  # (B, T, V)
    ref = F.cross_entropy(logits.reshape(-1, 37).float(), targets.reshape(-1), ignore_index=-100)  # fp32, as the loss
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=0, msg=n)
    keep = targets != -100
    torch.testing.assert_close(model(ids, keep=keep), logits[keep])  # (N, V)
    nothing = torch.full_like(targets, -100)  # a micro-batch with nothing to predict: 0, not NaN
    assert CausalLM().loss(model, {"input_ids": ids, "targets": nothing})[0].item() == 0.0
