"""Log-prob extraction against a naive per-token loop (and TRL), and the preference batch layout."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lmforge.errors import DataError, InputError
from lmforge.model import ModelConfig, build
from lmforge.objectives.logprobs import (
    completion_logprobs, model_completion_logprobs, sequence_logprobs, split_chosen_rejected, token_logprobs,
)
from lmforge.tasks.dpo import preference_collate, tokenize_pair

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL is only an oracle here

V = 11
PAD = 0


def naive_sequence_logprobs(logits, input_ids, completion_mask):
    """One token at a time, with softmax written out: sum of log p(token t+1 | logits at t)."""
    sums, counts = [], []
    for b in range(input_ids.shape[0]):
        total, n = 0.0, 0
        for t in range(input_ids.shape[1] - 1):
            if completion_mask[b, t + 1]:
                row = logits[b, t].tolist()
                z = sum(math.exp(v) for v in row)
                total += math.log(math.exp(row[int(input_ids[b, t + 1])]) / z)
                n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


def random_batch(seed=0, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[0, 3:9] = 1   # completion to the end
    mask[1, 5:7] = 1   # padding after it
    mask[2, 1:2] = 1   # a single completion token
    return logits, ids, mask


def test_sequence_logprobs_match_a_naive_loop():
    logits, ids, mask = random_batch()
    sums, counts = sequence_logprobs(logits, ids, mask)
    ref_sums, ref_counts = naive_sequence_logprobs(logits, ids, mask)
    assert sums.tolist() == pytest.approx(ref_sums, abs=1e-10)
    assert counts.tolist() == ref_counts == [6, 2, 1]
    avg, _ = sequence_logprobs(logits, ids, mask, average=True)
    assert avg.tolist() == pytest.approx([s / n for s, n in zip(ref_sums, ref_counts)], abs=1e-10)


def test_model_logprobs_run_the_head_on_completion_positions_only_with_the_same_results():
    _, ids, mask = random_batch()
    model = build(ModelConfig(vocab_size=V, context_length=16, n_layer=1, n_head=2, n_embd=8)).double()
    logits = model(ids)  # (B, T, V)
    want, want_mask = completion_logprobs(logits, ids, mask)
    got, got_mask = model_completion_logprobs(model, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_mask, want_mask)
    sums, counts = sequence_logprobs(None, ids, mask, model=model)
    ref_sums, ref_counts = naive_sequence_logprobs(logits.detach(), ids, mask)
    assert sums.tolist() == pytest.approx(ref_sums, abs=1e-10) and counts.tolist() == ref_counts
    sums.sum().backward()  # gradients flow through the scattered positions
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_rows_without_completion_tokens_average_to_zero():
    logits, ids, mask = random_batch()
    mask[1] = 0
    avg, counts = sequence_logprobs(logits, ids, mask, average=True)
    assert float(avg[1]) == 0.0 and float(counts[1]) == 0.0


def test_token_logprobs_ignore_index_and_shape_check():
    logits, ids, _ = random_batch()
    targets = ids.clone()
    targets[0, :4] = -100
    out = token_logprobs(logits, targets)
    assert (out[0, :4] == 0).all()
    full = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out[1:], full[1:])
    with pytest.raises(InputError, match="disagree"):
        token_logprobs(logits, targets[:, :-1])


def test_completion_logprobs_are_masked_and_shifted():
    logits, ids, mask = random_batch()
    per_token, m = completion_logprobs(logits, ids, mask)
    assert per_token.shape == m.shape == (3, 8)
    assert m[1].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]  # mask[1, 5:7] shifted one left
    assert (per_token[m == 0] == 0).all()


def test_matches_trl_batch_logps():
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.trainer.utils import selective_log_softmax

    logits, ids, mask = random_batch(seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    for average in (False, True):
        ours, _ = sequence_logprobs(logits, ids, mask, average=average)
        theirs = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token_logprobs(logits, ids), selective_log_softmax(logits, ids),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Preference collate
# ---------------------------------------------------------------------------------------------

PAIRS = [
    ([5, 6, 7], [8, 9], [3]),          # prompt 3, chosen 2, rejected 1
    ([4], [2, 2, 2, 2], [9, 8, 7]),     # prompt 1, chosen 4, rejected 3
]


def test_collate_layout_and_masks():
    b = preference_collate(PAIRS, pad_id=PAD)
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],      # chosen 0
        [4, 2, 2, 2, 2],      # chosen 1
        [5, 6, 7, 3, 0],      # rejected 0 (padded)
        [4, 9, 8, 7, 0],      # rejected 1 (padded)
    ]
    assert b["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 0, 0, 1, 0],      # prompt and padding masked
        [0, 1, 1, 1, 0],
    ]
    assert b["attention_mask"].tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert b["prompt_lengths"].tolist() == [3, 1, 3, 1] and b["truncated"] == 0
    chosen, rejected = split_chosen_rejected(b["input_ids"])
    assert chosen.tolist()[0] == [5, 6, 7, 8, 9] and rejected.tolist()[1] == [4, 9, 8, 7, 0]


def test_collate_counts_only_completion_tokens():
    b = preference_collate(PAIRS, pad_id=PAD)
    logits = torch.zeros(4, 5, V)  # uniform: every token has log-prob -log V
    sums, counts = sequence_logprobs(logits, b["input_ids"], b["completion_mask"])
    assert counts.tolist() == [2, 4, 1, 3]
    assert sums.tolist() == pytest.approx([-n * math.log(V) for n in (2, 4, 1, 3)])


def test_collate_truncates_completions_and_rejects_long_prompts():
    b = preference_collate(PAIRS, pad_id=PAD, max_length=4)
    assert b["input_ids"].shape == (4, 4) and b["truncated"] == 2  # chosen 0 and chosen 1
    assert b["completion_mask"].sum(1).tolist() == [1, 3, 1, 3]
    with pytest.raises(InputError, match="pair 0: the prompt has 3 tokens"):
        preference_collate(PAIRS, pad_id=PAD, max_length=3)
    with pytest.raises(DataError, match="pair 1: the rejected completion has no tokens"):
        preference_collate([PAIRS[0], ([1], [2], [])], pad_id=PAD)
    with pytest.raises(InputError, match="expected at least one"):
        preference_collate([], pad_id=PAD)
    with pytest.raises(InputError, match="pair 0: the prompt must be a list of token ids"):
        preference_collate([([1, -2], [3], [4])], pad_id=PAD)


def test_one_stacked_forward_equals_separate_unpadded_forwards():
    """Right padding under a causal mask leaves the real tokens' log-probs unchanged."""
    torch.manual_seed(0)
    model = build(ModelConfig(arch="decoder", vocab_size=V, context_length=16, n_layer=1, n_head=2,
                              n_embd=16)).eval()
    b = preference_collate(PAIRS, pad_id=PAD)
    with torch.no_grad():
        stacked, _ = sequence_logprobs(model(b["input_ids"]), b["input_ids"], b["completion_mask"])
        for row in range(4):
            n = int(b["attention_mask"][row].sum())
            ids = b["input_ids"][row:row + 1, :n]
            alone, _ = sequence_logprobs(model(ids), ids, b["completion_mask"][row:row + 1, :n])
            assert float(alone) == pytest.approx(float(stacked[row]), abs=1e-5)


def test_tokenize_pair_encodes_prompt_and_completions_separately():
    from lmforge.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    p, c, r = tokenize_pair(tok, "Q: 2+2?", " 4", " 5")
    assert p == tok.encode("Q: 2+2?") and c == tok.encode(" 4") + [tok.eos_id]
    assert r[-1] == tok.eos_id and tok.decode(r) == " 5"
    b = preference_collate([(p, c, r)], pad_id=0)
    assert b["completion_mask"][0].tolist() == [0] * len(p) + [1] * len(c)  # eos is scored


def test_step0_with_a_frozen_copy_is_ln2_and_dpo_steps_open_a_margin():
    """The whole chain: collate -> one forward -> sequence log-probs -> DPO loss."""
    import copy

    from lmforge.objectives.preference_losses import PairLogps, preference_loss

    torch.manual_seed(0)
    policy = build(ModelConfig(arch="decoder", vocab_size=V, context_length=16, n_layer=1,
                               n_head=2, n_embd=16))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    b = preference_collate(PAIRS, pad_id=PAD)
    with torch.no_grad():
        ref_sum, ref_n = sequence_logprobs(reference(b["input_ids"]), b["input_ids"], b["completion_mask"])
    ref = PairLogps(*split_chosen_rejected(ref_sum), *split_chosen_rejected(ref_n))
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    margins = []
    for step in range(4):
        logps, n = sequence_logprobs(policy(b["input_ids"]), b["input_ids"], b["completion_mask"])
        out = preference_loss("sigmoid", PairLogps(*split_chosen_rejected(logps),
                                                   *split_chosen_rejected(n)), ref, beta=0.5)
        if step == 0:
            assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
            assert out.metrics()["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        margins.append(out.metrics()["rewards/margins"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert margins[-1] > margins[0] + 0.05 and out.metrics()["rewards/accuracy"] == 1.0
