"""Throughput and latency of `ptcli serve`: dynamic batching against one request at a time.

A project with three tags (reviews, topic, sentiment) on the default model, their prompts
tuned for one step (enough to be served; quality is not measured here). For each server
setting (batching on: up to --max-batch 32 rows a pass; off: --max-batch-size 1), a fresh
`ptcli serve` on 127.0.0.1 takes closed-loop load from 1, 8 and 32 clients: each client
sends an OpenAI completion (one text of examples/data/test.jsonl, the tags in turn, greedy,
--max-tokens tokens), waits for the answer, and sends the next, until --seconds have
passed; the requests in flight then finish and count. Reports requests/s, p50/p99 latency
and the server's mean batch size (from /health).

    python bench/serve.py                         # full run (~4 min on 2 cores), writes bench/results/serve.json
    python bench/serve.py --quick --base DIR      # a short run on another base (the tests use a tiny model)
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"
TAGS = {"reviews": "reviews", "topic": "topic", "sentiment": "reviews"}  # tag -> the example task its rows come from
SETTINGS = {
    "on": ["--max-batch-size", "32", "--max-wait-ms", "10"],
    "off": ["--max-batch-size", "1", "--max-wait-ms", "0"],
}


def ptcli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ptcli", *args, "-q"], check=True, timeout=900)


def rows_of(split: str, task: str, tag: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (EXAMPLES / f"{split}.jsonl").read_text().splitlines()]
    return [{**r, "prompt_tag": tag} for r in rows if r["prompt_tag"] == task][:n]


def make_project(directory: Path, base: str | None) -> Path:
    """Three tags, tuned together for one step: prompts that are real bank entries, made in seconds."""
    root = directory / "proj"
    ptcli("init", str(root), *(["--base", base] if base else []), "--num-prompt-tokens", "20")
    train, valid = directory / "train.jsonl", directory / "valid.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for t, task in TAGS.items() for r in rows_of("train", task, t, 8)))
    valid.write_text("".join(json.dumps(r) + "\n" for t, task in TAGS.items() for r in rows_of("valid", task, t, 2)))
    tags = [a for t in TAGS for a in ("--tag", t)]
    ptcli(
        "tune",
        *tags,
        "--train",
        str(train),
        "--valid",
        str(valid),
        "--max-steps",
        "1",
        "--val-check-interval",
        "1",
        "--batch-size",
        "6",
        "-p",
        str(root),
    )
    return root


class Server:
    def __init__(self, root: Path, flags: list[str]):
        cmd = [sys.executable, "-m", "ptcli", "serve", "-p", str(root), "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if m := re.search(r"listening on http://([\d.]+):(\d+)", line):
                self.host, self.port = m.group(1), int(m.group(2))
                break
        else:
            raise SystemExit(f"the server did not start (exit {self.proc.wait()})")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def request(self, conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> dict:
        conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data}")
        return data

    def health(self) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)  # a fresh one: idle ones time out
        try:
            return self.request(conn, "GET", "/health")
        finally:
            conn.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def load(server: Server, texts: list[tuple[str, str]], clients: int, seconds: float, max_tokens: int) -> dict:
    """Closed-loop load from `clients` threads; returns requests/s, latency percentiles and the mean batch."""
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))
    lock = threading.Lock()

    def client(_: int) -> list[float]:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
        latencies: list[float] = []
        while not latencies or time.monotonic() < stop_at:  # at least one request each
            with lock:
                tag, text = texts[next(counter) % len(texts)]
            t0 = time.perf_counter()
            server.request(conn, "POST", "/v1/completions", {"model": tag, "prompt": text, "max_tokens": max_tokens})
            latencies.append(time.perf_counter() - t0)
        conn.close()
        return latencies

    before = server.health()
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(x for xs in pool.map(client, range(clients)) for x in xs)
    elapsed = time.monotonic() - start
    after = server.health()
    batches = max(1, after["batches"] - before["batches"])
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "mean_batch": (after["rows"] - before["rows"]) / batches,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="base model (default: the default model)")
    ap.add_argument("--quick", action="store_true", help="2 s per measurement, 4 tokens (CI keeps it working)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load time per measurement")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = ap.parse_args()
    seconds, max_tokens = (2.0, 4) if args.quick else (args.seconds, args.max_tokens)
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": dt.date.today().isoformat(),
        "base": args.base or "default (SmolLM2-135M-Instruct)",
        "tags": list(TAGS),
        "max_tokens": max_tokens,
        "seconds_per_measurement": seconds,
        "settings": SETTINGS,
        "runs": [],
    }
    test = [json.loads(line) for line in (EXAMPLES / "test.jsonl").read_text().splitlines()]
    tags = list(TAGS)
    texts = [(tags[i % len(tags)], r["text"]) for i, r in enumerate(test)]  # mixed tags, in turn
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(Path(tmp), args.base)
        for setting, flags in SETTINGS.items():
            server = Server(root, flags)
            try:
                load(server, texts, 4, 0.0, max_tokens)  # warm up: one request per client
                for clients in (1, 8, 32):
                    run = {
                        "batching": setting,
                        "concurrency": clients,
                        **load(server, texts, clients, seconds, max_tokens),
                    }
                    results["runs"].append(run)
                    print(
                        f"batching {setting:<3} concurrency {clients:>2}: {run['req_per_s']:6.2f} req/s, "
                        f"p50 {run['p50_ms']:7.0f} ms, p99 {run['p99_ms']:7.0f} ms",
                        file=sys.stderr,
                    )
            finally:
                code = server.stop()
            if code != 0:
                raise SystemExit(f"the server exited {code} on SIGTERM, not 0")
    by = {(r["batching"], r["concurrency"]): r for r in results["runs"]}
    results["speedup_c32"] = by["on", 32]["req_per_s"] / by["off", 32]["req_per_s"]
    results["p99_over_p50_c8"] = by["on", 8]["p99_ms"] / by["on", 8]["p50_ms"]
    print("| batching | clients | requests | req/s | p50 ms | p99 ms | mean batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results["runs"]:
        print(
            f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} |"
        )
    print(
        f"\nbatching on / off at 32 clients: {results['speedup_c32']:.2f}x req/s; "
        f"p99 / p50 at 8 clients: {results['p99_over_p50_c8']:.2f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
