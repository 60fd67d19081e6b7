"""Mixtral, Qwen2-MoE and OLMoE as configurations of lmforge's blocks (``model/moe.py``), checked
against transformers as the oracle.

transformers builds each random-weight tiny model from its own config class and saves it; lmforge
imports the folder and must give the same logits (plain, left- and right-padded batches), the same
load-balancing loss as transformers' ``aux_loss`` (``output_router_logits=True``, padding left
out), the same greedy tokens through the KV cache, and an export that transformers loads with the
same logits and the very same tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.generate import generate
from lmforge.interop.hf import export_hf, load_hf, read_hf_weights
from lmforge.model.moe import MoE

tf = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 96
CTX = 64

CASES = {
    # Mixtral: 4 experts, top-2, renormalised top-k weights, GQA
    "mixtral": ("MixtralConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    # Qwen2-MoE: q/k/v biases, a gated shared expert, raw top-k weights, layer 1 dense (mlp_only_layers)
    "qwen2moe": ("Qwen2MoeConfig", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=4, num_experts=6, num_experts_per_tok=2,
                                        moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                        intermediate_size=56, mlp_only_layers=[1])),
    # Qwen2-MoE: experts every 2nd layer (decoder_sparse_step), top-3 renormalised, tied head
    "qwen2moe-sparse-step": ("Qwen2MoeConfig", dict(num_hidden_layers=4, hidden_size=24, num_attention_heads=3,
                                                    num_key_value_heads=1, num_experts=5, num_experts_per_tok=3,
                                                    moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                                    intermediate_size=40, decoder_sparse_step=2,
                                                    norm_topk_prob=True, tie_word_embeddings=True)),
    # OLMoE: one RMSNorm over all query heads and one over all key heads, 8 experts top-2
    "olmoe": ("OlmoeConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                  num_experts_per_tok=2, intermediate_size=24)),
}


def _hf_config(name: str):
    cls, fields = CASES[name]
    base = dict(num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=CTX, bos_token_id=None,
                eos_token_id=None, pad_token_id=0)
    return getattr(tf, cls)(**{**base, **copy.deepcopy(fields)})


def _perturb(model, seed: int = 0, scale: float = 0.5):
    """Move every parameter off its init (unit norms, zero router) so layout mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family(name)`` -> (transformers model, its folder, lmforge model), built once per module."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            ref = _perturb(tf.AutoModelForCausalLM.from_config(_hf_config(name), attn_implementation="eager"))
            folder = tmp_path_factory.mktemp(name)
            ref.save_pretrained(folder)
            made[name] = (ref, folder, load_hf(folder))
        return made[name]

    return get


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _left_padded(ids):
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    return mask, (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_transformers_logits(family, name):
    ref, _, ours = family(name)
    ids = _ids(2, 15, 1)
    with torch.no_grad():
        assert _diff(ours(ids), ref(ids).logits) <= TOL
        mask, pos = _left_padded(ids)  # lmforge derives positions from the mask; the reference is given them
        real = mask.bool()
        got = ours(ids, attention_mask=mask)
        assert _diff(got[real], ref(ids, attention_mask=mask, position_ids=pos).logits[real]) <= TOL
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0  # right padding
        real = mask.bool()
        assert _diff(ours(ids, attention_mask=mask)[real], ref(ids, attention_mask=mask).logits[real]) <= TOL


def test_imported_fields_name_each_family(family):
    c = family("mixtral")[2].config
    assert (c.n_experts, c.n_experts_per_token, c.moe_hidden, c.norm_topk_prob, c.shared_expert_hidden) == \
        (4, 2, 48, True, 0)
    c = family("qwen2moe")[2].config
    assert (c.n_experts, c.moe_hidden, c.shared_expert_hidden, c.mlp_hidden, c.norm_topk_prob, c.qkv_bias) == \
        (6, 24, 40, 56, False, True)
    assert [c.is_moe_layer(i) for i in range(3)] == [True, False, True]
    c = family("qwen2moe-sparse-step")[2].config
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    c = family("olmoe")[2].config
    assert (c.qk_norm, c.qk_norm_span, c.n_experts, c.norm_topk_prob) == (True, "all", 8, False)
    ours = family("qwen2moe")[2]
    assert [type(b.mlp).__name__ for b in ours.transformer.blocks] == ["MoE", "MLP", "MoE"]


# ------------------------------------------------------------------------- router losses
@pytest.mark.parametrize("name", list(CASES))
def test_aux_loss_equals_transformers(family, name):
    """The load-balancing loss equals transformers' aux_loss, unpadded and with padding left out."""
    ref, _, ours = family(name)
    ids = _ids(2, 15, 2)
    with torch.no_grad():
        ours(ids)
        want = ref(ids, output_router_logits=True)
        assert abs(float(ours.router_stats.aux_loss) - float(want.aux_loss)) <= 1e-5
        mask, pos = _left_padded(ids)
        ours(ids, attention_mask=mask)
        want = ref(ids, attention_mask=mask, position_ids=pos, output_router_logits=True)
        assert abs(float(ours.router_stats.aux_loss) - float(want.aux_loss)) <= 1e-5
    # z-loss: ST-MoE's mean over real tokens of logsumexp(logits)^2, from transformers' router logits
    lse = torch.stack([torch.logsumexp(r.float(), -1) ** 2 for r in want.router_logits])  # (L, B*T)
    w = mask.reshape(-1).float()
    assert abs(float(ours.router_stats.z_loss) - float(((lse * w).sum(-1) / w.sum()).mean())) <= 1e-4
    # usage per layer: the share of top-k picks of transformers' router logits, padding left out
    for row, r in zip(ours.router_stats.usage, want.router_logits):
        picks = r.topk(ours.config.n_experts_per_token, -1).indices[w.bool()].reshape(-1)
        want_row = torch.bincount(picks, minlength=ours.config.n_experts).float() / picks.numel()
        assert torch.allclose(row, want_row)


def test_loss_with_labels_adds_the_weighted_aux_loss_like_transformers(family):
    """transformers' loss with labels is CE + router_aux_loss_coef * aux; the objective's likewise."""
    from lmforge.objectives.causal_lm import CausalLM

    ref, _, ours = family("mixtral")
    ids = _ids(2, 16, 3)
    ours.train()  # the objective adds router losses in training only
    try:
        loss, metrics = CausalLM().loss(ours, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
    finally:
        ours.eval()
    with torch.no_grad():
        want = ref(ids[:, :-1], labels=ids[:, :-1], shift_labels=ids[:, 1:].contiguous(), output_router_logits=True)
    assert abs(float(loss.detach()) - float(want.loss)) <= 1e-4
    assert abs(metrics["moe_aux_loss"] - float(want.aux_loss)) <= 1e-5


# --------------------------------------------------------------------------- generation
def test_greedy_kv_cache_generation_matches_transformers(family):
    """32 greedy tokens through the KV cache, two left-padded prompts, equal to transformers'."""
    ref, _, ours = family("qwen2moe")
    prompts = [_ids(1, 7, 3)[0].tolist(), _ids(1, 3, 4)[0].tolist()]
    got = generate(ours, prompts, max_new_tokens=32, temperature=0.0)
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                            pad_token_id=0, eos_token_id=None)[:, L:]
    assert all(len(set(row)) >= 6 for row in got)  # not stuck on one token: a real check
    assert got == want.tolist()


# ------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_the_same_logits(family, tmp_path, name):
    ref, folder, ours = family(name)
    out = export_hf(ours, tmp_path / "out")
    back = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back).__name__ == type(ref).__name__
    ids = _ids(2, 15, 7)
    with torch.no_grad():
        assert _diff(back(ids).logits, ours(ids)) <= TOL
    a, b = read_hf_weights(folder), read_hf_weights(out)  # HF -> lmforge -> HF: the very tensors
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(isinstance(m, MoE) for m in ours.modules()) == sum(ours.config.is_moe_layer(i)
                                                                   for i in range(ours.config.n_layer))
