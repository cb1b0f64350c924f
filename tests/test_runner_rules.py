"""Every delivery rule of the runner, in milliseconds, with an in-memory consumer and producer.

The same runner runs against a real broker in tests/test_runtime.py and tests/faults/.
GIVEN / WHEN / THEN: a throwaway function forwards delete events to ``out``;
``behaviour`` decides what each call does.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from kafka.structs import TopicPartition

from lookalike.shared.errors import PoisonMessage, SourceUnavailable, StoreUnavailable
from lookalike.shared.limits import MAX_MESSAGE_BYTES
from lookalike.shared.messages import CatalogDelete, CatalogUpsert, ImageRef, dlq_topic
from lookalike.shared.runtime import Emit, Function, Route, Runner, Supervisor
from tests.fakes import FakeConsumer, FakeProducer, Log

IN, OUT = "in", "out"


class Forward(Function):
    name = "forward"

    def __init__(self, behaviour=None, batch: bool = False):
        super().__init__()
        self.behaviour = behaviour or (lambda fn, msg: None)
        self.batch = batch
        self.calls: list[str] = []

    def routes(self):
        return [Route(IN, CatalogDelete, self.on_batch if self.batch else self.on_one, batch=self.batch)]

    def on_one(self, msg):
        self.calls.append(msg.product_id)
        out = self.behaviour(self, msg)
        return out if out is not None else [Emit(OUT, msg)]

    def on_batch(self, msgs):
        return [self.on_one(m) for m in msgs]


def event(pid: str) -> bytes:
    return CatalogDelete(product_id=pid).to_bytes()


def start(fn, log, *, producer=None, consumer=None, max_attempts=3):
    consumer = consumer or FakeConsumer(log, [IN])
    producer = producer or FakeProducer(log)
    runner = Runner(fn, "fake:0", poll_timeout_ms=5, max_attempts=max_attempts, backoff_max_s=0.05,
                    consumer_factory=lambda: consumer, producer_factory=lambda: producer)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return runner, thread, consumer


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def out_ids(log) -> list[str]:
    return [CatalogDelete.model_validate_json(r.value).product_id for r in log.read(OUT)]


def dlq(log) -> dict[bytes, dict]:
    return {r.key: {k: v.decode() for k, v in r.headers} for r in log.read(dlq_topic(IN))}


def committed_all(consumer, log) -> bool:
    return all(consumer.committed.get(tp, 0) == len(recs) for tp, recs in log.records.items() if tp.topic == IN)


def stop(runner, thread):
    runner.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_poison_goes_to_the_dlq_with_its_reason_and_the_rest_flows():
    # GIVEN a bad JSON record, a schema violation and a record the handler calls poison, among good ones
    log = Log()
    fn = Forward(lambda fn, msg: (_ for _ in ()).throw(PoisonMessage("image cannot be decoded"))
                 if msg.product_id == "bad" else None)
    for key, value in [(b"a", b"{not json"), (b"b", b'{"type": "delete"}'), (b"c", event("bad")),
                       (b"d", event("good-1")), (b"e", event("good-2"))]:
        log.append(IN, key, value, partition=0)
    runner, thread, consumer = start(fn, log)
    wait_for(lambda: committed_all(consumer, log))
    stop(runner, thread)
    # THEN the good ones are forwarded in order and each bad one is in the DLQ with a reason
    assert out_ids(log) == ["good-1", "good-2"]
    reasons = dlq(log)
    assert reasons[b"a"]["dlq.reason"].startswith("bad JSON")
    assert reasons[b"b"]["dlq.reason"].startswith("schema violation") and "product_id" in reasons[b"b"]["dlq.reason"]
    assert reasons[b"c"]["dlq.reason"] == "image cannot be decoded"
    assert reasons[b"c"]["dlq.source"] == "in[0]@2" and reasons[b"c"]["dlq.function"] == "forward"


def test_a_failing_source_waits_on_its_own_partition_then_is_dead_lettered():
    # GIVEN partition 0 holds a product whose image URL keeps answering 503, then another product;
    # partition 1 holds healthy products
    log = Log()
    log.append(IN, b"x", event("url-503"), partition=0)
    log.append(IN, b"y", event("after-it"), partition=0)
    for i in range(3):
        log.append(IN, b"z", event(f"other-{i}"), partition=1)

    def behaviour(fn, msg):
        if msg.product_id == "url-503":
            raise SourceUnavailable("GET https://cdn.example/a.jpg answered 503")

    fn = Forward(behaviour)
    runner, thread, consumer = start(fn, log, max_attempts=3)
    # THEN the other partition is forwarded and committed without waiting for the failing one
    wait_for(lambda: consumer.committed.get(TopicPartition(IN, 1)) == 3)
    # AND the failing record is tried exactly max_attempts times, then dead-lettered with the reason,
    # and only then does its partition move on, in order
    wait_for(lambda: committed_all(consumer, log))
    stop(runner, thread)
    assert fn.calls.count("url-503") == 3
    assert out_ids(log) == ["other-0", "other-1", "other-2", "after-it"]
    reason = dlq(log)[b"x"]["dlq.reason"]
    assert reason.startswith("source unavailable after 3 attempts") and "503" in reason
    assert fn.calls.index("after-it") > max(i for i, c in enumerate(fn.calls) if c == "url-503")


def test_a_source_that_recovers_is_delivered_and_not_dead_lettered():
    # GIVEN a URL that fails once and then answers
    log = Log()
    log.append(IN, b"x", event("flaky"), partition=0)
    failures = iter([True])

    def behaviour(fn, msg):
        if next(failures, False):
            raise SourceUnavailable("timed out")

    runner, thread, consumer = start(Forward(behaviour), log)
    wait_for(lambda: committed_all(consumer, log))
    stop(runner, thread)
    assert out_ids(log) == ["flaky"] and dlq(log) == {}


def test_an_infrastructure_outage_is_retried_without_a_cap_and_never_dead_lettered():
    # GIVEN the store is down for more tries than max_attempts
    log = Log()
    for i in range(4):
        log.append(IN, b"k", event(f"p{i}"), partition=i % 2)
    down = {"tries": 0}

    def behaviour(fn, msg):
        if down["tries"] < 6:
            down["tries"] += 1
            raise StoreUnavailable("store unreachable")

    fn = Forward(behaviour)
    runner, thread, consumer = start(fn, log, max_attempts=2)
    # WHILE it is down nothing is committed
    wait_for(lambda: down["tries"] >= 3)
    assert consumer.committed == {}
    # THEN once it is back every record is delivered, none dead-lettered
    wait_for(lambda: committed_all(consumer, log))
    stop(runner, thread)
    assert sorted(out_ids(log)) == ["p0", "p1", "p2", "p3"] and dlq(log) == {}
    assert fn.counters["retries"] >= 6


def test_a_batch_handler_bug_on_one_record_costs_only_that_record():
    # GIVEN a batching function whose handler crashes whenever one particular record is in the batch
    log = Log()
    for pid in ["a", "boom", "b", "c"]:
        log.append(IN, pid.encode(), event(pid), partition=0)

    def behaviour(fn, msg):
        if msg.product_id == "boom":
            raise ZeroDivisionError("a bug")

    fn = Forward(behaviour, batch=True)
    runner, thread, consumer = start(fn, log, max_attempts=2)
    wait_for(lambda: committed_all(consumer, log))
    # THEN the runner keeps running, the others are delivered in order, the bad one is dead-lettered
    assert thread.is_alive()
    stop(runner, thread)
    assert out_ids(log) == ["a", "b", "c"]
    assert dlq(log)[b"boom"]["dlq.reason"].startswith("handler error after 2 attempts: ZeroDivisionError")


def test_an_oversized_output_is_poison_with_a_reason():
    # GIVEN a handler whose output for one record would exceed the broker's message size
    log = Log()
    log.append(IN, b"big", event("big"), partition=0)
    log.append(IN, b"ok", event("ok"), partition=0)
    huge = CatalogUpsert(product_id="big", images=[ImageRef(data="A" * MAX_MESSAGE_BYTES)])

    def behaviour(fn, msg):
        return [Emit(OUT, huge)] if msg.product_id == "big" else None

    runner, thread, consumer = start(Forward(behaviour), log)
    wait_for(lambda: committed_all(consumer, log))
    stop(runner, thread)
    assert out_ids(log) == ["ok"]
    assert "message limit" in dlq(log)[b"big"]["dlq.reason"]


def test_a_failed_send_is_retried_and_nothing_is_committed_before_every_send_succeeded():
    # GIVEN the broker refuses the first send of the batch
    log = Log()
    for pid in ["a", "b", "c"]:
        log.append(IN, pid.encode(), event(pid), partition=0)
    producer = FakeProducer(log, fail_next=1)
    consumer = FakeConsumer(log, [IN])
    runner, thread, consumer = start(Forward(), log, producer=producer, consumer=consumer)
    wait_for(lambda: committed_all(consumer, log))
    stop(runner, thread)
    # THEN every record is delivered (at least once, in order), nothing lost
    ids = out_ids(log)
    assert set(ids) == {"a", "b", "c"} and ids[-3:] == ["a", "b", "c"]
    assert consumer.commits >= 1 and dlq(log) == {}


def test_the_supervisor_restarts_a_runner_that_dies_and_reports_it():
    # GIVEN a runner whose consumer fails once outside any handler (the broker connection breaks)
    log = Log()
    log.append(IN, b"a", event("a"), partition=0)
    consumer = FakeConsumer(log, [IN], poll_error=RuntimeError("connection lost"))
    runner = Runner(Forward(), "fake:0", poll_timeout_ms=5, consumer_factory=lambda: consumer,
                    producer_factory=lambda: FakeProducer(log))
    supervisor = Supervisor(runner, backoff_max_s=0.05).start()
    # THEN it comes back by itself, delivers, and says it restarted
    wait_for(lambda: committed_all(consumer, log))
    health = supervisor.health()
    supervisor.stop(5)
    assert out_ids(log) == ["a"]
    assert health["ok"] and health["state"] == "running" and health["restarts"] == 1
    assert "connection lost" in health["last_error"]


def test_a_hung_handler_shows_as_stuck():
    # GIVEN a handler that never returns
    log = Log()
    log.append(IN, b"a", event("a"), partition=0)
    release = threading.Event()
    fn = Forward(lambda fn, msg: release.wait(10))
    runner = Runner(fn, "fake:0", poll_timeout_ms=5, consumer_factory=lambda: FakeConsumer(log, [IN]),
                    producer_factory=lambda: FakeProducer(log))
    supervisor = Supervisor(runner, stuck_after_s=0.2).start()
    wait_for(lambda: fn.calls)
    time.sleep(0.3)
    # THEN its health says stuck and not ok
    health = supervisor.health()
    release.set()
    supervisor.stop(5)
    assert health["state"] == "stuck" and not health["ok"]


def test_a_recreated_input_topic_gets_a_fresh_consumer_before_its_records_are_handled():
    # GIVEN a runner consuming a topic whose id the broker reports
    log = Log()
    log.append(IN, b"a", event("a"), partition=0)
    topic_ids = {IN: "id-1"}

    def fresh_consumer():
        consumer = FakeConsumer(log, [IN])
        consumer._client = SimpleNamespace(cluster=SimpleNamespace(topic_id=topic_ids.get))
        return consumer

    fn = Forward()
    runner = Runner(fn, "fake:0", poll_timeout_ms=5, consumer_factory=fresh_consumer,
                    producer_factory=lambda: FakeProducer(log))
    supervisor = Supervisor(runner, backoff_max_s=0.05).start()
    wait_for(lambda: fn.calls == ["a"])
    # WHEN the topic is recreated (a broker that lost it) and a record arrives in the new one
    topic_ids[IN] = "id-2"
    log.append(IN, b"b", event("b"), partition=0)
    # THEN the old consumer's positions are not trusted: a fresh consumer (from the committed offsets)
    # handles the record, once
    wait_for(lambda: "b" in fn.calls)
    health = supervisor.health()
    supervisor.stop(5)
    assert fn.calls == ["a", "b"] and health["restarts"] == 1 and "recreated" in health["last_error"]


def test_a_batch_function_gathers_records_that_arrive_within_its_wait():
    # GIVEN a batch function that lingers up to 2 s for a fuller batch, and a non-batch one
    log = Log()
    sizes: list[int] = []

    class Sizes(Forward):
        def on_batch(self, msgs):
            sizes.append(len(msgs))
            return super().on_batch(msgs)

    fn = Sizes(batch=True)
    consumer = FakeConsumer(log, [IN])
    runner = Runner(fn, "fake:0", poll_timeout_ms=5, batch_max_wait_ms=2000, poll_max_records=6,
                    consumer_factory=lambda: consumer, producer_factory=lambda: FakeProducer(log))
    assert Runner(Forward(), "fake:0", batch_max_wait_ms=2000).batch_max_wait_ms == 0
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    # WHEN records trickle in, three now and three a little later
    for pid in "abc":
        log.append(IN, pid.encode(), event(pid), partition=0)
    time.sleep(0.2)
    for pid in "def":
        log.append(IN, pid.encode(), event(pid), partition=1)
    wait_for(lambda: committed_all(consumer, log))
    stop(runner, thread)
    # THEN they were handled as one batch of six (the batch filled before the wait ran out)
    assert sizes == [6]
    assert sorted(out_ids(log)) == list("abcdef")
