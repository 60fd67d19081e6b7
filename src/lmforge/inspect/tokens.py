"""Per-token loss: how surprised a causal LM is by each token of a text, and which tokens train.

Token t (t >= 1) is scored by -log p(x_t | x_<t); the first token has no prediction. With a
loss mask (SFT: the prompt does not train, the response does) each token is also marked as
trained or not, so prompt masking can be checked by eye.

    tl = token_losses(model, tokenizer, "To be, or not to be")
    tl.losses, tl.mean_loss
    print(to_terminal(tl)); token_html(tl, "tokens.html")

Masks come from ``prompt_response_ids`` (a prompt and a response) or ``chat_ids`` (messages in
lmforge's chat format, assistant turns train), tokenized piece by piece as SFT data is.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.chat import render_chat
from lmforge.errors import InputError
from lmforge.fsutil import atomic_write
from lmforge.inspect.common import encode_text, token_labels, token_texts


@dataclass
class TokenLosses:
    texts: list[str]  # each token's text
    labels: list[str]  # printable labels
    losses: list[float | None]  # nats; None for the first token (no prediction)
    trains: list[bool] | None  # loss mask (None: every predicted token trains)
    mean_loss: float  # over predicted tokens that train

    def to_json(self) -> dict:
        return {"tokens": self.texts, "losses": self.losses, "trains": self.trains, "mean_loss": self.mean_loss,
                "perplexity": math.exp(self.mean_loss) if self.mean_loss < 700 else None}


def prompt_response_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[bool]]:
    """ids of prompt + response and the loss mask (prompt tokens False, response tokens True)."""
    p, r = tokenizer.encode(prompt), tokenizer.encode(response)
    return p + r, [False] * len(p) + [True] * len(r)


def chat_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """ids of ``messages`` rendered in lmforge's chat format, and the loss mask: the content of
    assistant turns and their end tag train; role tags and other turns do not."""
    ids: list[int] = []
    mask: list[bool] = []
    for n, msg in enumerate(messages):
        whole = render_chat([msg])  # "<|role|>\n{content}<|end|>\n"; validates the message
        head = whole[: whole.index("\n") + 1]
        body = whole[len(head): -1]  # content + end tag
        trains = msg["role"] == "assistant"
        for piece, flag in ((head, False), (body, trains), ("\n", False)):
            t = tokenizer.encode(piece)
            ids += t
            mask += [flag] * len(t)
    if not ids:
        raise InputError("messages: expected at least one message")
    return ids, mask


@torch.no_grad()
def token_losses(model: nn.Module, tokenizer, text: str | None = None, *, ids: list[int] | None = None,
                 trains: list[bool] | None = None) -> TokenLosses:
    """Per-token next-token loss of ``text`` (or of ``ids``, with an optional loss mask)."""
    if model.config.arch != "decoder" and model.config.arch != "bigram":
        raise InputError(f"per-token loss needs a causal LM; this model is an {model.config.arch}")
    if ids is None:
        x = encode_text(model, tokenizer, text)  # (1, T)
    else:
        if not ids:
            raise InputError("ids: expected at least one token")
        if len(ids) > model.config.context_length:
            raise InputError(f"text is {len(ids)} tokens long, longer than the model's context_length "
                             f"{model.config.context_length}; shorten it")
        x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    if trains is not None and len(trains) != x.shape[1]:
        raise InputError(f"loss mask has {len(trains)} entries for {x.shape[1]} tokens; expected one per token")
    was_training = model.training
    model.eval()
    try:
        logits = model(x)[0, :-1].float()  # (T-1, vocab): position t predicts token t+1
    finally:
        model.train(was_training)
    nll = F.cross_entropy(logits, x[0, 1:], reduction="none").cpu()  # (T-1,)
    losses: list[float | None] = [None] + nll.tolist()
    counted = [i for i in range(1, x.shape[1]) if trains is None or trains[i]]
    mean = float(nll[[i - 1 for i in counted]].mean()) if counted else float("nan")
    id_list = x[0].tolist()
    return TokenLosses(texts=token_texts(tokenizer, id_list), labels=token_labels(tokenizer, id_list),
                       losses=losses, trains=trains, mean_loss=mean)


# ----------------------------------------------------------------------------------- colours
def _scale(loss: float, top: float) -> float:
    """0 (no surprise) .. 1 (loss >= top)."""
    return max(0.0, min(1.0, loss / top)) if top > 0 else 0.0


def _top(tl: TokenLosses) -> float:
    vals = sorted(v for v in tl.losses if v is not None)
    return vals[int(0.95 * (len(vals) - 1))] if vals else 1.0  # the 95th percentile: one outlier does not wash out the rest


def to_terminal(tl: TokenLosses, color: bool = True) -> str:
    """The text with each token's background from green (low loss) to red (high), untrained
    tokens dim and underlined; then the mean loss. ``color=False`` gives 'token[loss]' plain text."""
    top = _top(tl)
    out = []
    for text, loss, i in zip(tl.texts, tl.losses, range(len(tl.texts))):
        trains = tl.trains is None or tl.trains[i]
        if not color:
            mark = "" if trains else "~"
            out.append(f"{text}[{mark}{loss:.2f}]" if loss is not None else text)
            continue
        if loss is None:
            out.append(f"\x1b[2m{text}\x1b[0m")
            continue
        a = _scale(loss, top)
        r, g = int(255 * min(1.0, 2 * a)), int(255 * min(1.0, 2 * (1 - a)))
        style = f"\x1b[48;2;{r};{g};60m\x1b[38;2;0;0;0m" + ("" if trains else "\x1b[2;4m")
        pieces = text.split("\n")  # colour each line's part, keep the newlines plain
        out.append("\n".join(f"{style}{p}\x1b[0m" if p else "" for p in pieces))
    masked = "" if tl.trains is None else f" (over the {sum(tl.trains[1:])} tokens that train)"
    tail = f"\nmean loss {tl.mean_loss:.4f}{masked}, perplexity {math.exp(min(tl.mean_loss, 700)):.2f}"
    return "".join(out) + tail


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.7; font-size: 15px; }}
.text span {{ border-radius: 2px; }}
.text span.masked {{ opacity: 0.45; text-decoration: underline dotted; }}
.legend span {{ padding: 0 0.6em; font-family: monospace; }}
</style></head><body>
<h2>{title}</h2>
<p>mean loss <b>{mean:.4f}</b> nats{masked}, perplexity {ppl:.2f}. Hover a token for its loss.</p>
<p class="legend">loss: {legend}{mask_legend}</p>
<div class="text">{body}</div>
</body></html>
"""


def _rgb(a: float) -> str:
    r, g = int(255 * min(1.0, 2 * a)), int(255 * min(1.0, 2 * (1 - a)))
    return f"rgb({r},{g},90)"


def token_html(tl: TokenLosses, out_html: str | os.PathLike, title: str = "per-token loss") -> Path:
    """A self-contained HTML page: each token's background coloured by its loss (green low, red
    high), its loss on hover; tokens that do not train are faded and underlined."""
    top = _top(tl)
    spans = []
    for i, (text, loss) in enumerate(zip(tl.texts, tl.losses)):
        trains = tl.trains is None or tl.trains[i]
        cls = "" if trains else ' class="masked"'
        if loss is None:
            spans.append(f'<span{cls} title="first token: no prediction">{html.escape(text)}</span>')
        else:
            tip = f"{loss:.3f} nats" + ("" if trains else " (does not train)")
            spans.append(f'<span{cls} style="background:{_rgb(_scale(loss, top))}" title="{tip}">'
                         f'{html.escape(text)}</span>')
    legend = "".join(f'<span style="background:{_rgb(a)}">{a * top:.2f}</span>' for a in (0, 0.25, 0.5, 0.75, 1))
    masked = "" if tl.trains is None else f" over the {sum(tl.trains[1:])} tokens that train"
    mask_legend = "" if tl.trains is None else ' &nbsp; <span class="masked" style="opacity:.45">faded</span>: does not train'
    page = _PAGE.format(title=html.escape(title), mean=tl.mean_loss, masked=masked,
                        ppl=math.exp(min(tl.mean_loss, 700)) if tl.mean_loss == tl.mean_loss else float("nan"),
                        legend=legend, mask_legend=mask_legend, body="".join(spans))
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, page)
