# %% [markdown]
# # 11 · DPO: learning from preferences
#
# Sometimes we cannot write the right answer, but we can say which of two answers is better.
# Direct Preference Optimization (DPO, Rafailov et al. 2023) trains on such pairs
# `(prompt x, chosen y_w, rejected y_l)` with no reward model and no sampling:
#
# 1. score each completion by its **log-probability** under the policy being trained, `log π(y|x)`
#    (the sum of its tokens' log-probs), and under a frozen copy, the **reference** `log π_ref(y|x)`;
# 2. the *implicit reward* of a completion is `β · (log π(y|x) - log π_ref(y|x))`: how much more
#    likely the policy made it than the reference did;
# 3. the loss is `-log σ(reward(y_w) - reward(y_l))`: a logistic loss that the chosen completion's
#    reward beat the rejected one's. `β` sets how far from the reference the policy may go.
#
# At the start the policy *is* the reference, every reward is 0 and the loss is `ln 2`. We write the
# batch layout, the sequence log-probs and the loss by hand, check each against lmforge
# (`lmforge.tasks.dpo`, `lmforge.objectives.logprobs`, `lmforge.objectives.preference_losses`), then train on built-in
# arithmetic pairs: the right answer chosen, a plausible wrong one rejected.

# %%
import copy
import math
import tempfile

import torch
import torch.nn.functional as F

from lmforge.data.builtin_tasks import arithmetic_preference_pairs
from lmforge.model import DecoderLM, ModelConfig
from lmforge.objectives.logprobs import sequence_logprobs
from lmforge.objectives.preference_losses import sigmoid_loss
from lmforge.store import save_model
from lmforge.tasks import config_from_dict
from lmforge.tasks.dpo import preference_collate, tokenize_pair
from lmforge.tasks.run import run
from lmforge.tokenizer import CharTokenizer

torch.manual_seed(0)
pairs = arithmetic_preference_pairs(440, seed=0, max_operand=9, ops="+")
train_pairs, test_pairs = pairs[:400], pairs[400:]
print(pairs[0])
tok = CharTokenizer.train(["0123456789 What is+? Answer:"])

# %% [markdown]
# ## The batch: chosen rows, then rejected rows
#
# Both completions of a pair go through the model in one forward pass: rows `0..B-1` are
# `prompt + chosen + <eos>`, rows `B..2B-1` are `prompt + rejected + <eos>`, right-padded. A
# `completion_mask` marks the completion tokens, the only ones scored.

# %%
def encode(p):
    return tok.encode(p["prompt"]), tok.encode(p["chosen"]) + [tok.eos_id], tok.encode(p["rejected"]) + [tok.eos_id]


def collate_by_hand(batch_pairs):
    encoded = [encode(p) for p in batch_pairs]
    rows = [(pr, ch) for pr, ch, _ in encoded] + [(pr, rj) for pr, _, rj in encoded]  # chosen first
    width = max(len(pr) + len(c) for pr, c in rows)
    ids = torch.full((len(rows), width), tok.pad_id)  # (2B, T)
    completion_mask = torch.zeros(len(rows), width, dtype=torch.long)  # (2B, T)
    for r, (pr, c) in enumerate(rows):
        ids[r, :len(pr) + len(c)] = torch.tensor(pr + c)
        completion_mask[r, len(pr):len(pr) + len(c)] = 1
    return ids, completion_mask


ids, completion_mask = collate_by_hand(train_pairs[:4])
lm = preference_collate([tokenize_pair(tok, p["prompt"], p["chosen"], p["rejected"]) for p in train_pairs[:4]],
                        pad_id=tok.pad_id)
assert torch.equal(ids, lm["input_ids"]) and torch.equal(completion_mask, lm["completion_mask"])
print(ids.shape)
for row in (0, 4):  # pair 0: its chosen row, then its rejected row
    print(tok.decode(ids[row].tolist(), skip_special_tokens=False))

# %% [markdown]
# ## Sequence log-probabilities
#
# The logits at position `t` score token `t + 1`. Shift, take each actual token's log-softmax entry,
# keep the completion tokens and sum per row.

# %%
def sequence_logps_by_hand(logits, ids, completion_mask):
    logp = logits[:, :-1].log_softmax(dim=-1)  # (2B, T-1, V): position t predicts token t+1
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (2B, T-1): log p of each actual token
    return (picked * completion_mask[:, 1:]).sum(-1)  # (2B,): summed over completion tokens


cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=2, n_head=4, n_embd=64)
policy = DecoderLM(cfg).double()
reference = copy.deepcopy(policy)
with torch.no_grad():  # move the policy away from the reference, so the check is not at the trivial point
    for p in policy.parameters():
        p.add_(0.02 * torch.randn_like(p))
    logits, ref_logits = policy(ids), reference(ids)  # (2B, T, V) each
    logps = sequence_logps_by_hand(logits, ids, completion_mask)  # (2B,)
    ref_logps = sequence_logps_by_hand(ref_logits, ids, completion_mask)  # (2B,)
    lm_logps, counts = sequence_logprobs(logits, ids, completion_mask)  # (2B,), (2B,)
assert torch.allclose(logps, lm_logps, atol=1e-6, rtol=0)
print("completion tokens per row", counts.tolist())

# %% [markdown]
# ## The DPO loss
#
# `h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))`, loss `-log σ(β h)`, averaged
# over pairs. `F.logsigmoid` computes `log σ` without overflow.

# %%
beta = 0.1
B = len(ids) // 2
chosen, rejected = logps[:B], logps[B:]  # (B,) each
ref_chosen, ref_rejected = ref_logps[:B], ref_logps[B:]
h = (chosen - ref_chosen) - (rejected - ref_rejected)  # (B,)
loss_hand = -F.logsigmoid(beta * h).mean()

out = sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
print(f"DPO loss by hand {loss_hand.item():.8f}  lmforge {out.loss.item():.8f}")
assert abs(loss_hand.item() - out.loss.item()) < 1e-6
assert torch.allclose(out.chosen_rewards, beta * (chosen - ref_chosen), atol=1e-6, rtol=0)

same = sigmoid_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected, beta=beta)  # policy == reference
assert abs(same.loss.item() - math.log(2)) < 1e-6
print("policy == reference: loss", same.loss.item(), "= ln 2")

# %% [markdown]
# ## Training
#
# DPO starts from a model that already answers in the right format (the reference is usually the
# instruction-tuned model). So: 150 quick SFT steps on the chosen answers (notebook 10's loss), then
# DPO against a frozen copy of that model. We watch, on the last 40 pairs (never trained on; with
# only 100 distinct sums, their prompts can also occur in training with other wrong answers), the
# **reward accuracy** (how often the chosen completion gets the larger implicit reward) and the mean
# **margin**, both 0 at the start.

# %%
def sft_step(model, opt, batch_pairs):
    ids, mask = collate_by_hand(batch_pairs)
    ids, mask = ids[:len(batch_pairs)], mask[:len(batch_pairs)]  # the chosen rows only
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1): completion tokens only
    logits = model(ids[:, :-1])  # (B, T-1, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def dpo_loss(policy, reference, batch_pairs):
    ids, mask = collate_by_hand(batch_pairs)
    logps = sequence_logps_by_hand(policy(ids), ids, mask)  # (2B,)
    with torch.no_grad():
        ref_logps = sequence_logps_by_hand(reference(ids), ids, mask)  # (2B,)
    n = len(batch_pairs)
    return sigmoid_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=beta)


g = torch.Generator().manual_seed(0)
model = DecoderLM(cfg)  # float32 for training
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
for step in range(150):
    sft_step(model, opt, [train_pairs[i] for i in torch.randint(len(train_pairs), (32,), generator=g).tolist()])

policy, reference = model, copy.deepcopy(model).eval().requires_grad_(False)
opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
with torch.no_grad():
    start = dpo_loss(policy, reference, test_pairs).metrics()
print(f"step  0  held-out reward accuracy {start['rewards/accuracy']:.2f}  margin {start['rewards/margins']:.3f}")
for step in range(1, 61):
    idx = torch.randint(len(train_pairs), (16,), generator=g).tolist()
    out = dpo_loss(policy, reference, [train_pairs[i] for i in idx])
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    if step % 20 == 0:
        with torch.no_grad():
            m = dpo_loss(policy, reference, test_pairs).metrics()
        print(f"step {step:2d}  loss {out.loss.item():.3f}  held-out reward accuracy {m['rewards/accuracy']:.2f}  "
              f"margin {m['rewards/margins']:.3f}  chosen reward {m['rewards/chosen']:+.3f}  "
              f"rejected reward {m['rewards/rejected']:+.3f}")
assert m["rewards/margins"] > start["rewards/margins"]

# %% [markdown]
# Note what DPO optimises: the *gap*. Both rewards may fall (the policy makes both answers less
# likely than the reference did) as long as the rejected one falls faster; this is a known trait of
# DPO, and one reason for variants. lmforge's `preference_losses` has them side by side: cDPO and
# robust DPO (noisy labels), IPO (a bounded target margin), hinge, and the reference-free SimPO and
# ORPO.
#
# ## The same through lmforge's `task: dpo`
#
# `task: dpo` in a config runs all of this with batching, the reference (a frozen copy, the LoRA
# base, or cached log-probs) and the metrics (`configs/dpo-scratch.yaml`). It starts from a model
# folder: `save_model` writes our SFT model (the frozen `reference` above) with its tokenizer, and
# `model.init_from` names it. The pairs are the built-in arithmetic ones, read by the task itself.

# %%
with tempfile.TemporaryDirectory() as tmp:
    save_model(reference, f"{tmp}/sft", tokenizer=tok)
    summary = run(config_from_dict({
        "task": "dpo",
        "run": {"name": "learn-11", "out_dir": f"{tmp}/dpo", "seed": 0, "device": "cpu"},
        "model": {"init_from": f"{tmp}/sft"},
        "objective": {"loss_type": "sigmoid", "beta": beta, "reference": "copy"},
        "data": {"sources": [{"path": "builtin:arithmetic", "num_docs": 440, "seed": 0, "ops": "+",
                              "max_operand": 9}],
                 "val_fraction": 0.1, "cache_dir": f"{tmp}/cache"},
        "train": {"max_steps": 40, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-3, "schedule": "constant",
                  "warmup_steps": 2, "weight_decay": 0.0, "eval_every": 20, "eval_at_start": True,
                  "eval_batch_size": 44, "log_every": 20, "checkpoint_every": None, "resume": "never",
                  "progress": False, "best_metric": "val_rewards/accuracy", "best_mode": "max"},
        "logging": {"report": False},
    }), progress=False)
for e in summary["evals"]:
    print(f"step {e['step']:2d}  val reward accuracy {e['val_rewards/accuracy']:.2f}  margin {e['val_rewards/margins']:.3f}")
assert summary["evals"][-1]["val_rewards/margins"] > summary["evals"][0]["val_rewards/margins"]

# %% [markdown]
# **Next:** [12 · GRPO](12_grpo.ipynb): no fixed pairs at all; the model samples answers and a
# reward function scores them.
