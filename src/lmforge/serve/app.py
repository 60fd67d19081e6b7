"""The HTTP side of ``lmforge serve``: FastAPI routes in front of a :class:`~lmforge.serve.batcher.Batcher`.

    POST /v1/chat/completions   messages rendered with the model's chat template
    POST /v1/completions        plain text prompts (a string or a list of strings)
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", running, waiting, ...}
    GET  /                      a chat page (lmforge/serve/page/index.html)

Each request is checked before it takes a slot (body, fields, model name, roles, prompt and
answer lengths against the context and the server's limits) and refused with a 4xx OpenAI-style
error; a full server answers 429, one shutting down 503. An answer streams as server-sent events
(``stream: true``) ending in ``data: [DONE]``. A client that goes away mid-answer cancels its
requests: they leave the batch before the next decode step.

Events travel from the decode thread to the request's coroutine through an ``asyncio.Queue``
(``loop.call_soon_threadsafe``), so no thread blocks on a client.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.chat import render
from lmforge.errors import ConfigError, InputError
from lmforge.generate import SamplingConfig
from lmforge.serve import protocol as P
from lmforge.serve.batcher import Batcher, ServerBusy, ServerClosing

@dataclass
class ServeLimits:
    """What one request may ask for (None: up to the model's context)."""

    max_tokens: int = 1024  # longest answer
    max_prompt_tokens: int | None = None  # longest prompt


def create_app(batcher: Batcher, model_name: str, limits: ServeLimits | None = None) -> FastAPI:
    """The app serving ``batcher``'s model as ``model_name``; starts the batcher's thread at
    startup if it is not running and drains it at shutdown."""
    limits = limits or ServeLimits()
    tok = batcher.tokenizer
    context, vocab = batcher.model.config.context_length, batcher.model.config.vocab_size
    created = P.now()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if batcher._thread is None:
            batcher.start()
        yield
        await asyncio.to_thread(batcher.close, True)  # in-flight requests have finished by now

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # ---------------------------------------------------------------- errors
    @app.exception_handler(P.ApiError)
    async def _api_error(request, e: P.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return JSONResponse(P.error_body(f"{request.method} {request.url.path}: {e.detail}",
                                         "invalid_request_error", code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    # ---------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        s = batcher.stats()
        return {"status": "draining" if s["closing"] else "ok", "model": model_name, **s}

    @app.get("/v1/models")
    async def models():
        return P.models_list(model_name, created)

    page_html = resources.files("lmforge.serve").joinpath("page/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = P.parse(P.ChatCompletionRequest, await request.body())
        _check_model(body.model)
        body.check_unsupported()
        try:
            text = render(body.chat(), tok, add_generation_prompt=True)
        except InputError as e:
            raise P.ApiError(400, f"messages: {e}", param="messages") from None
        prompt = _encode(text)
        return await _run(request, body, [prompt], "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = P.parse(P.CompletionRequest, await request.body())
        _check_model(body.model)
        body.check_unsupported()
        prompts = [_encode(t) for t in body.prompts()]
        return await _run(request, body, prompts, "text", echo=body.prompts() if body.echo else None)

    # ---------------------------------------------------------------- helpers
    def _check_model(name: str) -> None:
        if name != model_name:
            raise P.ApiError(404, f"model: got {name!r}, expected {model_name!r} (the model this server serves; "
                             f"see GET /v1/models)", code="model_not_found", param="model")

    def _encode(text: str) -> list[int]:
        ids = tok.encode(text)
        if not ids:  # nothing to condition on: start from bos, as lmforge.generate does
            if tok.bos_id is None:
                raise P.ApiError(400, "prompt: encodes to no tokens and the tokenizer has no bos token; "
                                 "expected non-empty text", param="prompt")
            ids = [tok.bos_id]
        if max(ids) >= vocab:  # a tokenizer with more tokens than the model has embeddings
            raise P.ApiError(400, f"prompt: token id {max(ids)} ({tok.id_to_token(max(ids))!r}) is outside the "
                             f"model's vocabulary of {vocab}; expected ids below {vocab}", param="prompt")
        return ids

    def _sampling(body, prompt: list[int], choice: int) -> SamplingConfig:
        n_prompt, asked = len(prompt), body.answer_limit()
        longest = min(context, limits.max_prompt_tokens or context)
        if n_prompt > longest:
            what = f"the model's context of {context}" if longest == context else f"this server's limit of {longest}"
            raise P.ApiError(400, f"prompt: {n_prompt} tokens, more than {what}; expected at most {longest}",
                             code="context_length_exceeded",
                             param="messages" if hasattr(body, "messages") else "prompt")
        if asked is not None and asked > limits.max_tokens:
            raise P.ApiError(400, f"max_tokens: got {asked}, expected at most {limits.max_tokens} (this server's "
                             f"limit)", param="max_tokens")
        n_new = asked if asked is not None else min(limits.max_tokens, context - n_prompt)
        if n_prompt + n_new > context:
            raise P.ApiError(400, f"prompt of {n_prompt} tokens + max_tokens={n_new} is {n_prompt + n_new} tokens, "
                             f"more than the model's context of {context}; expected at most {context}",
                             code="context_length_exceeded", param="max_tokens")
        seed = body.seed + choice if body.seed is not None else None  # choice j of n: seed + j
        try:
            return SamplingConfig(max_new_tokens=n_new, temperature=body.temperature,
                                  top_p=body.top_p if body.temperature > 0 and body.top_p < 1 else None,
                                  seed=seed, stop=body.stops())
        except ConfigError as e:
            raise P.ApiError(400, str(e).replace("sampling.", "").replace("max_new_tokens", "max_tokens")) from None

    async def _run(request: Request, body, prompts: list[list[int]], kind: str, echo: list[str] | None = None):
        """Submit n choices per prompt, then answer as one JSON or as a stream."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for prompt in prompts:
            for j in range(body.n):
                sink = (lambda e, k=len(jobs): loop.call_soon_threadsafe(events.put_nowait, (k, e)))
                jobs.append((prompt, _sampling(body, prompt, j), sink))
        try:
            reqs = batcher.submit_many(jobs)
        except ServerBusy as e:
            raise P.ApiError(429, str(e), "rate_limit_error", code="server_busy") from None
        except ServerClosing as e:
            raise P.ApiError(503, str(e), "server_error", code="shutting_down") from None
        rid = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
        n_prompt = sum(len(p) for p in prompts)
        prefixes = [echo[k // body.n] if echo else "" for k in range(len(reqs))]

        def cancel_all():
            for r in reqs:
                r.cancel()

        if body.stream:
            return StreamingResponse(_stream(events, reqs, rid, kind, n_prompt, body.include_usage(), prefixes,
                                             cancel_all),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async def watch():  # the body is read: the next message can only be the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancel_all()
            events.put_nowait((None, None))

        watcher = asyncio.create_task(watch())
        try:
            left = len(reqs)
            while left:
                k, e = await events.get()
                if e is None:  # the client left
                    return JSONResponse(P.error_body("client disconnected"), status_code=499)
                if e.finish_reason == "error":
                    raise P.ApiError(500, f"generation failed: {e.error}", "server_error")
                left -= e.finish_reason is not None
        finally:
            watcher.cancel()
            cancel_all()  # no-op for finished requests; frees the slots if this coroutine was cancelled
        use = P.usage(n_prompt, sum(len(r.tokens) for r in reqs))
        choices = [(pre + r.text, r.finish_reason) for pre, r in zip(prefixes, reqs)]
        build = P.chat_response if kind == "chat" else P.completion_response
        return build(rid, model_name, P.now(), choices, use)

    async def _stream(events, reqs, rid, kind, n_prompt, include_usage, prefixes, cancel_all):
        t = P.now()
        chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        try:
            for k in range(len(reqs)):  # the opening chunk of every choice
                if kind == "chat":
                    yield P.sse(P.chat_chunk(rid, model_name, t, k, {"role": "assistant", "content": ""}))
                elif prefixes[k]:
                    yield P.sse(P.completion_chunk(rid, model_name, t, k, prefixes[k]))
            left = len(reqs)
            while left:
                k, e = await events.get()
                if e.text:
                    yield P.sse(P.chat_chunk(rid, model_name, t, k, {"content": e.text}) if kind == "chat"
                                else P.completion_chunk(rid, model_name, t, k, e.text))
                if e.finish_reason == "error":
                    yield P.sse(P.error_body(f"generation failed: {e.error}", "server_error"))
                    cancel_all()
                    break
                if e.finish_reason is not None:
                    left -= 1
                    yield P.sse(P.chat_chunk(rid, model_name, t, k, {}, e.finish_reason) if kind == "chat"
                                else P.completion_chunk(rid, model_name, t, k, "", e.finish_reason))
            if include_usage:
                use = P.usage(n_prompt, sum(len(r.tokens) for r in reqs))
                yield P.sse(P.usage_chunk(rid, model_name, t, chunk_object, use))
            yield P.sse("[DONE]")
        finally:  # the client left (the generator is closed or cancelled): free the slots
            cancel_all()

    return app
