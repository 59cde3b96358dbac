"""What the server's endpoints accept and return, checked field by field.

Two dialects. OpenAI completions (`model` is a tag, `prompt` one string or several):
greedy answers, as `ptcli infer --mode generate`, with their tokens' log-probabilities on
request (logprobs.py); sampling settings (temperature, top_p, seed...) are accepted and
ignored, settings that ask for more than one greedy answer per prompt are refused. ptcli rows
(`{"rows": [...], "mode": ..., "choices": ..., "tokens_to_generate": ...}`): the rows of a
`ptcli infer` file, any tags mixed, answered with `prediction` added.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from ptcli.data.jsonl import Record, check_inference_row
from ptcli.enums import Mode
from ptcli.errors import ServeError, unknown_tags
from ptcli.inference.engine import Item, Logprob, Prediction, Prompt
from ptcli.inference.infer import accuracy
from ptcli.serving import logprobs
from ptcli.serving.live_bank import LiveBank

MAX_PROBLEMS = 20
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": None}  # field -> the only value served


def integer(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ServeError(f"`{key}` must be a positive integer, got {value!r}")
    return value


def strings(value: Any, key: str, *, most: int | None = None) -> list[str]:
    """A string or a non-empty list of non-empty strings that are valid Unicode."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ServeError(f"`{key}` must be a non-empty string or a list of them")
    if most is not None and len(values) > most:
        raise ServeError(f"`{key}` takes at most {most} strings, got {len(values)}")
    for v in values:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ServeError(
                f"`{key}` holds a lone surrogate {e.object[e.start]!r}, which is not valid Unicode"
            ) from None
    return values


def served_prompt(body: dict[str, Any], bank: LiveBank) -> Prompt:
    """The prompt of the request's `model` (a tag of the bank); 404 naming the known tags otherwise."""
    tag = body.get("model")
    if not isinstance(tag, str):
        raise ServeError("`model` must be the tag of a prompt in the bank (GET /v1/models lists them)")
    return bank.prompt(tag)


def stops(body: dict[str, Any]) -> list[str]:
    """The request's stop strings (at most 4)."""
    return [] if body.get("stop") is None else strings(body["stop"], "stop", most=4)


def completion_request(body: dict[str, Any], bank: LiveBank) -> tuple[list[Item], list[str], bool]:
    """Items (one per prompt), stop strings, and whether to stream."""
    for key, served in UNSUPPORTED.items():
        if body.get(key, served) not in (served, None):
            raise ServeError(f"`{key}` = {body[key]!r} is not supported: ptcli gives one greedy answer per prompt")
    prompt = served_prompt(body, bank)
    if "prompt" not in body:
        raise ServeError("`prompt` is required")
    texts = strings(body["prompt"], "prompt")
    stop = stops(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError(f"`stream` must be true or false, got {stream!r}")
    max_tokens, top = integer(body, "max_tokens", 16), logprobs.completion_asks(body)
    return [Item(prompt, t, Mode.GENERATE, max_tokens, logprobs=top) for t in texts], stop, stream


def served(answer: Prediction, stop: list[str]) -> tuple[str, bool, list[tuple[Logprob, int]] | None]:
    """The answer's text cut at the first stop string, whether it was cut, and the steps behind it (if asked)."""
    at = min((i for i in (answer.text.find(s) for s in stop) if i >= 0), default=-1)
    text, cut = (answer.text[:at], True) if at >= 0 else (answer.text, False)
    return text, cut, None if answer.logprobs is None else logprobs.kept(answer.logprobs, text, cut)


def completion_choices(answers: list[Prediction], stop: list[str]) -> list[dict[str, Any]]:
    choices = []
    for i, a in enumerate(answers):
        text, cut, steps = served(a, stop)
        choices.append(
            {
                "index": i,
                "text": text,
                "logprobs": None if steps is None else logprobs.completion_shape(steps),
                "finish_reason": "stop" if cut or a.stopped else "length",
            }
        )
    return choices


def completion_body(tag: str, answers: list[Prediction], stop: list[str]) -> dict[str, Any]:
    prompt_tokens, completion_tokens = sum(a.prompt_tokens for a in answers), sum(a.tokens for a in answers)
    return {
        **completion_head(tag),
        "choices": completion_choices(answers, stop),
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def completion_head(tag: str) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": tag}


def rows_request(body: dict[str, Any], bank: LiveBank) -> tuple[list[Item], list[Record]]:
    """Items and records of a ptcli rows request.

    Every problem in the rows is reported at once, as `ptcli infer` does.
    """
    rows = body.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ServeError("`rows` must be a non-empty list of {prompt_tag, text[, answer]} objects")
    mode = body.get("mode")
    if mode is not None and mode not in Mode.values():
        raise ServeError(f"`mode` must be one of {', '.join(Mode.values())}, got {mode!r}")
    choices = None if body.get("choices") is None else [c.strip() for c in strings(body["choices"], "choices")]
    if choices is not None and len(choices) < 2:
        raise ServeError("`choices` needs at least two answers")
    problems = [f"rows[{i}]: {p}" for i, row in enumerate(rows) for p in check_inference_row(row)]
    if problems:
        raise ServeError(f"the rows have {len(problems)} problem(s)", extra={"problems": problems[:MAX_PROBLEMS]})
    tags = sorted({row["prompt_tag"] for row in rows})
    unknown = [t for t in tags if t not in bank.tags()]
    if unknown:
        raise ServeError(
            unknown_tags(unknown, bank.tags()).message,
            status=404,
            extra={"known_tags": bank.tags()},
        )
    prompts = {t: bank.prompt(t) for t in tags}
    modes = {
        t: Mode(mode) if mode else prompts[t].record.answer_mode for t in tags
    }  # by default the mode each prompt was chosen by, as `ptcli infer`
    options = {t: tuple(choices or prompts[t].record.choices or ()) for t in tags}
    missing = [t for t in tags if modes[t] == Mode.RANK and not options[t]]
    if missing:
        raise ServeError(
            f"mode rank needs an answer set: {', '.join(map(repr, missing))} had none in training; pass `choices`"
        )
    tokens = integer(body, "tokens_to_generate", 32)
    items = [Item(prompts[t], r["text"], modes[t], tokens, options[t]) for r in rows for t in [r["prompt_tag"]]]
    return items, [Record(i + 1, r["prompt_tag"], r["text"], r.get("answer"), r) for i, r in enumerate(rows)]


def rows_body(records: list[Record], answers: list[Prediction]) -> dict[str, Any]:
    predictions = [a.text for a in answers]
    return {
        "rows": [{**r.row, "prediction": p} for r, p in zip(records, predictions)],
        "accuracy": accuracy(records, predictions),
    }
