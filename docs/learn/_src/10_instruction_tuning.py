# %% [markdown]
# # 10 · Instruction tuning (SFT): learn the answers, not the questions
#
# A pretrained model continues text. To make it *answer*, fine-tune it on (prompt, response)
# pairs: the input is `prompt + response + <eos>`, the objective is the same next-token loss, but
# only the **response tokens** (and the final eos, so it learns to stop) count. Prompt positions get
# the label `-100`, which `F.cross_entropy(ignore_index=-100)` skips. Why mask the prompt? The
# model will always be *given* the prompt; spending capacity on predicting user questions is wasted,
# and on short answers the prompt tokens would dominate the loss.
#
# We build the labels by hand and check them against `lmforge.data.sft_format`, check the masked
# loss against lmforge's `CausalLM` objective, and then fine-tune a tiny model on generated
# arithmetic problems (`lmforge.data`'s built-in set: "What is 3 + 4? Answer: 7").

# %%
import json
import tempfile

import torch

from lmforge.data.builtin_tasks import arithmetic_split
from lmforge.data.sft_format import IGNORE, prompt_response, tokenize_prompt_response
from lmforge.model import DecoderLM, ModelConfig
from lmforge.objectives import CausalLM
from lmforge.tasks import config_from_dict
from lmforge.tasks.run import run
from lmforge.tokenizer import CharTokenizer

torch.manual_seed(0)
train_recs, test_recs = arithmetic_split(n_train=400, n_eval=40, seed=0, max_operand=9, ops="+")
print(train_recs[0], len(train_recs), "training and", len(test_recs), "held-out problems (none in both)")

tok = CharTokenizer.train(["0123456789 What is+? Answer:"])
print("vocab", tok.vocab_size, "eos", tok.eos_id)

# %% [markdown]
# ## Labels by hand
#
# Prompt and response are tokenized as one text (with a character tokenizer each character is one
# token, so the prompt is exactly the first `len(prompt)` tokens). Labels are aligned with the
# input ids; the loss shifts them by one, as in pretraining.

# %%
def sft_example(prompt, response):
    ids = tok.encode(prompt + response) + [tok.eos_id]
    n_prompt = len(tok.encode(prompt))
    labels = [IGNORE] * n_prompt + ids[n_prompt:]  # -100 on the prompt, the ids on the response and eos
    return ids, labels


prompt, response = train_recs[0]["prompt"], " " + train_recs[0]["answer"]
ids, labels = sft_example(prompt, response)
print([(tok.id_to_token(i), label) for i, label in zip(ids, labels)][-6:])  # the last few (token, label)

example = tokenize_prompt_response(tok, prompt, response)  # lmforge's SFTExample
assert example.input_ids == ids and example.labels == labels
print("trained tokens:", example.n_trained, "of", len(ids))

# %% [markdown]
# Real instruction datasets wrap the prompt in a template, so the model can tell where the
# instruction ends. lmforge has the Stanford Alpaca one (and a chat template for conversations);
# the masking is the same, the prompt is just longer. We keep the short prompt to stay fast.

# %%
alpaca, _ = prompt_response({"instruction": prompt, "input": "", "output": response}, "alpaca")
print(alpaca)

# %% [markdown]
# ## Batching and the masked loss
#
# Right-pad the inputs with `<|pad|>` and the labels with `-100`. Under the causal mask, padding at
# the end of a row cannot change the logits before it, so no attention mask is needed for the
# loss. Then shift: position `t` predicts `labels[t + 1]`. lmforge's `CausalLM` takes
# `input_ids = ids[:, :-1]` and `targets = labels[:, 1:]`; where targets are `-100` it does not even
# run the LM head (the `keep` argument of `DecoderLM`).

# %%
def sft_batch(recs):
    rows = [sft_example(r["prompt"], " " + r["answer"]) for r in recs]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_id)  # (B, T+1)
    labels = torch.full((len(rows), width), IGNORE)  # (B, T+1)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        labels[i, :len(row_labels)] = torch.tensor(row_labels)
    return {"input_ids": ids[:, :-1], "targets": labels[:, 1:]}  # (B, T) each, shifted


cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=2, n_head=4, n_embd=64)
model = DecoderLM(cfg).double()
batch = sft_batch(train_recs[:8])
with torch.no_grad():
    logits = model(batch["input_ids"])  # (B, T, V)
    logp = logits.log_softmax(-1)  # (B, T, V)
    keep = batch["targets"] != IGNORE  # (B, T): the response positions
    picked = logp.gather(-1, batch["targets"].clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    loss_hand = -(picked * keep).sum() / keep.sum()  # mean over response tokens only
    loss_lmforge, _ = CausalLM().loss(model, batch)
print(f"masked loss {loss_hand.item():.6f}  lmforge {loss_lmforge.item():.6f}  "
      f"({keep.sum().item()} of {keep.numel()} positions train)")
assert abs(loss_hand.item() - loss_lmforge.item()) < 1e-6

# %% [markdown]
# ## Fine-tuning
#
# A real recipe would start from a pretrained model (`configs/arithmetic-sft.yaml`,
# `configs/sft-smollm2-lora.yaml`); this one starts from scratch, so it must learn the format and
# the sums at once. We measure the greedy answer on the 40 held-out problems: the model generates
# until `<|eos|>` and we compare the digits. Expect the format to be learned quickly and the sums
# only partly: a few hundred steps on a 2-layer model is not enough to learn addition well.

# %%
@torch.no_grad()
def answer(model, prompt, max_new=4):
    ids = tok.encode(prompt)
    model.eval()
    for _ in range(max_new):
        next_id = model(torch.tensor([ids]))[0, -1].argmax().item()
        if next_id == tok.eos_id:
            break
        ids.append(next_id)
    model.train()
    return tok.decode(ids[len(tok.encode(prompt)):]).strip()


def exact_match(model, recs):
    return sum(answer(model, r["prompt"]) == r["answer"] for r in recs) / len(recs)


model = DecoderLM(cfg)  # float32 for training
objective = CausalLM()
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
first = None
for step in range(1, 301):
    idx = torch.randint(len(train_recs), (32,), generator=g).tolist()
    loss, _ = objective.loss(model, sft_batch([train_recs[i] for i in idx]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    first = first if first is not None else loss.item()
    if step % 100 == 0:
        print(f"step {step}  response loss {loss.item():.3f}  held-out exact match {exact_match(model, test_recs):.2f}")
assert loss.item() < first / 2
for r in test_recs[:5]:
    print(r["prompt"], repr(answer(model, r["prompt"])), "expected", r["answer"])

# %% [markdown]
# ## The same through lmforge's `task: sft`
#
# In the library, `task: sft` reads Alpaca, chat-message or OpenAssistant records from files,
# applies a template, masks the prompts (`train_on_prompt: false`), pads (or packs) the examples
# and trains with the same `CausalLM` objective. Here our problems become Alpaca records in a JSONL
# file, rendered with the `book` template (a longer prompt, so a longer context), for 40 steps.

# %%
with tempfile.TemporaryDirectory() as tmp:
    with open(f"{tmp}/arithmetic.jsonl", "w") as f:
        for r in train_recs:
            f.write(json.dumps({"instruction": r["prompt"], "input": "", "output": r["answer"]}) + "\n")
    summary = run(config_from_dict({
        "task": "sft",
        "run": {"name": "learn-10", "out_dir": f"{tmp}/run", "seed": 0, "device": "cpu"},
        "model": {"vocab_size": None, "context_length": 192, "n_layer": 2, "n_head": 4, "n_embd": 64},
        "tokenizer": {"kind": "char"},
        "objective": {"format": "alpaca", "template": "book", "max_length": 192, "sample_prompts": 2,
                      "sample_tokens": 4, "test_response_tokens": 0},
        "data": {"sources": [{"path": f"{tmp}/arithmetic.jsonl"}], "val_fraction": 0.1,
                 "cache_dir": f"{tmp}/cache"},
        "train": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-3, "schedule": "constant",
                  "warmup_steps": 5, "weight_decay": 0.0, "eval_every": 20, "eval_at_start": True,
                  "eval_batch_size": 40, "log_every": 20, "checkpoint_every": None, "resume": "never",
                  "progress": False},
        "logging": {"report": False},
    }), progress=False)
print([(e["step"], round(e["val_loss"], 3)) for e in summary["evals"]])
assert summary["evals"][-1]["val_loss"] < summary["evals"][0]["val_loss"]

# %% [markdown]
#
# **Next:** [11 · DPO](11_dpo.ipynb): learning from pairs of answers, one preferred to the other.
