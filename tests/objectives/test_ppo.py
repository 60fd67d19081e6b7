"""lmforge.objectives.ppo on a tiny decoder with hand-made rollout rows: the value model is
required and kept out of the KL reference, a shared value head reads the policy's own forward
pass (equal to two passes, gradients included), the rollout's tensors are laid out on the
completion tokens, and throughput counts real tokens."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, build
from lmforge.model.heads import attach_value_model, values_of
from lmforge.objectives.logprobs import batch_completion_logprobs
from lmforge.objectives.ppo import PPO
from lmforge.tasks.grpo import rollout_rows


def _model(kind="shared"):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", vocab_size=13, n_layer=1, n_head=2, n_embd=16, context_length=16)
    model = build(cfg)
    trunk = build(cfg) if kind == "separate" else None
    attach_value_model(model, kind, trunk)
    with torch.no_grad():  # a value head that is not all zeros
        (model.value_head if kind == "shared" else model.critic.head).out.weight.normal_()
    return model


def _rows():
    return rollout_rows([[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11], [12]], [True, False, True], eos_id=0, pad=0)


def test_setup_needs_a_value_model_and_keeps_it_out_of_the_reference():
    with pytest.raises(ConfigError, match="has no value model"):
        PPO().setup(build(ModelConfig(arch="decoder", vocab_size=13, n_layer=1, n_head=2, n_embd=16,
                                      context_length=16)), torch.device("cpu"))
    for kind in ("shared", "separate"):
        model, obj = _model(kind), PPO(kl_coef=0.1)
        obj.setup(model, torch.device("cpu"))
        names = {n for n, _ in obj.reference.named_parameters()}
        assert names and not any(n.startswith(("value_head.", "critic.")) for n in names)
        assert not any(p.requires_grad for p in obj.reference.parameters())
        assert hasattr(model, "value_head" if kind == "shared" else "critic")  # the policy keeps its own


def test_shared_value_head_reads_the_policys_own_forward_pass():
    """One trunk pass for log-probs and values gives what two separate passes give, gradients included."""
    model, b = _model(), _rows()
    got = PPO.logps_and_values(model, b)
    (got[0].sum() + got[2].sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logps, mask = batch_completion_logprobs(model, b)
    values = values_of(model, b["input_ids"])[:, :-1]
    (logps.sum() + values.sum()).backward()
    for a, w in zip(got, (logps, mask, values)):
        torch.testing.assert_close(a, w.float())
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)  # float rounding: one backward vs two


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_score_lays_the_rollout_out_on_completion_tokens(kind):
    model, obj, b = _model(kind), PPO(kl_coef=0.1, gamma=1.0, lam=1.0, whiten_advantages=False), _rows()
    obj.setup(model, torch.device("cpu"))
    scores = torch.tensor([1.0, -0.5, 2.0])
    s = obj.score(b, scores)
    mask = b["completion_mask"][:, 1:].float()
    for k in ("old_logps", "old_values", "rewards", "advantages", "returns"):
        assert s[k].shape == mask.shape and (s[k][mask == 0] == 0).all(), k
    # the policy is its own reference: no KL; with gamma = lam = 1 every token's return is the score
    assert s["stats"]["kl"] == pytest.approx(0, abs=1e-6)
    torch.testing.assert_close(s["returns"], scores[:, None] * mask)
    torch.testing.assert_close(s["advantages"], (scores[:, None] - s["old_values"]) * mask)
    # one update on fresh rollouts: ratio 1 and values unclipped
    loss, m = obj.loss(model, {**b, **s})
    assert torch.isfinite(loss) and m["ratio"] == pytest.approx(1.0) and m["clipfrac"] == 0


def test_targets_are_completion_tokens_and_tokens_are_real():
    b = _rows()
    assert PPO().targets_in(b) == (2 + 1) + 3 + (1 + 1)  # completions scored on their eos when finished
    assert PPO().tokens_in(b) == (3 + 3) + (1 + 3) + (2 + 2)
