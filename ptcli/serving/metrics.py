"""`GET /metrics`: what the server measured, in Prometheus's text format, through `prometheus_client`.

Each server has its own registry (never the library's global one), so several servers in one
process do not share counters. Only what the code sees is reported: the handlers time each
request and know its status; the batcher knows the size of every model pass and the rows and
tokens it answered. A `tag` label is only ever a tag of the bank (a request for an unknown tag
is counted with tag ""), so a client cannot grow the label set with names of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ptcli.inference.engine import Item, Prediction

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, queued: Callable[[], int] | None = None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "ptcli_requests",
            "HTTP requests answered, by endpoint, tag and status",
            ["endpoint", "tag", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ptcli_request_duration_seconds",
            "time from a request's arrival to its answer, by endpoint and tag",
            ["endpoint", "tag"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ptcli_batch_size", "rows per model pass of the batcher (any tags mixed)", buckets=BATCH_BUCKETS, registry=r
        )
        self.rows = Counter("ptcli_rows", "rows the model answered, by tag", ["tag"], registry=r)
        self.generated = Counter("ptcli_generated_tokens", "tokens generated, by tag", ["tag"], registry=r)
        self.read = Counter("ptcli_prompt_tokens", "text tokens the model read, by tag", ["tag"], registry=r)
        if queued is not None:
            Gauge("ptcli_queued_rows", "rows waiting for the batcher", registry=r).set_function(queued)

    def request(self, endpoint: str, tag: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, tag, str(status)).inc()
        self.latency.labels(endpoint, tag).observe(seconds)

    def batch(self, items: list[Any], results: list[Any]) -> None:
        """One model pass of the batcher (called on its worker thread; prometheus_client is thread-safe)."""
        self.batch_size.observe(len(items))
        for item, result in zip(items, results):
            if isinstance(item, Item) and isinstance(result, Prediction):
                tag = item.prompt.tag
                self.rows.labels(tag).inc()
                self.generated.labels(tag).inc(result.tokens)
                self.read.labels(tag).inc(result.prompt_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
