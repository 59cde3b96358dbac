"""`ptcli serve` end to end: a real server process on 127.0.0.1, called with the `openai` client and plain HTTP.

One project (a 2-member ensemble tag and a suffix-template tag, on the tiny lively Llama) and one server per module;
tests that need other flags start their own. Every answer is held to `ptcli infer` on the same rows.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from clihelp import cli, ok
from clihelp import write_jsonl as _jsonl

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # `ptcli serve` subprocesses

P = 4
FAST = [
    "--warmup-steps",
    "1",
    "--max-steps",
    "2",
    "--val-check-interval",
    "2",
    "--batch-size",
    "4",
    "--max-seq-length",
    "64",
    "-q",
]
DATA = {
    "sent": [
        ("i love it", "positive"),
        ("i hate it", "negative"),
        ("i really like the movie", "positive"),
        ("i dislike the food", "negative"),
    ],
    "topic": [
        ("the team won the game", "sports"),
        ("a new restaurant opened", "food"),
        ("the team lost on saturday", "sports"),
        ("fresh bread downtown", "food"),
    ],
}
ROWS = [{"prompt_tag": t, "text": x, "answer": a, "id": f"{t}-{i}"} for t in DATA for i, (x, a) in enumerate(DATA[t])]
MIXED = [ROWS[i] for i in (0, 4, 5, 1, 6, 2, 7, 3)]  # tags interleaved, as a client would send them
http = urllib.request.build_opener(
    urllib.request.ProxyHandler({})
)  # 127.0.0.1 only, whatever the environment's proxies


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> Path:
    d = tmp_path_factory.mktemp("serve")
    root = d / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", P, "-q"))
    for tag, extra in (
        ("sent", ["--ensemble", "2"]),
        ("topic", ["--template", "suffix"]),
    ):  # prompt before / after the text
        rows = [{"prompt_tag": tag, "text": x, "answer": a} for x, a in DATA[tag]]
        train, valid = _jsonl(d / f"{tag}-train.jsonl", rows), _jsonl(d / f"{tag}-valid.jsonl", rows[:2])
        ok(cli("tune", "--tag", tag, "--train", train, "--valid", valid, *FAST, *extra, "-p", root))
    return root


def infer(root: Path, rows: list[dict], *flags) -> list[dict]:
    """What `ptcli infer` answers for these rows."""
    path = _jsonl(root.parent / "rows.jsonl", rows)
    result = cli("infer", path, "-p", root, "-q", *flags)
    ok(result)
    return [json.loads(line) for line in result.stdout.splitlines()]


class Server:
    """`ptcli serve` in a subprocess, on a free port it picks itself (--port 0)."""

    def __init__(self, root: Path, *flags: str, env: dict[str, str] | None = None):
        cmd = [sys.executable, "-m", "ptcli", "serve", "-p", str(root), "--port", "0", *flags]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env)
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(120) or not self.url:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def _read(self, ready: threading.Event) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
                ready.set()
        ready.set()  # the process ended

    def call(self, path: str, body=None, *, raw: bytes | None = None, key: str | None = None) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one request."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            with http.open(urllib.request.Request(self.url + path, data=data, headers=headers), timeout=60) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def server(project: Path):
    s = Server(project, "--max-wait-ms", "20", "--max-body-bytes", "65536")
    yield s
    assert s.stop() == 0
    assert not [line for line in s.lines if "Traceback" in line or "failed" in line], "".join(s.lines)


def _client(server: Server, key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_gets_what_infer_gives(server: Server, project: Path) -> None:
    client = _client(server)
    assert sorted(m.id for m in client.models.list()) == ["sent", "topic"]
    texts = [x for x, _ in DATA["topic"]]
    want = [
        r["prediction"]
        for r in infer(
            project,
            [{"prompt_tag": "topic", "text": x} for x in texts],
            "--mode",
            "generate",
            "--tokens-to-generate",
            "6",
        )
    ]
    got = client.completions.create(model="topic", prompt=texts, max_tokens=6)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
    assert got.model == "topic" and got.usage.completion_tokens > 0
    one = client.completions.create(model="topic", prompt=texts[0], max_tokens=6)
    assert one.choices[0].text == want[0] and one.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model="topic", prompt=texts[0], max_tokens=6, stream=True)
    )
    assert streamed == want[0]


def test_stop_strings_cut_the_answer(server: Server, project: Path) -> None:
    full = _client(server).completions.create(model="sent", prompt="i love it", max_tokens=8).choices[0].text
    assert len(full) > 1, "the tiny model answers with some text"
    cut = _client(server).completions.create(model="sent", prompt="i love it", max_tokens=8, stop=[full[1:]]).choices[0]
    assert cut.text == full[:1] and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    "flags", [[], ["--mode", "generate"], ["--mode", "rank"], ["--mode", "rank", "--choices", "food,positive,science"]]
)
def test_rows_endpoint_mixes_tags_and_equals_infer(server: Server, project: Path, flags: list[str]) -> None:
    body: dict = {"rows": MIXED, "tokens_to_generate": 5}
    if flags:
        body["mode"] = flags[1]
    if "--choices" in flags:
        body["choices"] = flags[-1].split(",")
    status, _, got = server.call("/v1/ptcli/infer", body)
    assert status == 200, got
    assert got["rows"] == infer(project, MIXED, "--tokens-to-generate", "5", *flags)
    assert set(got["accuracy"]) == {"sent", "topic"}


def test_concurrent_requests_of_mixed_tags_equal_infer(server: Server, project: Path) -> None:
    """Rows of both tags, two generation lengths and both modes, in flight together."""
    kinds = [
        {"mode": "generate", "tokens_to_generate": 4},
        {"mode": "generate", "tokens_to_generate": 6},
        {"mode": "rank"},
    ]
    want = [
        infer(project, ROWS, "--mode", "generate", "--tokens-to-generate", "4"),
        infer(project, ROWS, "--mode", "generate", "--tokens-to-generate", "6"),
        infer(project, ROWS, "--mode", "rank"),
    ]
    before = server.call("/health")[2]
    requests = [(k, i) for i in range(len(ROWS)) for k in range(len(kinds))]
    with ThreadPoolExecutor(8) as pool:
        got = list(
            pool.map(lambda ki: server.call("/v1/ptcli/infer", {"rows": [ROWS[ki[1]]], **kinds[ki[0]]}), requests)
        )
    assert all(status == 200 for status, _, _ in got)
    assert [body["rows"][0] for _, _, body in got] == [want[k][i] for k, i in requests]
    after = server.call("/health")[2]
    assert after["rows"] - before["rows"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests), "concurrent requests shared batches"


def test_bad_input_gets_its_status_and_the_server_keeps_serving(server: Server) -> None:
    cases = [
        (dict(raw=b'{"model": "sent", "prompt": '), 400, "malformed JSON"),
        (dict(raw=b"[1, 2]"), 400, "JSON object"),
        (dict(body={"model": "nope", "prompt": "x"}), 404, "known tags: sent, topic"),
        (dict(body={"model": "sent"}), 400, "`prompt` is required"),
        (dict(body={"model": "sent", "prompt": [1, 2]}), 400, "`prompt` must be"),
        (dict(body={"model": "sent", "prompt": "x", "max_tokens": 0}), 400, "`max_tokens`"),
        (dict(body={"model": "sent", "prompt": "x", "n": 3}), 400, "not supported"),
        (dict(body={"model": "sent", "prompt": "x", "max_tokens": 100}), 400, "no room for text"),
        (dict(raw=b'{"model": "sent", "prompt": "' + b"a" * 70_000 + b'"}'), 413, "--max-body-bytes"),
        (dict(raw=b'{"model": "sent", "prompt": "\\ud800"}'), 400, "lone surrogate"),
    ]
    for kwargs, status, words in cases:
        got_status, _, body = server.call("/v1/completions", **kwargs)
        assert (got_status, words in body["error"]["message"]) == (status, True), (kwargs, body)
    status, _, body = server.call(
        "/v1/ptcli/infer", {"rows": [{"prompt_tag": "sent"}, {"prompt_tag": "ghost", "text": "x"}]}
    )
    assert status == 400 and body["error"]["problems"] == ["rows[0]: missing field 'text'"]
    status, _, body = server.call("/v1/ptcli/infer", {"rows": [{"prompt_tag": "ghost", "text": "x"}]})
    assert status == 404 and body["error"]["known_tags"] == ["sent", "topic"]
    assert server.call("/v1/nothing-here")[0] == 404
    assert server.call("/health")[2]["status"] == "ok"
    assert server.call("/v1/ptcli/infer", {"rows": ROWS[:1]})[0] == 200


def test_a_client_that_leaves_mid_request_does_not_hurt(server: Server) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"rows": ROWS, "tokens_to_generate": 8}).encode()
    for cut in (False, True):  # leave after the whole request, and halfway through its body
        with socket.create_connection((host, int(port)), timeout=10) as s:
            head = (
                "POST /v1/ptcli/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            s.sendall(head.encode() + (body[: len(body) // 2] if cut else body))
    assert server.call("/v1/ptcli/infer", {"rows": ROWS[:2]})[0] == 200
    assert server.proc.poll() is None


def test_the_bank_is_live(server: Server, project: Path) -> None:
    exported = project.parent / "sent.safetensors"
    ok(cli("export", "sent", exported, "-p", project, "-q"))
    ok(cli("import", exported, "--tag", "sent-copy", "-p", project, "-q"))
    assert [m["id"] for m in server.call("/v1/models")[2]["data"]] == ["sent", "sent-copy", "topic"]
    status, _, body = server.call("/v1/ptcli/infer", {"rows": [{**ROWS[0], "prompt_tag": "sent-copy"}, ROWS[0]]})
    assert status == 200 and body["rows"][0]["prediction"] == body["rows"][1]["prediction"]
    ok(cli("rename-tag", "sent-copy", "renamed", "-p", project, "-q"))
    assert [m["id"] for m in server.call("/v1/models")[2]["data"]] == ["renamed", "sent", "topic"]
    broken = project / "bank" / "broken.safetensors"
    blob = bytearray((project / "bank" / "renamed.safetensors").read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit in the tensor: the checksum no longer matches
    broken.write_bytes(bytes(blob))
    ok(cli("remove-tag", "renamed", "-p", project, "-q"))
    assert [m["id"] for m in server.call("/v1/models")[2]["data"]] == ["sent", "topic"]
    status, _, body = server.call("/v1/completions", {"model": "broken", "prompt": "x"})
    assert status == 409 and "checksum" in body["error"]["message"]
    broken.unlink()


def test_a_tag_tuned_while_serving_is_served(server: Server, project: Path) -> None:
    rows = [{"prompt_tag": "later", "text": x, "answer": a} for x, a in DATA["sent"]]
    train = _jsonl(project.parent / "later.jsonl", rows)
    ok(cli("tune", "--tag", "later", "--train", train, "--valid", train, *FAST, "-p", project))
    status, _, body = server.call("/v1/ptcli/infer", {"rows": rows, "mode": "rank"})
    assert status == 200
    assert body["rows"] == infer(project, rows, "--mode", "rank")
    ok(cli("remove-tag", "later", "-p", project, "-q"))


UNDER_CHANGE_SECONDS = 15.0  # bench/serve.py --sections under-change holds the load for 60 s on the default model
CLIENTS = 32


def _rss_mb(pid: int) -> float:
    """The process's resident set (VmRSS of /proc/PID/status) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def _allowed(versions: list[tuple[float, float]], sent: float, answered: float) -> list[int]:
    """The versions a request may see: those live at some moment between its sending and its answer.

    Version k is live from the start of the change that wrote it to the end of the change that replaced it.
    """
    return [k for k, (since, until) in enumerate(versions) if since <= answered and sent <= until]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's memory from /proc")
def test_serving_under_change(project: Path, tmp_path: Path, seconds: float = UNDER_CHANGE_SECONDS) -> None:
    """32 closed-loop clients while `tune --overwrite` rewrites a tag twice and `remove-tag` drops another.

    No 5xx; every answer is what `ptcli infer` gives for that row with a version of the prompt live
    while the request was in flight; the dropped tag answers until its removal and 404s after it;
    the server's memory after the load is what it was after the warm-up.
    """
    root = Path(shutil.copytree(project, tmp_path / "p"))  # the module's project keeps its tags
    ok(cli("export", "sent", tmp_path / "sent.safetensors", "-p", root, "-q"))
    ok(cli("import", tmp_path / "sent.safetensors", "--tag", "doomed", "-p", root, "-q"))
    texts = [x for examples in DATA.values() for x, _ in examples]
    pairs = [(tag, x) for x in texts for tag in ("sent", "topic", "doomed")]

    def answers() -> dict[tuple[str, str], str]:
        rows = [{"prompt_tag": t, "text": x} for t, x in pairs]
        got = infer(root, rows, "--mode", "generate", "--tokens-to-generate", "4")
        return {(r["prompt_tag"], r["text"]): r["prediction"] for r in got}

    def retune(seed: int) -> None:
        rows = [{"prompt_tag": "topic", "text": x, "answer": a} for x, a in DATA["topic"]]
        train, valid = _jsonl(tmp_path / "topic-train.jsonl", rows), _jsonl(tmp_path / "topic-valid.jsonl", rows[:2])
        seeded = ["--init", "random", "--seed", str(seed), "--overwrite"]
        ok(cli("tune", "--tag", "topic", "--train", train, "--valid", valid, *FAST, *seeded, "-p", root))

    want = [answers()]  # want[k]: the answers of version k of `topic` (sent and doomed never change)
    s = Server(root, "--max-batch-size", str(CLIENTS), "--max-wait-ms", "10")
    done = threading.Event()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:  # warm up: one request per client, all at once
            warm = pool.map(lambda i: s.call("/v1/completions", _ask(*pairs[i % len(pairs)], 4)), range(CLIENTS))
            assert {status for status, _, _ in warm} == {200}
        rss = [_rss_mb(s.proc.pid)]
        start = time.monotonic()
        stop_at = start + seconds

        def sample() -> None:
            while not done.wait(0.25):
                rss.append(_rss_mb(s.proc.pid))

        def client(c: int) -> list[tuple[str, str, float, float, int, dict]]:
            seen, i = [], c
            while time.monotonic() < stop_at:
                tag, text = pairs[i % len(pairs)]
                sent = time.monotonic()
                status, _, body = s.call("/v1/completions", _ask(tag, text, 4))
                seen.append((tag, text, sent, time.monotonic(), status, body))
                i += 1  # each client walks every pair, from its own start
            return seen

        threading.Thread(target=sample, daemon=True).start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, c) for c in range(CLIENTS)]
            changes: dict[str, tuple[float, float]] = {}
            for name, at, change in (
                ("overwrite 1", 0.2, lambda: retune(11)),
                ("overwrite 2", 0.45, lambda: retune(22)),
                ("remove", 0.7, lambda: ok(cli("remove-tag", "doomed", "-p", root, "-q"))),
            ):
                # at its time, but 15% of the load after the change before: each version is served a while
                after = max([end + 0.15 * seconds for _, end in changes.values()], default=start)
                time.sleep(max(0.0, start + at * seconds - time.monotonic(), after - time.monotonic()))
                began = time.monotonic()
                change()
                changes[name] = (began, time.monotonic())
                if name.startswith("overwrite"):
                    want.append(answers())
            assert time.monotonic() < stop_at, f"the changes outlasted the {seconds} s of load: {changes}"
            seen = [r for f in futures for r in f.result()]
        rss.append(_rss_mb(s.proc.pid))
    finally:
        done.set()
        assert s.stop() == 0
    assert not [line for line in s.lines if "Traceback" in line or "failed" in line], "".join(s.lines)

    for old, new in zip(want, want[1:]):  # else the test could not tell the versions apart
        assert any(old[("topic", x)] != new[("topic", x)] for x in texts), "an overwrite changed no answer"
    versions = [
        (float("-inf"), changes["overwrite 1"][1]),
        (changes["overwrite 1"][0], changes["overwrite 2"][1]),
        (changes["overwrite 2"][0], float("inf")),
    ]
    removed_from, removed_by = changes["remove"]
    problems, counts = [], {"5xx": 0, "404 after removal": 0, "answered before removal": 0}
    served: set[int] = set()  # versions of `topic` answered while no other was live
    for tag, text, sent, answered, status, body in seen:
        counts["5xx"] += status >= 500
        if tag == "doomed" and status == 404:
            if answered < removed_from:
                problems.append(f"{tag!r} answered 404 before its removal: {body}")
            elif "doomed" in body["error"]["known_tags"]:
                problems.append(f"a 404 for {tag!r} lists it as known: {body}")
            counts["404 after removal"] += sent > removed_by
            continue
        if tag == "doomed" and sent > removed_by:
            problems.append(f"{tag!r} answered {status} after its removal ended: {body}")
            continue
        if status != 200:
            problems.append(f"{tag!r} {text!r}: {status} {body}")
            continue
        counts["answered before removal"] += tag == "doomed" and answered < removed_from
        live = _allowed(versions, sent, answered) if tag == "topic" else [0]
        served.update(live if tag == "topic" and len(live) == 1 else [])
        if body["choices"][0]["text"] not in {want[k][(tag, text)] for k in live}:
            problems.append(
                f"{tag!r} {text!r}: {body['choices'][0]['text']!r}, not of versions {live} "
                f"({[want[k][(tag, text)] for k in live]})"
            )
    assert not problems, f"{len(problems)} of {len(seen)} answers wrong:\n" + "\n".join(problems[:20])
    assert counts["5xx"] == 0 and counts["404 after removal"] > 0 and counts["answered before removal"] > 0, counts
    assert served == {0, 1, 2}, f"versions of 'topic' served alone: {served}; changes at {changes}"
    after_warmup, last = rss[0], rss[-1]  # flat: at most 30 MiB and 15% above the warm server's
    assert last <= after_warmup + min(30, 0.15 * after_warmup), f"RSS {after_warmup:.0f} -> {last:.0f} MiB: {rss}"


def _ask(tag: str, text: str, max_tokens: int) -> dict:
    return {"model": tag, "prompt": text, "max_tokens": max_tokens}


def test_api_key_then_sigterm_finishes_the_request_in_flight(project: Path) -> None:
    s = Server(project, "--max-wait-ms", "3000", env={"PTCLI_API_KEY": "s3cret"})
    try:
        assert s.call("/health")[0] == 200
        status, headers, body = s.call("/v1/models")
        assert status == 401 and headers["www-authenticate"] == "Bearer" and "API key" in body["error"]["message"]
        assert s.call("/v1/models", key="wrong")[0] == 401
        assert [m.id for m in _client(s, "s3cret").models.list()] == ["sent", "topic"]
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(s.call, "/v1/ptcli/infer", {"rows": ROWS[:2]}, key="s3cret")
            deadline = time.monotonic() + 60
            while s.call("/health")[2]["queued_rows"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)  # until the rows wait in the batcher (for --max-wait-ms)
            s.proc.send_signal(signal.SIGTERM)
            status, _, body = pending.result(timeout=60)
        assert status == 200 and len(body["rows"]) == 2
        assert s.proc.wait(60) == 0
    finally:
        s.stop()


def test_light_commands_do_not_import_the_server_stack() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from ptcli.cli.app import app; "
        "codes = [CliRunner().invoke(app, a).exit_code for a in (['--help'], ['serve', '--help'])]; "
        "print(codes, sorted(m for m in ('starlette', 'uvicorn', 'torch') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[0, 0] []", proc.stderr


def test_the_docs_client_snippet_runs(server: Server) -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
    block = re.search(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    assert block, f"{page} has no python block (the OpenAI client snippet)"
    snippet = block.group(1)
    assert "http://127.0.0.1:8000/v1" in snippet and 'model="reviews"' in snippet
    snippet = snippet.replace("http://127.0.0.1:8000", server.url).replace('model="reviews"', 'model="sent"')
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tags, texts = proc.stdout.splitlines()
    assert tags == "['sent', 'topic']" and len(ast.literal_eval(texts)) == 2


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_server(project: Path, lively_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """The module's project on a copy of its base whose tokenizer has a chat template (the tiny one has none)."""
    d = tmp_path_factory.mktemp("chat")
    base, root = Path(shutil.copytree(lively_llama, d / "base")), Path(shutil.copytree(project, d / "p"))
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = CHAT_TEMPLATE
    (base / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    manifest = json.loads((root / "ptcli.json").read_text(encoding="utf-8"))
    manifest["base"]["ref"] = str(base)  # same weights, so the same fingerprint
    (root / "ptcli.json").write_text(json.dumps(manifest), encoding="utf-8")
    s = Server(root, "--max-wait-ms", "20")
    yield s, root
    assert s.stop() == 0
    assert not [line for line in s.lines if "Traceback" in line or "failed" in line], "".join(s.lines)


def _metrics(server: Server) -> dict:
    """/metrics parsed by Prometheus's own text parser: {family name: family}."""
    from prometheus_client.parser import text_string_to_metric_families

    with http.open(urllib.request.Request(server.url + "/metrics"), timeout=60) as r:
        assert r.headers["content-type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def _count(families: dict, name: str, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for s in families[name].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_chat_completions_answer_as_infer_does_on_the_rendered_conversation(chat_server) -> None:
    server, root = chat_server
    client = _client(server)
    conversations = [
        [{"role": "user", "content": "the team won the game"}],
        [
            {"role": "system", "content": "answer with a topic"},
            {"role": "user", "content": [{"type": "text", "text": t} for t in ("fresh bread", "downtown")]},
        ],
    ]
    rendered = [
        "user: the team won the game\nassistant:",
        "system: answer with a topic\nuser: fresh bread\ndowntown\nassistant:",
    ]
    for tag in ("topic", "sent"):  # the soft prompt after the text (suffix template), and before it (an ensemble)
        rows = [{"prompt_tag": tag, "text": t} for t in rendered]
        want = [r["prediction"] for r in infer(root, rows, "--mode", "generate", "--tokens-to-generate", "6")]
        for messages, expected in zip(conversations, want):
            got = client.chat.completions.create(model=tag, messages=messages, max_tokens=6, temperature=0)
            choice = got.choices[0]
            assert (choice.message.role, choice.message.content) == ("assistant", expected)
            assert got.object == "chat.completion" and got.model == tag and len(got.choices) == 1
            assert choice.finish_reason in ("stop", "length") and got.usage.completion_tokens > 0


def test_chat_refusals_get_400(server: Server, chat_server) -> None:
    chatty, _ = chat_server
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ({"stream": True}, "`stream`"),
        ({"n": 2}, "`n`"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"functions": [{"name": "f"}]}, "tools"),
        ({"top_logprobs": 2}, "needs `logprobs`"),
        ({"logprobs": True, "top_logprobs": 21}, "`top_logprobs`"),
        ({"logprobs": 3}, "`logprobs` must be true or false"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text parts"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}, "role"),
        ({"messages": []}, "`messages`"),
    ]
    for extra, words in cases:
        status, _, body = chatty.call("/v1/chat/completions", {"model": "sent", "messages": user, **extra})
        assert (status, words in body["error"]["message"]) == (400, True), (extra, body)
    status, _, body = chatty.call("/v1/chat/completions", {"model": "ghost", "messages": user})
    assert status == 404 and body["error"]["known_tags"] == ["sent", "topic"]
    status, _, body = server.call("/v1/chat/completions", {"model": "sent", "messages": user})  # the tiny base: none
    assert status == 400 and "no chat template" in body["error"]["message"], body
    accepted = chatty.call("/v1/chat/completions", {"model": "sent", "messages": user, "logprobs": False, "tools": []})
    assert accepted[0] == 200, accepted  # fields that ask for nothing are accepted


def test_metrics_count_the_requests_sent(chat_server) -> None:
    server, _ = chat_server
    before = _metrics(server)
    assert {before[n].type for n in ("ptcli_batch_size", "ptcli_request_duration_seconds")} == {"histogram"}
    sent = {"sent": 3, "topic": 2}
    for tag, n in sent.items():
        for _ in range(n):
            assert server.call("/v1/completions", {"model": tag, "prompt": "i love it", "max_tokens": 3})[0] == 200
    chat = {"model": "topic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert server.call("/v1/chat/completions", chat)[0] == 200
    assert server.call("/v1/chat/completions", {**chat, "n": 2})[0] == 400
    assert server.call("/v1/completions", {"model": "ghost", "prompt": "x"})[0] == 404
    after = _metrics(server)

    def moved(name: str, sample: str, **labels: str) -> float:
        return _count(after, name, sample, **labels) - _count(before, name, sample, **labels)

    for tag, n in sent.items():
        assert moved("ptcli_requests", "ptcli_requests_total", endpoint="/v1/completions", tag=tag, status="200") == n
        assert moved("ptcli_rows", "ptcli_rows_total", tag=tag) == n + (tag == "topic")
        assert moved("ptcli_generated_tokens", "ptcli_generated_tokens_total", tag=tag) > 0
    chats = dict(endpoint="/v1/chat/completions", tag="topic")
    assert moved("ptcli_requests", "ptcli_requests_total", **chats, status="200") == 1
    assert moved("ptcli_requests", "ptcli_requests_total", **chats, status="400") == 0  # refused before the tag
    assert moved("ptcli_requests", "ptcli_requests_total", endpoint="/v1/chat/completions", tag="", status="400") == 1
    assert moved("ptcli_requests", "ptcli_requests_total", endpoint="/v1/completions", tag="", status="404") == 1
    assert moved("ptcli_request_duration_seconds", "ptcli_request_duration_seconds_count", **chats) == 1
    assert moved("ptcli_batch_size", "ptcli_batch_size_count") >= 1
    assert _count(after, "ptcli_batch_size", "ptcli_batch_size_count") > 0
    assert "ghost" not in {s.labels.get("tag") for f in after.values() for s in f.samples}


def _plain_steps(root: Path, tag: str, text: str, max_new: int, top: int) -> list[list[tuple[str, float, list[float]]]]:
    """Each member's greedy tokens by full forwards of the whole row, no cache, no padding: per step the
    token (decoded alone), its log-probability and the `top` best log-probabilities."""
    from ptcli.api import Project
    from ptcli.enums import Mode
    from ptcli.inference.engine import Engine, Item, Prompt
    from ptcli.lm.base import load_project_base
    from ptcli.project import bank

    project = Project.open(root)
    model, tok = load_project_base(project.dir.base)
    prompt = Prompt.of(tag, *bank.get(project.dir, tag))
    engine = Engine(model, tok)
    seq = engine.rows([Item(prompt, text, Mode.GENERATE, max_new)])[0]
    assert isinstance(seq, list)
    emb, out = model.get_input_embeddings(), []
    with torch.no_grad():
        for members in prompt.members:  # (P, H) each
            ids: list[int] = []
            steps = []
            for _ in range(max_new):
                row = seq + ids  # prompt slots are -(j+1); a prefix layout has the prompt in front
                vectors = [members[-t - 1] if t < 0 else emb(torch.tensor(t)) for t in row]
                x = torch.stack([*members, *vectors] if engine.layout(prompt).prefix else vectors)  # (S, H)
                logp = model(inputs_embeds=x.unsqueeze(0)).logits[0, -1].float().log_softmax(-1)  # (V,)
                nxt = int(logp.argmax())
                if nxt == tok.eos_token_id:
                    break
                steps.append((tok.decode([nxt]), float(logp[nxt]), logp.topk(top).values.tolist()))
                ids.append(nxt)
            out.append(steps)
    return out


def _same_steps(served: list[tuple[str, float, list[float]]], plain: list[tuple[str, float, list[float]]]) -> bool:
    return len(served) == len(plain) and all(
        a[0] == b[0] and abs(a[1] - b[1]) < 1e-4 and torch.allclose(torch.tensor(a[2]), torch.tensor(b[2]), atol=1e-4)
        for a, b in zip(served, plain)
    )


def test_completion_logprobs_are_the_models_own(server: Server, project: Path) -> None:
    client = _client(server)
    for tag, text in (("topic", "the team won the game"), ("sent", "i love it")):  # after the text; an ensemble
        got = client.completions.create(model=tag, prompt=text, max_tokens=6, logprobs=3).choices[0]
        lp = got.logprobs
        served = [
            (t, v, sorted(alts.values(), reverse=True))
            for t, v, alts in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)
        ]
        assert served and all(len(alts) == 3 for alts in lp.top_logprobs)
        assert any(
            _same_steps(served, plain) for plain in _plain_steps(project, tag, text, 6, 3)
        )  # the member that answered
        assert "".join(lp.tokens).strip() == got.text and lp.text_offset[0] == 0
        assert all(a <= b for a, b in zip(lp.text_offset, lp.text_offset[1:]))
        cut = client.completions.create(model=tag, prompt=text, max_tokens=6, logprobs=0, stop=[got.text[1:]]).choices[
            0
        ]
        assert cut.text == got.text[:1] and cut.logprobs.tokens == lp.tokens[: len(cut.logprobs.tokens)]
        assert len(cut.logprobs.tokens) < len(lp.tokens) and cut.logprobs.top_logprobs[0] == {}
    plain = client.completions.create(model="topic", prompt="a", max_tokens=2).choices[0]
    assert plain.logprobs is None
    for bad in (6, -1, True, "3"):
        status, _, body = server.call("/v1/completions", {"model": "topic", "prompt": "a", "logprobs": bad})
        assert status == 400 and "`logprobs`" in body["error"]["message"], body


def test_chat_logprobs_are_the_models_own(chat_server) -> None:
    server, root = chat_server
    messages = [{"role": "user", "content": "the team won the game"}]
    rendered = "user: the team won the game\nassistant:"
    got = (
        _client(server)
        .chat.completions.create(model="topic", messages=messages, max_tokens=6, logprobs=True, top_logprobs=2)
        .choices[0]
    )
    content = got.logprobs.content
    served = [(c.token, c.logprob, [a.logprob for a in c.top_logprobs]) for c in content]
    assert _same_steps(served, _plain_steps(root, "topic", rendered, 6, 2)[0])
    assert "".join(c.token for c in content).strip() == got.message.content
    assert all(c.bytes == list(c.token.encode()) and c.top_logprobs[0].logprob == c.logprob for c in content)
    bare = _client(server).chat.completions.create(model="topic", messages=messages, max_tokens=6, logprobs=True)
    assert [c.top_logprobs for c in bare.choices[0].logprobs.content] == [[] for _ in content]
