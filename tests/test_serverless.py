"""The functions as AWS Lambda handlers and as a Knative KafkaSource sink, without AWS or Knative.

Lambda events are built in the documented shape (MSK / self-managed Kafka: records grouped
by "topic-partition", base64 key and value, header values as lists of byte integers), the
CloudEvents in the binary mode KafkaSource uses. The real functions are built from env vars
(query and ingest, with an in-process Qdrant); a fake producer stands in for Kafka, so
each test sees exactly what would have been produced and dead-lettered.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.functions import serverless
from lookalike.functions.cloudevents_app import app
from lookalike.shared.embedders import REGISTRY
from lookalike.shared.errors import StoreUnavailable
from lookalike.shared.messages import (
    CATALOG_EVENTS,
    IMAGES_NORMALIZED,
    QUERY_VECTORS,
    SEARCH_NORMALIZED,
    SEARCH_REQUESTS,
    SEARCH_RESULTS,
    Box,
    CatalogDelete,
    ImageRef,
    QueryObject,
    QueryVectors,
    SearchFilters,
    SearchRequest,
    dlq_topic,
    point_id,
)
from lookalike.shared.stores import PointRecord
from tests.fakes import FakeProducer, Log

MODEL = "efficientnet_lite0"  # no weights are loaded: query and ingest only need its id and size
DIM = REGISTRY[MODEL].dim
EVENT_BOOTSTRAP = "127.0.0.1:19092,127.0.0.1:19093"


@pytest.fixture
def kafka(monkeypatch, tmp_path):
    """A cold container for one function (set LOOKALIKE_FUNCTION), producing into an in-memory log."""
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "QDRANT_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    env = {"LOOKALIKE_FUNCTION": "query", "QDRANT_URL": ":memory:", "EMBED_MODEL": MODEL,
           "DETECT_WEIGHTS": "none", "LOOKALIKE_DATA_DIR": str(tmp_path), "MAX_ATTEMPTS": "3",
           "BACKOFF_MAX_S": "0", "ALLOW_PRIVATE_URLS": "true", "URL_TIMEOUT_S": "5"}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(serverless, "_warm", None)
    log = Log()
    producers_for: list[str] = []

    def make_producer(bootstrap_servers, client_id="lookalike"):
        producers_for.append(bootstrap_servers)
        return FakeProducer(log)

    monkeypatch.setattr(serverless, "make_producer", make_producer)
    return SimpleNamespace(log=log, producers_for=producers_for)


def lambda_event(*records: dict) -> dict:
    """An MSK event source mapping's event holding ``records``."""
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(f"{record['topic']}-{record['partition']}", []).append(record)
    return {"eventSource": "aws:kafka", "bootstrapServers": EVENT_BOOTSTRAP, "records": grouped,
            "eventSourceArn": "arn:aws:kafka:eu-west-1:123456789012:cluster/lookalike/abc"}


def lambda_record(topic: str, value: bytes | None, key: bytes | None = None, partition: int = 0, offset: int = 0,
                  headers: list[tuple[str, list[int]]] = ()) -> dict:
    """One record of such an event; a key or value of None is left out (a key-less record, a tombstone)."""
    record = {"topic": topic, "partition": partition, "offset": offset, "timestamp": 1767225600000,
              "timestampType": "CREATE_TIME", "headers": [{name: ints} for name, ints in headers]}
    for field, raw in (("key", key), ("value", value)):
        if raw is not None:
            record[field] = base64.b64encode(raw).decode()
    return record


def vectors(request_id: str, vector: list[float]) -> QueryVectors:
    return QueryVectors(request_id=request_id, model=MODEL, top_k=3, filters=SearchFilters(),
                        objects=[QueryObject(box=Box(x1=0, y1=0, x2=10, y2=10), label="image", score=1.0,
                                             vector=vector)])


def unit(i: int) -> list[float]:
    v = [0.0] * DIM
    v[i] = 1.0
    return v


def index_product(product_id: str, vector: list[float]) -> None:
    """One stored point for the query function of this container."""
    query = serverless.warm_function(EVENT_BOOTSTRAP).function
    payload = {"product_id": product_id, "title": f"product {product_id}", "image_id": "i1",
               "offers": [{"shop": "a", "price": 9.5}]}
    query.store.upsert(query.indexes.active_collection(), [PointRecord(point_id(product_id, "i1", 0), vector, payload)])


def photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def failing_image_host():
    """An image URL on 127.0.0.1 that answers 503 (the host is down for now); counts the requests."""

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):
            server.hits += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    server.hits = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_port}/photo.jpg"
    yield server
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- AWS Lambda


def test_results_go_to_the_route_topic_keyed_by_request(kafka):
    # GIVEN a query function with one product indexed
    index_product("p1", unit(0))
    # WHEN a batch of two query vectors in two partitions arrives
    event = lambda_event(
        lambda_record(QUERY_VECTORS, vectors("r1", unit(0)).to_bytes(), key=b"r1", partition=0, offset=5),
        lambda_record(QUERY_VECTORS, vectors("r2", unit(0)).to_bytes(), key=b"r2", partition=1, offset=9),
    )
    summary = serverless.lambda_handler(event, None)
    # THEN each search's result is on search.results, keyed by its request, naming the product
    results = kafka.log.read(SEARCH_RESULTS)
    assert [r.key for r in results] == [b"r1", b"r2"]
    assert json.loads(results[0].value)["objects"][0]["products"][0]["product_id"] == "p1"
    assert summary == {"function": "query", "records": 2, "produced": 2, "dead_lettered": 0}
    # AND a second invocation reuses the warm container's function and producer, made for the event's brokers
    serverless.lambda_handler(event, None)
    assert kafka.producers_for == [EVENT_BOOTSTRAP]
    assert len(kafka.log.read(SEARCH_RESULTS)) == 4


def test_kafka_bootstrap_servers_setting_wins_over_the_event(kafka, monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:29092")
    serverless.lambda_handler(lambda_event(lambda_record(QUERY_VECTORS, vectors("r1", unit(0)).to_bytes())), None)
    assert kafka.producers_for == ["127.0.0.1:29092"]


def test_poison_is_dead_lettered_with_its_reason_and_the_invocation_succeeds(kafka):
    # GIVEN a batch with bad JSON (carrying a header with a byte Java sends as negative),
    # bytes that are not even UTF-8, a record without a value, and a good record
    event = lambda_event(
        lambda_record(QUERY_VECTORS, b'{"request_id": ', key=b"bad", offset=7, headers=[("trace", [-61, -87, 65])]),
        lambda_record(QUERY_VECTORS, b"\xff\xfe\x00", key=b"binary", offset=8),
        lambda_record(QUERY_VECTORS, None, key=b"empty", offset=9),
        lambda_record(QUERY_VECTORS, vectors("good", unit(1)).to_bytes(), key=b"good", offset=10),
    )
    # WHEN the function gets it
    summary = serverless.lambda_handler(event, None)
    # THEN the bad records are in query.vectors.dlq byte for byte, with the reason in headers
    dlq = {r.key: r for r in kafka.log.read(dlq_topic(QUERY_VECTORS))}
    assert set(dlq) == {b"bad", b"binary", b"empty"}
    assert dlq[b"bad"].value == b'{"request_id": ' and dlq[b"binary"].value == b"\xff\xfe\x00"
    assert dlq[b"empty"].value is None and dict(dlq[b"empty"].headers)["dlq.reason"] == b"empty message value"
    headers = dict(dlq[b"bad"].headers)
    assert headers["trace"] == b"\xc3\xa9A"  # the original header, its signed bytes read as unsigned
    assert headers["dlq.reason"].startswith(b"bad JSON")
    assert headers["dlq.function"] == b"query"
    assert headers["dlq.source"] == b"query.vectors[0]@7"
    # AND the good record went on, and the invocation succeeded (the mapping commits the batch)
    assert [r.key for r in kafka.log.read(SEARCH_RESULTS)] == [b"good"]
    assert summary["dead_lettered"] == 3 and summary["produced"] == 1


def test_store_outage_fails_the_invocation_and_dead_letters_nothing(kafka, monkeypatch):
    # GIVEN a store that is down
    query = serverless.warm_function(EVENT_BOOTSTRAP).function
    up = query.store.search

    def down(*args, **kwargs):
        raise StoreUnavailable("qdrant did not answer")

    monkeypatch.setattr(query.store, "search", down)
    event = lambda_event(lambda_record(QUERY_VECTORS, vectors("r1", unit(0)).to_bytes(), key=b"r1", offset=3),
                         lambda_record(QUERY_VECTORS, b"not json", key=b"poison", offset=4))
    # WHEN a batch arrives, THEN the invocation fails so the mapping retries it
    with pytest.raises(StoreUnavailable):
        serverless.lambda_handler(event, None)
    # AND nothing was produced, not even the poison record's dead letter (the batch comes again whole)
    assert kafka.log.appended == []
    # WHEN the store is back, THEN the redelivered batch goes through
    monkeypatch.setattr(query.store, "search", up)
    assert serverless.lambda_handler(event, None)["dead_lettered"] == 1
    assert [r.key for r in kafka.log.read(SEARCH_RESULTS)] == [b"r1"]


def test_unavailable_image_fails_the_invocation_until_the_cap_then_dead_letters(kafka, monkeypatch,
                                                                                failing_image_host):
    # GIVEN the ingest function and a search whose photo URL answers 503
    monkeypatch.setenv("LOOKALIKE_FUNCTION", "ingest")
    request = SearchRequest(request_id="r1", image=ImageRef(url=failing_image_host.url))
    event = lambda_event(lambda_record(SEARCH_REQUESTS, request.to_bytes(), key=b"r1", partition=2, offset=11))
    # WHEN the mapping delivers it, THEN the first MAX_ATTEMPTS - 1 invocations fail, producing nothing
    for _ in range(2):
        with pytest.raises(serverless.RetryLater, match=r"search.requests\[2\]@11"):
            serverless.lambda_handler(event, None)
        assert kafka.log.appended == []
    # AND the third dead-letters it with the reason and succeeds, so its partition moves on
    summary = serverless.lambda_handler(event, None)
    assert summary["dead_lettered"] == 1
    (dead,) = kafka.log.read(dlq_topic(SEARCH_REQUESTS))
    reason = dict(dead.headers)["dlq.reason"]
    assert reason.startswith(b"source unavailable after 3 attempts") and b"503" in reason
    assert dead.key == b"r1" and dead.value == request.to_bytes()
    assert failing_image_host.hits == 3


def test_attempts_are_counted_per_container(kafka, monkeypatch, failing_image_host):
    # GIVEN a record that failed twice in one container
    monkeypatch.setenv("LOOKALIKE_FUNCTION", "ingest")
    request = SearchRequest(image=ImageRef(url=failing_image_host.url))
    event = lambda_event(lambda_record(SEARCH_REQUESTS, request.to_bytes(), offset=4))
    for _ in range(2):
        with pytest.raises(serverless.RetryLater):
            serverless.lambda_handler(event, None)
    # WHEN the next delivery lands in a cold container, THEN its count starts again: no dead letter yet
    monkeypatch.setattr(serverless, "_warm", None)
    with pytest.raises(serverless.RetryLater):
        serverless.lambda_handler(event, None)
    assert kafka.log.appended == []


def test_ingest_routes_each_record_to_its_lane(kafka, monkeypatch):
    # GIVEN the ingest function, whose catalogue events and shoppers' searches are separate lanes
    monkeypatch.setenv("LOOKALIKE_FUNCTION", "ingest")
    search = SearchRequest(request_id="r1", image=ImageRef(data=base64.b64encode(photo()).decode()))
    event = lambda_event(
        lambda_record(CATALOG_EVENTS, CatalogDelete(product_id="p1").to_bytes(), key=b"p1"),
        lambda_record(SEARCH_REQUESTS, search.to_bytes(), key=b"r1"),
    )
    # WHEN one event holds a record of each
    summary = serverless.lambda_handler(event, None)
    # THEN both were handled, each by its own route
    out = {r.key: json.loads(r.value) for r in kafka.log.read(IMAGES_NORMALIZED)}
    assert out[b"p1"]["intent"] == "sync" and out[b"p1"]["outcome"] == "deleted"
    (query,) = [json.loads(r.value) for r in kafka.log.read(SEARCH_NORMALIZED)]
    assert query["intent"] == "query" and query["query"]["request_id"] == "r1"
    assert summary == {"function": "ingest", "records": 2, "produced": 2, "dead_lettered": 0}
    assert set(serverless.warm_function().runners) == {"", "search"}


def test_a_topic_the_function_does_not_read_fails_the_invocation(kafka):
    event = lambda_event(lambda_record(CATALOG_EVENTS, CatalogDelete(product_id="p1").to_bytes()),
                         lambda_record(QUERY_VECTORS, vectors("r1", unit(0)).to_bytes()))
    with pytest.raises(serverless.UnknownTopic, match="catalog.events"):
        serverless.lambda_handler(event, None)
    assert kafka.log.appended == []


def test_a_function_needing_the_store_refuses_to_run_without_qdrant_url(kafka, monkeypatch):
    monkeypatch.delenv("QDRANT_URL")
    with pytest.raises(ValueError, match="QDRANT_URL"):
        serverless.lambda_handler(lambda_event(lambda_record(QUERY_VECTORS, b"{}")), None)


# ----------------------------------------------------------------------------- Knative KafkaSource


def cloud_event(topic: str, value: bytes, key: str | None = None, partition: int = 0, offset: int = 0) -> dict:
    """What a KafkaSource POSTs for one record (binary mode): CloudEvent attributes in ce-* headers."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": f"partition:{partition}/offset:{offset}",
        "ce-source": f"/apis/v1/namespaces/shop/kafkasources/lookalike-query#{topic}",
        "ce-type": "dev.knative.kafka.event",
        "ce-subject": f"partition:{partition}#{offset}",
        "ce-time": "2026-01-01T00:00:00Z",
        "content-type": "application/json",
    }
    if key is not None:
        headers["ce-key"] = key
    return {"headers": headers, "content": value}


@pytest.fixture
def http(kafka, monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:29092")  # a CloudEvent names no brokers
    return TestClient(app)


def test_knative_record_is_produced_and_answered_2xx(kafka, http):
    index_product("p1", unit(0))
    response = http.post("/", **cloud_event(QUERY_VECTORS, vectors("r1", unit(0)).to_bytes(), key="r1"))
    assert response.status_code == 204
    (result,) = kafka.log.read(SEARCH_RESULTS)
    assert result.key == b"r1" and json.loads(result.value)["objects"][0]["products"][0]["product_id"] == "p1"


def test_knative_poison_is_dead_lettered_and_answered_2xx(kafka, http):
    response = http.post("/", **cloud_event(QUERY_VECTORS, b"{oops", key="k1", partition=2, offset=41))
    assert response.status_code == 204
    (dead,) = kafka.log.read(dlq_topic(QUERY_VECTORS))
    headers = dict(dead.headers)
    assert dead.key == b"k1" and dead.value == b"{oops"
    assert headers["dlq.reason"].startswith(b"bad JSON") and headers["dlq.source"] == b"query.vectors[2]@41"


def test_knative_store_outage_answers_503_and_produces_nothing(kafka, http, monkeypatch):
    query = serverless.warm_function(EVENT_BOOTSTRAP).function

    def down(*args, **kwargs):
        raise StoreUnavailable("qdrant did not answer")

    monkeypatch.setattr(query.store, "search", down)
    response = http.post("/", **cloud_event(QUERY_VECTORS, vectors("r1", unit(0)).to_bytes(), key="r1"))
    assert response.status_code == 503 and "StoreUnavailable" in response.text
    assert kafka.log.appended == []


def test_knative_unavailable_image_answers_503_until_the_cap(kafka, http, monkeypatch, failing_image_host):
    monkeypatch.setenv("LOOKALIKE_FUNCTION", "ingest")
    request = cloud_event(SEARCH_REQUESTS, SearchRequest(image=ImageRef(url=failing_image_host.url)).to_bytes(),
                          offset=3)
    for _ in range(2):
        response = http.post("/", **request)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert kafka.log.appended == []
    assert http.post("/", **request).status_code == 204
    (dead,) = kafka.log.read(dlq_topic(SEARCH_REQUESTS))
    assert dict(dead.headers)["dlq.reason"].startswith(b"source unavailable after 3 attempts")


@pytest.mark.parametrize("change", [
    {"ce-specversion": None},  # not a CloudEvent
    {"ce-source": "/apis/v1/namespaces/shop/pingsources/tick"},  # no topic
    {"ce-subject": None, "ce-id": "a1b2"},  # no partition and offset
    {"ce-source": f"/apis/v1/namespaces/shop/kafkasources/s#{CATALOG_EVENTS}"},  # a topic query does not read
])
def test_knative_requests_that_are_no_record_of_ours_are_refused(kafka, http, change):
    request = cloud_event(QUERY_VECTORS, vectors("r1", unit(0)).to_bytes(), key="r1")
    for name, value in change.items():
        if value is None:
            del request["headers"][name]
        else:
            request["headers"][name] = value
    assert http.post("/", **request).status_code == 400
    assert kafka.log.appended == []
