"""GRPO's entropy bonus against its formula (loss - c * aggregated entropy, gradient included) and
the held-out evaluation of the configured reward."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import build
from lmforge.objectives.grpo import GRPO
from lmforge.objectives.grpo_math import aggregate_loss, entropy_from_logits, grpo_policy_loss
from lmforge.objectives.logprobs import completion_logits
from lmforge.objectives.rewards import build_rewards
from lmforge.tasks.grpo import GRPOOptions, evaluate_prompts, held_out_batches, rollout_rows
from lmforge.tokenizer import CharTokenizer


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_entropy_bonus_is_minus_c_times_the_aggregated_entropy(loss_type):
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 5, generator=g)
    adv = torch.randn(3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    ent = torch.rand(3, 5, generator=g, requires_grad=True)
    kw = dict(loss_type=loss_type, max_completion_length=5)
    plain = grpo_policy_loss(logps, None, adv, mask, **kw).loss
    bonus = grpo_policy_loss(logps, None, adv, mask, entropy=ent, entropy_coef=0.3, **kw).loss
    want = plain - 0.3 * aggregate_loss(ent, mask, loss_type, 5)
    assert torch.allclose(bonus, want, atol=1e-7)
    bonus.backward()  # the bonus pushes the entropy up: d loss / d H = -c on each (aggregated) token
    assert (ent.grad[mask.bool()] < 0).all() and (ent.grad[~mask.bool()] == 0).all()


def test_entropy_bonus_needs_the_entropy_and_a_non_negative_coefficient():
    x = torch.zeros(1, 2)
    with pytest.raises(Exception, match="entropy_coef"):
        grpo_policy_loss(x, None, torch.zeros(1), torch.ones(1, 2), entropy_coef=0.1)
    with pytest.raises(Exception, match="entropy_coef"):
        grpo_policy_loss(x, None, torch.zeros(1), torch.ones(1, 2), entropy=x, entropy_coef=-1.0)


def test_objective_with_the_bonus_equals_the_formula_on_the_models_own_entropy():
    torch.manual_seed(0)
    model = build({"vocab_size": 11, "context_length": 16, "n_layer": 1, "n_head": 2, "n_embd": 16})
    rows = rollout_rows([[1, 2, 3], [1, 2, 3]], [[4, 5], [6, 7, 8]], [False, False], eos_id=None, pad=0)
    batch = {**rows, "advantages": torch.tensor([0.5, -0.5]), "truncated": torch.tensor([False, False])}
    plain, bonus = GRPO(), GRPO(entropy_coef=0.2)
    for obj in (plain, bonus):
        obj.setup(model, torch.device("cpu"))
    l0, _ = plain.loss(model, batch)
    l1, metrics = bonus.loss(model, batch)
    logits, keep = completion_logits(model, batch)  # (M, V), (N, T-1)
    ent = torch.zeros(keep.shape).masked_scatter(keep, entropy_from_logits(logits.float()))
    mask = batch["completion_mask"][:, 1:].float()
    assert torch.allclose(l1, l0 - 0.2 * aggregate_loss(ent, mask, "grpo"), atol=1e-6)
    assert metrics["entropy"] == pytest.approx(float((ent * mask).sum() / mask.sum()), abs=1e-6)


def test_held_out_evaluation_reports_the_configured_reward():
    tok = CharTokenizer.train(["What is 1 + 2? Answer: 3 0123456789"])
    torch.manual_seed(0)
    model = build({"vocab_size": tok.vocab_size, "context_length": 32, "n_layer": 1, "n_head": 2, "n_embd": 16})
    records = [{"prompt": f"What is {a} + 2? Answer:", "answer": str(a + 2)} for a in range(4)]
    o = GRPOOptions(max_completion_length=4, num_generations=2)
    rewards = build_rewards(["exact_match", {"name": "length_penalty", "max_length": 4, "soft_length": 1,
                                             "weight": 0.5}])
    out = evaluate_prompts(model, held_out_batches(records, tok, 3)(), o, tok, rewards=rewards)
    assert out["rewards/exact_match"] == pytest.approx(out["exact_match"])
    assert out["reward"] == pytest.approx(out["rewards/exact_match"] + 0.5 * out["rewards/length_penalty"])
    assert out["rewards/length_penalty"] < 0  # an untrained model runs to the length limit
    assert "reward" not in evaluate_prompts(model, held_out_batches(records, tok, 3)(), o, tok)
