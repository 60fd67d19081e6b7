"""The OpenAI API's request and response shapes, as far as ``lmforge serve`` speaks them.

Requests are pydantic models in strict mode (a number must be a JSON number, not a string);
unknown fields are ignored, as OpenAI-compatible servers do. :func:`parse` turns a decoded JSON
body into one, or raises :class:`ApiError` with one line naming every bad field. Responses are
plain dicts built by the ``*_response`` / ``*_chunk`` functions. Every error the server returns
has OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_N = 16  # choices per request


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------------------ requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(400, f"stop: got {self.stop!r}, expected up to {MAX_STOPS} non-empty strings",
                           param="stop")
        return stops

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ApiError(400, f"{name}: got {getattr(self, name)}, expected 0 (not supported by this server)",
                               param=name)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs:
            raise ApiError(400, "logprobs: got true, expected false (not supported by this server)", param="logprobs")

    def chat(self) -> list[dict]:
        """The messages as ``{role, content}`` dicts (``developer`` becomes ``system``)."""
        out = []
        for i, m in enumerate(self.messages):
            if m.role not in ROLE_NAMES:
                raise ApiError(400, f"messages[{i}].role: got {m.role!r}, expected one of "
                               f"{', '.join(ROLE_NAMES)}", param=f"messages[{i}].role")
            out.append({"role": ROLE_NAMES[m.role], "content": m.text()})
        if not any(m["role"] == "user" for m in out):
            raise ApiError(400, "messages: no user message; expected at least one message with role 'user'",
                           param="messages")
        return out

    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs:
            raise ApiError(400, f"logprobs: got {self.logprobs}, expected null (not supported by this server)",
                           param="logprobs")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def answer_limit(self) -> int | None:
        return self.max_tokens


def parse(kind: type[_Strict], body: bytes) -> _Strict:
    """The request in ``body`` (raw bytes), or an :class:`ApiError` naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body: not valid UTF-8 (byte {e.start}); expected a JSON object in UTF-8",
                       code="invalid_body") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                       f"expected a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body: got a JSON {type(data).__name__}, expected a JSON object",
                       code="invalid_json")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, _one_line(e), param=_loc(e.errors()[0]["loc"])) from None


def _one_line(e: ValidationError) -> str:
    """Every bad field once: ``"stop: got 5, expected a valid string or a valid list; n: ..."``
    (the branches of a union that all failed are said together)."""
    by_field: dict[str, list] = {}
    for err in e.errors():
        by_field.setdefault(_loc(err["loc"]), []).append(err)
    problems = []
    for where, errs in by_field.items():
        if any(x["type"] == "missing" for x in errs):
            problems.append(f"{where}: field required")
            continue
        wants = [x["msg"].removeprefix("Input should be ").removeprefix("Value should be ") for x in errs]
        got = json.dumps(errs[0].get("input"))[:60]
        if all(x["msg"].startswith(("Input should be", "Value should be")) for x in errs):
            problems.append(f"{where}: got {got}, expected {' or '.join(dict.fromkeys(wants))}")
        else:
            problems.append(f"{where}: {'; '.join(dict.fromkeys(x['msg'][0].lower() + x['msg'][1:] for x in errs))}, "
                            f"got {got}")
    return "; ".join(problems)


def _loc(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; union branch names (str, list[...]) dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (part in ("str", "int", "float", "bool", "none") or "[" in part or part.startswith("function-")
                  or part in ("TextPart", "StreamOptions")):
            out += ("." if out else "") + part
    return out


# ------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(id: str, model: str, created: int, choices: list[tuple[str, str]], use: dict) -> dict:
    """``choices``: (text, finish_reason) per choice."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
            "usage": use}


def chat_chunk(id: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_response(id: str, model: str, created: int, choices: list[tuple[str, str]], use: dict) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": use}


def completion_chunk(id: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None = None) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(id: str, model: str, created: int, object: str, use: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": use}


def models_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge"}]}


def sse(data: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
