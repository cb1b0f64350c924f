"""Request/reply over Kafka: publish a request, wait for the answer keyed by its request id.

One ``ReplyListener`` per process (gateway or client) reads every partition of
``search.results`` from the end (as of ``start()``) in a thread, and hands each record
to the request waiting for its key. A request registers *before* it is published, so
its answer can't arrive unseen; it always unregisters, and an answer that arrives after
its request gave up (or one for another process) finds nobody waiting and is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kafka import KafkaConsumer

from lookalike.shared.bus import tail_consumer
from lookalike.shared.messages import SEARCH_RESULTS

log = logging.getLogger("lookalike.replies")


class ReplyTimeout(TimeoutError):
    """No answer within the time given."""


class _Waiter:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: bytes | None = None


class ReplyListener:
    def __init__(self, bootstrap_servers: str, client_id: str, topic: str = SEARCH_RESULTS):
        self.bootstrap_servers = bootstrap_servers
        self.client_id = client_id
        self.topic = topic
        self._waiting: dict[bytes, _Waiter] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: KafkaConsumer | None = None
        self.dropped = 0  # answers nobody waited for any more (timed out) or for another process

    def start(self) -> "ReplyListener":
        with self._lock:
            if self._thread is None:
                # positioned at the end before any request is published
                self._consumer = tail_consumer(self.bootstrap_servers, [self.topic], self.client_id)
                self._thread = threading.Thread(target=self._run, name=f"{self.client_id}-replies", daemon=True)
                self._thread.start()
        return self

    def request(self, request_id: str, publish: Callable[[], object], timeout_s: float) -> bytes:
        """Register ``request_id``, call ``publish``, and return the answer's bytes.

        Raises ``ReplyTimeout`` after ``timeout_s``; whatever ``publish`` raises propagates.
        """
        self.start()
        key = request_id.encode()
        waiter = _Waiter()
        with self._lock:
            self._waiting[key] = waiter
        try:
            publish()
            if not waiter.event.wait(timeout_s):
                raise ReplyTimeout(f"no answer for request {request_id} within {timeout_s:g} s")
            return waiter.value
        finally:
            with self._lock:
                self._waiting.pop(key, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._waiting)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batches = self._consumer.poll(timeout_ms=100)
            except Exception as e:  # broker hiccup: keep listening, requests time out meanwhile
                log.warning("reading %s failed: %s", self.topic, e)
                self._stop.wait(0.5)
                continue
            for records in batches.values():
                for r in records:
                    with self._lock:
                        waiter = self._waiting.get(r.key)
                        if waiter is None:
                            self.dropped += 1
                            continue
                        waiter.value = r.value
                    waiter.event.set()
        self._consumer.close(autocommit=False)
