"""Processes of one function share its consumer group: each event is handled by exactly one of them.

GIVEN the embedded broker (Tansu) with 4-partition topics and N processes of
`python -m lookalike.functions detect` (detection off: CPU-light, needs no store), one
consumer group
WHEN the group has settled and events with distinct keys go to images.normalized
THEN each process holds partitions, no partition is held twice, together they hold all,
and every event comes out on images.detected exactly once, as the function made it.

Each N gets a broker of its own: the group must start empty, and Tansu 0.6.0 can keep a
departed leader in a group for good (bench/tansu_group_repro.py). Throughput per N, and what
bounds it here: bench/scale.py.
"""

from __future__ import annotations

import pytest

from bench.scale import (
    GROUP,
    PARTITIONS,
    FunctionGroup,
    check_once,
    normalized_images,
    produce,
    read_outputs,
    wait_committed,
)
from lookalike.shared.bus import TansuBroker, ensure_topics
from lookalike.shared.detector import whole_image_object
from lookalike.shared.messages import IMAGES_NORMALIZED, DetectedImage
from tests.conftest import OUTPUT_DIR

pytestmark = pytest.mark.e2e

EVENTS = 400
# Starting a function process imports torch (~8 s of CPU each here) and each Tansu join round
# takes ~5 s: four processes on two busy cores have needed ~50 s to settle.
SETTLE_TIMEOUT_S = 150


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_share_the_partitions_and_handle_each_event_once(processes):
    OUTPUT_DIR.mkdir(exist_ok=True)
    with TansuBroker(log_path=OUTPUT_DIR / f"tansu-scale-{processes}.log") as broker:
        ensure_topics(broker.bootstrap_servers, PARTITIONS)
        with FunctionGroup(processes, broker.bootstrap_servers, detector="none",
                           log_dir=OUTPUT_DIR / f"scale-out-{processes}") as group:
            # WHEN the group has settled
            shares = group.wait_settled(SETTLE_TIMEOUT_S)
            rebalances = group.assignments()
            # THEN every process is a member of the function's one group and holds a share
            for member in group.members:
                assert f"consuming {IMAGES_NORMALIZED} as group {GROUP}" in "".join(member.lines)
            assert len(shares) == processes and all(shares), shares
            held = [p for share in shares for p in share]
            assert sorted(held) == list(range(PARTITIONS)), f"a partition held twice or by nobody: {shares}"

            # WHEN events with distinct keys are published, on every partition (so every process has work)
            events = normalized_images(EVENTS, run=f"scale-{processes}")
            _, _, ends = produce(broker.bootstrap_servers, events)
            assert sorted(ends) == list(range(PARTITIONS)) and sum(ends.values()) == EVENTS
            assert wait_committed(broker.bootstrap_servers, ends, timeout_s=60), group.log_tail()
            outputs = read_outputs(broker.bootstrap_servers)
            # no rebalance during the run: a duplicate could not be put down to a redelivery
            assert group.assignments() == rebalances, group.log_tail()

    # THEN every event came out exactly once ...
    missing, duplicated = check_once(events, outputs)
    assert not missing, f"{len(missing)} events never came out, e.g. {sorted(missing)[:3]}"
    assert not duplicated, f"{len(duplicated)} events came out more than once, e.g. {list(duplicated.items())[:3]}"
    # ... as detect made it: the same image, its whole picture as the one object (detection is off)
    by_key = {e.key(): e for e in events}
    for record in outputs:
        detected = DetectedImage.model_validate_json(record.value)
        event = by_key[record.key.decode()]
        assert detected.index == event.index and detected.image_id == event.image_id
        assert detected.objects == [whole_image_object(event.width, event.height)]


def test_a_leader_that_stops_while_a_member_joins_does_not_strand_the_group():
    """Tansu 0.6 keeps a member that leaves a rebalancing group as its leader for ever (bench/tansu_group_repro.py);
    a runner of a process run alone closes without LeaveGroup there (bus.close_consumer), so the session
    timeout drops it and the member that joined gets the partitions."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from bench.tansu_group_repro import TOPIC, consumer, poll_until_assigned
    from lookalike.shared.bus import close_consumer

    with TansuBroker(log_path=OUTPUT_DIR / "tansu-leader.log") as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_topics([NewTopic(TOPIC, 4, 1)])
        admin.close()
        # GIVEN a member that leads its group alone
        leader = consumer(broker.bootstrap_servers, "g", "leader")
        assert poll_until_assigned(leader, 30) is not None
        # WHEN another member joins and the leader stops while the group is rebalancing
        joining = consumer(broker.bootstrap_servers, "g", "joining")
        joining.poll(timeout_ms=1000)
        close_consumer(leader, leave_group=False)
        # THEN the joining member gets every partition once the leader's session has expired (10 s)
        took = poll_until_assigned(joining, 45)
        try:
            assert took is not None, "the group never formed again"
            assert len(joining.assignment()) == 4
        finally:
            joining.close(autocommit=False)
