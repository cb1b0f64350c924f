"""The gateway facing the internet: API keys, CORS, per-client rate limits, /metrics, no secret leaks.

No broker behind these gateways: the pipeline is a fake answering every request at once.
"""

from __future__ import annotations

import logging
import re

import pytest
from prometheus_client import REGISTRY

from lookalike.shared.indexes import Indexes
from lookalike.shared.messages import SearchResult
from tests.conftest import make_settings

KEY = "k3y-0f-the-shop-frontend-9f2c"
OTHER_KEY = "k3y-0f-the-mobile-app-71aa"
PRODUCT = {"product_id": "p1", "title": "Mug", "category": "kitchen", "image_id": "i1", "offers": []}


class Store:
    backend = "fake"

    def product_payloads(self, collection, product_id):
        return [PRODUCT] if product_id == "p1" else []

    def count(self, collection):
        return 1

    def read_doc(self, name):
        return None  # no index state: the one collection is active


@pytest.fixture
def gateway(tmp_path):
    """make(client=(address, port), **setting overrides) -> a test client of a gateway with a fake pipeline."""
    from fastapi.testclient import TestClient

    from lookalike.gateway.app import create_app

    def make(client=("10.0.0.1", 50000), root_path="", **overrides):
        settings = make_settings(tmp_path, **overrides)
        store = Store()
        app = create_app("127.0.0.1:1", store=store, indexes=Indexes.fixed(store, "c"), settings=settings)
        app.state.gateway.request = lambda topic, message: (SearchResult(request_id=message.request_id,
                                                                          kind="recommend"), "0" * 32)
        app.state.gateway.health = lambda: (True, {"status": "ok"})
        return TestClient(app, client=client, root_path=root_path)

    return make


def _recommend(http, key: str | None = None):
    headers = {"X-API-Key": key} if key is not None else {}
    return http.post("/api/recommend", json={"positive": ["p1"]}, headers=headers)


# ----------------------------------------------------------------------------- API keys


def test_without_keys_the_api_is_open(gateway):
    http = gateway()
    assert _recommend(http).status_code == 200
    assert http.get("/api/products/p1").status_code == 200


def test_with_keys_the_api_needs_one_and_the_rest_stays_open(gateway):
    http = gateway(gateway_api_keys=f"{KEY}, {OTHER_KEY}")
    # WHEN an API client sends no key, or a wrong one
    for key, reason in [(None, "no API key"), ("guess", "a wrong API key"), (KEY[:-1], "a wrong API key")]:
        response = _recommend(http, key)
        # THEN it is refused with 401, saying how to authenticate
        assert response.status_code == 401, key
        assert response.headers["www-authenticate"] == "ApiKey"
        assert response.json()["detail"].startswith(reason) and "X-API-Key" in response.json()["detail"]
    assert http.get("/api/products/p1").status_code == 401
    assert http.get("/api/products/p1/images/i1.jpg").status_code == 401
    # AND either key opens every /api route
    assert _recommend(http, KEY).status_code == 200
    assert _recommend(http, OTHER_KEY).status_code == 200
    assert http.get("/api/products/p1", headers={"X-API-Key": OTHER_KEY}).json()["title"] == "Mug"
    # AND the page, its files, health, metrics and the docs need none
    for path in ("/", "/static/app.js", "/healthz", "/metrics", "/docs", "/openapi.json"):
        assert http.get(path).status_code == 200, path
    # AND /docs can send the key ("Authorize")
    schemes = http.get("/openapi.json").json()["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}


def test_a_root_path_does_not_open_the_api(gateway):
    # GIVEN a gateway behind a proxy under /shop (uvicorn --root-path /shop: the ASGI path keeps the prefix)
    http = gateway(root_path="/shop", gateway_api_keys=KEY, gateway_rate_limit_per_min=1)
    recommend = dict(url="/shop/api/recommend", json={"positive": ["p1"]})
    # THEN the API still needs the key there, and the rate limit still counts
    assert http.post(**recommend).status_code == 401
    assert [http.post(**recommend, headers={"X-API-Key": KEY}).status_code for _ in range(2)] == [200, 429]


def test_blank_keys_leave_auth_off(gateway):
    # An empty GATEWAY_API_KEYS is what compose passes for an unset variable.
    assert _recommend(gateway(gateway_api_keys=" , ")).status_code == 200


def test_no_secret_reaches_an_answer_or_a_log(gateway, caplog):
    http = gateway(gateway_api_keys=f"{KEY},{OTHER_KEY}")
    caplog.set_level(logging.DEBUG)
    mistyped = KEY.upper()  # a client's near-miss is as secret as the key itself
    # WHEN requests without a key, with a wrong one and with a right one arrive
    answers = [_recommend(http), _recommend(http, mistyped), _recommend(http, "x"), _recommend(http, OTHER_KEY),
               http.get("/healthz"), http.get("/openapi.json")]
    # THEN no key shows in any answer's body or headers, nor in the logs
    assert [a.status_code for a in answers] == [401, 401, 401, 200, 200, 200]
    assert any("refused POST /api/recommend" in r.getMessage() for r in caplog.records)  # the refusal is logged
    shown = "\n".join([caplog.text] + [a.text + str(a.headers) for a in answers])
    for secret in (KEY, OTHER_KEY, mistyped):
        assert secret not in shown


def test_health_errors_are_scrubbed_of_secrets(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from lookalike.gateway import app as gateway_app

    password, qdrant_key = "sasl-pa55word-xyz", "qdrant-api-key-abc"

    class Offsets:  # a client library quoting its configuration in an error
        def __init__(self, bootstrap_servers):
            raise ConnectionError(f"SASL authentication failed for user shop with password {password}")

    class LeakyStore(Store):
        def count(self, collection):
            raise RuntimeError(f"401 from qdrant with api-key: {qdrant_key}")

    monkeypatch.setattr(gateway_app, "OffsetReader", Offsets)
    settings = make_settings(tmp_path, kafka_sasl_password=password, qdrant_api_key=qdrant_key,
                             gateway_api_keys=KEY)
    store = LeakyStore()
    app = gateway_app.create_app("127.0.0.1:1", store=store, indexes=Indexes.fixed(store, "c"), settings=settings,
                                 function_health=lambda: {"embed": {"ok": False, "last_error": f"bad key {KEY}"}})
    response = TestClient(app).get("/healthz")
    # THEN health says what failed, with every secret replaced
    assert response.status_code == 503
    body = response.json()
    assert body["broker"]["error"] == "SASL authentication failed for user shop with password ***"
    assert body["store"]["error"] == "401 from qdrant with api-key: ***"
    assert body["functions"]["embed"]["last_error"] == "bad key ***"


# ----------------------------------------------------------------------------- CORS


def _preflight(http, origin: str):
    return http.options("/api/recommend", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "content-type,x-api-key"})


def test_cors_allows_the_configured_origins_only(gateway):
    http = gateway(gateway_cors_origins="https://shop.example, https://m.shop.example", gateway_api_keys=KEY)
    # WHEN a page of an allowed origin asks whether it may POST with a key (a preflight carries no key)
    allowed = _preflight(http, "https://m.shop.example")
    # THEN it may
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == "https://m.shop.example"
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    assert "POST" in allowed.headers["access-control-allow-methods"]
    # AND its scripts can read the answers, refusals included
    refused = http.post("/api/recommend", json={"positive": ["p1"]}, headers={"Origin": "https://shop.example"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://shop.example"
    # WHEN another origin asks
    other = _preflight(http, "https://evil.example")
    # THEN the browser is told no
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default_and_star_allows_any_origin(gateway):
    assert "access-control-allow-origin" not in _preflight(gateway(), "https://shop.example").headers
    anyone = _preflight(gateway(gateway_cors_origins="*"), "https://anyone.example")
    assert anyone.status_code == 200 and anyone.headers["access-control-allow-origin"] == "*"


# ----------------------------------------------------------------------------- rate limit


def _rate_limited(path: str) -> float:
    return REGISTRY.get_sample_value("lookalike_gateway_rate_limited_total", {"path": path}) or 0.0


def test_rate_limit_per_address(gateway):
    from fastapi.testclient import TestClient

    http = gateway(gateway_rate_limit_per_min=3)
    before = _rate_limited("/api/recommend")
    # WHEN one address sends a fourth recommendation within the minute
    assert [_recommend(http).status_code for _ in range(3)] == [200, 200, 200]
    limited = _recommend(http)
    # THEN it gets 429 and when to retry (a token every 20 s)
    assert limited.status_code == 429, limited.text
    assert 1 <= int(limited.headers["retry-after"]) <= 20
    assert "more than 3 searches and recommendations a minute" in limited.json()["detail"]
    assert _rate_limited("/api/recommend") == before + 1
    # AND searches share that budget, while product pages are not limited
    photo = {"photo": ("a.jpg", b"not looked at", "image/jpeg")}
    assert http.post("/api/search", files=photo).status_code == 429
    assert http.get("/api/products/p1").status_code == 200
    # AND another address is not limited by the same gateway
    assert _recommend(TestClient(http.app, client=("10.0.0.2", 50000))).status_code == 200


def test_rate_limit_per_key_when_auth_is_on(gateway):
    http = gateway(gateway_rate_limit_per_min=2, gateway_api_keys=f"{KEY},{OTHER_KEY}")
    # GIVEN one key that used its budget
    assert [_recommend(http, KEY).status_code for _ in range(3)] == [200, 200, 429]
    # THEN another key from the same address is not limited, and refused keys spend no budget
    assert _recommend(http, "wrong").status_code == 401
    assert [_recommend(http, OTHER_KEY).status_code for _ in range(3)] == [200, 200, 429]


def test_token_buckets_refill_and_keep_few_clients():
    from lookalike.gateway.app import TokenBuckets

    now = [0.0]
    buckets = TokenBuckets(per_minute=6, max_clients=2, clock=lambda: now[0])
    # A burst of the minute's budget, then a wait of one token (10 s)
    assert [buckets.take("a") for _ in range(6)] == [0.0] * 6
    assert buckets.take("a") == pytest.approx(10.0)
    now[0] = 5.0
    assert buckets.take("a") == pytest.approx(5.0)
    now[0] = 10.0
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    # At most two clients kept: the least recently used is dropped and comes back with a full bucket
    buckets.take("b")
    buckets.take("c")
    assert len(buckets) == 2
    assert [buckets.take("a") for _ in range(6)] == [0.0] * 6


# ----------------------------------------------------------------------------- metrics


def _requests(path: str, method: str, status: str) -> float:
    labels = {"path": path, "method": method, "status": status}
    return REGISTRY.get_sample_value("lookalike_gateway_requests_total", labels) or 0.0


def test_metrics_count_requests_by_route_template(gateway):
    http = gateway(gateway_api_keys=KEY)
    product = ("/api/products/{product_id:path}", "GET", "200")
    before = {labels: _requests(*labels) for labels in [
        product, ("/api/recommend", "POST", "401"), ("other", "GET", "404"), ("/", "other", "405")]}
    seconds_before = REGISTRY.get_sample_value("lookalike_gateway_request_seconds_count",
                                               {"path": "/api/products/{product_id:path}"}) or 0.0
    # WHEN products are looked up, a request is refused, an unknown path and an odd method arrive
    for product_id in ("p1", "p1", "p1"):
        assert http.get(f"/api/products/{product_id}", headers={"X-API-Key": KEY}).status_code == 200
    assert _recommend(http).status_code == 401
    assert http.get("/no/such/page-123").status_code == 404
    assert http.request("BREW", "/").status_code == 405
    # THEN /metrics counts each under its route template, never the raw path or method
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert re.search(r'lookalike_gateway_requests_total\{method="GET",path="/api/products/\{product_id:path\}",'
                     r'status="200"\} \d', response.text)
    assert _requests(*product) == before[product] + 3
    for labels in [("/api/recommend", "POST", "401"), ("other", "GET", "404"), ("/", "other", "405")]:
        assert _requests(*labels) == before[labels] + 1, labels
    assert "page-123" not in response.text and "BREW" not in response.text
    assert REGISTRY.get_sample_value("lookalike_gateway_request_seconds_count",
                                     {"path": "/api/products/{product_id:path}"}) == seconds_before + 3
    assert "# HELP lookalike_gateway_rate_limited_total" in response.text
