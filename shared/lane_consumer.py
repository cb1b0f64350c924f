"""The function lanes' Kafka consumer on librdkafka (confluent-kafka), with the runner's kafka-python API.

Why: kafka-python is pure Python, so its network thread and fetch parsing run under the GIL the
handlers need. On the 2-core dev machine an idle kafka-python group consumer cost about 2.7 % of a
core (librdkafka 0.2 %), and consuming plus producing a 60 KB record about 0.3 ms of CPU (librdkafka
0.07); through the embedded stack indexing ran 7-26 % faster with the lanes on librdkafka
(``python -m bench.kafka_clients``, docs/benchmarks.md). Producers, the admin client, the reply
listeners and the offset reader stay on kafka-python: only the lanes poll all the time.

``KAFKA_CONSUMER`` picks the client (``Settings.lane_consumer_client``). ``RdKafkaLaneConsumer`` keeps
the lookalike-specific duties that ``bus`` does for kafka-python:

- **leaving on Tansu**: a member that leaves a rebalancing group strands it on Tansu 0.6
  (``bus.close_consumer``). librdkafka's ``close`` always sends LeaveGroup, but a consumer freed
  without ``close`` sends none, so a runner of a process run alone frees it there, and the session
  timeout drops the member;
- **recreated topics**: librdkafka does not notice a topic deleted and created again under the same
  name (its issue 3255; it can stall without an error). ``topic_ids`` asks the broker
  (DescribeTopics) at most every ``TOPIC_CHECK_S``, for the runner's check.
"""

from __future__ import annotations

import collections
import logging
import time

import confluent_kafka
from confluent_kafka.admin import AdminClient
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from lookalike.shared.bus import TANSU_CLUSTER_ID, ClientCredentialsTokens, kafka_options
from lookalike.shared.config import Settings
from lookalike.shared.limits import MAX_MESSAGE_BYTES

log = logging.getLogger("lookalike.rdkafka")

Record = collections.namedtuple("Record", "topic partition offset key value headers timestamp")
TOPIC_CHECK_S = 5.0  # how often topic_ids asks the broker; a recreated topic is noticed within this
METADATA_TIMEOUT_S = 5.0

# kafka-python's option names (bus.kafka_options, which validates the KAFKA_* settings) -> librdkafka's
_OPTION_NAMES = {
    "security_protocol": "security.protocol", "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location", "ssl_password": "ssl.key.password",
    "sasl_mechanism": "sasl.mechanism", "sasl_plain_username": "sasl.username", "sasl_plain_password": "sasl.password",
}


def rdkafka_options(settings: Settings | None = None) -> dict:
    """The ``KAFKA_*`` TLS and SASL settings as librdkafka configuration (empty for a plaintext broker)."""
    options: dict = {}
    for name, value in kafka_options(settings).items():
        if name == "sasl_oauth_token_provider":
            options["oauth_cb"] = _oauth_callback(value)
        else:
            options[_OPTION_NAMES[name]] = value
    if options.get("sasl.mechanism") == "AWS_MSK_IAM":
        raise ValueError("KAFKA_CONSUMER=librdkafka cannot sign AWS_MSK_IAM: use KAFKA_CONSUMER=kafka-python "
                         "(or auto, which does for AWS_MSK_IAM)")
    return options


def _oauth_callback(tokens: ClientCredentialsTokens):
    def token(_config: str) -> tuple[str, float]:
        value = tokens.token()
        return value, tokens.expires_at()  # the true expiry: librdkafka asks again at 80 % of what is left

    return token


# Errors a retry cannot mend: raised from poll, so the runner stops, the supervisor shows the error
# in /healthz and restarts it with backoff (kafka-python raises these from poll too).
_FATAL_CODES = {
    confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED, confluent_kafka.KafkaError.GROUP_AUTHORIZATION_FAILED,
    confluent_kafka.KafkaError.SASL_AUTHENTICATION_FAILED, confluent_kafka.KafkaError._AUTHENTICATION,
}


def _raise_if_fatal(error: confluent_kafka.KafkaError) -> None:
    if error.fatal() or error.code() in _FATAL_CODES:
        raise KafkaError(f"librdkafka: {error.str()}")


def consumer_config(bootstrap_servers: str, group_id: str, session_timeout_ms: int = 10000,
                    client_id: str = "lookalike", fetch_max_wait_ms: int = 50,
                    settings: Settings | None = None) -> dict:
    """A lane's librdkafka configuration, as ``bus.make_consumer`` configures kafka-python's (the
    ``KAFKA_*`` TLS and SASL settings included)."""
    return rdkafka_options(settings) | {
        "bootstrap.servers": bootstrap_servers, "group.id": group_id, "client.id": client_id,
        # offsets are committed by the runner after outputs are flushed
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_timeout_ms, "heartbeat.interval.ms": max(500, session_timeout_ms // 5),
        "fetch.wait.max.ms": fetch_max_wait_ms,  # FETCH_MAX_WAIT_MS, as bus.make_consumer says
        "max.partition.fetch.bytes": MAX_MESSAGE_BYTES, "fetch.max.bytes": 16 * MAX_MESSAGE_BYTES,
        "receive.message.max.bytes": 16 * MAX_MESSAGE_BYTES + 512,  # librdkafka wants room above fetch.max.bytes
        # Records fetched ahead wait in the consumer's queue: at most one fetch's worth, about what
        # kafka-python held. With librdkafka's default (64 MB, overshot by a fetch) a lane took 65 MB
        # of a 96 MB backlog ahead (tests/test_lane_consumer.py), beyond what the pods were sized for.
        "queued.max.messages.kbytes": 16 * MAX_MESSAGE_BYTES // 1024,
        "allow.auto.create.topics": False,  # only ensure_topics creates topics
        "log.connection.close": False,  # Tansu closes idle connections: not worth a warning each time
        "logger": log,
    }


def _names(partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"


class RdKafkaLaneConsumer:
    """The part of kafka-python's ``KafkaConsumer`` that ``Runner`` uses, on librdkafka.

    Configured as ``bus.make_consumer`` configures kafka-python's. Records come back as
    ``Record`` tuples with kafka-python's field names. Use it from one thread: librdkafka's calls
    are not safe while another thread is inside ``consume``.
    """

    def __init__(self, bootstrap_servers: str, group_id: str, topics: list[str], session_timeout_ms: int = 10000,
                 client_id: str = "lookalike", fetch_max_wait_ms: int = 50, leave_group_on_close: bool = True,
                 settings: Settings | None = None):
        self._bootstrap, self._group_id, self._settings = bootstrap_servers, group_id, settings
        self._leave_group_on_close = leave_group_on_close
        self._assigned: set[TopicPartition] = set()
        self._admin: AdminClient | None = None
        self._ids: dict[str, str | None] = {}
        self._ids_checked = -TOPIC_CHECK_S  # the first call asks, even on a machine up for under TOPIC_CHECK_S
        self._consumer = confluent_kafka.Consumer(consumer_config(
            bootstrap_servers, group_id, session_timeout_ms, client_id, fetch_max_wait_ms, settings))
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)

    def _on_assign(self, _consumer, partitions) -> None:
        self._assigned = {TopicPartition(p.topic, p.partition) for p in partitions}
        # the one place a process says which partitions it holds (bench/scale.py reads it)
        log.info("assigned partitions %s for group %s", _names(self._assigned), self._group_id)

    def _on_revoke(self, consumer, partitions) -> None:
        log.info("revoked partitions %s for group %s", _names(self._assigned), self._group_id)
        # librdkafka keeps a partition's pause across a rebalance; kafka-python starts every
        # assignment unpaused, and the runner forgets a retry's pause once its partition left
        # (Runner._resume_due): a pause kept through a rebalance would stall the partition for good.
        consumer.resume(partitions)
        self._assigned = set()

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[TopicPartition, list[Record]]:
        """Records fetched so far, by partition; raises kafka-python's ``KafkaError`` for an error no
        retry mends (authorization, a fatal client error). A rebalance can run inside ``consume``:
        records of a partition it revoked still come back, and their commit then fails
        (``CommitFailedError``, redelivered to the new owner), as with kafka-python."""
        # consume(n, timeout) waits until it has n records or the timeout passes (a first version
        # made searches wait 600 ms): wait for one, then take whatever else is already fetched.
        messages = self._consumer.consume(num_messages=1, timeout=timeout_ms / 1000)
        if messages and max_records > 1:
            messages += self._consumer.consume(num_messages=max_records - 1, timeout=0)
        polled: dict[TopicPartition, list[Record]] = collections.defaultdict(list)
        for m in messages:
            if m.error() is not None:  # a consumer event, not a record
                _raise_if_fatal(m.error())
                log.warning("%s", m.error())  # transient: the broker away, a topic not there yet
                continue
            polled[TopicPartition(m.topic(), m.partition())].append(Record(
                m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or [], m.timestamp()[1]))
        return dict(polled)

    def assignment(self) -> set[TopicPartition]:
        return self._assigned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        # A partition revoked since its records were polled (a rebalance inside consume) is not
        # ours to move: librdkafka would raise; its new owner reads from the last commit.
        if tp in self._assigned:
            self._consumer.seek(confluent_kafka.TopicPartition(tp.topic, tp.partition, offset))

    def pause(self, *tps: TopicPartition) -> None:
        self._consumer.pause([confluent_kafka.TopicPartition(t.topic, t.partition) for t in tps
                              if t in self._assigned])

    def resume(self, *tps: TopicPartition) -> None:
        self._consumer.resume([confluent_kafka.TopicPartition(t.topic, t.partition) for t in tps])

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit ``offsets`` (the next offset to read; their metadata is not kept), synchronously.

        A failure raises kafka-python's ``CommitFailedError``, which the runner takes as "redelivered"."""
        try:
            done = self._consumer.commit(offsets=[confluent_kafka.TopicPartition(tp.topic, tp.partition, o.offset)
                                                  for tp, o in offsets.items()], asynchronous=False)
        except confluent_kafka.KafkaException as e:
            raise CommitFailedError(str(e)) from e
        failed = [f"{p.topic}[{p.partition}]: {p.error}" for p in done or [] if p.error is not None]
        if failed:
            raise CommitFailedError("; ".join(failed))

    def topic_ids(self, topics) -> dict[str, str | None]:
        """Each topic's id as the broker reports it (None where it did not answer), asked at most every
        ``TOPIC_CHECK_S``; between asks, the last answer."""
        if time.monotonic() - self._ids_checked < TOPIC_CHECK_S:
            return self._ids
        self._ids_checked = time.monotonic()
        if self._admin is None:
            self._admin = AdminClient(rdkafka_options(self._settings) | {
                "bootstrap.servers": self._bootstrap, "logger": log, "log.connection.close": False})
        ids: dict[str, str | None] = {}
        futures = self._admin.describe_topics(confluent_kafka.TopicCollection(list(topics)),
                                              request_timeout=METADATA_TIMEOUT_S)
        for topic, future in futures.items():
            try:
                ids[topic] = str(future.result(timeout=METADATA_TIMEOUT_S + 1).topic_id)
            except Exception as e:  # broker away or topic gone for now: no verdict this time
                log.debug("no id for topic %s: %s", topic, e)
                ids[topic] = None
        self._admin.poll(0)  # hands over the admin client's queued log lines and errors
        self._ids = ids
        return ids

    def close(self, autocommit: bool = False) -> None:  # kafka-python's signature; nothing auto-commits here
        """Leave the group and close, or on Tansu with ``leave_group_on_close=False`` free the consumer
        without LeaveGroup (see the module docstring)."""
        consumer, self._consumer = self._consumer, None
        self._admin = None
        if consumer is None:
            return
        if self._leave_group_on_close or not self._on_tansu(consumer):
            consumer.close()
        # else: dropped here; freed without close, librdkafka sends no LeaveGroup

    def _on_tansu(self, consumer: confluent_kafka.Consumer) -> bool:
        try:
            return consumer.list_topics(timeout=METADATA_TIMEOUT_S).cluster_id == TANSU_CLUSTER_ID
        except confluent_kafka.KafkaException:
            return True  # the broker does not answer: a LeaveGroup would not reach it either
