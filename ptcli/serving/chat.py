"""OpenAI chat completions: the base's chat template renders the conversation; a tag answers it.

The rendered conversation (`apply_chat_template(..., add_generation_prompt=True)`) is the row's
text, so the tag's soft prompt goes where its own template puts it and the row takes the same
path as `/v1/completions` and `ptcli infer`: one greedy answer. What a plain text model with a
soft prompt cannot honour is refused with 400, never silently dropped: streaming, several
choices, tools and function calls, non-text content, JSON modes, and any chat at all on a
base without a chat template. `logprobs` / `top_logprobs` are served (logprobs.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from ptcli.enums import Mode
from ptcli.errors import ServeError
from ptcli.inference.engine import Item, Prediction
from ptcli.serving import logprobs, openai_api
from ptcli.serving.live_bank import LiveBank

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # as the template sees it
REFUSED = {  # field -> why; refused unless absent, null, or the value that asks for nothing
    "tools": "tools and function calling",
    "functions": "tools and function calling",
    "tool_choice": "tools and function calling",
    "function_call": "tools and function calling",
    "audio": "audio output",
}
HARMLESS: tuple[Any, ...] = (None, False, "none", [], 0)
Render = Callable[[list[dict[str, str]]], str]


def renderer(tok) -> Render | None:
    """The base's chat template as a function of the messages, or None if the tokenizer has none."""
    if not getattr(tok, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert isinstance(text, str)
        return text

    return render


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("stream") not in (None, False):
        raise ServeError(
            "`stream` = true is not supported on /v1/chat/completions: ask without it (the answer comes whole)"
        )
    if body.get("n") not in (None, 1):
        raise ServeError(f"`n` = {body['n']!r} is not supported: ptcli gives one greedy answer per conversation")
    for key, what in REFUSED.items():
        if key in body and not any(body[key] == h and type(body[key]) is type(h) for h in HARMLESS):
            raise ServeError(f"`{key}` is not supported: ptcli serves no {what} on /v1/chat/completions")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ServeError('`response_format` is not supported: only {"type": "text"}, plain text answers')


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined with newlines)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ServeError(f"`{where}.content` must be a string or a non-empty list of text parts")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ServeError(
                f"`{where}.content[{j}]` is not supported: only text parts ({{'type': 'text', 'text': ...}}), "
                f"got type {kind!r}"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ServeError("`messages` must be a non-empty list of {role, content} objects")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ServeError(f"`{where}` must be an object with `role` and `content`")
        role = m.get("role")
        if role not in ROLES:
            raise ServeError(
                f"`{where}.role` must be one of {', '.join(ROLES)}, got {role!r} (tool messages are not supported)"
            )
        if m.get("tool_calls") or m.get("function_call"):
            raise ServeError(f"`{where}` holds tool calls, which are not supported")
        text = _content(m.get("content"), where)
        openai_api.strings(text or " ", f"{where}.content")  # valid Unicode (an empty assistant turn is allowed)
        messages.append({"role": ROLES[role], "content": text})
    return messages


def chat_request(body: dict[str, Any], bank: LiveBank, render: Render | None) -> tuple[list[Item], list[str]]:
    """One item (the rendered conversation, answered by the tag) and the stop strings."""
    _refuse_unsupported(body)
    prompt = openai_api.served_prompt(body, bank)
    if "messages" not in body:
        raise ServeError("`messages` is required")
    messages = _messages(body["messages"])
    if render is None:
        raise ServeError(
            "the base model has no chat template, so it cannot render a conversation: "
            "use /v1/completions with the text formatted as the prompt was tuned on"
        )
    try:
        text = render(messages)
    except Exception as e:  # noqa: BLE001  (the template's own refusal, e.g. roles that do not alternate)
        raise ServeError(f"the base's chat template refused these messages: {e}") from None
    stop = openai_api.stops(body)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    top = logprobs.chat_asks(body)
    return [Item(prompt, text, Mode.GENERATE, openai_api.integer(body, key, 16), logprobs=top)], stop


def chat_body(tag: str, answers: list[Prediction], stop: list[str]) -> dict[str, Any]:
    """The chat.completion object: one choice, the assistant's message, finish_reason, usage."""
    (answer,) = answers
    text, cut, steps = openai_api.served(answer, stop)
    usage = openai_api.completion_body(tag, answers, [])["usage"]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": tag,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None if steps is None else logprobs.chat_shape(steps),
                "finish_reason": "stop" if cut or answer.stopped else "length",
            }
        ],
        "usage": usage,
    }
