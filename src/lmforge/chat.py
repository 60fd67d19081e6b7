"""Chat templates: messages -> text and token ids, with the span of every message.

A chat model was trained on conversations laid out in one exact text format, which its
tokenizer carries as a Jinja *chat template* (Hugging Face's ``tokenizer_config.json`` and
GGUF's ``tokenizer.chat_template``). :func:`render` runs that template the way ``transformers``
does (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``strftime_now``, the special tokens as variables). A tokenizer without a template gets
:data:`LMFORGE_TEMPLATE` when its vocabulary has lmforge's role tokens (the same text as
:func:`render_chat`, lmforge's own format), else ChatML (:data:`CHATML_TEMPLATE`).

Training on chats needs to know which tokens belong to which message: :func:`render_with_spans`
renders the conversation once, finds each message's segment by rendering growing prefixes of the
conversation, finds the content inside its segment, and maps both to token positions::

    chat = render_with_spans(messages, tokenizer)
    for s in chat.spans:                    # one per message
        s.role, chat.text[s.start:s.end]    # the whole segment, role header included
        chat.ids[s.train_token_start:s.token_end]   # content + end-of-turn: what an SFT loss trains
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from lmforge.errors import InputError

# lmforge's own chat format: each message is "<|role|>\n{content}<|end|>\n" (the role tokens are
# special tokens of every lmforge tokenizer, lmforge.tokenizer.DEFAULT_SPECIAL_TOKENS)
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLES = tuple(ROLE_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# lmforge's own format (render_chat below) as a Jinja template, for tokenizers exported with it
LMFORGE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The one chat format of lmforge: each message becomes ``"<|role|>\n{content}<|end|>\n"``;
    ``add_generation_prompt`` appends ``"<|assistant|>\n"`` so a model continues as the assistant."""
    parts = []
    for n, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise InputError(f"messages[{n}]: expected a dict with a string 'content'")
        role = msg.get("role")
        if role not in ROLE_TOKENS:
            raise InputError(f"messages[{n}].role: unknown role {role!r}; "
                             f"expected one of {', '.join(ROLES)}")
        parts.append(f"{ROLE_TOKENS[role]}\n{msg['content']}{END}\n")
    if add_generation_prompt:
        parts.append(f"{ASSISTANT}\n")
    return "".join(parts)


@dataclass
class MessageSpan:
    """Where one message lies in the rendered chat, in characters and in tokens (end exclusive).

    ``start:end`` is the message's whole segment (role header, content, end-of-turn marker);
    ``content_start:content_end`` its content. ``train_*`` runs from the content to the segment's
    end: the tokens an assistant turn is trained on (its words and its end-of-turn token).
    """

    role: str
    start: int
    end: int
    content_start: int
    content_end: int
    token_start: int = 0
    token_end: int = 0
    content_token_start: int = 0
    content_token_end: int = 0

    @property
    def train_token_start(self) -> int:
        return self.content_token_start


@dataclass
class RenderedChat:
    text: str
    ids: list[int]
    spans: list[MessageSpan] = field(default_factory=list)
    generation_prompt_start: int | None = None  # char offset of the assistant header, if added

    def role_mask(self, roles=("assistant",)) -> list[bool]:
        """Per token: True where it is the content or end-of-turn of a message with one of ``roles``."""
        mask = [False] * len(self.ids)
        for s in self.spans:
            if s.role in roles:
                for i in range(s.content_token_start, s.token_end):
                    mask[i] = True
        return mask


# ======================================================================== rendering
def _raise(message: str):
    raise InputError(f"chat template: {message}")


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise InputError(f"chat template does not compile: {type(e).__name__}: {e}") from None


def template_of(tokenizer) -> str:
    """The tokenizer's chat template, or the default for its vocabulary."""
    t = getattr(tokenizer, "chat_template", None)
    if t:
        return t
    if tokenizer is not None and tokenizer.token_to_id("<|user|>") is not None:
        return LMFORGE_TEMPLATE
    return CHATML_TEMPLATE


def check_messages(messages) -> list[dict]:
    """Each message a dict with a known ``role`` and a string ``content``; else an InputError."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages: expected a list of {{role, content}} dicts, got {type(messages).__name__}")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InputError(f"messages[{n}]: expected a dict with a string 'content'")
        if m.get("role") not in ROLES:
            raise InputError(f"messages[{n}].role: unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
    return list(messages)


def _special_tokens(tokenizer) -> dict[str, str]:
    out = {}
    if tokenizer is None:
        return out
    for role in ("bos", "eos", "pad", "unk"):
        i = getattr(tokenizer, f"{role}_id", None)
        if i is not None:
            out[f"{role}_token"] = tokenizer.id_to_token(i)
    return out


def render(messages, tokenizer=None, template: str | None = None, add_generation_prompt: bool = False,
           **extra) -> str:
    """The text of ``messages`` in ``template`` (default: the tokenizer's, see :func:`template_of`)."""
    import jinja2

    messages = check_messages(messages)
    tmpl = _compile(template or template_of(tokenizer))
    try:
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           **_special_tokens(tokenizer), **extra)
    except InputError:
        raise
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
        raise InputError(f"chat template failed to render: {type(e).__name__}: {e}") from None


# ======================================================================== spans
def render_with_spans(messages, tokenizer, template: str | None = None,
                      add_generation_prompt: bool = False) -> RenderedChat:
    """Render and tokenize ``messages``; return the text, ids and each message's spans.

    A message's segment ends where the rendering of the conversation up to and including it
    ends (templates render prefixes as prefixes: checked, with a fallback to the content's end
    when one does not). Content is found inside its segment; a template that rewrites content
    (e.g. strips it) falls back to the stripped content, then to the whole segment.
    """
    messages = check_messages(messages)
    text = render(messages, tokenizer, template, add_generation_prompt)
    body = render(messages, tokenizer, template, False) if add_generation_prompt else text
    spans: list[MessageSpan] = []

    def prefix_of(k: int) -> str | None:  # the rendering of the first k messages, if it renders
        try:
            return render(messages[:k], tokenizer, template)
        except InputError:  # e.g. a template that needs a first message or alternating roles
            return None

    empty = prefix_of(0) if messages else ""
    cursor = len(empty) if empty is not None and body.startswith(empty) else 0
    for n, m in enumerate(messages):
        prefix = prefix_of(n + 1)
        content = m["content"]
        c0 = text.find(content, cursor) if content else -1
        if c0 < 0 and content.strip():
            content = content.strip()
            c0 = text.find(content, cursor)
        if prefix is not None and body.startswith(prefix) and len(prefix) >= cursor:
            end = len(prefix)
        elif c0 >= 0:
            end = c0 + len(content)
        else:
            raise InputError(f"messages[{n}]: its content does not appear in the rendered chat; the chat "
                             f"template rewrites it, so its span cannot be found")
        if c0 < 0 or c0 + len(content) > end:  # empty or rewritten content: the segment's tail
            c0, content = end, ""
        spans.append(MessageSpan(m["role"], cursor, end, c0, c0 + len(content)))
        cursor = end
    ids, starts = encode_with_starts(tokenizer, text)

    def tok(c: int) -> int:  # first token that starts at or after char c
        return bisect_left(starts, c)

    for s in spans:
        s.token_start, s.token_end = tok(s.start), tok(s.end)
        s.content_token_start, s.content_token_end = tok(s.content_start), tok(s.content_end)
    gen = len(body) if add_generation_prompt else None
    return RenderedChat(text, ids, spans, gen)


def encode_with_starts(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the character offset where each token starts."""
    if hasattr(tokenizer, "encode_with_offsets"):
        ids, offsets = tokenizer.encode_with_offsets(text)
        return ids, [a for a, _ in offsets]
    ids = tokenizer.encode(text)
    if tokenizer.kind == "char":
        return ids, list(range(len(text)))
    if tokenizer.kind == "byte":  # one token per UTF-8 byte: a character starts at its first byte
        starts = []
        for i, ch in enumerate(text):
            starts += [i] * len(ch.encode("utf-8"))
        return ids, starts
    raise InputError(f"{tokenizer.kind} tokenizer: cannot map characters to tokens for chat spans")
