"""The embedded broker's process lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.e2e

STARTER = """
import time
from lookalike.shared.bus import TansuBroker
broker = TansuBroker()
print(broker.process.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie waiting for its (dead) parent counts as gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_broker_does_not_outlive_a_killed_parent():
    # GIVEN a process that started the embedded broker
    parent = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    broker_pid = int(parent.stdout.readline())
    assert _alive(broker_pid)
    # WHEN that process is killed without a chance to clean up
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # THEN the broker goes too instead of lingering on its port
    deadline = time.monotonic() + 15
    while _alive(broker_pid):
        assert time.monotonic() < deadline, "broker still running 15 s after its parent was killed"
        time.sleep(0.2)


def test_end_offsets_lag_and_tails_count_records_that_share_a_batch(kafka_bootstrap):
    import uuid

    from kafka import KafkaProducer

    from lookalike.shared.bus import OffsetReader, ensure_topics, tail_consumer

    topic = f"end-offsets-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, 1, [topic])
    reader = OffsetReader(kafka_bootstrap)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=200)  # each burst is one record batch
    try:
        # GIVEN bursts of small records, each burst sharing one record batch (Tansu 0.6 answers
        # ListOffsets with the newest batch's first offset + 1 for them), and a group that read none
        sent = 0
        for burst in (10, 1, 5):
            futures = [producer.send(topic, b"event") for _ in range(burst)]
            producer.flush()
            sent += burst
            assert futures[-1].get(timeout=10).offset + 1 == sent
            # THEN end offsets, sizes and the group's lag count every record, after each burst
            (end,) = reader.end_offsets([topic]).values()
            assert end == sent
            assert reader.sizes([topic]) == {topic: sent}
            assert reader.lag("end-offsets-group", [topic]) == {topic: sent}
            assert reader.group_lags({"end-offsets-group": (topic,)}) == {"end-offsets-group": sent}
        # AND a tail consumer opened now reads what comes next, not the end of the last batch
        tail = tail_consumer(kafka_bootstrap, [topic], "end-offsets-test")
        producer.send(topic, b"next")
        producer.flush()
        read, deadline = [], time.monotonic() + 15
        while not read and time.monotonic() < deadline:
            read = [r.value for records in tail.poll(timeout_ms=200).values() for r in records]
        tail.close()
        assert read == [b"next"]
    finally:
        producer.close()
        reader.close()
