"""The one Kafka runner every function uses.

A function is a set of routes: input topic -> parser -> handler. Handlers are pure
(models and stores are handed to them at start-up) and return the messages to
produce; the runner does all Kafka work:

1. poll a batch (consumer group ``lookalike-<function>``),
2. parse each record; a record that fails to parse is poison,
3. call the handlers (per record, or once per batch for batching functions),
4. produce outputs with acks=all, poison records to ``<topic>.dlq`` with the reason
   in headers, flush and check every send,
5. only then commit the batch's offsets (at-least-once).

``TransientError`` (store or broker unreachable) anywhere in 3-5 rewinds the
consumer to the batch start and retries with backoff: nothing is committed and
nothing good is dead-lettered. An unexpected handler exception is retried too,
and dead-lettered only after ``max_attempts`` tries on the same record, so a bug
triggered by one record cannot block its partition forever.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import TypeAdapter, ValidationError

from shared.bus import make_consumer, make_producer
from shared.errors import PoisonMessage, TransientError
from shared.messages import Message, dlq_topic

log = logging.getLogger("lookalike.runtime")


@dataclass(frozen=True)
class Emit:
    """One output message for ``topic``; keyed by the message's own key."""

    topic: str
    message: Message


Outcome = list[Emit] | PoisonMessage
RecordHandler = Callable[[Any], list[Emit]]
BatchHandler = Callable[[list[Any]], list[Outcome]]


@dataclass
class Route:
    """Input ``topic`` parsed as ``schema`` (a pydantic model or annotated union).

    ``handle`` takes one message (``batch=False``) or the list of this batch's
    messages on this topic (``batch=True``) and returns one ``Outcome`` each.
    """

    topic: str
    schema: Any
    handle: Callable
    batch: bool = False
    adapter: TypeAdapter = field(init=False)

    def __post_init__(self) -> None:
        self.adapter = TypeAdapter(self.schema)

    def parse(self, raw: bytes | None) -> Any:
        if raw is None:
            raise PoisonMessage("empty message value")
        try:
            return self.adapter.validate_json(raw)
        except ValidationError as e:
            kind = "bad JSON" if any(err["type"] == "json_invalid" for err in e.errors()) else "schema violation"
            raise PoisonMessage(f"{kind}: {_short(e)}") from None


class Function:
    """Base of the four functions: a name, routes and counters (for status and tests)."""

    name: str = "function"

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()

    def routes(self) -> list[Route]:
        raise NotImplementedError


class _RetryBatch(Exception):
    """Internal: an unexpected handler error that has tries left."""


class Runner:
    """Runs one function against Kafka until ``stop()``; see the module docstring."""

    def __init__(self, function: Function, bootstrap_servers: str, *, poll_max_records: int = 32,
                 poll_timeout_ms: int = 200, session_timeout_ms: int = 10000, max_attempts: int = 3,
                 backoff_max_s: float = 30.0):
        self.function = function
        self.routes = {r.topic: r for r in function.routes()}
        self.bootstrap_servers = bootstrap_servers
        self.poll_max_records = poll_max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.session_timeout_ms = session_timeout_ms
        self.max_attempts = max_attempts
        self.backoff_max_s = backoff_max_s
        self.group_id = f"lookalike-{function.name}"
        self._stop = threading.Event()
        self._failures: collections.Counter[tuple[str, int, int]] = collections.Counter()
        self.ready = threading.Event()  # set once the consumer has its partitions

    @classmethod
    def from_settings(cls, function: Function, settings, bootstrap_servers: str) -> "Runner":
        return cls(function, bootstrap_servers, poll_max_records=settings.poll_max_records,
                   poll_timeout_ms=settings.poll_timeout_ms, session_timeout_ms=settings.session_timeout_ms,
                   max_attempts=settings.max_attempts, backoff_max_s=settings.backoff_max_s)

    def stop(self) -> None:
        """Finish the batch in hand, commit it, and return from ``run``."""
        self._stop.set()

    def run(self) -> None:
        counters = self.function.counters
        producer = make_producer(self.bootstrap_servers, client_id=f"lookalike-{self.function.name}")
        consumer = make_consumer(self.bootstrap_servers, self.group_id, list(self.routes),
                                 self.session_timeout_ms, client_id=f"lookalike-{self.function.name}")
        backoff = 0.5
        log.info("%s: consuming %s as group %s", self.function.name, ", ".join(self.routes), self.group_id)
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.poll_max_records)
                if consumer.assignment():
                    self.ready.set()
                records = [r for batch in polled.values() for r in batch]
                if not records:
                    continue
                try:
                    self._process(records, producer)
                    consumer.commit(_next_offsets(records))
                    counters["batches"] += 1
                    backoff = 0.5
                except CommitFailedError as e:
                    # The group rebalanced under us: the new owner re-reads from the last commit.
                    log.warning("%s: commit failed (%s); records will be redelivered", self.function.name, e)
                except (TransientError, KafkaError, _RetryBatch) as e:
                    counters["retries"] += 1
                    log.warning("%s: batch of %d will be retried in %.1fs: %s", self.function.name,
                                len(records), backoff, e)
                    for tp, offset in _first_offsets(records).items():
                        consumer.seek(tp, offset)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
        finally:
            try:
                producer.flush(timeout=10)
                producer.close(timeout=10)
            finally:
                consumer.close(autocommit=False)
            log.info("%s: stopped", self.function.name)

    # ------------------------------------------------------------------ one batch

    def _process(self, records: list, producer) -> None:
        outcomes: list[Outcome | None] = [None] * len(records)
        parsed: dict[str, list[tuple[int, Any]]] = collections.defaultdict(list)
        for i, record in enumerate(records):
            try:
                parsed[record.topic].append((i, self.routes[record.topic].parse(record.value)))
            except PoisonMessage as e:
                outcomes[i] = e
        for topic, items in parsed.items():
            route = self.routes[topic]
            if route.batch:
                results = route.handle([msg for _, msg in items])
                if len(results) != len(items):
                    raise RuntimeError(f"{self.function.name}: batch handler returned {len(results)} "
                                       f"outcomes for {len(items)} messages")
                for (i, _), result in zip(items, results):
                    outcomes[i] = result
            else:
                for i, msg in items:
                    outcomes[i] = self._handle_one(route, records[i], msg)

        futures = []
        counters = self.function.counters
        for record, outcome in zip(records, outcomes):
            counters["records"] += 1
            if isinstance(outcome, PoisonMessage):
                counters["dead_lettered"] += 1
                log.warning("%s: %s[%d]@%d dead-lettered: %s", self.function.name, record.topic,
                            record.partition, record.offset, outcome)
                futures.append(producer.send(dlq_topic(record.topic), key=record.key, value=record.value,
                                             headers=_dlq_headers(record, outcome, self.function.name)))
                continue
            for emit in outcome or ():
                counters[f"emitted:{emit.topic}"] += 1
                futures.append(producer.send(emit.topic, key=emit.message.key().encode(),
                                             value=emit.message.to_bytes(), headers=_trace_headers(record)))
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)  # raises KafkaError if the broker did not take it
        for record in records:
            self._failures.pop((record.topic, record.partition, record.offset), None)

    def _handle_one(self, route: Route, record, msg) -> Outcome:
        try:
            return route.handle(msg)
        except PoisonMessage as e:
            return e
        except TransientError:
            raise
        except Exception as e:  # a bug or an unforeseen input: retry, then dead-letter
            key = (record.topic, record.partition, record.offset)
            self._failures[key] += 1
            if self._failures[key] >= self.max_attempts:
                log.exception("%s: handler failed %d times on %s[%d]@%d", self.function.name,
                              self._failures[key], *key)
                return PoisonMessage(f"handler error after {self._failures[key]} attempts: {e!r}")
            raise _RetryBatch(repr(e)) from e


def _short(e: ValidationError) -> str:
    parts = [f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()[:3]]
    return "; ".join(parts)[:500]


def _first_offsets(records: Sequence) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    return first


def _next_offsets(records: Sequence) -> dict[TopicPartition, OffsetAndMetadata]:
    last: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last[tp] = max(last.get(tp, r.offset), r.offset)
    return {tp: OffsetAndMetadata(off + 1, "", -1) for tp, off in last.items()}


def _trace_headers(record) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in (record.headers or []) if k == "trace_id"]


def _dlq_headers(record, error: PoisonMessage, function: str) -> list[tuple[str, bytes]]:
    return list(record.headers or []) + [
        ("dlq.reason", str(error).encode()[:2000]),
        ("dlq.function", function.encode()),
        ("dlq.source", f"{record.topic}[{record.partition}]@{record.offset}".encode()),
        ("dlq.time", str(int(time.time() * 1000)).encode()),
    ]
