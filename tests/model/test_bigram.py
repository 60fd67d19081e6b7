"""lmforge.model.bigram: the next-token logits are the current token's row of the table, for every
position, the last one only, or selected positions; token ids out of range are named."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import InputError
from lmforge.model import BigramLM, KVCache, ModelConfig, build

V = 11


def _model() -> BigramLM:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="bigram", vocab_size=V, context_length=8, n_layer=1, n_head=1, n_embd=V, positional="none")
    return build(cfg).eval()


def test_logits_are_the_rows_of_the_table():
    model = _model()
    ids = torch.tensor([[3, 0, 10, 3], [1, 2, 2, 9]])
    out = model(ids)
    assert out.shape == (2, 4, V)
    for b in range(2):
        for t in range(4):
            torch.testing.assert_close(out[b, t], model.table.weight[ids[b, t]])
    torch.testing.assert_close(model(ids, last_only=True), out[:, -1:])
    keep = torch.tensor([[True, False, False, True], [False, True, False, False]])
    torch.testing.assert_close(model(ids, keep=keep), out[keep])  # (N, V)


def test_a_later_token_never_changes_earlier_logits():
    model = _model()
    a = model(torch.tensor([[1, 2, 3, 4]]))
    b = model(torch.tensor([[1, 2, 3, 7]]))
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.equal(a[:, 3], b[:, 3])


def test_cache_advances_by_the_tokens_seen():
    model = _model()
    cache = KVCache.for_model(model, batch_size=1)
    first = model(torch.tensor([[1, 2, 3]]), cache=cache)
    step = model(torch.tensor([[4]]), cache=cache)
    assert cache.length == 4  # generation's position bookkeeping works as for a decoder
    torch.testing.assert_close(torch.cat([first, step], 1), model(torch.tensor([[1, 2, 3, 4]])))


@pytest.mark.parametrize("bad", [-1, V])
def test_token_id_out_of_range_is_named(bad):
    with pytest.raises(InputError, match=f"token id {bad} is out of range: expected 0 <= id < vocab_size={V}"):
        _model()(torch.tensor([[1, bad]]))
