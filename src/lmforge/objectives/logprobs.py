"""Log-probabilities of given tokens under a model's logits, and the preference batch layout
(built by ``lmforge.tasks.dpo.preference_collate``; split again by :func:`split_chosen_rejected`).

Preference learning (DPO and its family) and RL (GRPO) score *given* completions: how likely
is this answer under the policy, under the reference? A causal LM's logits at position ``t``
are the distribution of the token at ``t + 1``, so the log-prob of a sequence is read by
shifting the tokens one place left and picking each target's log-softmax entry.

A preference batch puts the chosen and rejected completions of ``B`` pairs in one ``(2B, T)``
tensor (chosen rows first), so both go through the model in one forward pass. The prompt and the
completion are tokenized separately and concatenated: tokenizing ``prompt + completion`` as one
string can merge characters across the boundary into a token that belongs to neither, and then
"the completion's tokens" would no longer be well defined. Rows are right-padded; under a causal
mask padding at the end cannot change the logits of the real tokens before it, so no attention
mask is needed for the forward pass. Prompt and padding positions are 0 in ``completion_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.errors import InputError

__all__ = [
    "token_logprobs",
    "completion_logprobs",
    "model_completion_logits",
    "model_completion_logprobs",
    "shared_prompt_rows",
    "completion_logits",
    "batch_completion_logprobs",
    "sequence_logprobs",
    "split_chosen_rejected",
]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., target]`` for every position: (B, T, V), (B, T) -> (B, T).

    Computed as ``logit[target] - logsumexp(logits)``, which never materialises the full
    (B, T, V) log-softmax. Targets equal to -100 (ignored positions) give 0.
    """
    if logits.shape[:-1] != targets.shape:
        raise InputError(f"token_logprobs: logits {tuple(logits.shape)} and targets "
                         f"{tuple(targets.shape)} disagree; expected (..., V) and (...)")
    safe = targets.masked_fill(targets == -100, 0)  # (B, T)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    logp = picked - torch.logsumexp(logits, dim=-1)  # (B, T)
    return logp.masked_fill(targets == -100, 0.0)


def completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion tokens of ``input_ids`` and their mask.

    ``logits`` (B, T, V) come from running the model on ``input_ids`` (B, T); ``completion_mask``
    (B, T) is 1 on completion tokens. Position ``t`` of the result is the log-prob of token
    ``t + 1``, so both results are (B, T - 1); masked positions hold 0.
    """
    if input_ids.shape != completion_mask.shape or logits.shape[:2] != input_ids.shape:
        raise InputError(f"completion_logprobs: logits {tuple(logits.shape)}, input_ids "
                         f"{tuple(input_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} disagree; expected (B, T, V), (B, T), (B, T)")
    targets = input_ids[:, 1:]  # (B, T-1): the token each position predicts
    mask = completion_mask[:, 1:].to(logits.dtype)  # (B, T-1)
    logp = token_logprobs(logits[:, :-1], targets)  # (B, T-1)
    return logp * mask, mask


def model_completion_logits(model, input_ids: torch.Tensor, completion_mask: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s next-token logits at the positions that predict a completion token only, with
    the vocab-sized LM head run there alone (``model(..., keep=...)``): prompts and padding cost
    the transformer blocks but not the head. Returns ``logits`` (N, V) and ``keep`` (B, T-1), the
    bool map of those positions in the shifted layout (``keep.sum() == N``)."""
    keep = torch.zeros_like(completion_mask, dtype=torch.bool)  # (B, T)
    keep[:, :-1] = completion_mask[:, 1:].bool()  # position t predicts completion token t + 1
    return model(input_ids, keep=keep), keep[:, :-1]  # (N, V), (B, T-1)


def model_completion_logprobs(model, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                              logits_and_keep: tuple[torch.Tensor, torch.Tensor] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_logprobs` of ``model`` on ``input_ids`` through
    :func:`model_completion_logits` (or its result, when the caller already has it). Same results,
    (B, T - 1) each."""
    logits, keep = logits_and_keep or model_completion_logits(model, input_ids, completion_mask)
    targets = input_ids[:, 1:][keep]  # (N,)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N,)
    per_token = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=picked.dtype,
                            device=picked.device)  # (B, T-1)
    per_token = per_token.masked_scatter(keep, picked)
    return per_token, completion_mask[:, 1:].to(picked.dtype)


def shared_prompt_rows(input_ids: torch.Tensor, completion_mask: torch.Tensor, groups: Sequence[Sequence[int]],
                       pad_id: int) -> dict:
    """The rows of ``input_ids`` (N, T) (each a prompt, then a completion marked by
    ``completion_mask``) regrouped so that each prompt is run once: ``groups`` lists the rows that
    share a prompt (a DPO pair's chosen and rejected; GRPO's K samples). Each group becomes one row:
    the prompt, then every completion of the group, each completion seeing the prompt and itself
    only (segment -1 = the shared prefix, k = the group's k-th completion; positions continue
    from the prompt for every completion, as in its own row).

    Returns ``shared_ids``, ``shared_position_ids``, ``shared_segment_ids`` (G, T'), and
    ``shared_index`` (M,): for every completion token of ``input_ids`` in row-major order (the
    order ``completion_mask[:, 1:]`` lists them), the flat position in (G, T') whose logits
    predict it. Same logits, a prompt's transformer work done once instead of once per row.
    """
    packed, preds = [], {}
    has_completion = completion_mask.bool().any(1).tolist()  # (N,): a row without one predicts nothing
    for members in groups:
        members = [r for r in members if has_completion[r]]
        if not members:
            continue
        g = len(packed)
        start = int(completion_mask[members[0]].argmax())  # the first completion token: the prompt's length
        prompt = input_ids[members[0], :start].tolist()
        seq, pos, seg = list(prompt), list(range(start)), [-1] * start
        for k, r in enumerate(members):
            if int(completion_mask[r].argmax()) != start or input_ids[r, :start].tolist() != prompt:
                raise InputError(f"shared_prompt_rows: row {r} does not share row {members[0]}'s prompt")
            prev, preds[r] = start - 1, []  # the prompt's last position predicts the first token
            for j, tok in enumerate(input_ids[r][completion_mask[r].bool()].tolist()):
                preds[r].append((g, prev))
                prev = len(seq)
                seq.append(tok)
                pos.append(start + j)
                seg.append(k + 1)
        packed.append((seq, pos, seg))
    if not packed:
        return {}
    width = max(len(x[0]) for x in packed)
    ids = torch.full((len(packed), width), pad_id, dtype=torch.long)  # (G, T')
    positions = torch.zeros(len(packed), width, dtype=torch.long)  # (G, T')
    segments = torch.zeros(len(packed), width, dtype=torch.long)  # (G, T'): 0 on padding
    for g, (seq, pos, seg) in enumerate(packed):
        n = len(seq)
        ids[g, :n], positions[g, :n], segments[g, :n] = torch.tensor(seq), torch.tensor(pos), torch.tensor(seg)
    index = [g * width + i for r in sorted(preds) for g, i in preds[r]]
    return {"shared_ids": ids.to(input_ids.device), "shared_position_ids": positions.to(input_ids.device),
            "shared_segment_ids": segments.to(input_ids.device),
            "shared_index": torch.tensor(index, dtype=torch.long, device=input_ids.device)}


def completion_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`model_completion_logits` of a batch (``input_ids``, ``completion_mask``), through its
    shared-prompt rows (:func:`shared_prompt_rows`) when it has them: logits (M, V), keep (N, T-1)."""
    if "shared_ids" not in batch:
        return model_completion_logits(model, batch["input_ids"], batch["completion_mask"])
    logits = model(batch["shared_ids"], position_ids=batch["shared_position_ids"],
                   segment_ids=batch["shared_segment_ids"], keep=batch["shared_index"])  # (M, V)
    return logits, batch["completion_mask"][:, 1:].bool()


def batch_completion_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`model_completion_logprobs` of a batch through :func:`completion_logits` (its
    shared-prompt rows when it has them): per-token log-probs and mask, (N, T-1) each."""
    return model_completion_logprobs(model, batch["input_ids"], batch["completion_mask"],
                                     completion_logits(model, batch))


def sequence_logprobs(logits: torch.Tensor | None, input_ids: torch.Tensor,
                      completion_mask: torch.Tensor, average: bool = False, model=None,
                      logits_and_keep: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each row's completion, summed (or averaged per token), and its token count.

    From ``logits`` (B, T, V), or with ``logits=None`` from ``model`` run here on the completion
    positions only (:func:`model_completion_logprobs`; ``logits_and_keep``: already computed,
    e.g. by :func:`completion_logits`). Returns ``(logps (B,), counts (B,))``.
    With ``average=True`` a row without completion tokens gives 0 rather than 0/0.
    """
    if logits is None:  # (B, T-1) each
        per_token, mask = model_completion_logprobs(model, input_ids, completion_mask, logits_and_keep)
    else:
        per_token, mask = completion_logprobs(logits, input_ids, completion_mask)  # (B, T-1) each
    total = per_token.sum(-1)  # (B,)
    counts = mask.sum(-1)  # (B,)
    if average:
        total = total / counts.clamp(min=1)
    return total, counts


def split_chosen_rejected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (2B, ...) tensor laid out by ``lmforge.tasks.dpo.preference_collate`` into chosen and rejected."""
    if x.shape[0] % 2:
        raise InputError(f"split_chosen_rejected: the batch dimension {x.shape[0]} is odd; "
                         f"expected chosen rows followed by as many rejected rows")
    half = x.shape[0] // 2
    return x[:half], x[half:]
