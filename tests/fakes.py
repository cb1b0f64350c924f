"""An in-memory stand-in for the Kafka consumer and producer the runner uses.

Just enough of kafka-python's surface (poll, seek, pause/resume, commit, send, flush)
to check every delivery rule of ``lookalike.shared.runtime.Runner`` in milliseconds; the
same rules are also tested against a real broker in tests/test_runtime.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from kafka.errors import KafkaError
from kafka.structs import TopicPartition


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list = field(default_factory=list)


class Log:
    """Topics as partitioned, append-only lists; shared by the fake consumer and producer."""

    def __init__(self, partitions: int = 2):
        self.partitions = partitions
        self.records: dict[TopicPartition, list[Record]] = {}
        self.appended: list[Record] = []  # every record in the order it was appended
        self.committed: dict[TopicPartition, int] = {}  # consumer group offsets (one group)
        self.lock = threading.Lock()

    def append(self, topic: str, key: bytes | None, value: bytes | None, headers=None, partition: int | None = None):
        if partition is None:
            partition = (sum(key) if key else 0) % self.partitions
        with self.lock:
            part = self.records.setdefault(TopicPartition(topic, partition), [])
            record = Record(topic, partition, len(part), key, value, list(headers or []))
            part.append(record)
            self.appended.append(record)
            return record

    def read(self, topic: str) -> list[Record]:
        """The topic's records in the order they were appended."""
        with self.lock:
            return [r for r in self.appended if r.topic == topic]


class FakeConsumer:
    def __init__(self, log: Log, topics: list[str], poll_error: Exception | None = None):
        self.log = log
        self.tps = [TopicPartition(t, p) for t in topics for p in range(log.partitions)]
        self.position = {tp: log.committed.get(tp, 0) for tp in self.tps}  # a new consumer starts there
        self.committed = log.committed
        self.paused: set[TopicPartition] = set()
        self.commits = 0
        self.poll_error = poll_error  # raised by the next poll (once)

    def poll(self, timeout_ms: int = 0, max_records: int = 500):
        """Like KafkaConsumer.poll: returns as soon as records are there, else after ``timeout_ms``."""
        if self.poll_error is not None:
            error, self.poll_error = self.poll_error, None
            raise error
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            out = self._take(max_records)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    def _take(self, max_records: int) -> dict:
        out = {}
        with self.log.lock:
            for tp in self.tps:
                if tp in self.paused:
                    continue
                part = self.log.records.get(tp, [])
                batch = part[self.position[tp]:self.position[tp] + max_records]
                if batch:
                    out[tp] = batch
                    self.position[tp] += len(batch)
                    max_records -= len(batch)
                if max_records <= 0:
                    break
        return out

    def assignment(self):
        return set(self.tps)

    def seek(self, tp, offset):
        self.position[tp] = offset

    def pause(self, *tps):
        self.paused.update(tps)

    def resume(self, *tps):
        self.paused.difference_update(tps)

    def commit(self, offsets):
        self.commits += 1
        for tp, meta in offsets.items():
            self.committed[tp] = meta.offset

    def close(self, autocommit=False):
        pass


class _Future:
    def __init__(self, error: Exception | None):
        self.error = error

    def get(self, timeout=None):
        if self.error is not None:
            raise self.error


class FakeProducer:
    """Appends to the log; ``fail_next`` makes that many sends fail (the broker did not take them)."""

    def __init__(self, log: Log, fail_next: int = 0):
        self.log = log
        self.fail_next = fail_next

    def send(self, topic, key=None, value=None, headers=None):
        if self.fail_next > 0:
            self.fail_next -= 1
            return _Future(KafkaError("injected produce failure"))
        self.log.append(topic, key, value, headers)
        return _Future(None)

    def flush(self, timeout=None):
        pass

    def close(self, timeout=None):
        pass
