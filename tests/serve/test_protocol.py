"""lmforge.serve.protocol: requests parsed strictly (a number must be a JSON number), unknown fields
ignored, every bad field named on one line with its location, body errors named; chat roles
mapped and checked, stop lists and unsupported options refused with OpenAI-style error bodies."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("pydantic")

from lmforge.serve.protocol import (  # noqa: E402
    ApiError, ChatCompletionRequest, CompletionRequest, error_body, parse, usage,
)


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def api_error(kind, raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(kind, raw)
    assert e.value.status == 400
    return e.value


def test_chat_request_parses_and_maps_roles():
    req = parse(ChatCompletionRequest, body(
        model="m", messages=[{"role": "developer", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        max_completion_tokens=5, max_tokens=9, stop="\n", unknown_field=1))
    assert req.chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert req.answer_limit() == 5 and req.stops() == ["\n"] and not req.include_usage()
    comp = parse(CompletionRequest, body(model="m", prompt=["a", "b"], stream=True,
                                         stream_options={"include_usage": True}))
    assert comp.prompts() == ["a", "b"] and comp.answer_limit() == 16 and comp.include_usage()


def test_strict_types_and_every_bad_field_on_one_line():
    e = api_error(ChatCompletionRequest, body(model="m", messages=[{"role": "user", "content": "x"}],
                                              temperature="0.5", n=0))
    assert "\n" not in e.message
    assert "temperature: got \"0.5\", expected a valid number" in e.message
    assert "n: " in e.message and "greater than or equal to 1" in e.message
    assert e.param == "temperature"
    e = api_error(ChatCompletionRequest, body(model="m"))
    assert e.message == "messages: field required"
    e = api_error(ChatCompletionRequest, body(model="m", messages=[{"role": "user", "content": 5}]))
    assert e.message.startswith("messages[0].content: got 5, expected a valid string or a valid list")


@pytest.mark.parametrize("raw,match,code", [
    (b"\xff{}", r"request body: not valid UTF-8 \(byte 0\)", "invalid_body"),
    (b"{\"model\": ", r"request body: malformed JSON \(Expecting value at line 1 column 11\)", "invalid_json"),
    (b"[1, 2]", "request body: got a JSON list, expected a JSON object", "invalid_json"),
])
def test_bad_bodies_are_named(raw, match, code):
    e = api_error(CompletionRequest, raw)
    assert e.code == code
    assert re.search(match, e.message), e.message


def test_roles_stops_and_unsupported_options_are_refused():
    chat = lambda **kw: parse(ChatCompletionRequest, body(model="m", **kw))  # noqa: E731
    with pytest.raises(ApiError, match="messages\\[1\\].role: got 'robot', expected one of"):
        chat(messages=[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]).chat()
    with pytest.raises(ApiError, match="messages: no user message"):
        chat(messages=[{"role": "system", "content": "a"}]).chat()
    with pytest.raises(ApiError, match="stop: got \\[''\\], expected up to"):
        chat(messages=[{"role": "user", "content": "a"}], stop=[""]).stops()
    with pytest.raises(ApiError, match="presence_penalty: got 0.5, expected 0") as e:
        chat(messages=[{"role": "user", "content": "a"}], presence_penalty=0.5).check_unsupported()
    assert e.value.body() == error_body(e.value.message, param="presence_penalty")
    with pytest.raises(ApiError, match="logprobs: got true"):
        chat(messages=[{"role": "user", "content": "a"}], logprobs=True).check_unsupported()


def test_error_body_and_usage_shapes():
    assert error_body("bad", code="c", param="p") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "p", "code": "c"}}
    assert usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
