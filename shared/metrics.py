"""Prometheus metrics of the function processes (``prometheus-client``), in one place.

Function processes serve them on ``METRICS_PORT`` (``/metrics``, beside ``/healthz``); the
gateway adds its own request metrics and serves ``/metrics`` on its port. The Grafana
dashboard and the alert rules in ``infra/monitoring/`` name only metrics defined here or in
the gateway (a test checks it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, Info, generate_latest

log = logging.getLogger("lookalike.metrics")
REFRESH_EVERY_S = 5.0

# Outcome of each record a runner finished: handled (outputs produced), dead_lettered, retried
# (a record-level failure that will be tried again after a backoff).
RECORDS = Counter("lookalike_records", "Records finished by a function, by outcome",
                  ["function", "topic", "outcome"])
# Whole batches rewound because the store or the broker failed (retried without a cap).
BATCH_RETRIES = Counter("lookalike_batch_retries", "Batches retried after an infrastructure failure",
                        ["function"])
HANDLER_SECONDS = Histogram("lookalike_handler_seconds", "Time in the handler per batch of one topic",
                            ["function", "topic"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
# From the record's Kafka timestamp (when it was produced) to its outputs being acknowledged.
END_TO_END_SECONDS = Histogram("lookalike_end_to_end_seconds", "Record produced to its outputs acknowledged",
                               ["function", "topic"],
                               buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
BATCH_SIZE = Histogram("lookalike_batch_size", "Records per polled batch", ["function"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
CONSUMER_LAG = Gauge("lookalike_consumer_lag", "Records not yet committed by the consumer group",
                     ["group", "topic"])
DLQ_RECORDS = Gauge("lookalike_dlq_records", "Records held in a dead-letter topic (waiting for a fix and a replay)",
                    ["topic"])
STORE_POINTS = Gauge("lookalike_store_points", "Points in the vector collection", ["collection"])
LAST_PROGRESS = Gauge("lookalike_last_progress_timestamp_seconds",
                      "Unix time of the function's last finished batch", ["function"])
FUNCTION_UP = Gauge("lookalike_function_up", "1 while the function's runner is healthy, 0 while it restarts or hangs",
                    ["function"])
MODEL = Info("lookalike_model", "The embedding model this process serves")

# Every metric name a dashboard or an alert may use (the ``_total``/``_bucket`` suffixes are Prometheus's).
FUNCTION_METRICS = (RECORDS, BATCH_RETRIES, HANDLER_SECONDS, END_TO_END_SECONDS, BATCH_SIZE, CONSUMER_LAG,
                    DLQ_RECORDS, STORE_POINTS, LAST_PROGRESS, FUNCTION_UP, MODEL)


class GaugeRefresher:
    """Reads the gauges that records passing by do not update (health, lag, dead letters, points).

    Called before a scrape; reads at most every ``REFRESH_EVERY_S`` so that frequent scrapes do
    not load the broker. ``supervisors`` are ``runtime.Supervisor``s, ``offsets`` a ``bus.OffsetReader``.
    """

    def __init__(self, supervisors: list, offsets, store=None, collections: Callable[[], list[str]] | None = None):
        """``collections``: the ones to count points of, read at each refresh (a reindex changes them)."""
        self.supervisors, self.offsets, self.store, self.collections = supervisors, offsets, store, collections
        self._lock = threading.Lock()
        self._last = -REFRESH_EVERY_S

    def __call__(self) -> None:
        with self._lock:
            if time.monotonic() - self._last < REFRESH_EVERY_S:
                return
            self._last = time.monotonic()
            try:
                self._read()
            except Exception as e:  # noqa: BLE001 - a broker hiccup must not fail the scrape
                log.warning("metrics refresh failed: %s", e)

    def _read(self) -> None:
        for supervisor in self.supervisors:
            runner = supervisor.runner
            FUNCTION_UP.labels(runner.name).set(1 if supervisor.health()["ok"] else 0)
            for topic, lag in self.offsets.lag(runner.group_id, list(runner.routes)).items():
                CONSUMER_LAG.labels(runner.group_id, topic).set(lag)
            for topic, held in self.offsets.sizes([f"{t}.dlq" for t in runner.routes]).items():
                DLQ_RECORDS.labels(topic).set(held)
        if self.store is not None and self.collections is not None:
            for collection in self.collections():
                STORE_POINTS.labels(collection).set(self.store.count(collection))


def serve(port: int, health: Callable[[], tuple[bool, dict]], refresh: Callable[[], None] | None = None,
          host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``/metrics`` (Prometheus) and ``/healthz`` (200 or 503, JSON) in a daemon thread.

    ``refresh`` (a ``GaugeRefresher``) updates the gauges read on demand before each scrape.
    Listens on every interface like ``prometheus_client.start_http_server``: in a container
    that is what a scraper and a probe reach; nothing secret is served.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path == "/metrics":
                if refresh is not None:
                    refresh()
                self._answer(200, CONTENT_TYPE_LATEST, generate_latest())
            elif self.path == "/healthz":
                ok, detail = health()
                self._answer(200 if ok else 503, "application/json", json.dumps(detail).encode())
            else:
                self._answer(404, "text/plain", b"not found\n")

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes and probes every few seconds: not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics, /healthz", host, server.server_address[1])
    return server
