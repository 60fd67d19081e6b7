"""Mixture of experts (model/moe.py): routing written out token by token, the config checks, active
parameter and FLOP counts against a dense twin, and the causal-LM objective's router losses.
(Numerical parity with transformers' Mixtral, Qwen2-MoE and OLMoE: test_moe_parity.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, InteropError
from lmforge.interop.hf import config_to_hf
from lmforge.model import ModelConfig, build, count_active_parameters, count_parameters, flops_per_token
from lmforge.model.moe import MoE, load_balancing_loss
from lmforge.objectives.causal_lm import CausalLM


def _cfg(**kw) -> ModelConfig:
    base = dict(preset="llama-baby", n_embd=32, n_head=4, n_kv_head=2, n_layer=2, n_experts=4,
                n_experts_per_token=2, moe_hidden=24)
    return ModelConfig.coerce({**base, **kw})


def _naive_moe(moe: MoE, x: torch.Tensor, norm_topk: bool) -> torch.Tensor:
    """Each token alone: softmax over experts, its top-k, their weighted outputs summed (+ shared)."""
    out = []
    for t in x.reshape(-1, x.shape[-1]):  # (C,)
        p = (moe.router.weight @ t).softmax(-1)  # (E,)
        w, idx = p.topk(moe.top_k)
        w = w / w.sum() if norm_topk else w
        y = sum(wj * moe.experts[int(j)](t[None])[0] for wj, j in zip(w, idx))
        if moe.shared is not None:
            y = y + torch.sigmoid(moe.shared_gate(t)) * moe.shared(t[None])[0]
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("kw", [dict(), dict(norm_topk_prob=False, shared_expert_hidden=16),
                                dict(n_experts=5, n_experts_per_token=3)])
def test_moe_layer_equals_routing_each_token_by_hand(kw):
    torch.manual_seed(0)
    cfg = _cfg(**kw)
    moe = MoE(cfg).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, cfg.n_embd)
    with torch.no_grad():
        assert torch.allclose(moe(x), _naive_moe(moe, x, cfg.norm_topk_prob), atol=1e-5)
        assert moe.router_logits.shape == (21, cfg.n_experts)


def test_dropless_an_expert_chosen_by_every_token_drops_none():
    """All tokens pick the same expert (a router biased to it): each still gets its full output."""
    cfg = _cfg(n_experts_per_token=1)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0
        x = torch.rand(2, 9, cfg.n_embd) + 0.1  # positive: expert 2 scores highest for every token
        assert torch.allclose(moe(x), moe.experts[2](x), atol=1e-6)  # weight 1 after renormalising


def test_aux_loss_is_one_when_uniform_and_e_when_collapsed():
    """E * sum f_e P_e: uniform routing gives top_k (here 1), one expert taking every token gives E."""
    E = 4
    uniform = torch.zeros(8, E)  # equal probabilities; topk picks spread by the index order below
    uniform_loss = load_balancing_loss([uniform + torch.eye(E).repeat(2, 1) * 1e-3], top_k=1)
    assert abs(float(uniform_loss) - 1.0) < 1e-2
    collapsed = torch.full((8, E), -30.0)
    collapsed[:, 0] = 30.0
    assert abs(float(load_balancing_loss([collapsed], top_k=1)) - E) < 1e-4


def test_config_problems_name_the_field():
    with pytest.raises(ConfigError, match="n_experts_per_token"):
        _cfg(n_experts_per_token=5)
    with pytest.raises(ConfigError, match="n_experts"):
        ModelConfig.coerce(dict(preset="bert-mini", n_experts=4))
    with pytest.raises(ConfigError, match="qk_norm_span"):
        _cfg(qk_norm_span="layer")
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        _cfg(router_aux_loss_coef=-1)
    with pytest.raises(ConfigError, match="dense_layers"):
        _cfg(dense_layers="0")


def test_dense_config_is_unchanged_by_the_moe_fields():
    """n_experts 0 (the default): the same modules, parameter count and FLOPs as before."""
    cfg = ModelConfig.from_preset("llama-baby")
    model = build(cfg)
    assert not any(isinstance(m, MoE) for m in model.modules())
    assert count_active_parameters(model) == count_parameters(model)
    assert not hasattr(model, "router_stats") and (model(torch.zeros(1, 4, dtype=torch.long)) is not None)
    assert not hasattr(model, "router_stats")


def test_active_parameters_and_flops_equal_a_dense_twin_plus_the_router():
    """top-1 of E experts of width H: a token runs a dense model of mlp_hidden H plus E router rows."""
    moe = build(_cfg(n_experts_per_token=1, moe_hidden=40))
    dense = build(_cfg(n_experts=0, mlp_hidden=40))
    cfg = moe.config
    router = cfg.n_layer * cfg.n_experts * cfg.n_embd
    assert count_active_parameters(moe) == count_parameters(dense) + router
    assert count_parameters(moe) > count_active_parameters(moe)
    assert flops_per_token(cfg) == flops_per_token(dense.config) + 6 * router
    # dense layers (moe_every 2): only layer 1 has experts
    sparse = build(_cfg(moe_every=2, n_experts_per_token=1, moe_hidden=40, mlp_hidden=40))
    assert [isinstance(b.mlp, MoE) for b in sparse.transformer.blocks] == [False, True]
    assert count_active_parameters(sparse) == count_parameters(dense) + router // 2


def test_objective_adds_router_losses_in_training_only():
    torch.manual_seed(0)
    model = build(_cfg(router_aux_loss_coef=0.1, router_z_loss_coef=0.01))
    ids = torch.randint(0, 65, (2, 12))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    model.train()
    loss, metrics = CausalLM().loss(model, batch)
    ce = F.cross_entropy(model(batch["input_ids"]).reshape(-1, 65), batch["targets"].reshape(-1))
    s = model.router_stats
    assert torch.allclose(loss, ce + 0.1 * s.aux_loss + 0.01 * s.z_loss)
    assert abs(metrics["ce_loss"] - float(ce.detach())) < 1e-6 and metrics["moe_aux_loss"] == float(s.aux_loss.detach())
    for layer in range(2):  # the share of tokens per expert, per layer, sums to 1
        shares = [metrics[f"expert_usage/L{layer}/E{e}"] for e in range(4)]
        assert abs(sum(shares) - 1.0) < 1e-6 and min(shares) >= 0
    loss.backward()  # the router learns from the balancing loss too
    assert model.transformer.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        val, val_metrics = CausalLM().loss(model, batch)
    assert torch.allclose(val, ce.detach()) and val_metrics == {}


def test_objective_on_a_dense_model_is_plain_cross_entropy():
    torch.manual_seed(0)
    model = build("llama-baby").train()
    ids = torch.randint(0, 65, (2, 12))
    loss, metrics = CausalLM().loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
    want = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 65), ids[:, 1:].reshape(-1))
    assert torch.equal(loss, want) and metrics == {}


def test_export_names_what_hugging_face_cannot_hold():
    with pytest.raises(InteropError, match="n_experts"):
        config_to_hf(ModelConfig.coerce(dict(preset="baby", n_experts=4)))
    with pytest.raises(InteropError, match="shared_expert_hidden"):
        config_to_hf(_cfg(moe_every=2))  # dense layers: Qwen2-MoE, which always has a shared expert
    assert config_to_hf(_cfg())["architectures"] == ["MixtralForCausalLM"]
    assert config_to_hf(_cfg(qk_norm=True, qk_norm_span="all"))["architectures"] == ["OlmoeForCausalLM"]
    assert config_to_hf(_cfg(shared_expert_hidden=16))["architectures"] == ["Qwen2MoeForCausalLM"]
