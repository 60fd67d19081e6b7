"""lmforge.objectives.dpo: the DPO objective on a tiny decoder against a hand computation
(completion log-probs summed by a loop, -log sigmoid(beta * margin) with a frozen copy as the
reference): ln 2 at step 0, the reference stays frozen while the policy moves, pairs as targets,
pair-weighted evaluation, reference-free losses, and bad options named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, build
from lmforge.objectives.dpo import DPO
from lmforge.tasks.dpo import preference_collate

V = 23


def _model():
    torch.manual_seed(0)
    return build(ModelConfig(arch="decoder", vocab_size=V, context_length=16, n_layer=1, n_head=2, n_embd=16,
                             dropout=0.0)).train()


def _batch():
    pairs = [([1, 2, 3], [4, 5], [6]), ([7, 8], [9, 10, 11], [12, 13]), ([14], [15], [16, 17, 18])]
    return {**preference_collate(pairs, pad_id=0), "split": "train"}


def _naive_logps(model, batch) -> torch.Tensor:
    """Sum over completion tokens of log p(token | everything before it), one row at a time."""
    out = []
    for ids, mask in zip(batch["input_ids"], batch["completion_mask"]):
        logp = F.log_softmax(model(ids[None])[0].double(), -1)  # (T, V)
        out.append(sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]))
    return torch.stack(out)  # (2B,)


def _naive_dpo(model, reference, batch, beta) -> torch.Tensor:
    p, r = _naive_logps(model, batch), _naive_logps(reference, batch)
    B = p.shape[0] // 2
    margin = (p[:B] - r[:B]) - (p[B:] - r[B:])
    return -F.logsigmoid(beta * margin).mean()


def test_step0_is_ln2_and_the_loss_is_the_hand_computed_one_after_a_step():
    model, batch = _model(), _batch()
    obj = DPO(beta=0.5)
    obj.setup(model, torch.device("cpu"))
    reference = _model().eval()  # the same weights, built again: what the frozen copy must stay
    loss, metrics = obj.loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    model.zero_grad()
    loss, metrics = obj.loss(model.eval(), batch)
    assert float(loss) == pytest.approx(float(_naive_dpo(model, reference, batch, 0.5)), abs=1e-5)
    assert float(loss) < math.log(2)  # the step opened a margin
    for (k, a), b in zip(obj.reference.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k  # the reference did not move with the policy
    assert not any(p.requires_grad for p in obj.reference.parameters())


def test_pairs_are_the_targets_and_evaluate_is_pair_weighted():
    model, batch = _model(), _batch()
    obj = DPO()
    obj.setup(model, torch.device("cpu"))
    assert obj.targets_in(batch) == 3
    assert obj.tokens_in(batch) == int(batch["attention_mask"].sum()) == (5 + 4 + 2) + (4 + 5 + 4)
    one = {k: (v[[0, 3]] if torch.is_tensor(v) and v.shape[:1] == (6,) else v) for k, v in batch.items()}
    two = {k: (v[[1, 2, 4, 5]] if torch.is_tensor(v) and v.shape[:1] == (6,) else v) for k, v in batch.items()}
    with torch.no_grad():
        l1, l2 = float(obj.loss(model.eval(), one)[0]), float(obj.loss(model.eval(), two)[0])
    out = obj.evaluate(model.train(), [one, two])
    assert out["loss"] == pytest.approx((l1 * 1 + l2 * 2) / 3, abs=1e-6) and model.training


def test_reference_free_loss_holds_no_reference():
    model, batch = _model(), _batch()
    obj = DPO(loss_type="simpo", reference="none")
    obj.setup(model, torch.device("cpu"))
    assert obj.reference is None and obj.reference_logps(batch) is None
    loss, _ = obj.loss(model, batch)
    assert torch.isfinite(loss) and loss.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "kto"}, "loss_type: got 'kto', expected one of"),
    ({"reference": "ema"}, "reference: got 'ema', expected copy, precompute or none"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DPO(**kwargs)


def test_precompute_needs_the_tasks_function():
    with pytest.raises(ConfigError, match="precompute needs the task's batches to score"):
        DPO(reference="precompute").setup(_model(), torch.device("cpu"))
