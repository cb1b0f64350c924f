"""The four functions as AWS Lambda handlers behind a Kafka event source mapping.

Deploy any function with the handler ``lookalike.functions.serverless.lambda_handler`` and
``LOOKALIKE_FUNCTION=<ingest|detect|embed|query>`` (docs/serverless.md). Each invocation
gets a batch of Kafka records (MSK or self-managed Kafka); they go through the same
``Runner.process_batch`` as the long-running runner: same routes, same output topics and
keys, the same poison rules and ``<topic>.dlq`` with the reason in headers. Only the
offsets are not ours to commit: the event source mapping commits a batch when the
invocation succeeds and redelivers all of it when the invocation fails. Hence:

- poison records are dead-lettered and the invocation succeeds;
- a store or broker failure (``TransientError``, ``KafkaError``) fails the invocation,
  without dead-lettering anything: the mapping retries the batch (uncapped by default);
- a record-level failure that may pass (``SourceUnavailable``: its image URL answered 503)
  or an unexpected handler error also fails the invocation (after the runner's backoff),
  so the batch comes again; once the record has failed ``MAX_ATTEMPTS`` times it is
  dead-lettered and the invocation succeeds.

Attempts are counted by the runner in memory, keyed by (topic, partition, offset), and
the runner lives as long as the warm container. Kafka has no per-record delivery count
we could read instead, and the source record cannot be changed. So the cap is per
container: a cold start (or a redelivery that lands in another container) starts the
count again. That errs towards retrying more, never towards dead-lettering good data
early; the mapping's own MaximumRetryAttempts/record age is the backstop (docs/serverless.md).

A failed invocation is redelivered whole, so the records of the batch that were done
before it failed are produced again: at-least-once, as everywhere in the pipeline
(handlers are idempotent, outputs are keyed).

Everything a function needs (models, store, producer) is built on the first invocation
and kept for the container's life. ``functions/cloudevents_app.py`` serves the same
``WarmFunction`` to Knative's KafkaSource.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from aws_lambda_powertools.utilities.kafka import ConsumerRecords, kafka_consumer

from lookalike.functions.wiring import FUNCTIONS, Resources
from lookalike.shared.bus import make_producer
from lookalike.shared.config import Settings
from lookalike.shared.runtime import Function, Runner

log = logging.getLogger("lookalike.serverless")

FUNCTION_ENV = "LOOKALIKE_FUNCTION"  # which of the four functions this deployment runs
NEEDS_STORE = ("ingest", "embed", "query")


@dataclass
class KafkaRecord:
    """A Kafka record with the fields ``Runner.process_batch`` reads (those of kafka-python's ConsumerRecord)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class RetryLater(Exception):
    """Records of the batch failed in a way that may pass: fail the delivery so they come again."""

    def __init__(self, message: str, delay_s: float):
        super().__init__(message)
        self.delay_s = delay_s


class UnknownTopic(ValueError):
    """A record of a topic the function has no route for: the deployment reads the wrong topic."""


class WarmFunction:
    """One function as a warm container keeps it: the function, a runner per lane, one producer."""

    def __init__(self, function: Function, settings: Settings, bootstrap_servers: str):
        self.function = function
        self.bootstrap_servers = bootstrap_servers
        self.lane_of = {route.topic: route.lane for route in function.routes()}
        self._producer = None
        # Runners only for process_batch: run() is never called, so they never consume.
        self.runners = {
            lane: Runner(function, bootstrap_servers, lane=lane, max_attempts=settings.max_attempts,
                         backoff_max_s=settings.backoff_max_s, consumer_factory=_no_consumer,
                         producer_factory=self.producer)
            for lane in function.lanes()
        }
        # The Knative app may take requests on several threads; the runners' attempt counts
        # and the summary's counters assume one batch at a time.
        self._lock = threading.Lock()

    def producer(self):
        """The container's producer (acks=all, TLS/SASL from KAFKA_* settings), made on first use."""
        if self._producer is None:
            self._producer = make_producer(self.bootstrap_servers, client_id=f"lookalike-{self.function.name}")
        return self._producer

    def process(self, records: list[KafkaRecord]) -> dict:
        """Handle, produce and dead-letter ``records``; a summary, or ``RetryLater`` when some must come again.

        Records are routed by topic to their lane's runner (an ingest deployment may take both
        catalog.events and search.requests). ``TransientError``/``KafkaError`` propagate.
        """
        unknown = sorted({r.topic for r in records} - self.lane_of.keys())
        if unknown:
            # A deployment mistake (the mapping reads a topic this function does not handle):
            # fail before producing anything; the records stay in Kafka for their real consumer.
            raise UnknownTopic(f"{self.function.name} has no route for topic(s) {', '.join(unknown)}; "
                               f"it reads {', '.join(sorted(self.lane_of))}")
        with self._lock:
            counters = self.function.counters
            before = counters.copy()
            retries = {}
            for lane, runner in self.runners.items():
                batch = [r for r in records if self.lane_of[r.topic] == lane]
                if batch:
                    _, lane_retries = runner.process_batch(batch, self.producer())
                    retries.update(lane_retries)
            emitted = sum(n - before[k] for k, n in counters.items() if k.startswith("emitted:"))
            summary = {"function": self.function.name, "records": len(records), "produced": emitted,
                       "dead_lettered": counters["dead_lettered"] - before["dead_lettered"]}
        if retries:
            where = ", ".join(f"{tp.topic}[{tp.partition}]@{offset}" for tp, (offset, _) in retries.items())
            raise RetryLater(f"{self.function.name}: records to try again from {where} "
                             f"(done: {summary})", max(delay for _, delay in retries.values()))
        return summary


def _no_consumer():
    raise RuntimeError("a serverless runner gets its records from the platform, it does not consume")


def load_function(name: str, settings: Settings) -> Function:
    """Build function ``name`` from settings: models and store, loaded once per container."""
    if name not in FUNCTIONS:
        raise ValueError(f"{FUNCTION_ENV} must be one of {', '.join(FUNCTIONS)}, not {name!r}")
    if name in NEEDS_STORE and not settings.qdrant_url:
        # The embedded Qdrant Edge would live on this container's own disk, seen by no other.
        raise ValueError(f"{name} needs QDRANT_URL when it runs serverless: instances share no disk")
    return Resources.load(settings, (name,)).build(name)


_warm: WarmFunction | None = None
_warm_lock = threading.Lock()


def warm_function(default_bootstrap_servers: str | None = None) -> WarmFunction:
    """This container's function, built on first use (``LOOKALIKE_FUNCTION``, settings from env vars).

    The producer connects to ``KAFKA_BOOTSTRAP_SERVERS``, else ``default_bootstrap_servers``
    (a Lambda event's ``bootstrapServers``). A build that fails (store unreachable) is tried
    again on the next delivery.
    """
    global _warm
    with _warm_lock:
        if _warm is None:
            settings = Settings()
            # Lambda's runtime has set up the root logger already; only our level is ours to set.
            logging.getLogger("lookalike").setLevel(settings.log_level.upper())
            bootstrap = settings.kafka_bootstrap_servers or default_bootstrap_servers
            if not bootstrap:
                raise ValueError("KAFKA_BOOTSTRAP_SERVERS is not set and the delivery names no bootstrap servers")
            name = os.environ.get(FUNCTION_ENV, "")
            _warm = WarmFunction(load_function(name, settings), settings, bootstrap)
            log.info("%s ready (producing to %s)", name, bootstrap)
        return _warm


# --------------------------------------------------------------------------- AWS Lambda


def _bytes(b64: str | None) -> bytes | None:
    return None if b64 is None else base64.b64decode(b64)


def _record(record) -> KafkaRecord:
    """A Powertools ``ConsumerRecordRecords`` as a ``KafkaRecord``.

    Key and value are base64-decoded to bytes here rather than through Powertools' default
    deserializer, which decodes them as UTF-8 text: a record that is not UTF-8 is poison to
    dead-letter byte for byte, not an invocation error. Headers keep their order and
    repeats (Powertools' ``headers`` is a dict); Java's signed bytes are read as unsigned.
    """
    return KafkaRecord(
        topic=record.topic, partition=record.partition, offset=record.offset,
        key=_bytes(record.original_key), value=_bytes(record.get("value")),
        headers=[(name, bytes(b & 0xFF for b in value))
                 for header in record.get("headers") or [] for name, value in header.items()],
    )


def _seconds_left(context) -> float:
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    return remaining_ms() / 1000 if remaining_ms else float("inf")


@kafka_consumer
def lambda_handler(event: ConsumerRecords, context) -> dict:
    """Lambda entry for MSK and self-managed Kafka event source mappings; see the module docstring."""
    warm = warm_function(event.get("bootstrapServers"))
    try:
        return warm.process([_record(r) for r in event.records])
    except RetryLater as e:
        # The mapping redelivers at once; wait the runner's backoff first (0.5 s, 1 s, ...) so
        # that a flaky image host gets the time it would get from the long-running runner.
        time.sleep(max(0.0, min(e.delay_s, _seconds_left(context) - 5)))
        log.warning("%s", e)
        raise
