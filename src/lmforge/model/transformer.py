"""Transformer = embeddings + blocks + final norm. DecoderLM and Encoder are thin wrappers.

A decoder is causal and ends in a language-model head; an encoder is bidirectional, takes a padding
mask and token types, and offers an MLM head and a pooled output. Both use the same ``Block``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.heads import ClassificationHead, MLMHead, pool
from lmforge.model.layers import Block, KVCache, RotaryEmbedding, dropout, init_weights, make_norm
from lmforge.model.moe import MoE, router_stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd) if cfg.positional == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.n_embd) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.rope = None  # RoPE (rope_scaling applies to it)
        self.rope_local = None  # sliding-window layers' own plain RoPE (Gemma 3: base 10k, global layers 1e6)
        if cfg.positional == "rope":
            self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            if cfg.has_local_layers and cfg.rope_local_theta is not None:
                self.rope_local = RotaryEmbedding(cfg.head_dim, cfg.rope_local_theta)
        # Gemma: embeddings times sqrt(C), rounded to the weights' dtype as transformers does
        self.embed_scale = math.sqrt(cfg.n_embd) if cfg.scale_embeddings else None
        self.drop = nn.Dropout(cfg.dropout)
        # a mixture of experts replaces the MLP of the layers the config names (moe.py)
        self.blocks = nn.ModuleList(Block(cfg, i, MoE(cfg) if cfg.is_moe_layer(i) else None)
                                    for i in range(cfg.n_layer))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else None  # post-LN ends normed
        self.check_inputs = True  # validate ids/lengths; the trainer turns it off once data is checked
        self.unpad = True  # encoders skip padding tokens (see _unpadded_blocks); False: the padded path
        self.unpad_tokens = 1024  # at most this many tokens attend together in one unpadded group

    def _check(self, input_ids: torch.Tensor, past: int, packed_positions: torch.Tensor | None = None) -> None:
        cfg = self.config
        if input_ids.dim() != 2:
            raise InputError(f"input_ids: expected shape (batch, time), got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if packed_positions is not None:  # packed rows: each token sees at most its position + 1 tokens
            T = int(packed_positions.max()) + 1 if packed_positions.numel() else 0
        limit_hit = T > cfg.context_length if self.pos_emb is None else past + T > cfg.context_length
        if limit_hit:
            raise InputError(f"sequence of {past + T} tokens is longer than the model's context_length "
                             f"{cfg.context_length}")
        if input_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(input_ids))  # one pass, not two
            if lo < 0 or hi >= cfg.vocab_size:
                bad = hi if hi >= cfg.vocab_size else lo
                raise InputError(f"token id {bad} is out of range: expected 0 <= id < vocab_size={cfg.vocab_size}")

    def forward(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None,
                cache: KVCache | None = None, segment_ids=None) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, C).

        attention_mask (B, S) marks real tokens with 1 and padding with 0; with a cache it covers
        the cached positions too (S = past + T). position_ids default to the count of real tokens
        before each position, so left-padded prompts get the same positions as unpadded ones.
        segment_ids (B, T) number the documents packed into a row: a token attends only to earlier
        tokens of its own segment (a block-diagonal causal mask; no cache). Pass position_ids
        restarting at 0 per segment with them. Segment -1 is a shared prefix: every later token of
        the row sees it (K completions of one prompt packed after a single copy of the prompt).
        """
        cfg = self.config
        past = cache.length if cache is not None else 0
        if self.check_inputs and not torch.compiler.is_compiling():
            self._check(input_ids, past, position_ids if segment_ids is not None else None)
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is not None and cfg.causal:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:  # (1, T): broadcast over the batch, no per-row copies
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]

        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.embed_scale is not None:
            x = x * x.new_tensor(self.embed_scale)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        if self.type_emb is not None:
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_emb(tt)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = dropout(self.drop, x)
        rope = self.rope(position_ids) if self.rope is not None else None
        rope_local = self.rope_local(position_ids) if self.rope_local is not None else rope

        if segment_ids is not None and (cache is not None or not cfg.causal):
            raise InputError("segment_ids (packed documents) need a causal model and no KV cache")
        if self._can_unpad(attention_mask, cache):
            x = self._unpadded_blocks(x, attention_mask)
            return self.norm(x) if self.norm is not None else x
        mask, is_causal = self._mask(attention_mask, B, T, past, x.device, segment_ids)
        local = None  # sliding-window layers: their own mask (a band) and RoPE
        if cfg.sliding_window is not None and any(b.attn.local for b in self.blocks):
            local = self._mask(attention_mask, B, T, past, x.device, segment_ids, cfg.sliding_window)
        for block in self.blocks:
            if block.attn.local:
                x = block(x, rope_local, *local, cache)
            else:
                x = block(x, rope, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x) if self.norm is not None else x

    def _can_unpad(self, attention_mask, cache) -> bool:
        """An encoder with padding skips it (below) unless attention weights are being recorded."""
        if not self.unpad or self.config.causal or attention_mask is None or cache is not None:
            return False
        if any(b.attn.record_weights for b in self.blocks):
            return False
        return not bool(attention_mask.bool().all())

    def _unpadded_blocks(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The blocks on real tokens only: an encoder's linear layers do no work on padding.

        The real tokens of several rows go through the blocks as one long row, each attending only
        to tokens of its own sentence (a block-diagonal mask); positions and token types were
        already added per row, so every token sees what it would see padded. Rows are grouped so a
        group holds at most ``unpad_tokens`` tokens (attention grows with the square of a group).
        Padding positions come back as zeros (pooling and heads never read them).
        """
        B, T, C = x.shape
        keep = attention_mask.bool()  # (B, T)
        flat = x.reshape(B * T, C)
        out = x.new_zeros(B * T, C)
        for rows in _row_groups(keep.sum(1).tolist(), max(self.unpad_tokens, T)):
            idx = keep[rows].reshape(-1).nonzero().squeeze(1) + rows.start * T  # (N,) flat token index
            seq = idx // T  # (N,) the row of each token
            h = flat.index_select(0, idx)[None]  # (1, N, C)
            mask, _ = self._mask(None, 1, len(idx), 0, x.device, seq[None])  # (1, 1, N, N) block-diagonal
            for block in self.blocks:
                h = block(h, None, mask, False, None)
            out = out.index_copy(0, idx, h[0])
        return out.view(B, T, C)

    def _mask(self, attention_mask, B, T, past, device, segment_ids=None, window: int | None = None):
        """The attention mask for SDPA: None + is_causal on the fast path, else bool (B, 1, T, S).

        ``window`` (sliding-window layers): a query at slot i also sees only keys at slots
        i - window < j, so window keys itself included, as transformers counts. Slots are cache
        positions, padding included: with padding only at the edges of each row (left-padded
        prompts, right-padded batches) the distance between two real tokens is the same.
        """
        S = past + T
        if window is not None and S <= window:  # nothing is out of reach yet: the plain causal mask
            window = None
        same = None  # packed rows: a token sees only tokens of its own segment
        if segment_ids is not None:
            same = (segment_ids[:, :, None] == segment_ids[:, None, :]) | (segment_ids[:, None, :] == -1)
            same = same[:, None]  # (B, 1, T, T): own segment, or the shared prefix
        if not self.config.causal:
            if same is not None:  # (unpadded encoder rows)
                return same, False
            if attention_mask is None:
                return None, False
            return attention_mask.bool()[:, None, None, :].expand(B, 1, T, S), False
        if attention_mask is None and segment_ids is None and window is None and (past == 0 or T == 1):
            return None, T > 1  # plain causal, or one new token that may see everything
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if window is not None:  # a band of the latest window keys (Gemma 3 local layers)
            allowed = allowed & (k_pos > q_pos - window)[None, None]
        if same is not None:  # block-diagonal causal (past == 0, so S == T)
            allowed = allowed & same  # (B, 1, T, T)
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, None, :S]  # (B, 1, 1, S)
            # a padding query would see no key at all (NaN); let every query see itself
            allowed = (allowed & keys) | (k_pos == q_pos)[None, None]
        return allowed.expand(B, 1, T, S), False


def _row_groups(lengths: list[int], budget: int) -> list[slice]:
    """Consecutive rows in groups of at most ``budget`` real tokens (a longer row is a group alone)."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > budget:
            groups.append(slice(start, i))
            start, total = i, 0
        total += n
    groups.append(slice(start, len(lengths)))
    return groups


class DecoderLM(nn.Module):
    """Causal language model: ``model(input_ids) -> logits (B, T, vocab)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.classifier = ClassificationHead(cfg.n_embd, cfg.num_classes, cfg.pooling) if cfg.num_classes else None
        init_weights(self, cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.tok_emb.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                last_only: bool = False, head: str | None = None, segment_ids=None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab); ``head="cls"`` returns class logits (B, num_classes).
        ``segment_ids`` (B, T): documents packed into one row attend only within themselves.
        ``keep`` (B, T) bool, or (N,) indices into the flattened B*T positions (repeats allowed):
        only those positions go through the LM head, giving (N, vocab) -- a fine-tuning loss on
        response tokens skips the head's cost at prompt and padding tokens."""
        h = self.transformer(input_ids, attention_mask, position_ids, cache=cache,
                             segment_ids=segment_ids)  # (B, T, C)
        if self.config.n_experts and cache is None:  # router losses and usage, for the objective (moe.py)
            self.router_stats = router_stats(self.transformer.blocks, self.config, attention_mask)
        if head is not None:
            return _classify(self, h, attention_mask, head)
        if last_only:  # generation needs only the next-token distribution
            h = h[:, -1:]
        if keep is not None:
            h = h[keep] if keep.dtype == torch.bool else h.reshape(-1, h.shape[-1]).index_select(0, keep)  # (N, C)
        logits = self.lm_head(h)  # (B, T, vocab) or (N, vocab)
        cap = self.config.logit_softcap
        if cap is not None:  # Gemma 2/3 option: squash the logits into (-cap, cap)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        return self.transformer(input_ids, attention_mask, position_ids)


class Encoder(nn.Module):
    """Bidirectional encoder (BERT style): ``model(input_ids, attention_mask) -> hidden (B, T, C)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.mlm = MLMHead(cfg) if cfg.mlm_head else None
        self.classifier = ClassificationHead(cfg.n_embd, cfg.num_classes, cfg.pooling) if cfg.num_classes else None
        init_weights(self, cfg)
        if self.mlm is not None and cfg.tie_embeddings:
            self.mlm.decoder.weight = self.transformer.tok_emb.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, head: str | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, C); ``head="mlm"`` returns masked-LM logits (B, T, vocab) instead,
        ``head="cls"`` class logits (B, num_classes). (Objectives call heads through forward, so
        DDP and torch.compile wrappers see the call.)"""
        h = self.transformer(input_ids, attention_mask, token_type_ids=token_type_ids)
        if head is None:
            return h
        if head == "cls":
            return _classify(self, h, attention_mask, head)
        if head != "mlm":
            raise InputError(f"head: got {head!r}, expected None, 'mlm' or 'cls'")
        if self.mlm is None:
            raise InputError("this encoder has no masked-LM head (model.mlm_head: false)")
        if positions is not None:  # only the predicted positions: (N, C) -> (N, vocab), ~7x less head work at 15%
            return self.mlm(h[positions])
        return self.mlm(h)

    def mlm_logits(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self(input_ids, attention_mask, token_type_ids, head="mlm")  # (B, T, vocab)

    def pooled(self, input_ids, attention_mask=None, token_type_ids=None, method: str | None = None):
        h = self(input_ids, attention_mask, token_type_ids)
        return pool(h, attention_mask, method or self.config.pooling)  # (B, C)


def _classify(model: nn.Module, h: torch.Tensor, attention_mask, head: str) -> torch.Tensor:
    """Class logits (B, num_classes) from hidden states (B, T, C) through the model's classifier."""
    if head != "cls":
        raise InputError(f"head: got {head!r}, expected None or 'cls'")
    if model.classifier is None:
        raise InputError("this model has no classification head (model.num_classes: 0)")
    return model.classifier(h, attention_mask)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; ``targets`` are already shifted (targets[t] = input[t+1])."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index)
