"""The shared runner against a real broker: delivery rules every function relies on.

Each test uses its own topics and a throwaway function, so it shows the rule itself.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from kafka import KafkaConsumer

from lookalike.shared.bus import ensure_topics, make_producer, topic_partitions
from lookalike.shared.errors import PoisonMessage, TransientError
from lookalike.shared.messages import CatalogDelete, dlq_topic
from lookalike.shared.runtime import Emit, Function, Route, Runner

pytestmark = pytest.mark.e2e


class Echo(Function):
    """Forwards every delete event to ``out``; ``behaviour`` decides what each call does."""

    name = "echo"

    def __init__(self, source: str, out: str, behaviour):
        super().__init__()
        self.source, self.out, self.behaviour = source, out, behaviour
        self.calls = 0

    def routes(self):
        return [Route(self.source, CatalogDelete, self.handle)]

    def handle(self, msg: CatalogDelete):
        self.calls += 1
        self.behaviour(self, msg)
        return [Emit(self.out, msg)]


def _topics(kafka_bootstrap):
    base = f"t{uuid.uuid4().hex[:8]}"
    topics = {"in": f"{base}.in", "out": f"{base}.out"}
    ensure_topics(kafka_bootstrap, 2, [topics["in"], dlq_topic(topics["in"]), topics["out"]])
    return topics


def _read_all(kafka_bootstrap, topic, expected, timeout_s=30):
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    tps = topic_partitions(consumer, topic)
    consumer.assign(tps)
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for recs in consumer.poll(200).values():
            out.extend(recs)
    consumer.close()
    return out


def _run(function, kafka_bootstrap, **kw):
    runner = Runner(function, kafka_bootstrap, poll_timeout_ms=100, backoff_max_s=0.5, **kw)
    runner.group_id = f"g-{uuid.uuid4().hex[:8]}"
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return runner, thread


def _publish(kafka_bootstrap, topic, values):
    producer = make_producer(kafka_bootstrap)
    for key, value in values:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def _committed(kafka_bootstrap, group, topic):
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    total = sum(consumer.committed(tp) or 0 for tp in topic_partitions(consumer, topic))
    consumer.close(autocommit=False)
    return total


def _wait(predicate, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_transient_failure_is_retried_and_never_dead_lettered(kafka_bootstrap):
    # GIVEN a store that is down for the first three attempts
    topics = _topics(kafka_bootstrap)

    def flaky(fn, msg):
        if fn.calls <= 3:
            raise TransientError("store unreachable")

    fn = Echo(topics["in"], topics["out"], flaky)
    runner, thread = _run(fn, kafka_bootstrap)
    # WHEN an event arrives
    _publish(kafka_bootstrap, topics["in"], [(b"p1", CatalogDelete(product_id="p1").to_bytes())])
    # THEN it is delivered once the store is back, nothing goes to the DLQ, and the offset is committed
    out = _read_all(kafka_bootstrap, topics["out"], 1)
    assert [r.key for r in out] == [b"p1"]
    _wait(lambda: _committed(kafka_bootstrap, runner.group_id, topics["in"]) == 1)
    runner.stop()
    thread.join(30)
    assert fn.counters["retries"] == 3
    assert _read_all(kafka_bootstrap, dlq_topic(topics["in"]), 0, timeout_s=1) == []


def test_poison_and_repeated_handler_errors_go_to_dlq_with_reason(kafka_bootstrap):
    # GIVEN one message that fails schema validation and one that crashes the handler every time
    topics = _topics(kafka_bootstrap)

    def crash_on_bad(fn, msg):
        if msg.product_id == "bug":
            raise KeyError("unexpected")
        if msg.product_id == "bad-image":
            raise PoisonMessage("image cannot be decoded")

    fn = Echo(topics["in"], topics["out"], crash_on_bad)
    runner, thread = _run(fn, kafka_bootstrap, max_attempts=3)
    _publish(kafka_bootstrap, topics["in"], [
        (b"k1", b'{"type": "delete"}'),
        (b"k2", CatalogDelete(product_id="bug").to_bytes()),
        (b"k3", CatalogDelete(product_id="bad-image").to_bytes()),
        (b"k4", CatalogDelete(product_id="good").to_bytes()),
    ])
    # THEN the good one is delivered and the three bad ones land in the DLQ with their reasons
    out = _read_all(kafka_bootstrap, topics["out"], 1)
    assert [r.key for r in out] == [b"good"]
    dlq = {r.key: dict(r.headers) for r in _read_all(kafka_bootstrap, dlq_topic(topics["in"]), 3)}
    assert b"schema violation" in dlq[b"k1"]["dlq.reason"] and b"product_id" in dlq[b"k1"]["dlq.reason"]
    assert b"after 3 attempts" in dlq[b"k2"]["dlq.reason"]
    assert dlq[b"k3"]["dlq.reason"] == b"image cannot be decoded"
    _wait(lambda: _committed(kafka_bootstrap, runner.group_id, topics["in"]) == 4)
    runner.stop()
    thread.join(30)


def test_stop_finishes_the_batch_in_hand_and_commits(kafka_bootstrap):
    # GIVEN a slow handler working through a batch
    topics = _topics(kafka_bootstrap)
    started = threading.Event()

    def slow(fn, msg):
        started.set()
        time.sleep(0.3)

    fn = Echo(topics["in"], topics["out"], slow)
    runner, thread = _run(fn, kafka_bootstrap, poll_max_records=5)
    _publish(kafka_bootstrap, topics["in"], [(f"p{i}".encode(), CatalogDelete(product_id=f"p{i}").to_bytes())
                                             for i in range(5)])
    # WHEN it is told to stop mid-batch (what SIGTERM does)
    assert started.wait(30)
    runner.stop()
    thread.join(30)
    # THEN every message it had started on was produced and committed: nothing lost, nothing twice
    done = fn.calls
    out = _read_all(kafka_bootstrap, topics["out"], done)
    assert len(out) == done >= 1
    assert _committed(kafka_bootstrap, runner.group_id, topics["in"]) == done
