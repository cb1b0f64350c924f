"""The fetch wait (``FETCH_MAX_WAIT_MS``): a hop's pickup time against idle CPU, ``python -m bench.fetch_wait``.

    python -m bench.fetch_wait [--waits 10,20,50,200] [--records 40] [--idle-s 10] [--bootstrap HOST:PORT]

For each wait W:

- **pickup**: one consumer (``make_consumer``, polling as the runner does) alone on a fresh topic of
  one partition; ``--records`` records produced one at a time, each after a random gap of 50 ms
  to 50 ms + 2 W (so it lands anywhere in the consumer's held fetch); the time from just before
  each send to the consumer's poll returning it. Median and p95, ms.
- **idle**: the one-process stack (the default model, detection off) with every function lane at W,
  after a 5 s settle, doing nothing for ``--idle-s`` seconds: the CPU of this process and of
  the broker, in % of a core (Linux /proc). Only on the embedded broker.

The pickups run on a fresh embedded Tansu broker, or on the broker at ``--bootstrap`` (a Kafka
broker answers a held fetch when a record arrives: compare). Ends with one JSON line.
Figures: docs/benchmarks.md ("The embedded broker's fetch wait").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `python bench/fetch_wait.py` finds the bench package

from bench.scale import cpu_seconds  # noqa: E402
from lookalike.shared.bus import TansuBroker, ensure_topics, make_consumer, make_producer  # noqa: E402
from lookalike.shared.config import Settings  # noqa: E402
from lookalike.shared.logs import setup_logging  # noqa: E402


def pickups(bootstrap: str, wait_ms: int, records: int, seed: int = 0) -> list[float]:
    """Milliseconds from send to the consumer's poll returning each record, one record at a time."""
    topic = f"fetch-wait-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, 1, [topic])
    consumer = make_consumer(bootstrap, f"{topic}-group", [topic], fetch_max_wait_ms=wait_ms,
                             client_id="bench-fetch-wait")
    producer = make_producer(bootstrap, client_id="bench-fetch-wait")
    sent: dict[int, float] = {}
    got: dict[int, float] = {}
    stop = threading.Event()
    reader: threading.Thread | None = None

    def consume() -> None:
        while not stop.is_set():
            for batch in consumer.poll(timeout_ms=200, max_records=128).values():
                now = time.perf_counter()
                for r in batch:
                    got[int(r.value)] = now

    try:
        deadline = time.monotonic() + 30  # the group's first join
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no partition assigned for {topic} after 30 s")
            consumer.poll(timeout_ms=100)
        reader = threading.Thread(target=consume, name="fetch-wait-consumer", daemon=True)
        reader.start()
        rng = random.Random(seed)
        for i in range(records):
            time.sleep(rng.uniform(0.05, 0.05 + 2 * wait_ms / 1000))  # anywhere in the consumer's held fetch
            sent[i] = time.perf_counter()
            producer.send(topic, str(i).encode())
            producer.flush(timeout=10)
        deadline = time.monotonic() + 10
        while len(got) < records and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        if reader is not None:
            reader.join(timeout=5)  # the consumer is not thread-safe: its poll ends before the close
        producer.close(timeout=5)
        consumer.close(autocommit=False)
    if len(got) < records:
        raise RuntimeError(f"{records - len(got)} of {records} records not consumed within 10 s")
    return [(got[i] - sent[i]) * 1000 for i in range(records)]


def idle_cpu(wait_ms: int, idle_s: float) -> dict:
    """% of a core the idle one-process stack and its broker use with every function lane at ``wait_ms``."""
    from lookalike.stack import Stack

    with tempfile.TemporaryDirectory() as tmp:
        # The embedded broker and the default model, whatever the environment says.
        settings = Settings(LOOKALIKE_DATA_DIR=str(Path(tmp) / "data"), kafka_bootstrap_servers="",
                            embed_model="auto", detect_weights="none", fetch_max_wait_ms=wait_ms)
        with Stack(settings) as stack:
            time.sleep(5)  # the groups join and the first fetches settle
            broker = stack.broker.process.pid
            process0, broker0, t0 = cpu_seconds(os.getpid()), cpu_seconds(broker), time.monotonic()
            time.sleep(idle_s)
            elapsed = time.monotonic() - t0
            return {"process_pct": round(100 * (cpu_seconds(os.getpid()) - process0) / elapsed, 1),
                    "broker_pct": round(100 * (cpu_seconds(broker) - broker0) / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waits", default="10,20,50,200", help="FETCH_MAX_WAIT_MS values, comma-separated")
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--idle-s", type=float, default=10.0, help="0: skip the idle stack")
    parser.add_argument("--bootstrap", help="measure pickups on this broker instead of a fresh Tansu")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    setup_logging("WARNING")
    waits = [int(w) for w in args.waits.split(",")]
    results = []
    broker = None if args.bootstrap else TansuBroker()
    try:
        bootstrap = args.bootstrap or broker.bootstrap_servers
        for wait in waits:
            ms = sorted(pickups(bootstrap, wait, args.records))
            results.append({"fetch_max_wait_ms": wait, "pickup_p50_ms": round(statistics.median(ms), 1),
                            "pickup_p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1)})
    finally:
        if broker is not None:
            broker.stop()
    if args.idle_s > 0 and not args.bootstrap:
        for row in results:
            row.update(idle_cpu(row["fetch_max_wait_ms"], args.idle_s))
    if not args.json:
        for row in results:
            idle = (f", idle stack {row['process_pct']} % + broker {row['broker_pct']} % of a core"
                    if "process_pct" in row else "")
            print(f"W {row['fetch_max_wait_ms']:>4} ms: pickup p50 {row['pickup_p50_ms']} ms, "
                  f"p95 {row['pickup_p95_ms']} ms{idle}")
    print(json.dumps({"broker": args.bootstrap or "tansu (embedded)", "records": args.records, "waits": results}))


if __name__ == "__main__":
    main()
