"""The function lanes' librdkafka consumer (shared/lane_consumer.py): what it must keep from kafka-python's.

The runner's rules run on it through every end-to-end and fault test (KAFKA_CONSUMER=auto picks it);
these tests cover what is its own: leaving a group on Tansu, noticing a recreated topic, and the
secured-cluster settings.
"""

from __future__ import annotations

import json
import time
import types
import uuid

import confluent_kafka
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError

from bench.tansu_group_repro import poll_until_assigned
from lookalike.shared import lane_consumer
from lookalike.shared.bus import ClientCredentialsTokens, TansuBroker, ensure_topics
from lookalike.shared.config import Settings
from lookalike.shared.lane_consumer import RdKafkaLaneConsumer, rdkafka_options
from tests.conftest import OUTPUT_DIR


@pytest.mark.e2e
def test_a_lane_leader_that_stops_while_a_member_joins_does_not_strand_the_group():
    """Tansu 0.6 strands a group whose leader leaves while it rebalances (bench/tansu_group_repro.py). librdkafka's
    close always sends LeaveGroup, so a runner of a process run alone frees its consumer without closing it."""
    with TansuBroker(log_path=OUTPUT_DIR / "tansu-lane-leader.log") as broker:
        topic = f"lane-leader-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker.bootstrap_servers, 4, [topic])

        def member(name: str, leave: bool) -> RdKafkaLaneConsumer:
            return RdKafkaLaneConsumer(broker.bootstrap_servers, "g", [topic], session_timeout_ms=6000,
                                       client_id=name, leave_group_on_close=leave)

        # GIVEN a lane that leads its group alone, in a process run alone (no LeaveGroup on close)
        leader = member("leader", leave=False)
        assert poll_until_assigned(leader, 30) is not None
        # WHEN another member joins and the leader stops while the group is rebalancing
        joining = member("joining", leave=True)
        joining.poll(timeout_ms=1000)
        leader.close()
        # THEN the joining member gets every partition once the leader's session has expired (6 s)
        took = poll_until_assigned(joining, 40)
        try:
            assert took is not None, "the group never formed again"
            assert len(joining.assignment()) == 4
        finally:
            joining.close()


@pytest.mark.e2e
def test_a_lane_consumer_sees_a_new_topic_id_once_its_topic_is_recreated(kafka_bootstrap, monkeypatch):
    # librdkafka itself does not notice (its issue 3255); the runner restarts a lane whose topic id changed
    monkeypatch.setattr(lane_consumer, "TOPIC_CHECK_S", 0.0)
    topic = f"recreated-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, 2, [topic])
    consumer = RdKafkaLaneConsumer(kafka_bootstrap, f"{topic}-g", [topic])
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        # GIVEN a lane consumer that knows its topic's id
        first = consumer.topic_ids([topic])[topic]
        assert first
        # WHEN the topic is deleted and created again under the same name
        admin.delete_topics([topic])
        deadline = time.monotonic() + 30
        while topic in admin.list_topics():
            assert time.monotonic() < deadline, "the topic was not deleted in 30 s"
            time.sleep(0.2)
        admin.create_topics([NewTopic(topic, 2, 1)])
        # THEN the consumer reports the new id (None while the broker has no answer)
        deadline = time.monotonic() + 30
        while consumer.topic_ids([topic])[topic] in (None, first):
            assert time.monotonic() < deadline, "the new topic id was not seen in 30 s"
            time.sleep(0.2)
    finally:
        admin.close()
        consumer.close()


def test_between_checks_a_lane_consumer_answers_topic_ids_without_asking_the_broker(kafka_bootstrap, monkeypatch):
    # every poll of the runner asks for the ids: a request each time would cost the broker and the lane
    asks: list[list] = []

    class CountingAdmin(lane_consumer.AdminClient):
        def describe_topics(self, topics, **options):
            asks.append(topics.topic_names)
            return super().describe_topics(topics, **options)

    monkeypatch.setattr(lane_consumer, "AdminClient", CountingAdmin)
    topic = f"ids-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, 1, [topic])
    consumer = RdKafkaLaneConsumer(kafka_bootstrap, f"{topic}-g", [topic])
    try:
        first = consumer.topic_ids([topic])
        assert first[topic] and [consumer.topic_ids([topic]) for _ in range(20)] == [first] * 20
        assert asks == [[topic]]
    finally:
        consumer.close()


def test_a_lane_consumer_on_a_machine_booted_a_moment_ago_asks_for_its_topic_ids(kafka_bootstrap, monkeypatch):
    # The monotonic clock counts from boot: a serverless microVM starts its function well under
    # TOPIC_CHECK_S after. Taking "never checked" for "checked at 0" answered no ids there, and the
    # runner's check failed the lane until the clock passed TOPIC_CHECK_S.
    real, started = time.monotonic, time.monotonic()
    booted = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    booted.monotonic = lambda: 0.5 + real() - started  # up for half a second
    monkeypatch.setattr(lane_consumer, "time", booted)
    topic = f"boot-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, 1, [topic])
    consumer = RdKafkaLaneConsumer(kafka_bootstrap, f"{topic}-g", [topic])
    try:
        assert consumer.topic_ids([topic])[topic]
    finally:
        consumer.close()


@pytest.mark.e2e
def test_a_backlogged_lane_holds_at_most_one_fetch_of_records_ahead(kafka_bootstrap):
    from lookalike.shared.lane_consumer import consumer_config
    from lookalike.shared.limits import MAX_MESSAGE_BYTES, RECORD_OVERHEAD_BYTES

    # GIVEN a backlog of 96 MB of records (photos waiting for a lane), in one partition
    topic = f"backlog-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, 1, [topic])
    value = b"x" * (MAX_MESSAGE_BYTES - RECORD_OVERHEAD_BYTES)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=MAX_MESSAGE_BYTES)
    for _ in range(96 * 2**20 // len(value)):
        producer.send(topic, value)
    producer.flush(60)
    producer.close()
    stats: list[dict] = []
    # the lane's own configuration, with librdkafka's statistics on (bytes received from the broker)
    consumer = confluent_kafka.Consumer(consumer_config(kafka_bootstrap, f"{topic}-g") | {
        "statistics.interval.ms": 500, "stats_cb": lambda raw: stats.append(json.loads(raw))})
    consumer.subscribe([topic])
    try:
        # WHEN the lane takes its first record and then works on it for a while, reading nothing
        deadline = time.monotonic() + 30
        while not consumer.consume(1, timeout=1.0):
            assert time.monotonic() < deadline, "no record in 30 s"
        time.sleep(3)
        consumer.poll(0)  # hands over the statistics gathered meanwhile
        assert stats, "librdkafka reported no statistics"
        received = sum(b["rxbytes"] for b in stats[-1]["brokers"].values())
        # THEN it fetched about one fetch's worth ahead (32 MB, and the fetch that crossed it), not the
        # backlog: librdkafka's default queue (64 MB) took 3/4 of it, kafka-python held about one fetch
        assert 16 * MAX_MESSAGE_BYTES <= received < 48 * 2**20
    finally:
        consumer.close()


@pytest.mark.e2e
def test_a_partition_paused_for_a_retry_reads_again_after_a_rebalance():
    """The runner pauses a partition whose record waits for a retry, and forgets the pause if the partition
    leaves it (Runner._resume_due). librdkafka would keep the pause through a rebalance: the partition
    would come back paused and never be read again."""
    with TansuBroker(log_path=OUTPUT_DIR / "tansu-lane-pause.log") as broker:
        topic = f"lane-pause-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker.bootstrap_servers, 2, [topic])
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        producer.send(topic, b"waits for a retry", partition=0).get(timeout=30)
        producer.close()

        def member(name: str) -> RdKafkaLaneConsumer:
            return RdKafkaLaneConsumer(broker.bootstrap_servers, "g", [topic], session_timeout_ms=6000, client_id=name)

        # GIVEN a lane that polled the record and paused its partition from it, as a retry does
        first = member("first")
        deadline = time.monotonic() + 40
        polled: dict = {}
        while not polled:
            assert time.monotonic() < deadline, "the record was not polled in 40 s"
            polled = first.poll(timeout_ms=200, max_records=10)
        [(tp, [record])] = polled.items()
        first.seek(tp, record.offset)
        first.pause(tp)
        # WHEN the group rebalances: a second member joins, takes a share, and leaves
        second = member("second")
        assert poll_until_assigned(second, 40, others=(first,)) is not None
        second.close()
        # THEN the first lane reads the record again, without resuming the partition itself
        seen = []
        deadline = time.monotonic() + 40
        while not seen and time.monotonic() < deadline:
            seen = [r.value for batch in first.poll(timeout_ms=200, max_records=10).values() for r in batch]
        first.close()
        assert seen == [b"waits for a retry"], "the paused partition stayed paused after the rebalance"


def test_an_authorization_error_stops_the_lane_and_a_transient_one_does_not(monkeypatch):
    # kafka-python raises what no retry mends from poll: the supervisor then shows it in /healthz
    class Event:
        def __init__(self, code):
            self._error = confluent_kafka.KafkaError(code)

        def error(self):
            return self._error

    class Broker:  # stands in for librdkafka's consumer: each consume() hands over the next events
        def __init__(self, config):
            self.events = [[Event(confluent_kafka.KafkaError._TRANSPORT)],
                           [Event(confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED)]]

        def subscribe(self, topics, **callbacks):
            pass

        def consume(self, num_messages, timeout):
            return self.events.pop(0) if num_messages == 1 and self.events else []

    monkeypatch.setattr(lane_consumer.confluent_kafka, "Consumer", Broker)
    consumer = RdKafkaLaneConsumer("127.0.0.1:1", "g", ["t"])
    assert consumer.poll(timeout_ms=10) == {}  # the broker away for a moment: logged, the lane goes on
    with pytest.raises(KafkaError, match="authorization"):
        consumer.poll(timeout_ms=10)


def test_the_kafka_security_settings_reach_librdkafka_under_its_names():
    settings = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                        kafka_sasl_username="lookalike", kafka_sasl_password="s3cret",
                        kafka_ssl_cafile="/etc/ca.pem", kafka_ssl_certfile="/etc/me.pem",
                        kafka_ssl_keyfile="/etc/me.key", kafka_ssl_password="keypass")
    assert rdkafka_options(settings) == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "lookalike", "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem", "ssl.certificate.location": "/etc/me.pem",
        "ssl.key.location": "/etc/me.key", "ssl.key.password": "keypass",
    }
    assert rdkafka_options(Settings()) == {}  # the embedded broker: plaintext


def test_oauthbearer_tokens_reach_librdkafka_with_their_expiry(monkeypatch):
    settings = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="OAUTHBEARER",
                        kafka_sasl_oauth_token_url="https://login.example/token",
                        kafka_sasl_oauth_client_id="lookalike", kafka_sasl_oauth_client_secret="s3cret")

    def fake_token(self) -> str:  # no request leaves the test: a 300 s token, as token() keeps it
        self._token, self._renew_at, self._expires_at = "token-1", time.monotonic() + 240, time.time() + 300
        return self._token

    monkeypatch.setattr(ClientCredentialsTokens, "token", fake_token)
    callback = rdkafka_options(settings)["oauth_cb"]
    token, expires_at = callback("")
    # the token's true expiry: librdkafka asks again at 80 % of it, and refuses one already expired
    assert token == "token-1" and 290 < expires_at - time.time() <= 300


def test_aws_msk_iam_keeps_the_lanes_on_kafka_python_and_librdkafka_refuses_it_clearly():
    msk = dict(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="AWS_MSK_IAM")
    assert Settings(**msk).lane_consumer_client() == "kafka-python"
    assert Settings().lane_consumer_client() == "librdkafka"
    assert Settings(kafka_consumer="kafka-python").lane_consumer_client() == "kafka-python"
    with pytest.raises(ValueError, match="AWS_MSK_IAM"):
        rdkafka_options(Settings(kafka_consumer="librdkafka", **msk))
