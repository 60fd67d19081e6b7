"""Shared pieces of the inspection tools: finding a model, encoding a text, labelling tokens,
and drawing/saving figures without pyplot.

Every tool works on an lmforge model (decoder, encoder, imported weights) and its tokenizer, as
``lmforge.store`` loads it from any name (a run folder gives its best, else newest, checkpoint).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from lmforge.errors import InputError
from lmforge.model.layers import Attention


# ----------------------------------------------------------------------------------- models
def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention layers of ``model`` in order (one per block); a model without any (bigram)
    is an InputError."""
    found = [m for m in model.modules() if isinstance(m, Attention)]
    if not found:
        arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
        raise InputError(f"this model ({arch}) has no attention layers; expected a decoder or encoder transformer")
    return found


def pick(indices: list[int] | None, n: int, what: str) -> list[int]:
    """``indices`` checked against ``range(n)`` (negative counts from the end); None means all."""
    if indices is None:
        return list(range(n))
    out = []
    for i in indices:
        if not -n <= i < n:
            raise InputError(f"{what} {i} is out of range: the model has {n} {what}s (0..{n - 1})")
        out.append(i % n)
    return out


def parse_indices(spec: str | None) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7] ('-1' is the last); None or '' -> None (all)."""
    if not spec:
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            out.extend(range(int(m.group(1)), int(m.group(2)) + 1))
        elif re.fullmatch(r"-?\d+", part):
            out.append(int(part))
        else:
            raise InputError(f"{spec!r}: expected indices like '0,2,5-7'")
    return out


# ------------------------------------------------------------------------------------ texts
def encode_text(model: nn.Module, tokenizer, text: str, add_bos: bool = False) -> torch.Tensor:
    """Token ids (1, T) of ``text`` on the model's device; empty or too long texts are InputErrors."""
    if not isinstance(text, str) or not text:
        raise InputError("text: got an empty text; expected at least one token")
    ids = tokenizer.encode(text, add_bos=add_bos)
    limit = model.config.context_length
    if len(ids) > limit:
        raise InputError(f"text is {len(ids)} tokens long, longer than the model's context_length {limit}; "
                         f"shorten it to at most {limit} tokens")
    if not ids:
        raise InputError("text: encodes to no tokens; expected at least one")
    device = next(model.parameters()).device
    return torch.tensor([ids], dtype=torch.long, device=device)


_VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}


def token_label(tokenizer, i: int) -> str:
    """A printable label of token ``i``: spaces as '·', newlines as '↵' (so they can be seen); an
    id the tokenizer does not know (a model vocabulary padded beyond it) is '<id N>'."""
    if not 0 <= i < tokenizer.vocab_size:
        return f"<id {i}>"
    s = tokenizer.decode([i], skip_special_tokens=False)
    if not s or s == "\ufffd":  # part of a multi-byte character
        s = tokenizer.id_to_token(i)
    return "".join(_VISIBLE.get(c, c) for c in s)


def token_labels(tokenizer, ids) -> list[str]:
    return [token_label(tokenizer, int(i)) for i in ids]


def token_texts(tokenizer, ids) -> list[str]:
    """Each token's own text (for HTML, where spaces and newlines are kept as they are)."""
    out = []
    for i in ids:
        s = tokenizer.decode([int(i)], skip_special_tokens=False)
        out.append(s if s and s != "\ufffd" else tokenizer.id_to_token(int(i)))
    return out


# ---------------------------------------------------------------------------------- figures
def label_fontsize(n: int) -> float:
    """Tick-label size for n labels along one axis: small enough to fit, large enough to read."""
    return max(4.0, min(10.0, 420.0 / max(n, 1)))
