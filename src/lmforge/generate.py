"""Text generation: greedy and sampled decoding with a key/value cache.

    from lmforge.generate import generate_text
    generate_text(model, tokenizer, "Once upon a time", max_new_tokens=50, temperature=0.8, top_p=0.9)

How a step works
    The prompt goes through the model once (*prefill*), which fills a pre-allocated
    :class:`~lmforge.model.KVCache` with every layer's keys and values; then one token at a time
    goes in (*decode*) and attends over the cache, so a new token costs the same whatever the
    prefix length. ``use_cache=False`` runs the whole sequence again at every step: slow, but it
    gives the same tokens (greedy) and logits within fp32 rounding, and is the reference in tests.

Batches
    Prompts of different lengths are left-padded into one batch. The attention mask hides the
    padding and position ids count real tokens only, so each row generates what it would alone.

Sampling, in this order
    repetition penalty (CTRL-style: the logit of every token already seen, prompt included, is
    divided by the penalty when positive and multiplied when negative), temperature (0 = greedy
    argmax), top-k, top-p (nucleus), then a draw from a ``torch.Generator`` seeded with ``seed``.
    The global RNG is never touched: the same seed gives the same tokens.

Stopping
    A row stops at ``eos_id`` (not part of the output), at a stop string, or after
    ``max_new_tokens``; the batch stops when every row has. ``min_new_tokens`` holds the stop
    token back (its logit set to -inf) until a row has that many new tokens, as Hugging Face's
    ``min_new_tokens`` does. Text results are cut right before the
    stop string; token results (:func:`generate`, :func:`stream`) keep the tokens whose text lies
    wholly before it. Streams hold back text that might be the start of a stop string, and text
    that ends in an unfinished multi-byte character, until it is settled.

Speed
    On a CPU, the large fp32 linear layers run from oneDNN-packed copies of their weights while
    generating (:mod:`lmforge.model.packed`): the same products within float rounding, about 2.5x
    faster than ``F.linear`` for SmolLM2's layers. A model in eval mode (and any frozen weight)
    keeps the copies between calls; a model in training mode drops its trainable weights' copies
    when the call ends, since the next optimizer step changes them.

Context length
    A model sees at most ``context_length`` tokens. Past that, RoPE models and models without
    positions slide a window: once the cache is full, each step drops the oldest position
    (``KVCache.drop_front``) and positions keep counting up, so the model sees the last
    ``context_length`` tokens. (The cached keys of those tokens were computed while older tokens
    were still visible, so past the context the cached and uncached paths may differ.) Learned
    positions cannot slide (there is no embedding for position ``context_length``), so they
    *crop*, as nanoGPT does: each step past the context runs the last ``context_length`` tokens
    again at positions 0.. (no cache for those steps). A prompt longer than the context keeps its
    last ``context_length`` tokens. ``context_overflow="error"`` refuses instead: a request whose
    longest prompt + ``max_new_tokens`` exceeds the context fails with
    :class:`~lmforge.errors.InputError` before any compute.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError, InputError
from lmforge.model.layers import KVCache
from lmforge.model.packed import packed_linears

__all__ = ["SamplingConfig", "generate", "stream", "generate_text", "stream_text", "sample_next_token",
           "apply_repetition_penalty"]


CONTEXT_OVERFLOW = ("crop", "error")  # what to do when prompt + new tokens exceed the context


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # the stop token (eos) cannot be drawn before this many new tokens
    temperature: float = 1.0  # 0 -> greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # 1 -> off
    seed: int | None = None  # None -> a fresh random seed (still a private generator)
    stop: Sequence[str] = ()  # stop strings (need a tokenizer); a single str is accepted
    eos_id: int | None = None  # stop token; None -> tokenizer.eos_id when a tokenizer is given
    use_cache: bool = True
    context_overflow: str = "crop"  # past context_length: "crop"/slide the window, or "error"

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.validate()

    def problems(self) -> list[str]:
        """Every bad field, each as ``"sampling.<field>: got ..., expected ..."``."""
        p: list[str] = []

        def bad(name: str, expected: str) -> None:
            p.append(f"sampling.{name}: got {getattr(self, name)!r}, expected {expected}")

        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 0):
            bad("max_new_tokens", "an integer >= 0")
        if not (_is_int(self.min_new_tokens) and self.min_new_tokens >= 0):
            bad("min_new_tokens", "an integer >= 0")
        if not (_is_num(self.temperature) and self.temperature >= 0):
            bad("temperature", "a number >= 0 (0 = greedy)")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            bad("top_k", "an integer >= 1 or None")
        if self.top_p is not None and not (_is_num(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", "a number in (0, 1] or None")
        if not (_is_num(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", "a number > 0 (1 = off)")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "an integer or None")
        if not (isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", "a list of non-empty strings")
        if self.eos_id is not None and not (_is_int(self.eos_id) and self.eos_id >= 0):
            bad("eos_id", "a token id >= 0 or None")
        if not isinstance(self.use_cache, bool):
            bad("use_cache", "True or False")
        if self.context_overflow not in CONTEXT_OVERFLOW:
            bad("context_overflow", " or ".join(map(repr, CONTEXT_OVERFLOW)))
        return p

    def validate(self) -> "SamplingConfig":
        if p := self.problems():
            raise ConfigError(p)
        return self


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x == x  # x == x: not NaN


# ------------------------------------------------------------------------------------ sampling
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Logits (B, V) with every ``seen`` (B, V bool) token's logit divided by ``penalty`` when
    positive and multiplied by it when negative (CTRL; Hugging Face's RepetitionPenaltyLogitsProcessor)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
                      seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row (B,) from next-token logits (B, V): penalty, temperature, top-k, top-p, draw."""
    if seen is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        # keep the most likely tokens until their mass reaches top_p (the first one always stays)
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= cfg.top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------- the loop
@torch.inference_mode()
def _token_steps(model, prompts: list[list[int]], cfg: SamplingConfig,
                 logits_out: list | None = None, eos: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, a (B,) tensor, ``max_new_tokens`` times (``eos`` held
    back for the first ``min_new_tokens``)."""
    mc = model.config
    B, L, n, C = len(prompts), max(map(len, prompts)), cfg.max_new_tokens, mc.context_length
    if n == 0:
        return
    device = next(model.parameters()).device
    # one buffer for the whole generation: left-padded prompts, then the new tokens
    ids = torch.tensor([[0] * (L - len(p)) + p + [0] * n for p in prompts], device=device)  # (B, L+n)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * (len(p) + n) for p in prompts], device=device)
    padded = any(len(p) < L for p in prompts)  # no padding: no mask at all, the fast SDPA path
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device)
        if cfg.seed is None:
            generator.seed()  # a fresh nondeterministic seed
        else:
            generator.manual_seed(cfg.seed)
    seen = None
    if cfg.repetition_penalty != 1.0:  # (B, V) tokens seen so far, padding excluded
        seen = torch.zeros(B, mc.vocab_size, dtype=torch.long, device=device)
        seen = seen.scatter_add_(1, ids[:, :L], mask[:, :L]) > 0
    start = 0  # column of ids held in cache slot 0 (grows once the window slides)
    crop = mc.positional == "learned"  # learned positions cannot slide: recompute the last C tokens
    # a prompt repeated in the batch (GRPO's K samples of one prompt) is prefilled once, then copied
    slot: dict[tuple, int] = {}  # prompt -> its slot among the distinct prompts
    distinct = []  # the row of each distinct prompt's first use
    for i, p in enumerate(prompts):
        if tuple(p) not in slot:
            slot[tuple(p)] = len(distinct)
            distinct.append(i)
    copy_of = torch.tensor([slot[tuple(p)] for p in prompts], device=device)  # (B,) each row's slot
    cache = KVCache.for_model(model, len(distinct), min(L + n, C)) if cfg.use_cache else None
    was_training = model.training
    model.eval()
    try:
        # fp32 CPU linears from oneDNN-packed weights (model/packed.py); a model generating in
        # eval mode keeps them for its next call, one being trained (GRPO rollouts) does not
        with packed_linears(model, keep=not was_training):
            for t in range(n):
                end = L + t  # columns of ids filled so far
                if crop and end > C:
                    cache = None  # past the context: from now on the last C tokens, at positions 0..C-1
                if cache is None:  # the whole (windowed) sequence again
                    s = max(0, end - C)
                    logits = model(ids[:, s:end], attention_mask=mask[:, s:end] if padded else None, last_only=True)
                elif t == 0:  # prefill each distinct prompt, then give every row its prompt's keys/values
                    logits = model(ids[distinct, :end], attention_mask=mask[distinct, :end] if padded else None,
                                   cache=cache, last_only=True)[copy_of]  # (B, 1, V)
                    if len(distinct) < B:
                        cache.select(copy_of)
                    pos = mask[:, :end].sum(-1, keepdim=True)  # (B, 1) position of the next token
                else:  # decode one token
                    if cache.length == cache.max_len:  # window full: forget the oldest position
                        cache.drop_front(1)
                        start += 1
                    logits = model(ids[:, end - 1:end], attention_mask=mask[:, start:end] if padded else None,
                                   position_ids=pos, cache=cache, last_only=True)
                    pos += 1
                logits = logits[:, -1]  # (B, V)
                if logits_out is not None:
                    logits_out.append(logits)
                if t < cfg.min_new_tokens and eos is not None:
                    logits = logits.clone()
                    logits[:, eos] = float("-inf")
                nxt = sample_next_token(logits, cfg, generator, seen)  # (B,)
                ids[:, end] = nxt
                if seen is not None:
                    seen.scatter_(1, nxt[:, None], True)
                yield nxt
    finally:
        model.train(was_training)


def _fill_rows(model, prompts, cfg, tokenizer, rows: list[list[int]], logits_out=None) -> Iterator[None]:
    """Append each step's tokens to ``rows`` (eos left out, stop strings kept) and yield; ends when
    every row has stopped."""
    eos = cfg.eos_id if cfg.eos_id is not None else getattr(tokenizer, "eos_id", None)
    live = range(len(prompts))
    steps = _token_steps(model, prompts, cfg, logits_out, eos)
    try:
        for nxt in steps:
            toks = nxt.tolist()  # one device sync per step, not per row
            still = []
            for i in live:
                if toks[i] == eos:
                    continue
                rows[i].append(toks[i])
                if cfg.stop and find_stop(tokenizer.decode(rows[i]), cfg.stop) >= 0:
                    continue
                still.append(i)
            live = still
            yield
            if not live:
                return
    finally:
        steps.close()  # restores the model's train/eval mode at once


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    return min((i for s in stops if (i := text.find(s)) >= 0), default=-1)


def settled_length(text: str, stops: Sequence[str]) -> int:
    """How many leading characters of ``text`` later tokens cannot change or turn into a stop
    string: not a trailing unfinished character (U+FFFD), not a tail that starts a stop string."""
    hold = 0
    for s in stops:
        hold = max([hold] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
    return max(0, min(len(text.rstrip("\ufffd")), len(text) - hold))


def _before_stop(ids: list[int], tokenizer, stops: Sequence[str]) -> list[int]:
    """The longest prefix of ``ids`` whose text lies wholly before the first stop string."""
    text = tokenizer.decode(ids) if stops else ""
    cut = find_stop(text, stops)
    if cut < 0:
        return ids
    head, k = text[:cut], len(ids)
    while k and not head.startswith(tokenizer.decode(ids[:k])):
        k -= 1
    return ids[:k]


# ------------------------------------------------------------------------------- public API
def generate(model, prompt_ids, cfg: SamplingConfig | None = None, tokenizer=None, *, return_logits: bool = False,
             **overrides):
    """New tokens for one prompt (a list of ids -> a list of ids) or a batch (a list of lists ->
    a list of lists). ``return_logits=True`` also returns the raw logits of every step, (B, steps, V)
    (or (steps, V) for one prompt). Options come from ``cfg`` and/or keyword ``overrides``."""
    prompts, single, cfg = _prepare(model, prompt_ids, cfg, tokenizer, overrides)
    rows: list[list[int]] = [[] for _ in prompts]
    logits_out: list | None = [] if return_logits else None
    for _ in _fill_rows(model, prompts, cfg, tokenizer, rows, logits_out):
        pass
    out = [_before_stop(r, tokenizer, cfg.stop) for r in rows]
    if not return_logits:
        return out[0] if single else out
    V = model.config.vocab_size
    logits = torch.stack(logits_out, 1) if logits_out else torch.empty(len(prompts), 0, V)  # (B, steps, V)
    return (out[0], logits[0]) if single else (out, logits)


def stream(model, prompt_ids: list[int], cfg: SamplingConfig | None = None, tokenizer=None,
           **overrides) -> Iterator[int]:
    """The new tokens of one prompt as they come; the same tokens as :func:`generate`."""
    prompts, single, cfg = _prepare(model, prompt_ids, cfg, tokenizer, overrides)
    if not single:
        raise InputError("stream: expected one prompt (a list of token ids); use generate for a batch")
    return _stream_ids(model, prompts, cfg, tokenizer)


def _stream_ids(model, prompts, cfg, tokenizer) -> Iterator[int]:
    row: list[int] = []
    sent = 0
    for _ in _fill_rows(model, prompts, cfg, tokenizer, [row]):
        if not cfg.stop:
            yield from row[sent:]
            sent = len(row)
            continue
        text = tokenizer.decode(row)
        if find_stop(text, cfg.stop) >= 0:
            break
        settled = text[:settled_length(text, cfg.stop)]
        while sent < len(row) and settled.startswith(tokenizer.decode(row[:sent + 1])):
            yield row[sent]
            sent += 1
    yield from _before_stop(row, tokenizer, cfg.stop)[sent:]


def generate_text(model, tokenizer, prompt: str | list[str], cfg: SamplingConfig | None = None,
                  **overrides) -> str | list[str]:
    """The text generated after ``prompt`` (a str -> a str, a list -> a list), cut before any stop string."""
    prompts, single = _encode_prompts(tokenizer, prompt)
    prompts, _, cfg = _prepare(model, prompts, cfg, tokenizer, overrides)
    rows: list[list[int]] = [[] for _ in prompts]
    for _ in _fill_rows(model, prompts, cfg, tokenizer, rows):
        pass
    texts = []
    for r in rows:
        text = tokenizer.decode(r)
        cut = find_stop(text, cfg.stop)
        texts.append(text if cut < 0 else text[:cut])
    return texts[0] if single else texts


def stream_text(model, tokenizer, prompt: str, cfg: SamplingConfig | None = None, **overrides) -> Iterator[str]:
    """Pieces of generated text as they settle; joined, they equal :func:`generate_text`'s result."""
    prompts, single = _encode_prompts(tokenizer, prompt)
    if not single:
        raise InputError("stream_text: expected one prompt (a str); use generate_text for a batch")
    prompts, _, cfg = _prepare(model, prompts, cfg, tokenizer, overrides)
    return _stream_text(model, prompts, cfg, tokenizer)


def _stream_text(model, prompts, cfg, tokenizer) -> Iterator[str]:
    row: list[int] = []
    sent, text = 0, ""
    for _ in _fill_rows(model, prompts, cfg, tokenizer, [row]):
        text = tokenizer.decode(row)
        cut = find_stop(text, cfg.stop)
        if cut >= 0:
            if cut > sent:
                yield text[sent:cut]
            return
        settled = settled_length(text, cfg.stop)
        if settled > sent:
            yield text[sent:settled]
            sent = settled
    if len(text) > sent:  # whatever is left at the end, unfinished characters included
        yield text[sent:]


# ----------------------------------------------------------------------------- input checks
def _resolve(cfg, overrides: dict) -> SamplingConfig:
    if cfg is None:
        cfg = SamplingConfig()
    elif isinstance(cfg, dict):
        cfg, overrides = SamplingConfig(), {**cfg, **overrides}
    elif not isinstance(cfg, SamplingConfig):
        raise ConfigError(f"sampling: got {type(cfg).__name__}, expected a SamplingConfig, a dict or None")
    names = [f.name for f in dataclasses.fields(SamplingConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError([f"sampling.{k}: unknown option (expected one of {', '.join(names)})" for k in unknown])
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _prepare(model, prompt_ids, cfg, tokenizer, overrides) -> tuple[list[list[int]], bool, SamplingConfig]:
    """Check everything before any compute: options, model kind, prompts, context length."""
    cfg = _resolve(cfg, overrides)
    mc = getattr(model, "config", None)
    if getattr(mc, "arch", None) not in ("decoder", "bigram"):
        raise InputError(f"generation needs a decoder or bigram model, got {type(model).__name__} "
                         f"(arch={getattr(mc, 'arch', None)!r})")
    if cfg.stop and tokenizer is None:
        raise ConfigError("sampling.stop: stop strings need a tokenizer to read the text; pass tokenizer=")
    if hasattr(prompt_ids, "tolist"):  # a tensor or an array
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise InputError(f"prompt_ids: got {prompt_ids!r:.60}, expected a non-empty list of token ids "
                         "or a list of such lists")
    single = not isinstance(prompt_ids[0], (list, tuple))
    prompts = []
    for i, row in enumerate([prompt_ids] if single else prompt_ids):
        if not isinstance(row, (list, tuple)) or not row:
            raise InputError(f"prompt {i}: got {row!r:.60}, expected a non-empty list of token ids")
        for tok in row:
            if not (_is_int(tok) and 0 <= tok < mc.vocab_size):
                raise InputError(f"prompt {i}: token id {tok!r} is out of range, expected 0 <= id < "
                                 f"vocab_size={mc.vocab_size}")
        prompts.append([int(t) for t in row])
    longest = max(map(len, prompts))
    if cfg.context_overflow == "error" and mc.positional != "none" \
            and longest + cfg.max_new_tokens > mc.context_length:
        raise InputError(f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} is "
                         f"{longest + cfg.max_new_tokens} tokens, longer than the model's context_length "
                         f"{mc.context_length}; expected at most {mc.context_length} with "
                         f"context_overflow='error' (the default 'crop' keeps the last tokens)")
    return [p[-mc.context_length:] for p in prompts], single, cfg  # keep the last context_length tokens


def _encode_prompts(tokenizer, prompt) -> tuple[list[list[int]], bool]:
    single = isinstance(prompt, str)
    texts = [prompt] if single else prompt
    if tokenizer is None or not isinstance(texts, (list, tuple)) or not texts \
            or not all(isinstance(t, str) for t in texts):
        raise InputError(f"prompt: got {prompt!r:.60} with tokenizer {tokenizer!r}, expected a str or a "
                         "non-empty list of str and a tokenizer")
    prompts = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if not ids:  # nothing to condition on: start from bos when there is one
            if tokenizer.bos_id is None:
                raise InputError(f"prompt {i}: {text!r} encodes to no tokens and the tokenizer has no bos "
                                 "token; expected non-empty text")
            ids = [tokenizer.bos_id]
        prompts.append(ids)
    return prompts, single
