"""Tests for lmforge.embeddings: pooled, normalised sentence vectors from an encoder."""

from __future__ import annotations

import pytest
import torch

from lmforge.embeddings import embed
from lmforge.errors import InputError
from lmforge.model import build
from lmforge.tokenizer import ByteTokenizer

ENC = {"arch": "encoder", "vocab_size": 300, "context_length": 64, "n_layer": 1, "n_head": 2, "n_embd": 16,
       "norm_position": "post", "embedding_norm": True, "pooling": "mean"}


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return build(ENC).eval()


def test_each_text_embeds_as_it_would_alone(enc):
    tok = ByteTokenizer()
    texts = ["a", "a longer sentence here", "mid length"]
    batch = embed(enc, tok, texts, batch_size=2)  # two batches, padded differently
    assert batch.shape == (3, 16)
    for i, t in enumerate(texts):
        assert torch.allclose(batch[i], embed(enc, tok, t), atol=1e-5)
    assert torch.allclose(batch.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_matches_manual_pooling(enc):
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("hello")])
    with torch.no_grad():
        h = enc(ids)  # (1, T, C)
    for pooling, vec in (("mean", h.mean(1)[0]), ("cls", h[0, 0]), ("last", h[0, -1])):
        assert torch.allclose(embed(enc, tok, "hello", pooling=pooling, normalize=False), vec, atol=1e-5)


def test_bad_input(enc):
    tok = ByteTokenizer()
    with pytest.raises(InputError, match="expected an encoder"):
        embed(build({**ENC, "arch": "decoder", "norm_position": "pre", "embedding_norm": False}), tok, "x")
    with pytest.raises(InputError, match="non-empty list of str"):
        embed(enc, tok, [])
