"""A toy run of the trainer shared by the trainer's and the callbacks' tests: a tiny decoder, a
masked-label objective and variable-length examples through the step sampler."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.config import TrainSection
from lmforge.data.sampler import ExampleBatches, StepSampler
from lmforge.model import ModelConfig, build
from lmforge.objectives.base import Objective
from lmforge.train.trainer import Trainer


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


def fit_toy(tmp_path, batch, accum, steps=3, callbacks=None, best_metric=None):
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


