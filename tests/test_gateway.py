"""The HTTP gateway against the real pipeline: search, box search, filters, recommend, products, health, limits."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from PIL import Image

from tests.conftest import make_settings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    from lookalike.sample_catalog import generate

    return generate(tmp_path_factory.mktemp("gateway-sample"), n_products=6, photos_per_product=3, seed=1)


@pytest.fixture(scope="module")
def indexed(stack, client, catalog):
    from lookalike.client import read_catalog
    from lookalike.shared.messages import CATALOG_EVENTS

    events = read_catalog(catalog.catalog_path)
    client.publish(CATALOG_EVENTS, events)
    client.wait_indexed(300)
    return {e.product_id: e for e in events}


@pytest.fixture(scope="module")
def api(stack, indexed):
    from fastapi.testclient import TestClient

    from lookalike.gateway.app import create_app

    app = create_app(stack.bootstrap_servers, stack.resources.store, stack.resources.indexes, stack.settings)
    with TestClient(app) as http:  # runs the lifespan: the results listener starts
        yield http


@pytest.fixture(scope="module")
def limited(stack):
    """An app with small limits; requests refused by validation never reach Kafka."""
    from fastapi.testclient import TestClient

    from lookalike.gateway.app import create_app

    settings = make_settings(stack.settings.data_dir, max_image_bytes=50_000, max_image_pixels=1_000_000)
    return TestClient(create_app(stack.bootstrap_servers, stack.resources.store, stack.resources.indexes, settings))


def _jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _search(http, photo: bytes, **form):
    data = {k: (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in form.items()}
    return http.post("/api/search", files={"photo": ("photo.jpg", photo, "image/jpeg")}, data=data)


def test_search_finds_the_product_and_serves_its_thumbnail(api, catalog):
    # GIVEN a new photo of an indexed product
    photo, product_id = catalog.queries[0]
    raw = photo.read_bytes()
    # WHEN a shopper uploads it
    response = _search(api, raw, top_k=3)
    # THEN the product comes first, with its best offer, and the photo's size for drawing boxes
    assert response.status_code == 200, response.text
    body = response.json()
    width, height = Image.open(photo).size
    assert body["image"] == {"width": width, "height": height, "scale": 1.0}
    whole = body["objects"][-1]
    assert whole["label"] == "image" and whole["box"] == {"x1": 0, "y1": 0, "x2": width, "y2": height}
    top = whole["products"][0]
    assert top["product_id"] == product_id and top["best_offer"]["price"] > 0 and len(top["offers"]) >= 3
    # AND its thumbnail URL serves a JPEG
    assert top["thumbnail_url"] == f"/api/products/{product_id}/images/{top['image_id']}.jpg"
    thumb = api.get(top["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 160


def test_results_show_what_matched_and_how_fresh_the_catalogue_is(api, catalog):
    photo, product_id = catalog.queries[0]
    started = time.time()
    body = _search(api, photo.read_bytes(), top_k=3).json()
    top = body["objects"][-1]["products"][0]
    # THEN the match names its box in the stored photo (detection is off: the whole photo), which
    # the page draws over the thumbnail of the same proportions
    width, height = top["image_size"]
    assert top["matched_box"] == {"x1": 0, "y1": 0, "x2": width, "y2": height} and top["matched_label"] == "image"
    thumb = Image.open(io.BytesIO(api.get(top["thumbnail_url"]).content))
    assert abs(thumb.width / thumb.height - width / height) < 0.02
    # AND each product says when its catalogue event was applied, the response when the last one was
    assert top["applied_at"] < started
    assert body["catalogue_as_of"] >= top["applied_at"] and body["catalogue_as_of"] < started
    assert api.get("/healthz").json()["catalogue_as_of"] == body["catalogue_as_of"]


def test_a_search_is_one_trace_from_the_gateway_through_every_function(api, catalog, stack):
    from kafka import KafkaConsumer

    from lookalike.shared.bus import topic_partitions
    from lookalike.shared.messages import SEARCH_RESULTS

    # WHEN a shopper searches
    photo, _ = catalog.queries[0]
    response = _search(api, photo.read_bytes(), top_k=1)
    assert response.status_code == 200, response.text
    trace_id = response.json()["trace_id"]
    # THEN the answer the query function published (after ingest, detect and embed) continues the
    # trace the gateway started, and the response names it
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap_servers, enable_auto_commit=False)
    consumer.assign(topic_partitions(consumer, SEARCH_RESULTS))
    consumer.seek_to_beginning()
    traces, deadline = set(), time.monotonic() + 30
    while trace_id not in traces and time.monotonic() < deadline:
        for records in consumer.poll(500).values():
            traces |= {dict(r.headers).get("traceparent", b"").decode().split("-")[1:2][0]
                       for r in records if dict(r.headers).get("traceparent")}
    consumer.close()
    assert len(trace_id) == 32 and trace_id in traces


def test_box_search_uses_photo_pixels_even_when_the_pipeline_scales_the_photo(api, catalog):
    # GIVEN a photo larger than IMAGE_MAX_SIDE (three times the sample photo; the pipeline works at 640 px)
    photo, product_id = catalog.queries[1]
    small = Image.open(photo).convert("RGB")
    big = small.resize((small.width * 3, small.height * 3))
    box = (big.width * 0.1, big.height * 0.1, big.width * 0.9, big.height * 0.9)
    # WHEN the shopper searches only a region of it, in pixels of their photo
    response = _search(api, _jpeg(big), box=",".join(f"{v:.1f}" for v in box))
    # THEN that one region is searched and its box comes back in the same pixels
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"]["width"] == big.width and body["image"]["scale"] == pytest.approx(640 / max(big.size))
    assert len(body["objects"]) == 1
    got = body["objects"][0]["box"]
    assert [got["x1"], got["y1"], got["x2"], got["y2"]] == pytest.approx(box, abs=2)
    assert body["objects"][0]["products"][0]["product_id"] == product_id


def test_filters_apply_inside_the_search(api, catalog, indexed):
    photo, product_id = catalog.queries[0]
    other = sorted({e.category for e in indexed.values()} - {indexed[product_id].category})[0]
    # WHEN the shopper filters on another category than the photographed product's
    response = _search(api, photo.read_bytes(), filters={"categories": [other]})
    # THEN only products of that category come back
    assert response.status_code == 200, response.text
    products = response.json()["objects"][-1]["products"]
    assert products and all(p["category"] == other for p in products)
    assert product_id not in {p["product_id"] for p in products}
    # AND a price ceiling below every offer leaves nothing
    response = _search(api, photo.read_bytes(), filters={"price_max": 0.01})
    assert response.status_code == 200 and response.json()["objects"][-1]["products"] == []


def test_recommend_more_like_this(api, indexed):
    product_id = sorted(indexed)[0]
    # WHEN a shopper asks for more like a product
    response = api.post("/api/recommend", json={"positive": [product_id], "top_k": 3})
    # THEN other products come back, with thumbnails, the given one excluded
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "recommend"
    products = body["objects"][0]["products"]
    assert products and product_id not in {p["product_id"] for p in products}
    assert all(p["thumbnail_url"] for p in products)
    # AND an unknown product is a clear error, a malformed body a 400
    unknown = api.post("/api/recommend", json={"positive": ["nope"]})
    assert unknown.status_code == 422 and "is indexed" in unknown.json()["detail"]
    assert api.post("/api/recommend", json={"positive": []}).status_code == 400


def test_product_endpoint(api, indexed):
    product_id = sorted(indexed)[0]
    event = indexed[product_id]
    # WHEN the page asks for a product
    body = api.get(f"/api/products/{product_id}").json()
    # THEN its catalogue fields, offers (cheapest first) and image thumbnails come back
    assert body["title"] == event.title and body["category"] == event.category
    assert [o["price"] for o in body["offers"]] == sorted(o.price for o in event.offers)
    assert len(body["images"]) == len(event.images)
    assert all(api.get(i["thumbnail_url"]).status_code == 200 for i in body["images"])
    # AND unknown products and images are 404s
    assert api.get("/api/products/nope").status_code == 404
    assert api.get(f"/api/products/{product_id}/images/nope.jpg").status_code == 404


def test_healthz_reports_lag_and_points(api, stack):
    # GIVEN an idle pipeline (everything indexed and answered)
    deadline = time.monotonic() + 30
    while True:
        response = api.get("/healthz")
        body = response.json()
        if all(v == 0 for v in body.get("lag", {1: 1}).values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # THEN health is ok: the broker answers, every function's lag is 0, the store counts its points
    assert response.status_code == 200, body
    assert body["broker"]["ok"] and body["store"]["ok"]
    assert body["lag"] == {"ingest": 0, "detect": 0, "embed": 0, "query": 0}
    assert body["store"]["points"] == stack.resources.store.count(stack.resources.collection) > 0
    assert body["pending_requests"] == 0


def test_healthz_is_503_when_the_store_fails(stack):
    from fastapi.testclient import TestClient

    from lookalike.gateway.app import create_app
    from lookalike.shared.errors import StoreUnavailable
    from lookalike.shared.indexes import Indexes

    class BrokenStore:
        backend = "broken"

        def count(self, collection):
            raise StoreUnavailable("disk on fire")

        def read_doc(self, name):
            raise StoreUnavailable("disk on fire")

    store = BrokenStore()
    http = TestClient(create_app(stack.bootstrap_servers, store, Indexes.fixed(store, "c"), stack.settings))
    response = http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["store"] == {"ok": False, "error": "disk on fire"}


@pytest.mark.parametrize("case, status, reason", [
    ("too many bytes", 413, "more than the limit of 50000"),
    ("huge body", 413, "at most 50000 bytes"),
    ("too many pixels", 413, "1200x1000 pixels"),
    ("text", 415, "not text/plain"),
    ("corrupt jpeg", 400, "cannot be decoded"),
    ("no photo", 400, "photo"),
    ("short box", 400, "four numbers"),
    ("inverted box", 400, "x2 > x1"),
    ("box outside", 400, "lies outside"),
    ("bad filters", 400, "price_min"),
    ("bad top_k", 400, "top_k"),
])
def test_bad_uploads_get_a_reason_never_a_500(limited, case, status, reason):
    small = _jpeg(Image.new("RGB", (100, 80), "red"))
    requests = {
        "too many bytes": dict(files={"photo": ("a.png", _png(Image.effect_noise((260, 260), 60)), "image/png")}),
        "huge body": dict(files={"photo": ("a.jpg", b"\xff" * 200_000, "image/jpeg")}),
        "too many pixels": dict(files={"photo": ("a.png", _png(Image.new("L", (1200, 1000))), "image/png")}),
        "text": dict(files={"photo": ("a.txt", b"hello", "text/plain")}),
        "corrupt jpeg": dict(files={"photo": ("a.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", "image/jpeg")}),
        "no photo": dict(data={"top_k": "3"}),
        "short box": dict(files={"photo": ("a.jpg", small, "image/jpeg")}, data={"box": "1,2,3"}),
        "inverted box": dict(files={"photo": ("a.jpg", small, "image/jpeg")}, data={"box": "50,10,20,30"}),
        "box outside": dict(files={"photo": ("a.jpg", small, "image/jpeg")}, data={"box": "200,10,300,30"}),
        "bad filters": dict(files={"photo": ("a.jpg", small, "image/jpeg")}, data={"filters": '{"price_min": -1}'}),
        "bad top_k": dict(files={"photo": ("a.jpg", small, "image/jpeg")}, data={"top_k": "many"}),
    }
    # WHEN a bad upload arrives
    response = limited.post("/api/search", **requests[case])
    # THEN it is refused with a status and a reason, before anything is published
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]
    assert limited.app.state.gateway.listener.pending() == 0


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def test_no_answer_is_a_504_and_leaves_nothing_waiting(stack, tmp_path):
    from fastapi.testclient import TestClient

    from lookalike.gateway.app import create_app
    from lookalike.shared.bus import TansuBroker, ensure_topics, make_producer
    from lookalike.shared.messages import SEARCH_RESULTS, SearchResult

    # GIVEN a gateway on a broker where no function runs
    with TansuBroker() as broker:
        ensure_topics(broker.bootstrap_servers, 1)
        settings = make_settings(tmp_path, gateway_timeout_s=1.5)
        app = create_app(broker.bootstrap_servers, stack.resources.store, stack.resources.indexes, settings)
        with TestClient(app) as http:
            # WHEN a shopper searches
            start = time.monotonic()
            response = _search(http, _jpeg(Image.new("RGB", (64, 64), "blue")))
            # THEN after the timeout a 504 says what happened, and no request is left registered
            assert response.status_code == 504, response.text
            assert 1.5 <= time.monotonic() - start < 10
            detail = response.json()["detail"]
            assert "no answer from the pipeline within 1.5 s" in detail
            listener = app.state.gateway.listener
            assert listener.pending() == 0
            # AND an answer arriving late is dropped, not kept
            request_id = re.search(r"request (\w+)", detail).group(1)
            producer = make_producer(broker.bootstrap_servers)
            late = SearchResult(request_id=request_id)
            producer.send(SEARCH_RESULTS, key=request_id.encode(), value=late.to_bytes()).get(timeout=10)
            producer.close()
            deadline = time.monotonic() + 10
            while listener.dropped == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert listener.dropped == 1 and listener.pending() == 0


def test_openapi_docs_and_the_web_page_are_served(limited):
    spec = limited.get("/openapi.json").json()
    assert {"/api/search", "/api/recommend", "/healthz"} <= set(spec["paths"])
    page = limited.get("/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text and 'capture="environment"' in page.text
    assert limited.get("/static/app.js").status_code == 200
    assert limited.get("/docs").status_code == 200
