"""Sentence embeddings from an encoder: ``embed(model, tokenizer, ["a sentence", ...])``.

The recipe sentence-transformers uses for models such as all-MiniLM-L6-v2: tokenize each text
with the tokenizer's own special tokens (``[CLS] ... [SEP]``), run the encoder on a right-padded
batch with an attention mask, pool the hidden states (mean over real tokens by default: the
model's ``pooling``), and scale each vector to unit length so a dot product is the cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import InputError
from lmforge.model.heads import pool

__all__ = ["embed"]


@torch.inference_mode()
def embed(model, tokenizer, texts: str | list[str], *, pooling: str | None = None, normalize: bool = True,
          batch_size: int = 32, max_length: int | None = None) -> torch.Tensor:
    """Embeddings (N, C) of ``texts`` (a str gives (C,)) on the model's device, in float32.

    ``pooling``: mean, cls or last (default: the model's ``config.pooling``); ``max_length``
    keeps the first ``max_length`` ids of each tokenized text (default: the model's
    ``context_length``; a text cut there loses its closing ``[SEP]``, where sentence-transformers
    truncates inside it: the two agree on texts that fit).
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    cfg = getattr(model, "config", None)
    if getattr(cfg, "arch", None) != "encoder":
        raise InputError(f"embed: expected an encoder model (arch 'encoder'), got arch "
                         f"{getattr(cfg, 'arch', None)!r}")
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError("embed: expected a str or a non-empty list of str")
    max_length = max_length or cfg.context_length
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        rows = [ids[:max_length] for ids in tokenizer.encode_batch(texts[i:i + batch_size])]
        T = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)  # (B, T)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)  # (B, T)
        hidden = model(ids, attention_mask=mask)  # (B, T, C)
        vec = pool(hidden, mask, pooling or cfg.pooling).float()  # (B, C)
        out.append(F.normalize(vec, dim=-1) if normalize else vec)
    result = torch.cat(out)  # (N, C)
    return result[0] if single else result
