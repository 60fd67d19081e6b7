"""Continuous batching: many requests decoded together by one thread that owns the model.

A request waits in a queue until a slot is free. Between two decode steps the thread takes it
in: its prompt goes through the model alone (*prefill*, into a cache of its own), it samples its
first token, and its keys/values join the running batch. Every decode step then feeds the last
token of every running request through the model at once. A request leaves the batch as soon as
it is done (end-of-sequence token, a stop string, ``max_tokens``, or cancelled because its
client went away), and its row is freed for the next one.

The running batch's cache
    All rows live in one :class:`~lmforge.model.KVCache` of shape (B, nkv, S, hs) per layer,
    *right-aligned*: every row's newest key sits in the same column, and a row with a shorter
    history is padded on the left, hidden by the attention mask, exactly as
    :mod:`lmforge.generate` left-pads a batch of prompts. Each row's position ids count its own
    real tokens, so a row computes what it would compute alone. When a longer request joins,
    the others shift right; when rows leave, columns that are padding in every remaining row are
    dropped, so S never exceeds the longest live request. The cache is rebuilt only when rows
    join or leave, and sized so it never has to grow in between.

Same output as alone
    Prefill runs the prompt exactly as ``lmforge.generate`` does; a decode step differs only in
    the batch size and the padding mask, i.e. by float rounding, so greedy text is the text the
    request gets alone (tested against :func:`lmforge.generate.generate` with staggered
    arrivals). Sampling uses a private ``torch.Generator`` per request, seeded with its ``seed``,
    drawing one token per step as ``generate`` does: a seeded sampled request also repeats.

Events go to each request's ``sink`` (called from the decode thread): :class:`Event` with the
new text as it settles (text that might begin a stop string, or ends in an unfinished UTF-8
character, is held back until it is settled), and a last one with ``finish_reason`` set.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import InputError, LMForgeError
from lmforge.generate import SamplingConfig, find_stop, settled_length, sample_next_token
from lmforge.model.layers import KVCache
from lmforge.model.packed import packed_linears

__all__ = ["Batcher", "Request", "Event", "ServerBusy", "ServerClosing"]


class ServerBusy(LMForgeError):
    """Every slot is taken and the waiting queue is full."""


class ServerClosing(LMForgeError):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class Event:
    """What a request's sink receives: ``text`` settled since the last event; the last event has
    ``finish_reason`` ("stop", "length", "cancelled" or "error", then ``error`` says why)."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, sampling options and where its events go."""

    prompt: list[int]
    cfg: SamplingConfig
    sink: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # sampled ids (the end-of-sequence token left out)
    text: str = ""  # the answer as sent so far
    finish_reason: str | None = None
    _sent: int = 0  # characters of the decoded answer already sent
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating (the client left): the request leaves the batch before the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has finished; False on timeout."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class _RunningBatch:
    """The requests being decoded and their keys/values in one right-aligned cache (see above)."""

    def __init__(self, model):
        self.model = model
        self.requests: list[Request] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, S_max) 1 where a row has a real key
        self.pos: torch.Tensor | None = None  # (B, 1) each row's count of real keys = next position

    def __len__(self) -> int:
        return len(self.requests)

    def rebuild(self, keep: list[int], newcomers: Sequence[tuple[Request, KVCache]] = ()) -> None:
        """Keep rows ``keep`` (in order), append ``newcomers`` (requests with their prefilled
        batch-1 caches), drop columns that are padding in every row, and size the cache for the
        rest of every row's generation."""
        old_len = self.cache.length if self.cache is not None else 0
        real = [int(self.pos[i]) for i in keep]  # real keys per kept row
        requests = [self.requests[i] for i in keep] + [r for r, _ in newcomers]
        real += [c.length for _, c in newcomers]
        self.requests = requests
        if not requests:
            self.cache = self.mask = self.pos = None
            return
        L = max(real)  # the new common length: the longest history
        # each row feeds (max_tokens - sampled) more tokens at most; the last one needs no column
        room = max(r.cfg.max_new_tokens - len(r.tokens) for r in requests)
        B, dev = len(requests), next(self.model.parameters()).device
        cache = KVCache.for_model(self.model, B, L + room)
        mask = torch.zeros(B, L + room, dtype=torch.long, device=dev)
        n_old = min(L, old_len)  # the old columns that hold some kept row's keys
        if keep:
            idx = torch.tensor(keep, device=dev)
            for new, old in zip((*cache.k, *cache.v), (*self.cache.k, *self.cache.v)):
                new[:len(keep), :, L - n_old:L] = old[idx, :, old_len - n_old:old_len]
            mask[:len(keep), L - n_old:L] = self.mask[idx, old_len - n_old:old_len]
        for row, (_, mine) in enumerate(newcomers, start=len(keep)):
            n = mine.length
            for new, old in zip((*cache.k, *cache.v), (*mine.k, *mine.v)):
                new[row, :, L - n:L] = old[0, :, :n]
            mask[row, L - n:L] = 1
        cache.length = L
        self.cache, self.mask = cache, mask
        self.pos = torch.tensor(real, device=dev)[:, None]  # (B, 1)

    def step(self) -> torch.Tensor:
        """Feed every row's last token; next-token logits (B, V)."""
        L = self.cache.length
        last = torch.tensor([r.tokens[-1] for r in self.requests], device=self.pos.device)[:, None]  # (B, 1)
        self.mask[:, L] = 1
        mask = self.mask[:, :L + 1]  # (B, S)
        padded = not bool(mask.all())  # no padding: no mask, the fast path (what generate runs alone)
        logits = self.model(last, attention_mask=mask if padded else None, position_ids=self.pos,
                            cache=self.cache, last_only=True)  # (B, 1, V)
        self.pos += 1
        return logits[:, -1]


class Batcher:
    """The decode thread and its queue.

        batcher = Batcher(model, tokenizer, max_batch=8, max_waiting=32).start()
        req = batcher.submit(prompt_ids, SamplingConfig(max_new_tokens=50, temperature=0), sink)
        ...
        batcher.close()          # finishes what is running (drain), then the thread ends

    ``max_batch`` requests are decoded together; up to ``max_waiting`` more wait for a slot;
    past that :meth:`submit` raises :class:`ServerBusy`. After :meth:`close`, :class:`ServerClosing`.
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_waiting: int = 32):
        if getattr(model.config, "arch", None) != "decoder":
            raise InputError(f"serving needs a decoder language model, got arch={model.config.arch!r}")
        if max_batch < 1 or max_waiting < 0:
            raise InputError(f"max_batch={max_batch}, max_waiting={max_waiting}: expected >= 1 and >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._waiting: deque[Request] = deque()
        self._batch = _RunningBatch(self.model)
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.finished: deque[Request] = deque(maxlen=256)  # the latest finished requests, newest last
        self.counts = {"finished": 0, "cancelled": 0, "errors": 0, "steps": 0, "max_batch_seen": 0}

    # --------------------------------------------------------------------- public
    def start(self) -> "Batcher":
        self._thread = threading.Thread(target=self._loop, name="lmforge-decode", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt: Sequence[int], cfg: SamplingConfig, sink: Callable[[Event], None]) -> Request:
        """Queue one request; see :meth:`submit_many`."""
        return self.submit_many([(prompt, cfg, sink)])[0]

    def submit_many(self, items: Sequence[tuple[Sequence[int], SamplingConfig, Callable]]) -> list[Request]:
        """Queue several requests at once (all or none: the ``n`` choices of one API call)."""
        reqs = [Request(list(p), cfg, sink) for p, cfg, sink in items]
        for r in reqs:
            if not r.prompt:
                raise InputError("prompt: expected at least one token id")
        with self._lock:
            if self._closing:
                raise ServerClosing("the server is shutting down; no new requests are taken")
            free = self.max_batch + self.max_waiting - len(self._batch) - len(self._waiting)
            if len(reqs) > free:
                raise ServerBusy(f"the server is full ({len(self._batch)} running, {len(self._waiting)} "
                                 f"waiting); {len(reqs)} more requested; try again shortly")
            self._waiting.extend(reqs)
            self._lock.notify()
        return reqs

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._batch), "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "max_waiting": self.max_waiting, "closing": self._closing, **self.counts}

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Take no new requests; with ``drain`` let the running and waiting ones finish, else
        cancel them. Waits for the thread (up to ``timeout`` s); True when it has ended."""
        with self._lock:
            self._closing = True
            if not drain:
                for r in (*self._waiting, *self._batch.requests):
                    r.cancel()
            self._lock.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --------------------------------------------------------------------- the thread
    def _loop(self) -> None:
        with torch.inference_mode(), packed_linears(self.model, keep=True):
            while True:
                with self._lock:
                    while not self._waiting and not len(self._batch) and not self._closing:
                        self._lock.wait()
                    if self._closing and not self._waiting and not len(self._batch):
                        return
                    take = max(0, self.max_batch - len(self._batch))
                    newcomers = [self._waiting.popleft() for _ in range(min(take, len(self._waiting)))]
                self._leave_cancelled()
                if newcomers:
                    self._guarded(self._admit, *newcomers)
                if len(self._batch):
                    self._guarded(self._decode_step)

    def _guarded(self, fn, *args) -> None:
        """Run one admission or step; an unexpected failure ends the requests it touched."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 -- the thread must keep serving the others
            victims = list(args) if args else list(self._batch.requests)
            for r in victims:
                self._finish(r, "error", f"{type(e).__name__}: {e}")
            with self._lock:
                self.counts["errors"] += 1
            if not args:
                self._batch.rebuild([])
            else:
                self._batch.rebuild([i for i, r in enumerate(self._batch.requests) if not r.done])

    def _admit(self, *reqs: Request) -> None:
        """Prefill each request's prompt alone, sample its first token, and add the ones that go
        on to the batch (one rebuild for all of them)."""
        joining = []
        for req in reqs:
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            try:
                cache, token = self._prefill(req)
            except Exception as e:  # noqa: BLE001 -- this request fails, the others go on
                self._finish(req, "error", f"{type(e).__name__}: {e}")
                with self._lock:
                    self.counts["errors"] += 1
                continue
            if not self._take(req, token):
                joining.append((req, cache))
        if joining:
            self._batch.rebuild(list(range(len(self._batch))), joining)

    def _prefill(self, req: Request) -> tuple[KVCache, int]:
        """``req``'s prompt through the model alone, as lmforge.generate runs it: its cache and first token."""
        device = next(self.model.parameters()).device
        if req.cfg.temperature > 0:
            req._generator = torch.Generator(device=device)
            if req.cfg.seed is None:
                req._generator.seed()
            else:
                req._generator.manual_seed(req.cfg.seed)
        ids = torch.tensor([req.prompt], device=device)  # (1, T)
        cache = KVCache.for_model(self.model, 1, len(req.prompt))
        logits = self.model(ids, cache=cache, last_only=True)[:, -1]  # (1, V)
        return cache, int(sample_next_token(logits, req.cfg, req._generator)[0])

    def _decode_step(self) -> None:
        logits = self._batch.step()  # (B, V)
        reqs = self._batch.requests
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row
        tokens = [g if r.cfg.temperature == 0 else int(sample_next_token(logits[i:i + 1], r.cfg, r._generator)[0])
                  for i, (r, g) in enumerate(zip(reqs, greedy))]
        with self._lock:
            self.counts["steps"] += 1
            self.counts["max_batch_seen"] = max(self.counts["max_batch_seen"], len(reqs))
        ended = [self._take(r, t) for r, t in zip(reqs, tokens)]
        if any(ended):
            self._batch.rebuild([i for i, e in enumerate(ended) if not e])

    def _leave_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self._batch.requests) if r.cancelled]
        if gone:
            for i in gone:
                self._finish(self._batch.requests[i], "cancelled")
            self._batch.rebuild([i for i in range(len(self._batch)) if i not in gone])

    def _take(self, req: Request, token: int) -> bool:
        """Record a sampled token, send the text it settles; True when the request is done."""
        if token == self.eos_id:  # the end: text held back for a possible stop string is real
            self._send(req, self.tokenizer.decode(req.tokens))
            return self._finish(req, "stop")
        req.tokens.append(token)
        text = self.tokenizer.decode(req.tokens)
        stops = req.cfg.stop
        cut = find_stop(text, stops) if stops else -1
        if cut >= 0:
            self._send(req, text[:cut])
            return self._finish(req, "stop")
        if len(req.tokens) >= req.cfg.max_new_tokens:
            self._send(req, text)
            return self._finish(req, "length")
        self._send(req, text[:settled_length(text, stops)])
        return False

    def _send(self, req: Request, text: str) -> None:
        """Send what ``text`` (the answer so far, settled) adds to what was sent."""
        if len(text) > req._sent:
            piece = text[req._sent:]
            req._sent = len(text)
            req.text += piece
            req.sink(Event(text=piece))

    def _finish(self, req: Request, reason: str, error: str | None = None) -> bool:
        if req.done:
            return True
        req.finish_reason = reason
        with self._lock:
            self.counts["finished"] += 1
            self.counts["cancelled"] += reason == "cancelled"
            self.finished.append(req)
        try:
            req.sink(Event(finish_reason=reason, error=error))
        finally:
            req._done.set()
        return True


def wait_all(requests: Sequence[Request], timeout: float) -> bool:
    """Block until every request has finished, at most ``timeout`` seconds in all."""
    end = time.monotonic() + timeout
    return all(r.wait(max(0.0, end - time.monotonic())) for r in requests)
