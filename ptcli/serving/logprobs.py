"""Log-probabilities of the generated tokens, asked for and returned in OpenAI's two shapes.

`/v1/completions` takes `logprobs: N` (0-5) and answers, per choice, the legacy object of
parallel lists (tokens, token_logprobs, top_logprobs as {token: log-prob}, text_offset).
`/v1/chat/completions` takes `logprobs: true` and `top_logprobs: N` (0-20) and answers
`{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`. Both come from the engine's
greedy steps (`Prediction.logprobs`): the log-softmax of the logits that chose each token,
in float32, as `ptcli infer` decodes. A token is its own decoded text; `bytes` are that
text's UTF-8, so a token that holds part of a character shows U+FFFD, as the tokenizer decodes it.
The tokens listed are those behind the served text: the answer is stripped of surrounding
whitespace and cut at a stop string, so tokens that start past that cut are left out.
"""

from __future__ import annotations

from typing import Any

from ptcli.errors import ServeError
from ptcli.inference.engine import Logprob

MOST_COMPLETION, MOST_CHAT = 5, 20  # OpenAI's limits on the likeliest tokens per step


def completion_asks(body: dict[str, Any]) -> int | None:
    """The `logprobs` of a completions request: None (not asked) or how many likeliest tokens per step."""
    n = body.get("logprobs")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MOST_COMPLETION:
        raise ServeError(f"`logprobs` must be an integer from 0 to {MOST_COMPLETION}, got {n!r}")
    return n


def chat_asks(body: dict[str, Any]) -> int | None:
    """The `logprobs` / `top_logprobs` of a chat request: None (not asked) or how many likeliest tokens per step."""
    asked, n = body.get("logprobs"), body.get("top_logprobs")
    if asked not in (None, True, False):
        raise ServeError(f"`logprobs` must be true or false, got {asked!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MOST_CHAT):
        raise ServeError(f"`top_logprobs` must be an integer from 0 to {MOST_CHAT}, got {n!r}")
    if n is not None and not asked:
        raise ServeError("`top_logprobs` needs `logprobs` = true")
    return (n or 0) if asked else None


def kept(steps: tuple[Logprob, ...], text: str, cut: bool) -> list[tuple[Logprob, int]]:
    """The steps behind the served `text`, each with its token's offset in it.

    The text is the generation stripped (and cut at a stop when `cut`): offsets count from its
    first character; a token that starts at or past a stop's cut is not part of the answer.
    """
    joined = "".join(s.token for s in steps)
    lead = len(joined) - len(joined.lstrip())
    out, at = [], 0
    for s in steps:
        if cut and at - lead >= len(text):
            break
        out.append((s, max(0, at - lead)))
        at += len(s.token)
    return out


def completion_shape(steps: list[tuple[Logprob, int]]) -> dict[str, Any]:
    return {
        "tokens": [s.token for s, _ in steps],
        "token_logprobs": [s.logprob for s, _ in steps],
        "top_logprobs": [dict(s.top) for s, _ in steps],
        "text_offset": [at for _, at in steps],
    }


def chat_shape(steps: list[tuple[Logprob, int]]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [{**one(s.token, s.logprob), "top_logprobs": [one(t, lp) for t, lp in s.top]} for s, _ in steps],
        "refusal": None,
    }
