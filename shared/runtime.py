"""The one Kafka runner every function uses, and the supervisor that keeps it running.

A function is a set of routes: input topic -> parser -> handler. Models and stores
are handed to handlers at start-up; handlers return the messages to produce (some
also write to the store, idempotently: deterministic point ids). The runner does all
Kafka work:

1. poll a batch (consumer group ``lookalike-<function>[-<lane>]``, see ``consumer_group``),
2. parse each record; a record that fails to parse is poison,
3. call the handlers (per record, or once per batch for batching functions),
4. produce outputs with acks=all, poison records to ``<topic>.dlq`` with the reason
   in headers, flush and check every send,
5. only then commit offsets (at-least-once).

What each failure does:

- ``PoisonMessage`` (or an output over the message size limit): the record goes to
  the DLQ with the reason, its partition moves on.
- A record-level failure that may pass (``SourceUnavailable``: its image URL answered
  503) or an unexpected handler exception: that record is tried again after a backoff,
  at most ``max_attempts`` times, then dead-lettered with the reason. Meanwhile only
  its own partition waits (paused, from that record on, to keep per-key order); the
  other partitions of the batch are produced and committed.
- An infrastructure failure (any other ``TransientError``: store unreachable; a Kafka
  error producing): nothing of the batch is committed or dead-lettered, the consumer
  rewinds to the batch start and retries with backoff, without a cap: good data never
  goes to the DLQ because the store was down. The runner reports it in ``health``.
- A batch handler that raises unexpectedly is called again one record at a time, so
  the record that breaks it is found and handled like a record handler's failure.

``Supervisor`` runs a runner in a thread, restarts it with backoff when anything
escapes it (broker gone, a bug in the loop), and says whether it is alive and making
progress (``health()``), which ``/healthz`` and ``lookalike status`` show.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata, TopicPartition
from opentelemetry import trace
from pydantic import TypeAdapter, ValidationError

from lookalike.shared import metrics
from lookalike.shared.bus import close_consumer, make_consumer, make_producer
from lookalike.shared.config import Settings
from lookalike.shared.errors import PoisonMessage, SourceUnavailable, TransientError, describe_errors
from lookalike.shared.lane_consumer import RdKafkaLaneConsumer
from lookalike.shared.limits import MAX_MESSAGE_BYTES, fits_message
from lookalike.shared.messages import (
    CATALOG_EVENTS,
    IMAGES_DETECTED,
    IMAGES_NORMALIZED,
    QUERY_VECTORS,
    RECOMMEND_REQUESTS,
    SEARCH_DETECTED,
    SEARCH_NORMALIZED,
    SEARCH_REQUESTS,
    Message,
    dlq_topic,
)
from lookalike.shared.tracing import start_span, trace_headers

log = logging.getLogger("lookalike.runtime")

# Every consumer group and the topics it reads: the one place that names them (status,
# lag and health read it; a test checks it against the functions' routes). Ingest reads
# shopper searches in a lane of its own, so a slow catalogue image URL never delays a search.
CONSUMER_GROUPS: dict[str, tuple[str, ...]] = {
    "lookalike-ingest": (CATALOG_EVENTS,),
    "lookalike-ingest-search": (SEARCH_REQUESTS,),
    "lookalike-detect": (IMAGES_NORMALIZED,),
    "lookalike-detect-search": (SEARCH_NORMALIZED,),
    "lookalike-embed": (IMAGES_DETECTED,),
    "lookalike-embed-search": (SEARCH_DETECTED,),
    "lookalike-query": (QUERY_VECTORS, RECOMMEND_REQUESTS),
}


def consumer_group(function: str, lane: str = "") -> str:
    return f"lookalike-{function}" + (f"-{lane}" if lane else "")


def lag_per_function(group_lags: dict[str, int]) -> dict[str, int]:
    """Lag per function, its lanes' groups added up (``{"lookalike-ingest-search": 2, ...}`` -> ``{"ingest": 2}``)."""
    out: dict[str, int] = {}
    for group, lag in group_lags.items():
        function = group.removeprefix("lookalike-").split("-")[0]
        out[function] = out.get(function, 0) + lag
    return out


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
    Routes of one function with different ``lane``s are consumed by separate runners
    (consumer groups), so one lane's slow records never hold up another's.
    """

    topic: str
    schema: Any
    handle: Callable
    batch: bool = False
    lane: str = ""
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
            raise PoisonMessage(f"{kind}: {describe_errors(e.errors())}"[:2000]) from None


class Function:
    """Base of the four functions: a name, routes and counters (for status and tests)."""

    name: str = "function"

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def lanes(self) -> list[str]:
        return sorted({r.lane for r in self.routes()})


@dataclass
class _Retry:
    """A record to try again later (its partition waits from it on)."""

    reason: str
    delay_s: float


class Runner:
    """Runs one lane of a function against Kafka until ``stop()``; see the module docstring."""

    def __init__(self, function: Function, bootstrap_servers: str, *, lane: str = "", poll_max_records: int = 128,
                 poll_timeout_ms: int = 200, batch_max_wait_ms: int = 0, session_timeout_ms: int = 10000,
                 fetch_max_wait_ms: int = 50,
                 max_attempts: int = 3, backoff_max_s: float = 30.0, consumer_factory: Callable | None = None,
                 producer_factory: Callable | None = None, leave_group_on_close: bool = True,
                 consumer_client: str | None = None):
        self.function = function
        self.lane = lane
        self.routes = {r.topic: r for r in function.routes() if r.lane == lane}
        if not self.routes:
            raise ValueError(f"{function.name} has no routes in lane {lane!r}")
        self.name = function.name + (f"-{lane}" if lane else "")
        self.bootstrap_servers = bootstrap_servers
        self.poll_max_records = poll_max_records
        self.poll_timeout_ms = poll_timeout_ms
        # A lane with a batch route keeps polling this long after its first record, until it
        # holds poll_max_records: the embedder's batches form across polls, not per poll.
        self.batch_max_wait_ms = batch_max_wait_ms if any(r.batch for r in self.routes.values()) else 0
        self.session_timeout_ms = session_timeout_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.max_attempts = max_attempts
        self.backoff_max_s = backoff_max_s
        self.group_id = consumer_group(function.name, lane)
        # False for processes that share a group on the embedded broker: see bus.close_consumer and
        # lane_consumer.RdKafkaLaneConsumer.close.
        self.leave_group_on_close = leave_group_on_close
        # KAFKA_CONSUMER's pick (Settings.lane_consumer_client), read from the environment if not given
        if consumer_factory is None and consumer_client is None:
            consumer_client = Settings().lane_consumer_client()
        self.consumer_client = consumer_client
        self._consumer_factory = consumer_factory or self._make_consumer
        self._producer_factory = producer_factory or (
            lambda: make_producer(self.bootstrap_servers, client_id=f"lookalike-{self.name}"))
        self._stop = threading.Event()
        self._attempts: collections.Counter[tuple[str, int, int]] = collections.Counter()
        self._paused: dict[TopicPartition, float] = {}  # partition -> when to resume (monotonic)
        self.ready = threading.Event()  # set once the consumer has its partitions
        self.last_beat = time.monotonic()  # each turn of the poll loop: a hung handler stops it
        self.failing_since: float | None = None  # first of consecutive infrastructure failures
        self.last_error = ""

    @classmethod
    def from_settings(cls, function: Function, settings, bootstrap_servers: str, lane: str = "",
                      leave_group_on_close: bool = True) -> "Runner":
        return cls(function, bootstrap_servers, lane=lane, leave_group_on_close=leave_group_on_close,
                   poll_max_records=settings.poll_max_records,
                   poll_timeout_ms=settings.poll_timeout_ms, batch_max_wait_ms=settings.batch_max_wait_ms,
                   session_timeout_ms=settings.session_timeout_ms, fetch_max_wait_ms=settings.fetch_max_wait_ms,
                   max_attempts=settings.max_attempts, backoff_max_s=settings.backoff_max_s,
                   consumer_client=settings.lane_consumer_client())

    def _make_consumer(self):
        options = dict(session_timeout_ms=self.session_timeout_ms, client_id=f"lookalike-{self.name}",
                       fetch_max_wait_ms=self.fetch_max_wait_ms)
        if self.consumer_client == "librdkafka":
            return RdKafkaLaneConsumer(self.bootstrap_servers, self.group_id, list(self.routes),
                                       leave_group_on_close=self.leave_group_on_close, **options)
        return make_consumer(self.bootstrap_servers, self.group_id, list(self.routes), **options)

    def stop(self) -> None:
        """Finish the batch in hand, commit it, and return from ``run``."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        counters = self.function.counters
        producer = self._producer_factory()
        try:
            consumer = self._consumer_factory()
        except BaseException:
            producer.close(timeout=5)
            raise
        self._paused.clear()
        backoff = 0.5
        topic_ids: dict[str, Any] = {}
        log.info("%s: consuming %s as group %s", self.name, ", ".join(self.routes), self.group_id)
        try:
            while not self._stop.is_set():
                self.last_beat = time.monotonic()
                self._resume_due(consumer)
                polled = consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.poll_max_records)
                topic_ids = _check_topic_ids(consumer, self.routes, topic_ids)
                if consumer.assignment():
                    self.ready.set()
                records = [r for batch in polled.values() for r in batch]
                if not records:
                    continue
                records += self._linger(consumer, len(records))
                metrics.BATCH_SIZE.labels(self.name).observe(len(records))
                try:
                    commits, retries = self.process_batch(records, producer)
                except (TransientError, KafkaError) as e:
                    # The store or the broker failed: nobody's record is at fault. Retry the
                    # whole batch, uncapped, with backoff; never dead-letter good data for it.
                    counters["retries"] += 1
                    metrics.BATCH_RETRIES.labels(self.name).inc()
                    self.failing_since = self.failing_since or time.monotonic()
                    self.last_error = f"{type(e).__name__}: {e}"[:500]
                    log.warning("%s: batch of %d will be retried in %.1fs: %s", self.name, len(records), backoff, e)
                    for tp, offset in _first_offsets(records).items():
                        consumer.seek(tp, offset)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
                    continue
                self.failing_since, backoff = None, 0.5
                for tp, (offset, delay) in retries.items():
                    consumer.seek(tp, offset)
                    consumer.pause(tp)
                    self._paused[tp] = time.monotonic() + delay
                if commits:
                    try:
                        consumer.commit(commits)
                    except CommitFailedError as e:
                        # The group rebalanced under us: the new owner re-reads from the last commit.
                        log.warning("%s: commit failed (%s); records will be redelivered", self.name, e)
                counters["batches"] += 1
                metrics.LAST_PROGRESS.labels(self.name).set_to_current_time()
        finally:
            try:
                producer.flush(timeout=10)
                producer.close(timeout=10)
            finally:
                close_consumer(consumer, self.leave_group_on_close)
            log.info("%s: stopped", self.name)

    def _linger(self, consumer, have: int) -> list:
        """More records for the batch in hand, for up to ``batch_max_wait_ms`` (bounded by the clock)."""
        more: list = []
        deadline = time.monotonic() + self.batch_max_wait_ms / 1000
        while have + len(more) < self.poll_max_records and not self._stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            polled = consumer.poll(timeout_ms=left_ms, max_records=self.poll_max_records - have - len(more))
            more += [r for batch in polled.values() for r in batch]
        return more

    def _resume_due(self, consumer) -> None:
        now = time.monotonic()
        for tp, when in list(self._paused.items()):
            if when <= now:
                del self._paused[tp]
                if tp in consumer.assignment():
                    consumer.resume(tp)

    # ------------------------------------------------------------------ one batch

    def process_batch(self, records: list, producer) -> tuple[dict, dict]:
        """Handle, produce and return (offsets to commit, partitions to retry from: (offset, delay)).

        ``records`` need only Kafka's record fields (topic, partition, offset, key, value, headers),
        so entries that are not a consumer's (a Lambda event's records) go through the same rules.
        """
        # One span per record, continuing the trace its headers carry; outputs carry it on.
        spans = [start_span(f"{self.name} {r.topic}", r.headers, **{"messaging.kafka.offset": r.offset,
                                                                    "messaging.destination": r.topic})
                 for r in records]
        try:
            return self._process(records, producer, spans)
        finally:
            for span in spans:
                span.end()

    def _process(self, records: list, producer, spans: list) -> tuple[dict, dict]:
        outcomes: list[Outcome | _Retry | None] = [None] * len(records)
        parsed: dict[str, list[tuple[int, Any]]] = collections.defaultdict(list)
        for i, record in enumerate(records):
            try:
                parsed[record.topic].append((i, self.routes[record.topic].parse(record.value)))
            except PoisonMessage as e:
                outcomes[i] = e
        for topic, items in parsed.items():
            route = self.routes[topic]
            started = time.perf_counter()
            if route.batch:
                self._handle_batch(route, records, items, outcomes, spans)
            else:
                self._handle_each(route, records, items, outcomes, spans)
            metrics.HANDLER_SECONDS.labels(self.name, topic).observe(time.perf_counter() - started)

        # Per partition, records are done in order up to the first one to retry; nothing
        # after it is produced or committed, so per-key order holds.
        retries: dict[TopicPartition, tuple[int, float]] = {}
        for record, outcome in zip(records, outcomes):
            tp = TopicPartition(record.topic, record.partition)
            if isinstance(outcome, _Retry) and tp not in retries:
                retries[tp] = (record.offset, outcome.delay_s)
        done = [(r, o) for r, o in zip(records, outcomes)
                if not (TopicPartition(r.topic, r.partition) in retries
                        and r.offset >= retries[TopicPartition(r.topic, r.partition)][0])]

        futures = []
        counters = self.function.counters
        span_of = {id(r): span for r, span in zip(records, spans)}
        outcome_of: dict[int, str] = {}
        for record, outcome in done:
            counters["records"] += 1
            span = span_of[id(record)]
            if not isinstance(outcome, PoisonMessage):
                sends = [(emit.topic, emit.message.key().encode(), emit.message.to_bytes()) for emit in outcome or ()]
                oversized = next(((t, len(v)) for t, k, v in sends if not fits_message(k, v)), None)
                if oversized is None:
                    headers = trace_headers(span)
                    for topic, key, value in sends:
                        counters[f"emitted:{topic}"] += 1
                        futures.append((record, producer.send(topic, key=key, value=value, headers=headers)))
                    outcome_of[id(record)] = "handled"
                    continue
                outcome = PoisonMessage(f"output to {oversized[0]} would be {oversized[1]} bytes, over the "
                                        f"{MAX_MESSAGE_BYTES}-byte message limit")
            counters["dead_lettered"] += 1
            outcome_of[id(record)] = "dead_lettered"
            with trace.use_span(span, end_on_exit=False):  # the line carries the record's trace id
                log.warning("%s: %s[%d]@%d dead-lettered: %s", self.name, record.topic, record.partition,
                            record.offset, outcome)
            futures.append((record, producer.send(dlq_topic(record.topic), key=record.key, value=record.value,
                                                  headers=_dlq_headers(record, outcome, self.name))))
        producer.flush(timeout=30)
        refused = {}
        for record, future in futures:
            try:
                future.get(timeout=30)  # raises KafkaError if the broker did not take it
            except MessageSizeTooLargeError as e:
                # Past our own check: the broker's limit is lower than ours. Retrying can't help.
                refused[(record.topic, record.partition, record.offset)] = (record, e)
        if refused:
            dlq = [producer.send(dlq_topic(r.topic), key=r.key, value=r.value, headers=_dlq_headers(
                       r, PoisonMessage(f"the broker refused an output as too large: {e}"), self.name))
                   for r, e in refused.values()]
            counters["dead_lettered"] += len(dlq)
            producer.flush(timeout=30)
            for future in dlq:
                future.get(timeout=30)
            for record, _ in refused.values():
                outcome_of[id(record)] = "dead_lettered"
        self._observe(done, outcome_of, records, outcomes)
        for record, _ in done:
            self._attempts.pop((record.topic, record.partition, record.offset), None)
        commits = {tp: OffsetAndMetadata(offset + 1, "", -1)
                   for tp, offset in _last_offsets([r for r, _ in done]).items()}
        return commits, retries

    def _observe(self, done: list, outcome_of: dict[int, str], records: list, outcomes: list) -> None:
        """Metrics of a finished batch: each record's outcome, and its age now that its outputs are acknowledged."""
        now_ms = time.time() * 1000
        for record, _ in done:
            metrics.RECORDS.labels(self.name, record.topic, outcome_of[id(record)]).inc()
            if getattr(record, "timestamp", None):  # Kafka's producer timestamp, ms
                metrics.END_TO_END_SECONDS.labels(self.name, record.topic).observe(max(0.0, now_ms - record.timestamp)
                                                                                  / 1000)
        for record, outcome in zip(records, outcomes):
            if isinstance(outcome, _Retry):
                metrics.RECORDS.labels(self.name, record.topic, "retried").inc()

    def _handle_each(self, route: Route, records: list, items: list[tuple[int, Any]], outcomes: list,
                     spans: list, single: bool = False) -> None:
        """Records one at a time (``single``: through a batch handler, as batches of one)."""
        waiting: set[tuple[str, int]] = set()  # partitions with a record to retry: the rest of them waits
        for i, msg in items:
            record = records[i]
            if (record.topic, record.partition) in waiting:
                continue
            with trace.use_span(spans[i], end_on_exit=False):  # its log lines carry its trace id
                outcomes[i] = self._attempt(record, (lambda: route.handle([msg])[0]) if single else
                                            (lambda: route.handle(msg)))
            if isinstance(outcomes[i], _Retry):
                waiting.add((record.topic, record.partition))

    def _handle_batch(self, route: Route, records: list, items: list[tuple[int, Any]], outcomes: list,
                      spans: list) -> None:
        try:
            results = route.handle([msg for _, msg in items])
            if len(results) != len(items):
                raise RuntimeError(f"batch handler returned {len(results)} outcomes for {len(items)} messages")
        except TransientError as e:
            if isinstance(e, SourceUnavailable):  # a record's own problem: find which one, as below
                return self._handle_each(route, records, items, outcomes, spans, single=True)
            raise
        except Exception as e:
            log.warning("%s: batch handler failed (%r); handling the %d records one by one", self.name, e, len(items))
            return self._handle_each(route, records, items, outcomes, spans, single=True)
        for (i, _), result in zip(items, results):
            outcomes[i] = result

    def _attempt(self, record, call: Callable[[], Any]) -> Outcome | _Retry:
        """One try of one record: its outcome, or when to try again; infrastructure errors propagate."""
        try:
            return call()
        except PoisonMessage as e:
            return e
        except TransientError as e:
            if not isinstance(e, SourceUnavailable):
                raise
            return self._failed(record, "source unavailable", e)
        except Exception as e:  # a bug or an unforeseen input
            log.exception("%s: handler failed on %s[%d]@%d", self.name, record.topic, record.partition, record.offset)
            return self._failed(record, "handler error", e)

    def _failed(self, record, what: str, error: Exception) -> PoisonMessage | _Retry:
        """Count a failed try of a record: retry after a backoff, or dead-letter at the cap."""
        key = (record.topic, record.partition, record.offset)
        self._attempts[key] += 1
        attempts = self._attempts[key]
        if attempts >= self.max_attempts:
            self._attempts.pop(key, None)
            return PoisonMessage(f"{what} after {attempts} attempts: {error!r}"[:2000])
        self.function.counters["record_retries"] += 1
        return _Retry(repr(error), min(0.5 * 2 ** (attempts - 1), self.backoff_max_s))


class TopicRecreated(Exception):
    """An input topic has a new id: the broker lost it (a memory-only broker restarted)."""


def _check_topic_ids(consumer, topics, seen: dict[str, Any]) -> dict[str, Any]:
    """Raise ``TopicRecreated`` when an input topic was recreated since this consumer saw it.

    The consumer's in-memory positions belong to the old log: fetching the new one from
    them would skip its first records. Raised before the polled records are handled, so the
    supervisor starts a fresh consumer that reads from the committed offsets (or the start).
    kafka-python keeps topic ids in its cluster metadata; ``RdKafkaLaneConsumer.topic_ids`` asks the
    broker now and then. A consumer with neither (tests' fakes) is not checked.
    """
    if hasattr(consumer, "topic_ids"):
        now = consumer.topic_ids(topics)
    else:
        cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
        if cluster is None:
            return seen
        now = {t: cluster.topic_id(t) for t in topics}
    for topic, topic_id in now.items():
        if topic_id is not None and seen.get(topic) not in (None, topic_id):
            raise TopicRecreated(f"topic {topic} was recreated (id {seen[topic]} -> {topic_id})")
    return {t: now.get(t) or seen.get(t) for t in topics}


def _first_offsets(records: Sequence) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    return first


def _last_offsets(records: Sequence) -> dict[TopicPartition, int]:
    last: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last[tp] = max(last.get(tp, r.offset), r.offset)
    return last


def _dlq_headers(record, error: PoisonMessage, function: str) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in (record.headers or []) if not k.startswith("dlq.")] + [
        ("dlq.reason", str(error).encode()[:2000]),
        ("dlq.function", function.encode()),
        ("dlq.source", f"{record.topic}[{record.partition}]@{record.offset}".encode()),
        ("dlq.time", str(int(time.time() * 1000)).encode()),
    ]


# --------------------------------------------------------------------------- supervision


class Supervisor:
    """Runs a ``Runner`` in a daemon thread and restarts it with backoff whenever it fails.

    ``health()`` says whether it is alive and making progress: a runner whose poll loop
    has not turned for ``stuck_after_s`` (a hung handler) or whose infrastructure has
    failed for that long is not ok.
    """

    def __init__(self, runner: Runner, *, backoff_max_s: float = 30.0, stuck_after_s: float = 120.0):
        self.runner = runner
        self.backoff_max_s = backoff_max_s
        self.stuck_after_s = stuck_after_s
        self.restarts = 0
        self.state = "starting"
        self.last_error = ""
        self._thread = threading.Thread(target=self._loop, name=runner.name, daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def _loop(self) -> None:
        backoff = 0.5
        while not self.runner.stopped:
            started = time.monotonic()
            self.state = "running"
            try:
                self.runner.run()
            except BaseException as e:  # noqa: BLE001 - whatever escapes, the function must come back
                self.restarts += 1
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                self.state = "restarting"
                if time.monotonic() - started > 60:
                    backoff = 0.5  # it ran a good while: a new failure, not the same one again
                expected = isinstance(e, (KafkaError, TransientError, TopicRecreated))  # no traceback needed
                log.error("%s: runner failed (%s); restart %d in %.1f s", self.runner.name, self.last_error,
                          self.restarts, backoff, exc_info=not expected)
                self.runner.ready.clear()
                self.runner._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
        self.state = "stopped"

    def stop(self, timeout_s: float = 60.0) -> None:
        self.runner.stop()
        self._thread.join(timeout=timeout_s)

    def health(self) -> dict:
        now = time.monotonic()
        r = self.runner
        quiet_s = now - r.last_beat
        failing_s = now - r.failing_since if r.failing_since else 0.0
        state = self.state
        if state == "running" and quiet_s > self.stuck_after_s:
            state = "stuck"
        elif state == "running" and failing_s > self.stuck_after_s:
            state = "failing"
        if state == "running" and not self._thread.is_alive():
            state = "dead"
        return {
            "ok": state == "running" or (state == "stopped" and r.stopped),
            "state": state,
            "group": r.group_id,
            "restarts": self.restarts,
            "last_error": r.last_error if state == "failing" else self.last_error,
            "seconds_since_progress": round(quiet_s, 1),
        }
