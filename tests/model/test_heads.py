"""lmforge.model.heads: pooling (mean over real tokens, CLS, last real token with right or left
padding) by hand; the classification and value heads; the masked-LM head against transformers'
BERT prediction head with the same weights."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import InputError
from lmforge.model import ModelConfig
from lmforge.model.heads import ClassificationHead, MLMHead, ValueHead, pool


def _hidden():
    torch.manual_seed(0)
    return torch.randn(3, 4, 5)  # (B, T, C)


def test_pool_by_hand_with_right_and_left_padding():
    h = _hidden()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]])  # full, right-padded, left-padded
    mean = pool(h, mask, "mean")
    torch.testing.assert_close(mean[0], h[0].mean(0))
    torch.testing.assert_close(mean[1], h[1, :2].mean(0))
    torch.testing.assert_close(mean[2], h[2, 2:].mean(0))
    last = pool(h, mask, "last")
    for b, t in enumerate([3, 1, 3]):
        torch.testing.assert_close(last[b], h[b, t])
    torch.testing.assert_close(pool(h, mask, "cls"), h[:, 0])
    torch.testing.assert_close(pool(h, None, "mean"), h.mean(1))  # no mask: every token is real
    torch.testing.assert_close(pool(h, None, "last"), h[:, -1])


def test_pool_of_an_all_padding_row_is_finite_and_bad_method_named():
    h = _hidden()
    out = pool(h, torch.zeros(3, 4), "mean")
    assert torch.isfinite(out).all() and (out == 0).all()
    with pytest.raises(InputError, match="pooling: got 'max', expected one of mean, cls, last"):
        pool(h, None, "max")


def test_classification_head_is_a_linear_layer_on_the_pooled_states():
    h = _hidden()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    head = ClassificationHead(5, 3, pooling="mean").eval()
    out = head(h, mask)
    assert out.shape == (3, 3)
    torch.testing.assert_close(out, pool(h, mask, "mean") @ head.out.weight.T + head.out.bias)


def test_value_head_starts_at_zero_and_gives_one_value_per_position():
    head = ValueHead(5)
    v = head(_hidden())
    assert v.shape == (3, 4) and (v == 0).all()  # zero-initialised: no value bias at the start
    with torch.no_grad():
        head.out.weight.fill_(1.0)
    torch.testing.assert_close(head(_hidden()), _hidden().sum(-1))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_mlm_head_matches_transformers_bert_prediction_head(activation):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLMPredictionHead

    cfg = ModelConfig(arch="encoder", vocab_size=37, context_length=16, n_layer=1, n_head=2, n_embd=16,
                      activation=activation, norm="layernorm", norm_eps=1e-12, norm_position="post",
                      mlm_head=True)
    torch.manual_seed(0)
    ours = MLMHead(cfg).eval()
    with torch.no_grad():
        ours.bias.normal_()
        ours.norm.weight.normal_()
    ref = BertLMPredictionHead(BertConfig(vocab_size=37, hidden_size=16, layer_norm_eps=1e-12,
                                          hidden_act="gelu_new" if activation == "gelu_tanh" else "gelu")).eval()
    ref.transform.dense.load_state_dict(ours.dense.state_dict())
    ref.transform.LayerNorm.load_state_dict(ours.norm.state_dict())
    with torch.no_grad():
        ref.decoder.weight.copy_(ours.decoder.weight)
        ref.decoder.bias.copy_(ours.bias)  # transformers 5: the output bias is the decoder's
    h = _hidden().repeat(1, 1, 4)[..., :16]  # (B, T, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(h), ref(h), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ PPO's value model
def _decoder():
    from lmforge.model import build

    torch.manual_seed(0)
    return build(ModelConfig(arch="decoder", vocab_size=11, n_layer=1, n_head=2, n_embd=8, context_length=8))


def test_attach_value_model_shared_and_separate():
    from lmforge.model.heads import attach_value_model, value_model_of, values_of

    ids = torch.tensor([[1, 2, 3, 4]])
    shared = attach_value_model(_decoder(), "shared")
    assert value_model_of(shared) == "shared" and attach_value_model(shared, "shared") is shared  # idempotent
    with torch.no_grad():
        shared.value_head.out.weight.fill_(0.5)
    torch.testing.assert_close(values_of(shared, ids), shared.hidden_states(ids).sum(-1) * 0.5)  # (B, T)
    trunk = _decoder()
    separate = attach_value_model(_decoder(), "separate", trunk)
    assert separate.critic.trunk is trunk and values_of(separate, ids).shape == (1, 4)
    assert any(n.startswith("critic.trunk.") for n, _ in separate.named_parameters())  # the optimizer sees it
    with pytest.raises(InputError, match="already has a shared value model"):
        attach_value_model(shared, "separate", trunk)
    with pytest.raises(InputError, match="value_model: got 'twin'"):
        attach_value_model(_decoder(), "twin")
    with pytest.raises(InputError, match="needs a trunk"):
        attach_value_model(_decoder(), "separate")
    with pytest.raises(InputError, match="has no value model"):
        values_of(_decoder(), ids)


def test_captured_hidden_states_are_the_forward_pass_trunk_output():
    from lmforge.model.heads import captured_hidden_states

    model, ids = _decoder(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    with captured_hidden_states(model) as got:
        model(ids)
    torch.testing.assert_close(got["hidden"], model.hidden_states(ids))
    model(ids[:1])  # the hook is gone after the block
    assert got["hidden"].shape[0] == 2
