# %% [markdown]
# # 08 · Pretraining on tiny shakespeare
#
# Pretraining is next-token prediction on raw text: cut random windows of `T + 1` tokens, feed the
# first `T`, and score the model's logits at every position against the token that follows (the
# same window shifted by one). The loss is the mean cross-entropy; an optimizer (AdamW) follows its
# gradient. This notebook writes that loop by hand around lmforge's `DecoderLM`, checks the loss
# against lmforge's `CausalLM` objective, and then runs the same thing the way the library does:
# a config and `run`.
#
# Everything is tiny (2 layers, width 64, a few hundred steps) so it runs on a CPU in seconds; the
# text reads better with `configs/shakespeare-char.yaml` (2000 steps of a 4-layer model).
# The data is tiny shakespeare when a `shared/data/tinyshakespeare/input.txt` sits in this folder or
# one above it (the project's machines have one); otherwise lmforge's built-in generated stories
# stand in for it, and the notebook says so.

# %%
import copy
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data import stories
from lmforge.model import DecoderLM, ModelConfig
from lmforge.objectives import CausalLM
from lmforge.tasks import config_from_dict
from lmforge.tasks.run import run
from lmforge.tokenizer import CharTokenizer

torch.manual_seed(0)


def find_shakespeare():
    for folder in [Path.cwd(), *Path.cwd().parents]:
        path = folder / "shared" / "data" / "tinyshakespeare" / "input.txt"
        if path.is_file():
            return path
    return None


path = find_shakespeare()
if path is not None:
    text = path.read_text(encoding="utf-8")
    print(f"tiny shakespeare ({path}): {len(text):,} characters")
else:
    text = "\n\n".join(stories(2000, seed=0))
    print(f"tiny shakespeare not found: using {len(text):,} characters of lmforge's built-in stories")

tok = CharTokenizer.train([text])
data = torch.tensor(tok.encode(text))  # (N,)
n_val = len(data) // 10
train_data, val_data = data[:-n_val], data[-n_val:]  # the last 10% is held out
print("vocab", tok.vocab_size, " train tokens", len(train_data), " val tokens", len(val_data))

# %% [markdown]
# ## Batches and the loss
#
# A batch is `B` random windows. Inputs are the first `T` tokens, targets the last `T`: position
# `t` is asked to predict token `t + 1`. lmforge's `CausalLM` objective makes the same split from
# the `(B, T+1)` windows (`collate`) and computes the same mean cross-entropy (`loss`).

# %%
B, T = 16, 64


def get_windows(split_data, batch_size=B, generator=None):
    start = torch.randint(len(split_data) - T - 1, (batch_size,), generator=generator)  # (B,)
    return torch.stack([split_data[s:s + T + 1] for s in start])  # (B, T+1)


cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=T, n_layer=2, n_head=4, n_embd=64,
                  activation="gelu_tanh", bias=True, dropout=0.0)
model = DecoderLM(cfg)
print(sum(p.numel() for p in model.parameters()), "parameters")

windows = get_windows(train_data)
x, y = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
model64 = copy.deepcopy(model).double()  # the check in float64, so 1e-6 is far above rounding
with torch.no_grad():
    logits = model64(x)  # (B, T, V)
    logp = logits.log_softmax(dim=-1)  # (B, T, V)
    loss_hand = -logp.gather(-1, y[..., None]).squeeze(-1).mean()  # mean of -log p(next token)

    objective = CausalLM()
    loss_lmforge, _ = objective.loss(model64, objective.collate(windows))
print(f"hand loss {loss_hand.item():.6f}  lmforge CausalLM {loss_lmforge.item():.6f}  "
      f"ln V {math.log(tok.vocab_size):.6f}")
assert abs(loss_hand.item() - loss_lmforge.item()) < 1e-6

# %% [markdown]
# ## The training loop
#
# AdamW, a learning rate that warms up for a few steps, gradient clipping at norm 1. Every 50
# steps we estimate the validation loss on a few fixed batches (with `torch.no_grad`: no graph).

# %%
@torch.no_grad()
def val_loss(model, n_batches=8):
    g = torch.Generator().manual_seed(0)  # the same batches every time
    model.eval()
    losses = [objective.loss(model, objective.collate(get_windows(val_data, generator=g)))[0].item()
              for _ in range(n_batches)]
    model.train()
    return sum(losses) / len(losses)


steps, lr, warmup = 300, 3e-3, 20
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.99))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
t0 = time.time()
history = []
for step in range(steps + 1):
    if step % 50 == 0:
        history.append((step, val_loss(model)))
        print(f"step {step:4d}  val loss {history[-1][1]:.3f}  ({time.time() - t0:.1f} s)")
    if step == steps:
        break
    windows = get_windows(train_data)
    logits = model(windows[:, :-1])  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
assert history[-1][1] < history[0][1] - 1.0  # it learned something

# %% [markdown]
# ## Sampling
#
# Temperature divides the logits before the softmax (below 1: safer choices); the model writes one
# character at a time, each conditioned on the last `T`.

# %%
@torch.no_grad()
def sample(model, prompt, n_new=200, temperature=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt)])  # (1, t)
    model.eval()
    for _ in range(n_new):
        logits = model(ids[:, -T:])[:, -1] / temperature  # (1, V)
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=g)], dim=1)
    model.train()
    return tok.decode(ids[0].tolist())


print(sample(model, "ROMEO:" if path is not None else "One day"))

# %% [markdown]
# ## The same run through lmforge
#
# In the library, a run is a config: the model, the tokenizer, where the text comes from and how to
# train. `run(cfg)` builds the tokenizer and a token cache, trains with the same objective (plus
# a cosine learning-rate schedule, evaluation, metrics and a sample), and returns a summary. This is what
# `lmforge train -c configs/shakespeare-char.yaml` does, here for 60 steps in a temporary folder.

# %%
source = {"path": str(path)} if path is not None else {"path": "builtin:stories", "num_docs": 2000}
with tempfile.TemporaryDirectory() as tmp:
    run_cfg = config_from_dict({
        "task": "pretrain",
        "run": {"name": "learn-08", "out_dir": f"{tmp}/run", "seed": 0, "device": "cpu"},
        "model": {"vocab_size": None, "context_length": T, "n_layer": 2, "n_head": 4, "n_embd": 64,
                  "activation": "gelu_tanh"},
        "tokenizer": {"kind": "char"},
        "data": {"sources": [source], "val_fraction": 0.1, "cache_dir": f"{tmp}/cache"},
        "train": {"max_steps": 60, "batch_size": B, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10,
                  "eval_every": 30, "eval_batches": 4, "log_every": 20, "checkpoint_every": None,
                  "resume": "never", "progress": False},
        "sample": {"prompt": "ROMEO:" if path is not None else "One day", "max_new_tokens": 80},
        "logging": {"report": False},
    })
    summary = run(run_cfg, progress=False)
print({k: summary[k] for k in summary if "loss" in k or k == "steps"})

# %% [markdown]
# **Next:** [09 · classification](09_classification.ipynb): the same decoder, a different head and
# loss.
