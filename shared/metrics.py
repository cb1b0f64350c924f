"""Prometheus metrics of the function processes (``prometheus-client``), in one place.

Function processes serve them on ``METRICS_PORT`` (``/metrics``, beside ``/healthz``); the
gateway adds its own request metrics and serves ``/metrics`` on its port. The Grafana
dashboard and the alert rules in ``infra/monitoring/`` name only metrics defined here or in
the gateway (a test checks it).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

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
STORE_POINTS = Gauge("lookalike_store_points", "Points in the vector collection", ["collection"])
LAST_PROGRESS = Gauge("lookalike_last_progress_timestamp_seconds",
                      "Unix time of the function's last finished batch", ["function"])
FUNCTION_UP = Gauge("lookalike_function_up", "1 while the function's runner is running, 0 while it restarts or is stuck",
                    ["function"])
MODEL = Info("lookalike_model", "The embedding model this process serves")

# Every metric name a dashboard or an alert may use (the ``_total``/``_bucket`` suffixes are Prometheus's).
FUNCTION_METRICS = (RECORDS, BATCH_RETRIES, HANDLER_SECONDS, END_TO_END_SECONDS, BATCH_SIZE, CONSUMER_LAG,
                    STORE_POINTS, LAST_PROGRESS, FUNCTION_UP, MODEL)
