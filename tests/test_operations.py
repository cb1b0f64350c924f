"""What an operator relies on: secured-cluster settings reach every Kafka client, secrets stay
out of sight, a trace id follows each event through the topics, and the metrics count it."""

from __future__ import annotations

import ast
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from lookalike.shared import bus, lane_consumer, metrics
from lookalike.shared.bus import ClientCredentialsTokens, ensure_topics, kafka_options
from lookalike.shared.config import Settings
from lookalike.shared.logs import JsonFormatter, TextFormatter, add_trace_ids
from lookalike.shared.messages import CatalogDelete, dlq_topic
from lookalike.shared.runtime import Emit, Function, Route, Runner
from lookalike.shared.tracing import TRACEPARENT, origin_headers, setup_tracing, start_span, trace_id

ROOT = Path(__file__).resolve().parents[1]
SASL_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "svc-lookalike",
    "KAFKA_SASL_PASSWORD": "s3cret-kafka-pw",
    "KAFKA_SSL_CAFILE": "/etc/ssl/cluster-ca.pem",
}


class Recorder:
    """Stands in for a kafka-python client class: records the configuration it was given."""

    made: list[tuple[str, dict]] = []

    def __init__(self, *topics, **config):
        Recorder.made.append((type(self).__name__, config))

    def __getattr__(self, name):  # whatever the caller does next with the client
        return lambda *a, **k: {}


class RdRecorder(Recorder):
    """Stands in for a confluent-kafka (librdkafka) client class, which takes one configuration dict."""

    def __init__(self, config: dict):
        Recorder.made.append((type(self).__name__, config))


def test_security_settings_reach_every_kafka_client_the_library_makes(monkeypatch):
    # GIVEN a SASL_SSL cluster configured through the environment
    for k, v in SASL_ENV.items():
        monkeypatch.setenv(k, v)
    Recorder.made = []
    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
        monkeypatch.setattr(bus, name, type(name, (Recorder,), {}))
    monkeypatch.setattr(bus, "topic_partitions", lambda consumer, topic, timeout_s=30.0: [])
    # WHEN the producer, consumers, admin client and offset reader are made
    bus.make_producer("broker:9096")
    bus.make_consumer("broker:9096", "lookalike-embed", ["images.detected"])
    bus.tail_consumer("broker:9096", ["search.results"], "cli")
    bus.ensure_topics("broker:9096", 4, ["t"])
    bus.OffsetReader("broker:9096").lag("lookalike-embed", ["images.detected"])
    # THEN every one of them got the same TLS and SASL options
    assert {kind for kind, _ in Recorder.made} == {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient"}
    assert len(Recorder.made) == 6  # the offset reader keeps a group-less consumer beside the group's
    for kind, config in Recorder.made:
        assert config["security_protocol"] == "SASL_SSL", kind
        assert config["sasl_mechanism"] == "SCRAM-SHA-512"
        assert config["sasl_plain_username"] == "svc-lookalike"
        assert config["sasl_plain_password"] == "s3cret-kafka-pw"
        assert config["ssl_cafile"] == "/etc/ssl/cluster-ca.pem"
    # AND the function lanes' librdkafka consumer got them under librdkafka's names
    Recorder.made = []
    monkeypatch.setattr(lane_consumer.confluent_kafka, "Consumer", type("Consumer", (RdRecorder,), {}))
    lane_consumer.RdKafkaLaneConsumer("broker:9096", "lookalike-embed", ["images.detected"])
    [(_, config)] = Recorder.made
    assert {k: config[k] for k in ("security.protocol", "sasl.mechanism", "sasl.username", "sasl.password",
                                   "ssl.ca.location")} == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "svc-lookalike",
        "sasl.password": "s3cret-kafka-pw", "ssl.ca.location": "/etc/ssl/cluster-ca.pem"}


def test_the_fetch_wait_setting_reaches_every_function_lanes_consumer(monkeypatch, tmp_path):
    """FETCH_MAX_WAIT_MS: how long the broker may hold a lane's empty fetch (on the embedded Tansu
    each hop's pickup time and the idle lanes' CPU; on Kafka only how often an idle lane asks)."""
    import pydantic

    from lookalike.shared.messages import QUERY_VECTORS, QueryVectors
    from tests.conftest import make_settings

    class Listens(Function):
        name = "listens"

        def routes(self) -> list[Route]:
            return [Route(QUERY_VECTORS, QueryVectors, lambda msg: [])]

    Recorder.made = []
    monkeypatch.setattr(bus, "KafkaConsumer", type("KafkaConsumer", (Recorder,), {}))
    monkeypatch.setattr(lane_consumer.confluent_kafka, "Consumer", type("Consumer", (RdRecorder,), {}))
    # GIVEN a wait other than the default (Kafka's manifests set 500), for either client of the lanes
    for client in ("librdkafka", "kafka-python"):
        settings = make_settings(tmp_path, fetch_max_wait_ms=500, kafka_consumer=client)
        # WHEN a function lane opens its consumer
        Runner.from_settings(Listens(), settings, "broker:9096")._consumer_factory()
    # THEN the consumer asks the broker to hold empty fetches that long
    assert [(kind, config.get("fetch.wait.max.ms", config.get("fetch_max_wait_ms"))) for kind, config in
            Recorder.made] == [("Consumer", 500), ("KafkaConsumer", 500)]
    # AND a wait of 0 (Tansu would answer every fetch at once: a busy loop) or one that reaches
    # kafka-python's request timeout (30 s: every consumer would be refused) is not accepted
    for wait in (0, 30000):
        with pytest.raises(pydantic.ValidationError, match="fetch_max_wait_ms"):
            Settings(fetch_max_wait_ms=wait)


def test_every_kafka_client_in_the_code_takes_the_security_options():
    # A new KafkaConsumer(...) somewhere that forgets **kafka_options() would connect in plaintext.
    missing = []
    for folder in ("shared", "functions", "gateway", "lookalike"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                        "KafkaConsumer", "KafkaProducer", "KafkaAdminClient"):
                    spread = [k.value for k in node.keywords if k.arg is None]
                    if not any(isinstance(v, ast.Call) and getattr(v.func, "id", "") == "kafka_options"
                               for v in spread):
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                # librdkafka's clients take one dict: it must start from rdkafka_options (consumer_config does)
                elif isinstance(node, ast.Call) and (getattr(node.func, "attr", None) or getattr(
                        node.func, "id", None)) in ("Consumer", "Producer", "AdminClient"):
                    source = ast.get_source_segment(path.read_text(), node) or ""
                    if "rdkafka_options(" not in source and "consumer_config(" not in source:
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert missing == []


@pytest.mark.parametrize("env, message", [
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL must be one of"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs KAFKA_SASL_MECHANISM"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN"}, "needs KAFKA_SASL_USERNAME"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "OAUTHBEARER"}, "KAFKA_SASL_OAUTH_TOKEN_URL"),
])
def test_incomplete_security_settings_are_refused_with_what_is_missing(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        kafka_options()


def test_msk_iam_and_plaintext_need_no_secrets(monkeypatch):
    assert kafka_options() == {}  # the embedded broker
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "AWS_MSK_IAM")
    assert kafka_options() == {"security_protocol": "SASL_SSL", "sasl_mechanism": "AWS_MSK_IAM"}


def test_secrets_never_show_in_settings_or_token_providers(monkeypatch):
    secrets = {"KAFKA_SASL_PASSWORD": "kafka-pw-123", "QDRANT_API_KEY": "qdrant-key-456",
               "KAFKA_SASL_OAUTH_CLIENT_SECRET": "oauth-secret-789", "GATEWAY_API_KEYS": "gw-key-1,gw-key-2",
               "KAFKA_SSL_PASSWORD": "key-pw-000"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    provider = ClientCredentialsTokens("https://idp.example/token", "client", "oauth-secret-789")
    shown += repr(provider) + str(provider)
    for value in secrets.values():
        for part in value.split(","):
            assert part not in shown
    assert settings.qdrant_api_key.get_secret_value() == "qdrant-key-456"  # still usable where it is needed


def test_oauthbearer_tokens_come_from_the_token_endpoint_and_are_reused():
    # GIVEN an OAuth token endpoint on loopback that counts its calls
    calls = []

    class TokenEndpoint(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            calls.append((self.headers["Authorization"], body))
            answer = json.dumps({"access_token": f"token-{len(calls)}", "expires_in": 3600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/oauth2/token"
        provider = ClientCredentialsTokens(url, "lookalike", "client-secret", scope="kafka")
        # WHEN the Kafka client asks for a token twice
        first, second = provider.token(), provider.token()
    finally:
        server.shutdown()
    # THEN one client-credentials request was made (HTTP basic auth) and its token reused
    assert first == second == "token-1"
    assert len(calls) == 1
    auth, body = calls[0]
    assert auth.startswith("Basic ") and "grant_type=client_credentials" in body and "scope=kafka" in body


class Echo(Function):
    """Forwards delete events to ``out``; a product id of 'bad' is poison."""

    name = "echo"

    def __init__(self, source: str, out: str):
        super().__init__()
        self.source, self.out = source, out

    def routes(self):
        return [Route(self.source, CatalogDelete, self.handle)]

    def handle(self, msg: CatalogDelete):
        logging.getLogger("lookalike.test").warning("handling %s", msg.product_id)
        if msg.product_id == "bad":
            from lookalike.shared.errors import PoisonMessage

            raise PoisonMessage("bad product")
        return [Emit(self.out, msg)]


def _read(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list:
    consumer = bus.KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                                 **kafka_options())
    consumer.assign(bus.topic_partitions(consumer, topic))
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for records in consumer.poll(200).values():
            out.extend(records)
    consumer.close()
    return out


def _sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.e2e
def test_a_trace_follows_an_event_through_a_function_and_the_metrics_count_it(kafka_bootstrap, caplog):
    setup_tracing()
    add_trace_ids()
    base = f"ops{uuid.uuid4().hex[:8]}"
    source, out = f"{base}.in", f"{base}.out"
    ensure_topics(kafka_bootstrap, 2, [source, dlq_topic(source), out])
    runner = Runner(Echo(source, out), kafka_bootstrap, poll_timeout_ms=100)
    runner.group_id = f"g-{base}"
    handled_before = _sample("lookalike_records_total", function="echo", topic=source, outcome="handled")
    # GIVEN one event that starts a trace (as `lookalike index` does) and one from a producer without tracing
    traced = origin_headers("test publish")
    producer = bus.make_producer(kafka_bootstrap)
    producer.send(source, key=b"p1", value=CatalogDelete(product_id="p1").to_bytes(), headers=traced)
    producer.send(source, key=b"p2", value=CatalogDelete(product_id="p2").to_bytes())
    producer.send(source, key=b"bad", value=CatalogDelete(product_id="bad").to_bytes(), headers=traced)
    producer.flush()
    producer.close()
    # WHEN the function handles them
    thread = threading.Thread(target=runner.run, daemon=True)
    with caplog.at_level(logging.WARNING, logger="lookalike"):
        thread.start()
        outputs = {r.key: dict(r.headers) for r in _read(kafka_bootstrap, out, 2)}
        dead = {r.key: dict(r.headers) for r in _read(kafka_bootstrap, dlq_topic(source), 1)}
        runner.stop()
        thread.join(30)
    # THEN the output continues the event's trace (same trace id, a new span), an untraced event
    # gets a trace of its own, and the dead letter keeps the trace it came with
    sent_trace = dict(traced)[TRACEPARENT].decode().split("-")
    p1 = outputs[b"p1"][TRACEPARENT].decode().split("-")
    assert p1[1] == sent_trace[1] and p1[2] != sent_trace[2]
    p2 = outputs[b"p2"][TRACEPARENT].decode().split("-")
    assert len(p2[1]) == 32 and int(p2[1], 16) != 0 and p2[1] != sent_trace[1]
    assert dead[b"bad"][TRACEPARENT] == dict(traced)[TRACEPARENT]
    # ... the handler's log lines carry the trace id of the record being handled
    assert any(r.getMessage() == "handling p1" and getattr(r, "trace_id", "") == sent_trace[1]
               for r in caplog.records)
    assert any("dead-lettered" in r.getMessage() and r.trace_id == sent_trace[1] for r in caplog.records)
    # ... and the metrics count each outcome
    assert _sample("lookalike_records_total", function="echo", topic=source, outcome="handled") == handled_before + 2
    assert _sample("lookalike_records_total", function="echo", topic=source, outcome="dead_lettered") == 1
    assert _sample("lookalike_end_to_end_seconds_count", function="echo", topic=source) == 3
    assert _sample("lookalike_batch_size_count", function="echo") >= 1


class FakeOffsets:
    """The broker's view for the gauges: lag and dead letters per topic; counts its reads."""

    def __init__(self):
        self.reads = 0

    def lag(self, group, topics):
        self.reads += 1
        return {t: 7 for t in topics}

    def sizes(self, topics):
        return {t: 2 for t in topics}


class FakeSupervisor:
    def __init__(self, name, group, topics, ok):
        self.runner = type("R", (), {"name": name, "group_id": group, "routes": {t: None for t in topics}})()
        self.ok = ok

    def health(self):
        return {"ok": self.ok}


def test_metrics_endpoint_serves_prometheus_text_with_fresh_gauges_and_health_turns_503():
    healthy = {"ok": True}
    offsets = FakeOffsets()
    refresh = metrics.GaugeRefresher([FakeSupervisor("detect", "lookalike-detect", ["images.normalized"], ok=False)],
                                     offsets)
    server = metrics.serve(0, lambda: (healthy["ok"], {"embed": {"ok": healthy["ok"]}}), refresh=refresh,
                           host="127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        metrics.RECORDS.labels("embed", "images.detected", "handled").inc(0)
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            text = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain")
        assert 'lookalike_records_total{function="embed",outcome="handled",topic="images.detected"}' in text
        assert 'lookalike_consumer_lag{group="lookalike-detect",topic="images.normalized"} 7.0' in text
        assert 'lookalike_dlq_records{topic="images.normalized.dlq"} 2.0' in text
        assert 'lookalike_function_up{function="detect"} 0.0' in text
        urllib.request.urlopen(f"{base}/metrics", timeout=5).read()
        assert offsets.reads == 1  # a second scrape within REFRESH_EVERY_S does not load the broker again
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["embed"]["ok"] is True
        healthy["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert failed.value.code == 503
    finally:
        server.shutdown()


def test_log_lines_carry_the_trace_id_as_text_and_as_json():
    from opentelemetry import trace

    setup_tracing()
    add_trace_ids()
    span = start_span("search")
    with trace.use_span(span, end_on_exit=True):
        # made as a logger makes it: through the record factory
        record = logging.getLogRecordFactory()("lookalike.query", logging.WARNING, __file__, 1,
                                               "slow search %d ms", (250,), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "slow search 250 ms" and line["level"] == "WARNING"
    assert line["trace_id"] == trace_id(span) and len(line["trace_id"]) == 32
    assert TextFormatter().format(record).endswith(f"slow search 250 ms trace={trace_id(span)}")
    # outside any record's handling there is no trace id, and the line says nothing about one
    quiet = logging.getLogRecordFactory()("lookalike", logging.INFO, __file__, 1, "started", (), None)
    assert "trace_id" not in json.loads(JsonFormatter().format(quiet))
    assert "trace=" not in TextFormatter().format(quiet)


def test_collections_on_a_qdrant_cluster_get_the_configured_shards_replicas_and_quantization(monkeypatch):
    from lookalike.shared.stores import CollectionSpec, open_store

    monkeypatch.setenv("QDRANT_SHARDS", "6")
    monkeypatch.setenv("QDRANT_REPLICATION_FACTOR", "2")
    monkeypatch.setenv("QDRANT_QUANTIZATION", "int8")
    store = open_store(":memory:", Path("unused"), **Settings().qdrant_options())
    created = []
    real_create = store._client.create_collection
    monkeypatch.setattr(store._client, "create_collection", lambda name, **kw: created.append(kw) or real_create(
        name, vectors_config=kw["vectors_config"]))
    store.ensure_collection(CollectionSpec("products", 8, "cosine"))
    (layout,) = created
    assert layout["shard_number"] == 6 and layout["replication_factor"] == 2
    assert layout["write_consistency_factor"] == 2
    assert layout["vectors_config"].on_disk is True  # float vectors on disk, the int8 copy in RAM rescored from them
    assert layout["quantization_config"].scalar.always_ram is True
    monkeypatch.setenv("QDRANT_QUANTIZATION", "fp8")
    with pytest.raises(ValueError, match="QDRANT_QUANTIZATION must be one of"):
        open_store(":memory:", Path("unused"), **Settings().qdrant_options())
