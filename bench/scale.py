"""Scale-out: N processes of the detect function in one consumer group, on the embedded broker.

    python -m bench.scale [--processes 1,2,4] [--records 10000] [--detector none|PATH.tflite] [--side 64]
                          [--member-env NAME=VALUE ...] [--log-dir DIR]

For each N, on a fresh Tansu broker (topics of TOPIC_PARTITIONS=4 partitions):

1. start N processes of ``python -m lookalike.functions detect`` (the real function: parser,
   handler, Runner, producer, commits), all members of ``lookalike-detect``;
2. wait until the group settled: every member holds partitions, none is held twice, together
   they hold all 4 (read from each member's log: its lane consumer's assignment lines, the only place that says it:
   Tansu's DescribeGroups carries no assignments, see below);
3. produce ``--records`` images.normalized messages with distinct keys over all partitions, as
   fast as one producer goes (it stays well ahead of the group);
4. wait until the group committed every input (the runner commits only what it produced),
   then read images.detected.

Throughput (the method): records / (newest output's CreateTime - the moment the first input
was sent), i.e. the steady state of a settled group fed faster than it drains (the producer
sends the whole backlog in a fraction of that time: produce_s); the group's join time is not
in it. "once" is true when every input came out exactly once (same key, one output each).
CPU seconds of the members, the broker and this process from the first send to the last
commit say what bounds it: "cores busy" near the machine's core count is CPU-bound.

Measured on the 2-core dev machine while other jobs kept it busy ("all" = 2.0 in every run),
so the numbers vary by run and show which share of the CPU we got:
- detection off, 64 px, five runs (four of N=4): 640-1460 records/s at N=1, 660-1940 at N=2,
  1060-1770 at N=4; every record exactly once. Per record: ~0.55-1.0 ms CPU in the member (mostly kafka-python
  producing and consuming; the handler is ~10%), ~0.15 ms in Tansu, ~0.1 ms in the producer.
  One process stays under one core (its threads share one GIL), so N=2 is where the second
  core comes in; N=4 adds no core (it only takes a larger share from the other jobs).
  CPU-bound, not broker-bound.
- the team's YOLOv8n int8 TFLite, 640 px: ~100 ms CPU per image in one thread (Ultralytics
  gives TFLite cpu_count - 1 threads: 1 here); 6-8 images/s for every N, because the other jobs
  left our processes under one core. On two free cores N=2 should be ~2x N=1 (not measured).

Why a fresh broker per N: the group must start empty (no committed offsets, no members of a
previous run), and Tansu 0.6.0 can keep a departed leader in a group for good
(bench/tansu_group_repro.py), which stopping a previous N's processes may trigger.

Why the members raise kafka-python's coordinator logging to INFO: that log line ("Setting
newly assigned partitions ...") is the only record of who holds which partition;
setup_logging() keeps the "kafka" loggers at ERROR. Nothing else differs from
``python -m lookalike.functions detect``. (kafka-python's KafkaAdminClient.describe_groups
fails against Tansu: Tansu answers every authorized-operations bit set, kafka-python raises
"15 is not a valid ACLOperation"; and Tansu's answer has no member assignments anyway.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from PIL import Image

from lookalike.shared.bus import TansuBroker, ensure_topics, topic_partitions
from lookalike.shared.messages import (
    IMAGES_DETECTED,
    IMAGES_NORMALIZED,
    ImageRef,
    IndexContext,
    NormalizedImage,
    ProductInfo,
)

PARTITIONS = 4
GROUP = "lookalike-detect"

# `python -m lookalike.functions detect`, with the log line that names a member's partitions let through
# (kafka-python's; the librdkafka lane consumer logs its own at INFO).
MEMBER = ("import logging, runpy, sys; "
          "logging.getLogger('kafka.coordinator.consumer').setLevel(logging.INFO); "
          "sys.argv = ['lookalike.functions', 'detect']; "
          "runpy.run_module('lookalike.functions', run_name='__main__', alter_sys=True)")
# kafka-python's coordinator: "TopicPartition(topic='images.normalized', partition=0)"; the librdkafka
# lane consumer (shared/lane_consumer.py): "images.normalized[0]"
_PARTITION = re.compile(r"TopicPartition\(topic='" + re.escape(IMAGES_NORMALIZED) + r"', partition=(\d+)\)|"
                        + re.escape(IMAGES_NORMALIZED) + r"\[(\d+)\]")


# --------------------------------------------------------------------------- the group


@dataclass
class Member:
    """One process of the function and what its log said about its partitions."""

    index: int
    process: subprocess.Popen
    partitions: frozenset[int] = frozenset()  # held now (empty between a revocation and the next assignment)
    assignments: int = 0  # "newly assigned" lines so far: each one is a (re)balance this member took part in
    lines: list[str] = field(default_factory=list)


class FunctionGroup:
    """N processes of one function in its consumer group, each a separate OS process."""

    def __init__(self, processes: int, bootstrap_servers: str, *, detector: str = "none",
                 log_dir: Path | None = None, extra_env: dict[str, str] | None = None):
        self.log_dir = log_dir
        env = dict(os.environ)
        env.update(KAFKA_BOOTSTRAP_SERVERS=bootstrap_servers, DETECT_WEIGHTS=detector,
                   TOPIC_PARTITIONS=str(PARTITIONS), EMBED_MODEL="efficientnet_lite0", LOG_LEVEL="INFO",
                   METRICS_PORT="0",  # N processes on one machine: no metrics port to fight over
                   PYTHONUNBUFFERED="1", **(extra_env or {}))
        self._lock = threading.Lock()
        self.members: list[Member] = []
        for i in range(processes):
            process = subprocess.Popen([sys.executable, "-c", MEMBER], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            member = Member(i, process)
            self.members.append(member)
            threading.Thread(target=self._read_log, args=(member,), name=f"member-{i}-log", daemon=True).start()

    def _read_log(self, member: Member) -> None:
        for line in member.process.stdout:
            with self._lock:
                member.lines.append(line)
                if not line.rstrip().endswith(f" for group {GROUP}"):
                    continue  # another lane's group (detect's search lane) or not about groups
                if "Revoking previously assigned partitions" in line or "revoked partitions" in line:
                    member.partitions = frozenset()
                elif "assigned partitions" in line:  # kafka-python's "newly assigned partitions", or ours
                    member.partitions = frozenset(int(a or b) for a, b in _PARTITION.findall(line))
                    member.assignments += 1

    def shares(self) -> list[frozenset[int]]:
        with self._lock:
            return [m.partitions for m in self.members]

    def assignments(self) -> int:
        """Assignments taken by all members so far: it grows with every rebalance."""
        with self._lock:
            return sum(m.assignments for m in self.members)

    def settled(self) -> bool:
        """Every member holds partitions, none twice, all of them held.

        With kafka-python's eager rebalancing every member gives its partitions up before any
        member gets new ones, so this holds only in a generation that all N members joined.
        """
        shares = self.shares()
        held = [p for share in shares for p in share]
        return all(shares) and len(held) == len(set(held)) == PARTITIONS

    def wait_settled(self, timeout_s: float) -> list[frozenset[int]]:
        deadline = time.monotonic() + timeout_s
        while not self.settled():
            dead = [m for m in self.members if m.process.poll() is not None]
            if dead or time.monotonic() > deadline:
                what = f"member {dead[0].index} exited" if dead else f"not settled after {timeout_s:.0f} s"
                raise RuntimeError(f"{what}; shares {self.shares()}\n{self.log_tail()}")
            time.sleep(0.1)
        return self.shares()

    def log_tail(self, lines: int = 15) -> str:
        with self._lock:
            return "\n".join(f"--- member {m.index}:\n" + "".join(m.lines[-lines:]) for m in self.members)

    def pids(self) -> list[int]:
        return [m.process.pid for m in self.members]

    def stop(self) -> None:
        """SIGTERM (the function finishes its batch, commits, leaves the group), then wait."""
        for m in self.members:
            if m.process.poll() is None:
                m.process.send_signal(signal.SIGTERM)
        for m in self.members:
            try:
                m.process.wait(30)
            except subprocess.TimeoutExpired:
                m.process.kill()
                m.process.wait()
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for m in self.members:
                (self.log_dir / f"member-{m.index}.log").write_text("".join(m.lines))

    def __enter__(self) -> "FunctionGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- inputs and outputs


def jpeg(side: int) -> tuple[bytes, int, int]:
    """A noise JPEG ``side`` x 3/4 ``side`` (noise: the detector finds nothing, but runs in full)."""
    width, height = side, max(1, side * 3 // 4)
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return buf.getvalue(), width, height


def normalized_images(count: int, side: int = 64, run: str = "scale") -> list[NormalizedImage]:
    """``count`` catalogue images keyed by distinct product ids (so they spread over all partitions)."""
    raw, width, height = jpeg(side)
    data = ImageRef.from_bytes(raw).data
    return [NormalizedImage(intent="index", image_id=f"{run}-image-{i:06d}", jpeg=data, width=width, height=height,
                            index=IndexContext(event_id=f"{run}-event-{i:06d}",
                                               product=ProductInfo(product_id=f"{run}-{i:06d}"), image_index=0))
            for i in range(count)]


def produce(bootstrap_servers: str, messages: list[NormalizedImage]) -> tuple[float, float, dict[int, int]]:
    """Send every message to images.normalized; (wall time of the first send, seconds to send them all,
    end offset per partition). Serialised before the clock starts, so the producer outruns the group."""
    payloads = [(m.key().encode(), m.to_bytes()) for m in messages]
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5,
                             batch_size=256 * 1024, max_request_size=8 * 1024 * 1024)
    try:
        started, clock = time.time(), time.monotonic()
        futures = [producer.send(IMAGES_NORMALIZED, key=key, value=value) for key, value in payloads]
        producer.flush(timeout=120)
        ends: dict[int, int] = {}
        for future in futures:
            sent = future.get(timeout=30)
            ends[sent.partition] = max(ends.get(sent.partition, 0), sent.offset + 1)
        return started, time.monotonic() - clock, ends
    finally:
        producer.close(timeout=10)


def wait_committed(bootstrap_servers: str, ends: dict[int, int], timeout_s: float) -> bool:
    """Whether the group committed every input (offset ``ends[p]`` on each partition) within ``timeout_s``.

    The runner commits a batch only after its outputs are acknowledged, so this is "all done".
    Watching commits costs little CPU, unlike reading the outputs while the members work; and
    end offsets can't be used: Tansu 0.6.0 answers ListOffsets with the newest record batch's
    first offset + 1, short of the real end by the rest of that batch (bench/tansu_group_repro.py).
    """
    offsets = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=GROUP, enable_auto_commit=False,
                            client_id="bench-scale-offsets")
    try:
        deadline = time.monotonic() + timeout_s
        while any((offsets.committed(TopicPartition(IMAGES_NORMALIZED, p)) or 0) < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
    finally:
        offsets.close(autocommit=False)


def read_outputs(bootstrap_servers: str, idle_s: float = 1.0, timeout_s: float = 120.0) -> list:
    """Every record of images.detected: up to the high watermark of each partition, then until
    nothing came for ``idle_s`` (the high watermark of a fetch is right on Tansu, its end offsets are not)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=50,
                             max_partition_fetch_bytes=8 * 1024 * 1024, client_id="bench-scale-read")
    try:
        tps = topic_partitions(consumer, IMAGES_DETECTED)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list = []
        quiet_since = time.monotonic()
        deadline = quiet_since + timeout_s
        while time.monotonic() < deadline and (time.monotonic() - quiet_since < idle_s or not all(
                consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp) for tp in tps)):
            polled = consumer.poll(timeout_ms=100)
            if polled:
                quiet_since = time.monotonic()
            for batch in polled.values():
                records += batch
        return records
    finally:
        consumer.close(autocommit=False)


def check_once(inputs: list[NormalizedImage], outputs: list) -> tuple[set[str], dict[str, int]]:
    """(keys of inputs with no output, keys that came out more than once with their count)."""
    counts: dict[str, int] = {}
    for record in outputs:
        key = record.key.decode()
        counts[key] = counts.get(key, 0) + 1
    missing = {m.key() for m in inputs} - set(counts)
    return missing, {k: n for k, n in counts.items() if n > 1}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def machine_busy_seconds() -> float:
    """CPU seconds all cores of this machine spent busy so far, whoever's (Linux /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


# --------------------------------------------------------------------------- one measurement


def run(processes: int, records: int, detector: str = "none", side: int = 64, settle_timeout_s: float = 240,
        log_dir: Path | None = None, member_env: dict[str, str] | None = None) -> dict:
    """One N: a fresh broker, N members, ``records`` through the settled group. A dict for the table."""
    with TansuBroker() as broker:
        ensure_topics(broker.bootstrap_servers, PARTITIONS)
        inputs = normalized_images(records, side, run=f"n{processes}")
        started = time.monotonic()
        with FunctionGroup(processes, broker.bootstrap_servers, detector=detector, log_dir=log_dir,
                           extra_env=member_env) as group:
            shares = group.wait_settled(settle_timeout_s)
            settle_s = time.monotonic() - started
            rebalances_before = group.assignments()
            pids = {"members": group.pids(), "broker": [broker.process.pid], "bench": [os.getpid()]}
            cpu_before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
            machine_before, window_start = machine_busy_seconds(), time.monotonic()
            first_sent, produce_s, ends = produce(broker.bootstrap_servers, inputs)
            wait_committed(broker.bootstrap_servers, ends, timeout_s=max(60.0, records / 20))
            # CPU from the first send to the last commit
            cpu = {k: round(sum(cpu_seconds(p) for p in v) - cpu_before[k], 2) for k, v in pids.items()}
            machine_s, window_s = machine_busy_seconds() - machine_before, time.monotonic() - window_start
            outputs = read_outputs(broker.bootstrap_servers)
            rebalanced = group.assignments() != rebalances_before
    missing, duplicated = check_once(inputs, outputs)
    newest = max((r.timestamp for r in outputs), default=first_sent * 1000) / 1000
    elapsed = max(newest - first_sent, 1e-3)
    return {
        "processes": processes,
        "records": records,
        "detector": detector,
        "image_side": side,
        "member_env": member_env or {},
        "records_per_s": round(len(set(r.key for r in outputs)) / elapsed, 1),
        "seconds": round(elapsed, 2),
        "once": not missing and not duplicated,
        "missing": len(missing),
        "duplicated": len(duplicated),
        "rebalanced_during_run": rebalanced,
        "shares": [sorted(s) for s in shares],
        "inputs_per_partition": [ends.get(p, 0) for p in range(PARTITIONS)],
        "produce_s": round(produce_s, 2),
        "settle_s": round(settle_s, 1),
        # CPU seconds from the first send to the last commit: members (all), broker, this process (the producer)
        "cpu_s": cpu,
        "cores_busy": round(sum(cpu.values()) / window_s, 2),  # ours: members + broker + producer
        # every process of the machine: near os.cpu_count() means the CPU was the limit (others' work included)
        "machine_cores_busy": round(machine_s / window_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated process counts (default 1,2,4)")
    parser.add_argument("--records", type=int, default=10000, help="records per process count (default 10000)")
    parser.add_argument("--detector", default="none",
                        help="DETECT_WEIGHTS of the members: none (default, CPU-light) or a model file")
    parser.add_argument("--side", type=int, default=64, help="longest side of the input JPEG in px (default 64)")
    parser.add_argument("--member-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the members, e.g. POLL_MAX_RECORDS=256 (repeatable)")
    parser.add_argument("--log-dir", type=Path, default=None, help="write each member's log here")
    args = parser.parse_args(argv)
    member_env = dict(item.split("=", 1) for item in args.member_env)
    rows = []
    for n in (int(x) for x in args.processes.split(",")):
        log_dir = args.log_dir / f"n{n}" if args.log_dir else None
        rows.append(run(n, args.records, args.detector, args.side, log_dir=log_dir, member_env=member_env))
        r = rows[-1]
        print(f"N={n}: {r['records_per_s']} records/s, once={r['once']}, shares={r['shares']}, "
              f"cpu={r['cpu_s']}", file=sys.stderr, flush=True)
    base = rows[0]["records_per_s"] or 1.0
    settings = "".join(f", {k}={v}" for k, v in member_env.items())
    print(f"\ndetect (DETECT_WEIGHTS={args.detector}{settings}), {args.records} records of a {args.side} px JPEG, "
          f"{PARTITIONS} partitions, {os.cpu_count()} CPUs")
    print(f"{'N':>3} {'records/s':>10} {'speed-up':>8} {'once':>5} {'seconds':>8} "
          f"{'CPU s: members / broker / bench':>32} {'cores busy: ours / all':>23}  shares")
    for r in rows:
        cpu = r["cpu_s"]
        print(f"{r['processes']:>3} {r['records_per_s']:>10} {r['records_per_s'] / base:>8.2f} {str(r['once']):>5} "
              f"{r['seconds']:>8} {cpu['members']:>16} / {cpu['broker']:>6} / {cpu['bench']:>5} "
              f"{r['cores_busy']:>16} / {r['machine_cores_busy']:>4}  {r['shares']}")
    print(json.dumps({"bench": "scale", "function": "detect", "rows": rows}))
    return 0 if all(r["once"] and not r["rebalanced_during_run"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
