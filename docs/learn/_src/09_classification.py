# %% [markdown]
# # 09 · Classification: one label per text
#
# A language model's last hidden states already summarise the text it read. To classify, **pool**
# them into one vector per text and add a linear **head** from width `C` to one logit per class;
# the loss is the cross-entropy against the label. Pooling choices:
#
# - `last`: the hidden state of the last real token. In a causal decoder it is the only position
#   that has seen the whole text, so it is lmforge's default for decoders;
# - `mean`: the average over the real tokens (padding excluded);
# - `cls`: the first token, for bidirectional encoders like BERT (in a decoder it sees nothing).
#
# Texts in a batch differ in length, so they are right-padded, and an **attention mask** marks the
# real tokens. We write the pooling, the head and the loss by hand on top of lmforge's decoder and
# check them against `DecoderLM(..., head="cls")` and the `Classification` objective; then train on
# generated review sentences.

# %%
import json
import random
import tempfile

import torch
import torch.nn.functional as F

from lmforge.model import DecoderLM, ModelConfig
from lmforge.objectives.classification import Classification
from lmforge.tasks import config_from_dict
from lmforge.tasks.run import run
from lmforge.tokenizer import CharTokenizer

torch.manual_seed(0)
rng = random.Random(0)
things = ["film", "book", "meal", "song", "hotel", "game", "play", "story", "garden", "concert"]
good = ["wonderful", "lovely", "great", "delightful", "superb", "charming", "moving", "fun"]
bad = ["awful", "boring", "dreadful", "terrible", "dull", "clumsy", "bland", "tiresome"]
templates = ["the {t} was {a}.", "what a {a} {t}!", "i found the {t} {a}, honestly.",
             "a {a} {t} from start to end.", "my friends said the {t} was {a}."]
labels = ["negative", "positive"]


def review(label):
    adj = rng.choice(good if label == 1 else bad)
    return rng.choice(templates).format(t=rng.choice(things), a=adj)


records = [(review(label), label) for label in [rng.randrange(2) for _ in range(1200)]]
train_records, test_records = records[:1000], records[1000:]
for text, label in records[:4]:
    print(labels[label], "|", text)

tok = CharTokenizer.train([text for text, _ in records])
pad_id = tok.pad_id


def make_batch(recs):
    ids = [tok.encode(text) for text, _ in recs]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id)  # (B, T): right-padded
    attention_mask = torch.zeros(len(ids), width, dtype=torch.long)  # (B, T): 1 on real tokens
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.tensor([label for _, label in recs])}  # (B,)


batch = make_batch(train_records[:6])
print(batch["input_ids"].shape, batch["attention_mask"].sum(1).tolist())

# %% [markdown]
# ## Pooling, head and loss by hand
#
# `num_classes=2` gives lmforge's `DecoderLM` a `classifier` (pooling + `nn.Linear(C, 2)`), and
# `model(ids, mask, head="cls")` returns the class logits. We compute the same from the decoder's
# hidden states (`model.hidden_states`, the final-norm output of notebook 07's stack), in float64.
#
# The strongest check of the padding is to not pad at all: run every text alone, at its own length,
# and take its last position. Because attention is causal, the padding *after* a text can never
# change its hidden states, and the mask keeps the pooling off the padding.

# %%
cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=64, n_layer=2, n_head=4, n_embd=64,
                  num_classes=2, pooling="last")
model = DecoderLM(cfg).double()
head = model.classifier.out  # nn.Linear(C, 2)
ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
lengths = mask.sum(1)  # (B,)

with torch.no_grad():
    h = model.hidden_states(ids, mask)  # (B, T, C)
    last = h[torch.arange(len(ids)), lengths - 1]  # (B, C): the last real token of each row
    alone = torch.stack([model.hidden_states(ids[i:i + 1, :n])[0, -1] for i, n in enumerate(lengths)])  # (B, C)
    assert torch.allclose(last, alone, atol=1e-6, rtol=0)  # padding changed nothing

    logits_hand = last @ head.weight.T + head.bias  # (B, 2)
    loss_hand = -F.log_softmax(logits_hand, dim=-1)[torch.arange(len(y)), y].mean()

    logits_lmforge = model(ids, mask, head="cls")  # (B, 2)
    objective = Classification(num_classes=2, label_names=labels)
    loss_lmforge, metrics = objective.loss(model, batch)
print("max |logits - lmforge|", (logits_hand - logits_lmforge).abs().max().item())
assert torch.allclose(logits_hand, logits_lmforge, atol=1e-6, rtol=0)
assert abs(loss_hand.item() - loss_lmforge.item()) < 1e-6

# mean pooling: the average over real tokens only
mean_hand = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, C)
model.classifier.pooling = "mean"
with torch.no_grad():
    assert torch.allclose(mean_hand @ head.weight.T + head.bias, model(ids, mask, head="cls"), atol=1e-6, rtol=0)
model.classifier.pooling = "last"

# %% [markdown]
# ## Training
#
# The whole model trains (decoder and head) on the classification loss alone, in float32 now. With
# a pretrained decoder one would often freeze most of it (lmforge's `train.trainable: head` or
# `last_blocks:N`); from scratch, everything has to learn. Accuracy is measured on the 200 held-out
# reviews. (The learning rate matters more than it looks: at 3e-3 instead of 1e-3 this model sat at
# chance for the whole 100 steps when we tried it.)

# %%
model = DecoderLM(cfg)  # a fresh float32 model
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
test_batch = make_batch(test_records)


@torch.no_grad()
def accuracy(model, batch):
    model.eval()
    preds = model(batch["input_ids"], batch["attention_mask"], head="cls").argmax(-1)  # (N,)
    model.train()
    return (preds == batch["labels"]).float().mean().item()


acc_start = accuracy(model, test_batch)
print(f"step   0  test accuracy {acc_start:.3f}")
g = torch.Generator().manual_seed(0)
for step in range(1, 101):
    idx = torch.randint(len(train_records), (32,), generator=g).tolist()
    loss, metrics = objective.loss(model, make_batch([train_records[i] for i in idx]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % 25 == 0:
        print(f"step {step:3d}  loss {loss.item():.3f}  batch accuracy {metrics['accuracy']:.2f}  "
              f"test accuracy {accuracy(model, test_batch):.3f}")
acc_end = accuracy(model, test_batch)
assert acc_end > acc_start + 0.15  # well above chance after 100 steps

report = objective.report(model, [test_batch])  # per-class precision / recall / F1, confusion matrix
print({k: report[k] for k in ("accuracy", "macro_f1", "examples")})

# %% [markdown]
# ## The same through lmforge's `task: classify`
#
# For real data, `task: classify` in a config does all of this: it reads the records (JSONL, CSV,
# TSV, Hugging Face datasets), splits them per label, fixes the label order, pads, trains and
# writes reports (`configs/spam-gpt.yaml`, `configs/sst2-bert.yaml`). Our reviews become a JSONL
# file; the model is configured as above (it may also start from a pretrained run with
# `model.init_from`).

# %%
with tempfile.TemporaryDirectory() as tmp:
    with open(f"{tmp}/reviews.jsonl", "w") as f:
        for text, label in records:
            f.write(json.dumps({"text": text, "label": labels[label]}) + "\n")
    summary = run(config_from_dict({
        "task": "classify",
        "run": {"name": "learn-09", "out_dir": f"{tmp}/run", "seed": 0, "device": "cpu"},
        "model": {"vocab_size": None, "context_length": 64, "n_layer": 2, "n_head": 4, "n_embd": 64},
        "tokenizer": {"kind": "char"},
        "objective": {"text_field": "text", "label_field": "label", "max_length": 64, "pooling": "last"},
        "data": {"sources": [{"path": f"{tmp}/reviews.jsonl"}], "val_fraction": 0.15,
                 "cache_dir": f"{tmp}/cache"},
        "train": {"max_steps": 100, "batch_size": 32, "lr": 1e-3, "min_lr": 1e-3, "schedule": "constant",
                  "warmup_steps": 5, "weight_decay": 0.0, "eval_every": 50, "eval_at_start": True,
                  "eval_batch_size": 64, "log_every": 50, "checkpoint_every": None, "resume": "never",
                  "progress": False, "best_metric": "val_accuracy", "best_mode": "max"},
        "logging": {"report": False},
    }), progress=False)
print([(e["step"], round(e["val_accuracy"], 3)) for e in summary["evals"]])

# %% [markdown]
#
# **Next:** [10 · instruction tuning](10_instruction_tuning.ipynb): back to generating text, trained
# on answers only.
