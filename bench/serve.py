"""Throughput and latency of `ptcli serve`: dynamic batching against one request at a time.

A project with three tags (reviews, topic, sentiment) on the default model, their prompts
tuned for one step (enough to be served; quality is not measured here). For each server
setting (batching on: up to --max-batch 32 rows a pass; off: --max-batch-size 1), a fresh
`ptcli serve` on 127.0.0.1 takes closed-loop load from 1, 8 and 32 clients: each client
sends an OpenAI completion (one text of examples/data/test.jsonl, the tags in turn, greedy,
--max-tokens tokens), waits for the answer, and sends the next, until --seconds have
passed; the requests in flight then finish and count. Reports requests/s, p50/p99 latency
and the server's mean batch size (from /health).

Section under-change: 32 clients for --change-seconds (60) against one batching server while
`ptcli tune --overwrite` rewrites `topic` twice and `ptcli remove-tag` drops `sentiment`.
Every answer is held to what `ptcli infer` gives for its row with a version of the prompt live
while the request was in flight (before, after the first overwrite, after the second); the
dropped tag must answer until its removal and 404 after it; the server's VmRSS is sampled.
Reports requests/s, p50/p95 latency, 5xx, mismatches, 404s after removal, RSS start/end.

The batching server per engine (`--engine torch`, `llama.cpp`, `llama.cpp --llama-weights bf16`) is measured
by `bench/speed.py --sections serve` with this file's project, server and clients (`engines`).

    python bench/serve.py                         # full run (~4 min on 2 cores), writes bench/results/serve.json
    python bench/serve.py --sections under-change # adds the under-change row to bench/results/serve.json
    python bench/serve.py --table                 # that row as docs/benchmarks.md shows it
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
import shutil
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


def answers_of(root: Path, pairs: list[tuple[str, str]], max_tokens: int) -> dict[tuple[str, str], str]:
    """What `ptcli infer --mode generate` answers for each (tag, text), as a completion of max_tokens would."""
    rows = root.parent / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt_tag": t, "text": x}) + "\n" for t, x in pairs))
    cmd = ["infer", str(rows), "-p", str(root), "--mode", "generate", "--tokens-to-generate", str(max_tokens), "-q"]
    out = subprocess.run([sys.executable, "-m", "ptcli", *cmd], check=True, capture_output=True, text=True, timeout=900)
    return {(r["prompt_tag"], r["text"]): r["prediction"] for r in map(json.loads, out.stdout.splitlines())}


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


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

    def call(self, conn: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
        """(status, JSON body) of one POST, whatever the status."""
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

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


REWRITTEN, DROPPED = "topic", "sentiment"
Seen = tuple[str, str, float, float, int, dict]  # tag, text, sent, answered (monotonic s), status, JSON body


def under_change(root: Path, pairs: list[tuple[str, str]], clients: int, seconds: float, max_tokens: int) -> dict:
    """Closed-loop load while `topic` is retuned twice (--overwrite) and `sentiment` removed; answers checked."""
    train, valid = root.parent / "topic-train.jsonl", root.parent / "topic-valid.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows_of("train", "topic", REWRITTEN, 8)))
    valid.write_text("".join(json.dumps(r) + "\n" for r in rows_of("valid", "topic", REWRITTEN, 2)))
    retune = ["tune", "--tag", REWRITTEN, "--train", str(train), "--valid", str(valid), "--max-steps", "1"]
    retune += ["--val-check-interval", "1", "--batch-size", "8", "--init", "random", "--overwrite", "-p", str(root)]
    plan = [  # (change, when: a fraction of `seconds`, but 15% of it after the change before ends, ptcli args)
        ("overwrite 1", 0.1, [*retune, "--seed", "11"]),
        ("overwrite 2", 0.35, [*retune, "--seed", "22"]),
        ("remove", 0.6, ["remove-tag", DROPPED, "-p", str(root)]),
    ]
    want = [answers_of(root, pairs, max_tokens)]  # want[k]: the answers with version k of `topic`
    snapshots: list[Path] = []  # each later version's bank file, answered by `ptcli infer` once the load is over
    server = Server(root, SETTINGS["on"])
    changes: dict[str, tuple[float, float]] = {}
    done = threading.Event()  # set once the changes are made; the load then runs to --change-seconds, 5 s at least
    try:
        load(server, pairs, clients, 0.0, max_tokens)  # warm up: one request per client, all at once
        rss = [rss_mb(server.proc.pid)]
        start = time.monotonic()

        def client(c: int) -> list[Seen]:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
            seen, i = [], c
            while not done.is_set():
                tag, text = pairs[i % len(pairs)]
                i += 1
                sent = time.monotonic()
                status, body = server.call(
                    conn, "/v1/completions", {"model": tag, "prompt": text, "max_tokens": max_tokens}
                )
                seen.append((tag, text, sent, time.monotonic(), status, body))
            conn.close()
            return seen

        def sample() -> None:
            while not done.wait(1.0):
                rss.append(rss_mb(server.proc.pid))

        threading.Thread(target=sample, daemon=True).start()
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, c) for c in range(clients)]
            try:
                for name, at, cmd in plan:
                    after = max([end + 0.15 * seconds for _, end in changes.values()], default=start)
                    time.sleep(max(0.0, start + at * seconds - time.monotonic(), after - time.monotonic()))
                    began = time.monotonic()
                    ptcli(*cmd)
                    changes[name] = (began, time.monotonic())
                    if name.startswith("overwrite"):
                        snapshots.append(root.parent / f"{REWRITTEN}-v{len(snapshots) + 1}.safetensors")
                        shutil.copy2(root / "bank" / f"{REWRITTEN}.safetensors", snapshots[-1])
                    print(
                        f"under change: {name} at {began - start:.1f} to {time.monotonic() - start:.1f} s",
                        file=sys.stderr,
                    )
                time.sleep(max(0.0, start + seconds - time.monotonic(), changes["remove"][1] + 5 - time.monotonic()))
            finally:
                done.set()
            seen = [r for f in futures for r in f.result()]
        elapsed = time.monotonic() - start
        rss.append(rss_mb(server.proc.pid))
    finally:
        done.set()
        code = server.stop()
    if code != 0:
        raise SystemExit(f"the server exited {code} on SIGTERM, not 0")
    texts = [x for t, x in pairs if t == REWRITTEN]
    for snapshot in snapshots:  # version K as tag topic-vK, so that one `ptcli infer` answers them all
        ptcli("import", str(snapshot), "--tag", snapshot.stem, "-p", str(root))
    later = answers_of(root, [(v.stem, x) for v in snapshots for x in texts], max_tokens)
    want += [{**want[0], **{(REWRITTEN, x): later[v.stem, x] for x in texts}} for v in snapshots]
    latencies = sorted(answered - sent for _, _, sent, answered, status, _ in seen if status == 200)
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": len(seen),
        "req_per_s": len(seen) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        **check(seen, want, changes),
        "changes_s": {name: [round(a - start, 2), round(b - start, 2)] for name, (a, b) in changes.items()},
        "rss_mb_start": rss[0],
        "rss_mb_end": rss[-1],
        "rss_mb_max": max(rss),
        "rss_mb_every_5s": [round(x) for x in rss[::5]],
    }


def check(seen: list[Seen], want: list[dict], changes: dict[str, tuple[float, float]]) -> dict:
    """Count what went wrong: 5xx, other errors, answers of no version live in flight, the dropped tag's answers.

    Version k of `topic` is live from the start of the change that wrote it to the end of the one that replaced it.
    """
    (o1, e1), (o2, e2), (removed_from, removed_by) = changes["overwrite 1"], changes["overwrite 2"], changes["remove"]
    live = [(float("-inf"), e1), (o1, e2), (o2, float("inf"))]
    n = {"5xx": 0, "other_errors": 0, "mismatches": 0, "dropped_200_before_removal": 0}
    n |= {"dropped_404_after_removal": 0, "dropped_answered_after_removal": 0, "dropped_404_before_removal": 0}
    versions_served: set[int] = set()
    for tag, text, sent, answered, status, body in seen:
        if status >= 500:
            n["5xx"] += 1
        elif tag == DROPPED and status == 404:
            if answered < removed_from:
                n["dropped_404_before_removal"] += 1
            elif sent > removed_by:
                n["dropped_404_after_removal"] += 1
        elif tag == DROPPED and sent > removed_by:
            n["dropped_answered_after_removal"] += 1
        elif status != 200:
            n["other_errors"] += 1
        else:
            n["dropped_200_before_removal"] += tag == DROPPED and answered < removed_from
            ks = [k for k, (a, b) in enumerate(live) if a <= answered and sent <= b] if tag == REWRITTEN else [0]
            n["mismatches"] += body["choices"][0]["text"] not in {want[k][tag, text] for k in ks}
            versions_served.update(ks if len(ks) == 1 and tag == REWRITTEN else [])
    rows_changed = [sum(a[p] != b[p] for p in a if p[0] == REWRITTEN) for a, b in zip(want, want[1:])]
    return {**n, "versions_served": sorted(versions_served), "rows_changed_by_each_overwrite": rows_changed}


def batching(root: Path, texts: list[tuple[str, str]], seconds: float, max_tokens: int) -> dict:
    """The table: batching on and off, 1, 8 and 32 clients; a fresh server per setting."""
    runs = []
    for setting, flags in SETTINGS.items():
        server = Server(root, flags)
        try:
            load(server, texts, 4, 0.0, max_tokens)  # warm up: one request per client
            for clients in (1, 8, 32):
                run = {"batching": setting, "concurrency": clients, **load(server, texts, clients, seconds, max_tokens)}
                runs.append(run)
                print(
                    f"batching {setting:<3} concurrency {clients:>2}: {run['req_per_s']:6.2f} req/s, "
                    f"p50 {run['p50_ms']:7.0f} ms, p99 {run['p99_ms']:7.0f} ms",
                    file=sys.stderr,
                )
        finally:
            code = server.stop()
        if code != 0:
            raise SystemExit(f"the server exited {code} on SIGTERM, not 0")
    by = {(r["batching"], r["concurrency"]): r for r in runs}
    print("| batching | clients | requests | req/s | p50 ms | p99 ms | mean batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        print(
            f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} |"
        )
    results = {
        "runs": runs,
        "speedup_c32": by["on", 32]["req_per_s"] / by["off", 32]["req_per_s"],
        "p99_over_p50_c8": by["on", 8]["p99_ms"] / by["on", 8]["p50_ms"],
    }
    print(
        f"\nbatching on / off at 32 clients: {results['speedup_c32']:.2f}x req/s; "
        f"p99 / p50 at 8 clients: {results['p99_over_p50_c8']:.2f}"
    )
    return results


def engines(root: Path, texts: list[tuple[str, str]], seconds: float, max_tokens: int) -> list[dict]:
    """bench/speed.py's section serve: a batching server per engine (torch, llama.cpp on the GGUF file and on its bf16
    re-encoding), 1, 8 and 32 clients, its peak RSS."""
    one = root.parent / "one-row.jsonl"
    one.write_text(json.dumps({"prompt_tag": texts[0][0], "text": texts[0][1]}) + "\n")
    # llama.cpp's first load fingerprints the base once, through torch, and re-encodes it as bf16 once: neither
    # counts in the peak RSS of the servers measured
    subprocess.run(
        [sys.executable, "-m", "ptcli", "infer", str(one), "-p", str(root), "--engine", "llama.cpp", "-q"]
        + ["--llama-weights", "bf16"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    runs: list[dict] = []
    for engine in ("torch", "llama.cpp", "llama.cpp-bf16"):
        name, _, weights = engine.partition("-")
        server = Server(root, [*SETTINGS["on"], "--engine", name, *(["--llama-weights", weights] if weights else [])])
        mine = []
        try:
            load(server, texts, 4, 0.0, max_tokens)  # warm up: one request per client
            for clients in (1, 8, 32):
                mine.append(
                    {"engine": engine, "concurrency": clients, **load(server, texts, clients, seconds, max_tokens)}
                )
                print(f"{engine} {clients:>2} clients: {mine[-1]['req_per_s']:.2f} req/s", file=sys.stderr)
            peak = rss_mb(server.proc.pid, "VmHWM")
        finally:
            server.stop()
        runs += [{**r, "peak_rss_mb": peak} for r in mine]
    print(engines_table(runs), end="")
    return runs


def engines_table(runs: list[dict]) -> str:
    lines = ["| engine | clients | requests | req/s | p50 ms | p99 ms | mean batch | server peak RSS MiB |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        lines.append(
            f"| {r['engine']} | {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | {r['p50_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def under_change_table(r: dict) -> str:
    """The markdown table of the under-change row (docs/benchmarks.md holds it as printed here)."""
    return (
        "| clients | seconds | requests | req/s | p50 ms | p95 ms | 5xx | mismatches | 404s after removal | RSS MiB |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
        f"| {r['clients']} | {r['seconds']:.0f} | {r['requests']} | {r['req_per_s']:.2f} | {r['p50_ms']:.0f} "
        f"| {r['p95_ms']:.0f} | {r['5xx']} | {r['mismatches']} | {r['dropped_404_after_removal']} "
        f"| {r['rss_mb_start']:.0f} -> {r['rss_mb_end']:.0f} |\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="base model (default: the default model)")
    ap.add_argument("--quick", action="store_true", help="2 s per measurement, 10 s under change, 4 tokens (CI)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load time per measurement")
    ap.add_argument("--change-seconds", type=float, default=60.0, help="load time of the under-change section")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--sections",
        default="batching",
        help="comma-separated: batching (the table), under-change (a row added to --out's other results)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    ap.add_argument("--table", action="store_true", help="print the under-change table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(under_change_table(json.loads(args.out.read_text())["under_change"]), end="")
        return
    sections = set(args.sections.split(","))
    if sections - {"batching", "under-change"}:
        raise SystemExit(f"--sections takes batching and under-change, got {args.sections!r}")
    seconds, max_tokens = (2.0, 4) if args.quick else (args.seconds, args.max_tokens)
    change_seconds = 10.0 if args.quick else args.change_seconds
    header = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": dt.date.today().isoformat(),
        "base": args.base or "default (SmolLM2-135M-Instruct)",
        "tags": list(TAGS),
        "max_tokens": max_tokens,
    }
    if "batching" in sections:
        results: dict = {**header, "seconds_per_measurement": seconds, "settings": SETTINGS}
    else:  # keep the batching table of an earlier run beside the new row
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    test = [json.loads(line) for line in (EXAMPLES / "test.jsonl").read_text().splitlines()]
    tags = list(TAGS)
    texts = [(tags[i % len(tags)], r["text"]) for i, r in enumerate(test)]  # mixed tags, in turn
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(Path(tmp), args.base)
        if "batching" in sections:
            results |= batching(root, texts, seconds, max_tokens)
        if "under-change" in sections:
            row = under_change(root, texts[:48], 32, change_seconds, max_tokens)  # 16 texts a tag
            results["under_change"] = {**header, "settings": SETTINGS["on"], **row}
            print(under_change_table(row), end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
