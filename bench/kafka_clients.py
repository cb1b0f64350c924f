"""kafka-python against librdkafka (confluent-kafka) on the embedded broker: ``python -m bench.kafka_clients``.

    python -m bench.kafka_clients [--consumers 5] [--idle-s 10] [--records 1500] [--size 60000] [--rounds 3]
    python -m bench.kafka_clients --stack-only --variants kafka-python@50,librdkafka@50,librdkafka@20 \
        --detect ../shared/models/yolov8n-coco/yolov8n_int8.tflite --filler 100000 --rounds 2

The function lanes consume through librdkafka (``KAFKA_CONSUMER=auto``, ``shared/lane_consumer.py``),
which does a client's work in C threads outside the GIL; every other client is kafka-python, pure
Python. This measures the two on the embedded Tansu broker:

- **idle**: ``--consumers`` group consumers, one topic of 4 partitions each, nothing to read, at the
  product's fetch wait (50 ms), for ``--idle-s`` seconds: the CPU of this process and of the broker,
  in % of a core. The function lanes that wait for work (a search lane while the catalogue indexes)
  are such consumers.
- **relay**: ``--records`` records of ``--size`` bytes (about an ingested photo's message) consumed
  from one topic and produced to another in batches of up to 128, flushed and committed per batch,
  as a function's hop does: CPU ms per record, and records per second (each client's consumer and
  producer).
- **departed leader**: whether Tansu's group still forms when a librdkafka member that leads it
  stops during a rebalance (``departed_leader`` below). The product frees the consumer of a process
  run alone without ``close``, so it sends no LeaveGroup (``RdKafkaLaneConsumer.close``).
- **stack** (``--rounds`` > 0): ``bench.pipeline`` (100 products, 4 photos, 10 searches, the default
  model, with its standalone baseline; with ``--detect``, its photo searches instead) once per
  ``--variants`` entry ``CLIENT@W``: ``KAFKA_CONSUMER`` and ``FETCH_MAX_WAIT_MS`` of the function
  lanes. Producers and every other client stay kafka-python.

Ends with one JSON line. Figures: docs/benchmarks.md ("The Kafka client's share").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from unittest import mock

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `python bench/kafka_clients.py` finds the bench package

import confluent_kafka  # noqa: E402
from kafka.structs import OffsetAndMetadata  # noqa: E402

from bench.scale import cpu_seconds  # noqa: E402
from lookalike.shared.bus import MAX_MESSAGE_BYTES, TansuBroker, ensure_topics, make_consumer, make_producer  # noqa: E402
from lookalike.shared.config import Settings  # noqa: E402
from lookalike.shared.lane_consumer import RdKafkaLaneConsumer, consumer_config  # noqa: E402
from lookalike.shared.logs import setup_logging  # noqa: E402

FETCH_WAIT_MS = Settings.model_fields["fetch_max_wait_ms"].default  # the product's default FETCH_MAX_WAIT_MS
log = logging.getLogger("bench.kafka_clients")


def librdkafka_consumer(bootstrap: str, group_id: str, session_timeout_ms: int = 10000,
                        **extra) -> confluent_kafka.Consumer:
    """A bare librdkafka consumer with a lane's configuration (``lane_consumer.consumer_config``);
    ``extra``: more settings (``group.instance.id``)."""
    return confluent_kafka.Consumer(
        consumer_config(bootstrap, group_id, session_timeout_ms, "bench", FETCH_WAIT_MS) | extra)


def lane_consumer(client: str):
    """The function lanes' consumer factory of ``client`` (``KAFKA_CONSUMER``), as ``Runner`` makes them."""
    factories = {"kafka-python": make_consumer, "librdkafka": RdKafkaLaneConsumer}
    if client not in factories:
        raise ValueError(f"unknown client {client!r}: one of {', '.join(factories)}")
    return factories[client]


def _cpu_pct(pid: int, since: float, t0: float) -> float:
    return round(100 * (cpu_seconds(pid) - since) / (time.monotonic() - t0), 1)


def idle(client: str, bootstrap: str, broker_pid: int, consumers: int, idle_s: float) -> dict:
    """% of a core this process and the broker use while ``consumers`` group consumers find nothing."""
    topics = [f"idle-{client}-{uuid.uuid4().hex[:8]}" for _ in range(consumers)]
    ensure_topics(bootstrap, 4, topics)
    stop, assigned = threading.Event(), threading.Semaphore(0)

    def consume(topic: str) -> None:
        consumer = lane_consumer(client)(bootstrap, f"{topic}-group", [topic], session_timeout_ms=6000)
        announced = False
        while not stop.is_set():
            consumer.poll(timeout_ms=200, max_records=128)
            if consumer.assignment() and not announced:
                announced = True
                assigned.release()
        consumer.close(autocommit=False)

    threads = [threading.Thread(target=consume, args=(t,), daemon=True) for t in topics]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for _ in topics:
        if not assigned.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the idle consumers got no partitions in 60 s")
    time.sleep(2)  # past the joins' and first fetches' work
    process0, broker0, t0 = cpu_seconds(os.getpid()), cpu_seconds(broker_pid), time.monotonic()
    time.sleep(idle_s)
    result = {"process_pct": _cpu_pct(os.getpid(), process0, t0), "broker_pct": _cpu_pct(broker_pid, broker0, t0)}
    stop.set()
    for t in threads:
        t.join(timeout=10)
    return result


def relay(client: str, bootstrap: str, records: int, size: int) -> dict:
    """CPU per record of consuming, producing, flushing and committing ``records`` records, batch by batch."""
    source, sink = f"relay-in-{uuid.uuid4().hex[:8]}", f"relay-out-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, 4, [source, sink])
    payload = os.urandom(size)
    feeder = make_producer(bootstrap, client_id="bench-relay-feeder")
    for i in range(records):
        feeder.send(source, key=str(i).encode(), value=payload)
    feeder.flush()
    feeder.close()
    moved, started = 0, None
    consumer = lane_consumer(client)(bootstrap, f"{source}-group", [source])
    if client == "kafka-python":
        producer = make_producer(bootstrap)
        send = producer.send
    else:
        producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 2,
                                             "batch.size": MAX_MESSAGE_BYTES // 2,
                                             "message.max.bytes": MAX_MESSAGE_BYTES, "log.connection.close": False})
        send = producer.produce
    deadline = time.monotonic() + 300
    while moved < records and time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=200, max_records=128)
        if not polled:
            continue
        if started is None:  # the clock starts at the first batch: the group join is not a hop's cost
            started = (cpu_seconds(os.getpid()), time.monotonic())
        for batch in polled.values():
            for r in batch:
                send(sink, key=r.key, value=r.value)
                moved += 1
        producer.flush(30)
        consumer.commit({tp: OffsetAndMetadata(batch[-1].offset + 1, "", -1) for tp, batch in polled.items()})
    if moved < records:
        raise TimeoutError(f"relayed {moved} of {records} records in 300 s")
    cpu, elapsed = cpu_seconds(os.getpid()) - started[0], time.monotonic() - started[1]
    consumer.close(autocommit=False)
    if client == "kafka-python":
        producer.close()
    return {"cpu_ms_per_record": round(1000 * cpu / moved, 3), "records_per_s": round(moved / elapsed)}


def departed_leader(bootstrap: str, how: str, wait_s: float = 40.0) -> float | None:
    """Seconds until a member gets partitions after the group's leader stops, None if not within ``wait_s``.

    ``bench/tansu_group_repro.py``'s leader scenario with librdkafka members: the leader stops while
    the member's join has the group rebalancing. ``how``: ``control`` (the leader stops before the
    member joins), ``leave`` (dynamic members: its close sends LeaveGroup), ``drop`` (the leader freed
    without ``close``, as ``RdKafkaLaneConsumer`` does on Tansu: no LeaveGroup), ``static`` (every member
    static, ``group.instance.id``: static members do not leave on close, the effect that
    ``bus.close_consumer`` gets for kafka-python's dynamic members) or ``static-leader`` (only the
    leader static).
    """
    topic = f"leader-{how}-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, 4, [topic])
    static = how.startswith("static")
    leader = librdkafka_consumer(bootstrap, topic, session_timeout_ms=6000,
                                 **({"group.instance.id": f"{topic}-leader"} if static else {}))
    leader.subscribe([topic])
    deadline = time.monotonic() + 30
    while not leader.assignment() and time.monotonic() < deadline:
        leader.consume(num_messages=1, timeout=0.2)
    if not leader.assignment():
        raise TimeoutError("the leader got no partitions in 30 s")
    if how == "control":
        leader.close()
    member = librdkafka_consumer(bootstrap, topic, session_timeout_ms=6000,
                                 **({"group.instance.id": f"{topic}-member"} if how == "static" else {}))
    member.subscribe([topic])
    member.consume(num_messages=1, timeout=1.0)  # its JoinGroup: the group is rebalancing
    if how == "drop":
        del leader  # freed without close(): librdkafka sends no LeaveGroup
    elif how != "control":
        leader.close()
    t0 = time.monotonic()
    while not member.assignment() and time.monotonic() - t0 < wait_s:
        member.consume(num_messages=1, timeout=0.2)
    took = round(time.monotonic() - t0, 1) if member.assignment() else None
    member.close()
    return took


def stack_runs(variants: list[str], rounds: int, detect: str = "none", filler: int = 0) -> dict:
    """``bench.pipeline`` once per variant (``client@W``: whose consumers the function lanes use, and
    ``FETCH_MAX_WAIT_MS``) in each of ``rounds`` rounds, the order reversed every other round.

    Without ``detect``: indexing against standalone embedding (100 products, 4 photos, 10 searches,
    the default model). With it: ``bench/pipeline.py``'s search benchmark (25 products, 4 photos,
    20 searches, its default model, detection, ``filler`` other points in the store).
    """
    from bench import pipeline

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:  # neither side always goes first
            client, wait_ms = variant.split("@")
            lane_consumer(client)  # refuses an unknown client before the run
            # Settings() reads KAFKA_CONSUMER and FETCH_MAX_WAIT_MS: every function lane's client and wait.
            with mock.patch.dict(os.environ, {"KAFKA_CONSUMER": client, "FETCH_MAX_WAIT_MS": wait_ms}):
                runs[variant].append(pipeline.run(25, 4, 20, detect=detect, filler=filler) if detect != "none"
                                     else pipeline.run(100, 4, 10, "efficientnet_lite2_rmac", baseline=True))
    keys = ("search_ms_median", "search_ms_p95", "top1_correct") + (
        () if detect != "none" else ("photos_per_second", "standalone_img_per_s", "index_vs_embed"))
    return {variant: {k: [r[k] for r in results] for k in keys} for variant, results in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--consumers", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--size", type=int, default=60_000, help="bytes per relayed record")
    parser.add_argument("--rounds", type=int, default=3, help="bench.pipeline runs per variant (0: skip)")
    parser.add_argument("--variants", default=f"kafka-python@{FETCH_WAIT_MS},librdkafka@{FETCH_WAIT_MS}",
                        help="CLIENT@FETCH_MAX_WAIT_MS, comma-separated; CLIENT: kafka-python or librdkafka")
    parser.add_argument("--detect", default="none", help="a detector: time bench/pipeline.py's photo searches")
    parser.add_argument("--filler", type=int, default=0, help="other points in the store, with --detect")
    parser.add_argument("--stack-only", action="store_true", help="skip the idle, relay and group checks")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    setup_logging("WARNING")
    report: dict = {"librdkafka": confluent_kafka.libversion()[0], "idle_relay_fetch_wait_ms": FETCH_WAIT_MS}
    if not args.stack_only:
        with TansuBroker() as broker:
            for client in ("kafka-python", "librdkafka"):
                report[client] = {"idle": idle(client, broker.bootstrap_servers, broker.process.pid,
                                               args.consumers, args.idle_s),
                                  "relay": relay(client, broker.bootstrap_servers, args.records, args.size)}
                if not args.json:
                    print(client, json.dumps(report[client]), flush=True)
            report["departed_leader_s"] = {how: departed_leader(broker.bootstrap_servers, how)
                                           for how in ("control", "leave", "drop", "static", "static-leader")}
            if not args.json:
                print("librdkafka, a member after its group's leader stops:",
                      json.dumps(report["departed_leader_s"]), flush=True)
    if args.rounds:
        report["stack"] = stack_runs(args.variants.split(","), args.rounds, args.detect, args.filler)
        if not args.json:
            for variant, figures in report["stack"].items():
                print(variant, json.dumps(figures), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
