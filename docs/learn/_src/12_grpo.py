# %% [markdown]
# # 12 · GRPO: learning from rewards on the model's own samples
#
# DPO needs pairs someone ranked. When answers can be *checked* (a sum, a unit test, a format), the
# model can instead try, get scored, and learn from its own attempts: reinforcement learning.
# GRPO (Group Relative Policy Optimization, Shao et al. 2024) is the simple version used for
# reasoning models:
#
# 1. for each prompt, **sample a group** of `K` completions and score each with a reward function;
# 2. a completion's **advantage** is its reward minus the group's mean, divided by the group's
#    standard deviation: better than its siblings -> positive, worse -> negative. The group is the
#    baseline, so no value network is needed; a group whose rewards are all equal teaches nothing;
# 3. push each completion token's log-prob up or down by its advantage, with PPO's **clipped
#    ratio** `π(token) / π_old(token)` keeping each update near the policy that sampled the group,
#    plus (optionally) `β` times an estimate of the KL divergence to a frozen **reference**.
#
# We write the sampling, the advantages and the loss by hand, check them against
# `lmforge.objectives.grpo_math`, then train a tiny arithmetic model whose reward is 1 for a right
# answer and 0 otherwise.

# %%
import copy
import tempfile

import torch
import torch.nn.functional as F

from lmforge.data.builtin_tasks import arithmetic_split
from lmforge.model import DecoderLM, ModelConfig
from lmforge.objectives.grpo_math import group_advantages, grpo_policy_loss
from lmforge.store import save_model
from lmforge.tasks import config_from_dict
from lmforge.tasks.run import run
from lmforge.tokenizer import CharTokenizer

torch.manual_seed(0)
train_recs, test_recs = arithmetic_split(n_train=400, n_eval=40, seed=0, max_operand=9, ops="+")
tok = CharTokenizer.train(["0123456789 What is+? Answer:"])
cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=2, n_head=4, n_embd=64)

# %% [markdown]
# ## A starting policy
#
# RL only sharpens what a model can already sometimes do: with reward 1 for a right sum, a model
# that never answers in the right format never gets a signal. So first a short SFT (notebook 10).

# %%
def sft_batch(recs):
    rows = [tok.encode(r["prompt"] + " " + r["answer"]) + [tok.eos_id] for r in recs]
    n_prompt = len(tok.encode(recs[0]["prompt"]))  # single-digit sums: every prompt has the same length
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_id)  # (B, T+1)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    targets = ids[:, 1:].clone()  # (B, T)
    targets[:, :n_prompt - 1] = -100  # no loss on the prompt
    targets[ids[:, 1:] == tok.pad_id] = -100  # nor on padding
    return ids[:, :-1], targets


g = torch.Generator().manual_seed(0)
model = DecoderLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
for step in range(150):
    x, y = sft_batch([train_recs[i] for i in torch.randint(len(train_recs), (32,), generator=g).tolist()])
    loss = F.cross_entropy(model(x).reshape(-1, cfg.vocab_size), y.reshape(-1), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
print("SFT loss", round(loss.item(), 3))

# %% [markdown]
# ## Sampling a group, and the reward
#
# Each prompt is repeated `K` times (rows `g·K .. g·K+K-1` belong to prompt `g`) and every row
# samples up to 4 tokens, stopping at `<|eos|>`. The `completion_mask` marks the tokens each row
# actually generated (its eos included, nothing after). The reward reads the answer and compares.

# %%
K, max_new = 8, 4


@torch.no_grad()
def sample_group(model, recs, generator, greedy=False):
    prompts = torch.tensor([tok.encode(r["prompt"]) for r in recs])  # (G, P)
    ids = prompts.repeat_interleave(1 if greedy else K, dim=0)  # (N, P), N = G*K
    done = torch.zeros(len(ids), dtype=torch.bool)  # (N,)
    mask = torch.zeros(len(ids), 0, dtype=torch.long)  # (N, t)
    model.eval()
    for _ in range(max_new):
        logits = model(ids)[:, -1]  # (N, V)
        if greedy:
            next_id = logits.argmax(-1)  # (N,)
        else:
            next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # (N,)
        next_id = next_id.masked_fill(done, tok.pad_id)  # finished rows only pad
        ids = torch.cat([ids, next_id[:, None]], dim=1)  # (N, P+t+1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # (N, t+1)
        done |= next_id == tok.eos_id
    model.train()
    completion_mask = torch.cat([torch.zeros_like(prompts[:1]).expand(len(ids), -1), mask], dim=1)  # (N, P+max_new)
    return ids, completion_mask


def rewards_of(ids, completion_mask, recs, per_prompt):
    out = []
    for row, (seq, m) in enumerate(zip(ids.tolist(), completion_mask.tolist())):
        text = tok.decode([t for t, keep in zip(seq, m) if keep])  # special tokens (eos) dropped
        out.append(1.0 if text.strip() == recs[row // per_prompt]["answer"] else 0.0)
    return torch.tensor(out)  # (N,)


recs = [train_recs[i] for i in range(4)]
ids, completion_mask = sample_group(model, recs, g)
rewards = rewards_of(ids, completion_mask, recs, K)
for row in (0, 1, 2):
    print(repr(tok.decode(ids[row].tolist(), skip_special_tokens=False)), "reward", rewards[row].item())
print("rewards per group:\n", rewards.view(-1, K))

# %% [markdown]
# ## Advantages
#
# Per group: `(r - mean) / (std + 1e-4)` with the sample standard deviation (Bessel's correction,
# as TRL computes it). A group that is all right or all wrong gets advantage 0 everywhere.

# %%
grouped = rewards.view(-1, K)  # (G, K)
adv_hand = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)  # (N,)
adv = group_advantages(rewards, K)
assert torch.allclose(adv_hand, adv.advantages, atol=1e-6, rtol=0)
print(adv_hand.view(-1, K).numpy().round(2), " groups without signal:", adv.frac_zero_std)

# %% [markdown]
# ## The loss, by hand
#
# Per completion token (log-probs `logp` under the policy being trained, `old` under the policy
# that sampled, `ref` under the frozen reference):
#
# - ratio `ρ = exp(logp - old)`; surrogate `-min(ρ A, clip(ρ, 1-ε, 1+ε) A)`: once the ratio has
#   moved past `1 ± ε` in the direction the advantage wants, that token stops pushing;
# - KL estimate `exp(ref - logp) - (ref - logp) - 1` ("k3": never negative, unbiased);
# - per-token loss = surrogate + `β` · KL; averaged over each completion's tokens, then over
#   completions (the original GRPO aggregation; lmforge also has Dr. GRPO's and DAPO's).
#
# With one update per batch of samples `old = logp` and the ratio is 1; clipping matters from the
# second update on the same samples. To exercise it, the check below uses `old` and `ref` log-probs
# from perturbed copies of the policy, in float64.

# %%
def completion_token_logps(model, ids, completion_mask):
    logp = model(ids)[:, :-1].log_softmax(-1)  # (N, T-1, V): position t predicts token t+1
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1), completion_mask[:, 1:]  # (N, T-1) each


def grpo_loss_by_hand(logp, old, ref, advantages, mask, eps=0.2, beta=0.04):
    ratio = torch.exp(logp - old)  # (N, T)
    A = advantages[:, None]  # (N, 1)
    surrogate = -torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)  # (N, T)
    kl = torch.exp(ref - logp) - (ref - logp) - 1  # (N, T)
    per_token = (surrogate + beta * kl) * mask  # (N, T)
    return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()


def perturbed(model, scale):
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m


policy64 = copy.deepcopy(model).double()
with torch.no_grad():
    logp, mask = completion_token_logps(policy64, ids, completion_mask)  # (N, T-1) each
    old, _ = completion_token_logps(perturbed(model, 0.05), ids, completion_mask)
    ref, _ = completion_token_logps(perturbed(model, 0.05), ids, completion_mask)
A = adv.advantages.double()
loss_hand = grpo_loss_by_hand(logp, old, ref, A, mask.double())
out = grpo_policy_loss(logp, old, A, mask, ref_logps=ref, beta=0.04, epsilon_low=0.2, loss_type="grpo")
print(f"GRPO loss by hand {loss_hand.item():.8f}  lmforge {out.loss.item():.8f}  "
      f"tokens clipped {out.metrics['clip_ratio/region']:.2f}")
assert abs(loss_hand.item() - out.loss.item()) < 1e-6

# %% [markdown]
# ## Training
#
# Each step: sample `K = 8` completions for 8 training prompts, score them, compute advantages,
# then take 2 gradient steps on that batch (`old` = the log-probs at sampling time, so the second
# step's ratio differs from 1 and the clip acts). The reference is the SFT model, frozen. We report
# the mean reward of the samples and the greedy accuracy on the 40 held-out problems.

# %%
@torch.no_grad()
def greedy_accuracy(model, recs):
    ids, completion_mask = sample_group(model, recs, None, greedy=True)
    return rewards_of(ids, completion_mask, recs, 1).mean().item()


policy, reference = model, copy.deepcopy(model).eval().requires_grad_(False)
opt = torch.optim.AdamW(policy.parameters(), lr=5e-4, weight_decay=0.0)
acc_start = greedy_accuracy(policy, test_recs)
print(f"step  0  held-out greedy accuracy {acc_start:.2f}")
mean_rewards = []
for step in range(1, 41):
    recs = [train_recs[i] for i in torch.randint(len(train_recs), (8,), generator=g).tolist()]
    ids, completion_mask = sample_group(policy, recs, g)
    rewards = rewards_of(ids, completion_mask, recs, K)  # (N,)
    advantages = group_advantages(rewards, K).advantages  # (N,)
    with torch.no_grad():
        old, mask = completion_token_logps(policy, ids, completion_mask)  # (N, T-1)
        ref, _ = completion_token_logps(reference, ids, completion_mask)
    for _ in range(2):
        logp, _ = completion_token_logps(policy, ids, completion_mask)  # (N, T-1), with gradient
        out = grpo_policy_loss(logp, old, advantages, mask, ref_logps=ref, beta=0.04)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    mean_rewards.append(rewards.mean().item())
    if step % 10 == 0:
        print(f"step {step:2d}  mean sample reward (last 10 steps) {sum(mean_rewards[-10:]) / 10:.2f}  "
              f"kl {out.metrics['kl']:.4f}  held-out greedy accuracy {greedy_accuracy(policy, test_recs):.2f}")

# %% [markdown]
# At this size forty steps move the reward of the samples more than the held-out greedy accuracy,
# and the run is fragile: with a learning rate 4x larger, our trial collapsed (the sample reward
# fell, the KL to the reference jumped). The KL term and the clip are there to limit exactly that.
#
# ## The same through lmforge's `task: grpo`
#
# What the library adds around this arithmetic (`task: grpo`, `configs/grpo-arithmetic.yaml`):
# batched generation with a KV cache, reward functions by name (`exact_match` here), the
# shared-prompt trick (each prompt's transformer work done once for its `K` completions), overlong
# filtering, and the Dr. GRPO / DAPO aggregations, all built on the functions checked above. As in
# notebook 11, the run starts from our SFT model (`reference`), saved as a model folder.

# %%
with tempfile.TemporaryDirectory() as tmp:
    save_model(reference, f"{tmp}/sft", tokenizer=tok)
    summary = run(config_from_dict({
        "task": "grpo",
        "run": {"name": "learn-12", "out_dir": f"{tmp}/grpo", "seed": 0, "device": "cpu"},
        "model": {"init_from": f"{tmp}/sft"},
        "objective": {"num_generations": K, "max_completion_length": max_new, "rewards": ["exact_match"],
                      "beta": 0.04, "loss_type": "grpo"},
        "data": {"sources": [{"path": "builtin:arithmetic", "num_docs": 440, "seed": 1, "ops": "+",
                              "max_operand": 9}],
                 "val_fraction": 0.1, "cache_dir": f"{tmp}/cache"},
        "train": {"max_steps": 20, "batch_size": 8, "lr": 5e-4, "min_lr": 5e-4, "schedule": "constant",
                  "warmup_steps": 2, "weight_decay": 0.0, "eval_every": 10, "eval_at_start": True,
                  "eval_batch_size": 44, "log_every": 10, "checkpoint_every": None, "resume": "never",
                  "progress": False, "best_metric": "val_exact_match", "best_mode": "max"},
        "logging": {"report": False},
    }), progress=False)
print("held-out exact match by step:", [(e["step"], e["val_exact_match"]) for e in summary["evals"]])
print("mean sample reward by step:", [round(h["reward"], 2) for h in summary["history"]])

# %% [markdown]
#
# This is the end of the path. From here: `lmforge train -c configs/...` runs every stage at full
# size, and the modules these notebooks matched are the ones in `src/lmforge/`.
