"""The HTTP gateway: shoppers search by photo from a browser, operators check health.

Requests become messages on the pipeline's topics; answers come back on
``search.results`` through one ``shared.replies.ReplyListener`` per app (the same
request/reply code the ``lookalike`` client uses); no answer in time is a 504.

Coordinates: ``box`` (request) and every object box in a search response are in
pixels of the uploaded photo after EXIF rotation (``image.width``/``image.height`` of
the response). The gateway publishes the photo re-encoded at ``IMAGE_MAX_SIDE`` (so a
phone photo fits a message) with the box scaled alike, and converts the pipeline's
boxes back with ``image.scale``.

Input limits (shared/limits.py): a request body is counted as it streams and refused
with 413 past the photo limit; at most ``GATEWAY_MAX_INFLIGHT`` searches and
recommendations run at once, more get 429 at once.

Facing the internet (settings in shared/config.py, all off by default):

- ``GATEWAY_API_KEYS``: every route under ``/api/`` needs one of the keys in the
  ``X-API-Key`` header (401 otherwise); the page, ``/static``, ``/healthz``, ``/metrics``,
  ``/docs`` and ``/openapi.json`` stay open. The web page sends no key: it is meant for the
  embedded stack and trusted networks; API clients send ``X-API-Key``.
- ``GATEWAY_CORS_ORIGINS``: origins whose browser scripts may call the API.
- ``GATEWAY_RATE_LIMIT_PER_MIN``: searches + recommendations per client (its API key, else
  its address) per minute, as a token bucket; 429 with ``Retry-After`` past it.

``/metrics`` serves Prometheus metrics: the gateway's requests, and in the embedded stack
the functions' too (one process, one registry). Secrets never reach a response or a log:
keys are compared as digests in constant time, and error texts are scrubbed of them.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pybase64 as base64  # SIMD base64: several times the stdlib's speed on image payloads
from fastapi import FastAPI, File, Form, HTTPException, Request, Security, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lookalike.shared.bus import OffsetReader, make_producer
from lookalike.shared.config import Settings
from lookalike.shared.errors import PoisonMessage, describe_errors
from lookalike.shared.images import ImageTooLarge, decode, to_jpeg
from lookalike.shared.indexes import Indexes
from lookalike.shared.limits import FORM_OVERHEAD_BYTES, MAX_LIST_ITEMS, MAX_MESSAGE_BYTES, MAX_TOP_K, fits_message
from lookalike.shared.messages import (
    CATALOG_INDEXED,
    RECOMMEND_REQUESTS,
    SEARCH_REQUESTS,
    Box,
    ImageRef,
    ProductId,
    RecommendRequest,
    SearchFilters,
    SearchRequest,
    SearchResult,
)
from lookalike.shared.replies import ReplyListener, ReplyTimeout
from lookalike.shared.runtime import CONSUMER_GROUPS, lag_per_function
from lookalike.shared.stores import VectorStore
from lookalike.shared.tracing import start_span, trace_headers, trace_id

log = logging.getLogger("lookalike.gateway")
AS_OF_EVERY_S = 0.5  # how stale "catalogue as of" may be: well within the 1 s a price update may take

STATIC_DIR = Path(__file__).parent / "static"
# Types that may carry a photo; browsers send application/octet-stream for unknown extensions.
ACCEPTED_TYPES = ("image/", "application/octet-stream")
# The routes that make the pipeline work: limited in flight and per client.
PIPELINE_PATHS = ("/api/search", "/api/recommend")
API_KEY_HEADER = "X-API-Key"
# Rate-limit buckets kept at most (about 250 bytes each: ~2.5 MB); see TokenBuckets.
MAX_RATE_LIMITED_CLIENTS = 10_000

# Defined once per process (prometheus_client refuses a second registration; create_app runs many times in tests).
# Labels stay bounded: ``path`` is a route template or "other", ``method`` a known method or "other".
REQUESTS = Counter("lookalike_gateway_requests", "HTTP requests answered by the gateway",
                   ["path", "method", "status"])
REQUEST_SECONDS = Histogram("lookalike_gateway_request_seconds", "Time to answer an HTTP request", ["path"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
RATE_LIMITED = Counter("lookalike_gateway_rate_limited", "Requests refused by the per-client rate limit",
                       ["path"])
GATEWAY_METRICS = (REQUESTS, REQUEST_SECONDS, RATE_LIMITED)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class GatewayTimeout(Exception):
    pass


class Gateway:
    """What the endpoints share: producer, results listener, offsets reader, store."""

    def __init__(self, bootstrap_servers: str, store: VectorStore, indexes: Indexes, settings: Settings,
                 function_health: Callable[[], dict[str, dict]] | None = None):
        self.bootstrap_servers = bootstrap_servers
        self.store = store
        # The active model's collection, read when needed: a reindex switches it (lookalike.shared.indexes).
        self.indexes = indexes
        self.settings = settings
        self.function_health = function_health  # {function: {"ok": bool, ...}}, from whoever runs them
        self.timeout_s = settings.gateway_timeout_s
        self.secrets = secret_values(settings)  # scrubbed from error texts that answers carry
        self.listener = ReplyListener(bootstrap_servers, client_id="lookalike-gateway")
        self._producer = None
        self._offsets: OffsetReader | None = None
        self._lock = threading.Lock()
        self._offsets_lock = threading.Lock()
        self.catalogue_as_of: float | None = None  # when the last catalogue event was applied (Unix s)
        self._stop = threading.Event()
        self._freshness: threading.Thread | None = None

    @property
    def producer(self):
        with self._lock:
            if self._producer is None:
                self._producer = make_producer(self.bootstrap_servers, client_id="lookalike-gateway")
            return self._producer

    def request(self, topic: str, message: SearchRequest | RecommendRequest) -> tuple[SearchResult, str]:
        """Publish ``message`` and wait for its answer (registered first, unregistered always).

        Starts the request's trace: (the answer, its trace id), which the response carries so a
        search can be followed through every function's logs.
        """
        span = start_span(f"gateway {topic}", request_id=message.request_id)
        with trace.use_span(span, end_on_exit=True):
            return self._request(topic, message, trace_headers(span)), trace_id(span)

    def _request(self, topic: str, message: SearchRequest | RecommendRequest, headers: list) -> SearchResult:
        key, value = message.key().encode(), message.to_bytes()
        if not fits_message(key, value):
            raise HTTPException(413, f"the request is {len(value)} bytes, more than one message may carry "
                                     f"({MAX_MESSAGE_BYTES})")

        def publish() -> None:
            try:
                self.producer.send(topic, key=key, value=value, headers=headers).get(timeout=10)
            except Exception as e:
                raise HTTPException(503, scrub(f"could not publish to {topic}: {e}", self.secrets)) from None

        try:
            answer = self.listener.request(message.request_id, publish, self.timeout_s)
        except ReplyTimeout:
            raise GatewayTimeout(f"no answer from the pipeline within {self.timeout_s:g} s "
                                 f"(request {message.request_id}); is `lookalike up` running?") from None
        return SearchResult.model_validate_json(answer)

    def health(self) -> tuple[bool, dict]:
        out: dict[str, Any] = {"pending_requests": self.listener.pending()}
        healthy = True
        try:
            with self._offsets_lock:
                if self._offsets is None:
                    self._offsets = OffsetReader(self.bootstrap_servers)
                out["lag"] = lag_per_function(self._offsets.group_lags(CONSUMER_GROUPS))
            out["catalogue_as_of"] = self.catalogue_as_of
            out["broker"] = {"ok": True, "bootstrap_servers": self.bootstrap_servers}
        except Exception as e:
            healthy = False
            out["broker"] = {"ok": False, "error": str(e) or type(e).__name__}
        try:
            state = self.indexes.state()
            collection = self.indexes.collection(state.active.id)
            out["store"] = {"ok": True, "backend": self.store.backend, "collection": collection,
                            "points": self.store.count(collection), "index": state.describe()}
        except Exception as e:
            healthy = False
            out["store"] = {"ok": False, "error": str(e) or type(e).__name__}
        if self.function_health is not None:
            out["functions"] = self.function_health()
            healthy = healthy and all(f.get("ok", True) for f in out["functions"].values())
        out["status"] = "ok" if healthy else "unavailable"
        return healthy, scrub(out, self.secrets)  # errors quote other libraries' texts: keep secrets out

    def follow_freshness(self) -> None:
        """Keep ``catalogue_as_of`` current in a thread of its own: every AS_OF_EVERY_S, the time of the newest
        catalog.indexed report. Searches and /healthz read the value and never wait for the broker."""

        def loop() -> None:
            reader = OffsetReader(self.bootstrap_servers)  # its own: the health check's may be busy
            try:
                while not self._stop.is_set():
                    try:
                        self.catalogue_as_of = reader.latest_timestamp(CATALOG_INDEXED) or self.catalogue_as_of
                    except Exception as e:  # noqa: BLE001 - the broker may come later
                        log.debug("catalogue_as_of not read: %s", e)
                    self._stop.wait(AS_OF_EVERY_S)
            finally:
                reader.close()

        self._freshness = threading.Thread(target=loop, name="gateway-freshness", daemon=True)
        self._freshness.start()

    def close(self) -> None:
        self._stop.set()
        if self._freshness is not None:
            self._freshness.join(timeout=10)
        self.listener.stop()
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=10)
                self._producer = None
        with self._offsets_lock:
            if self._offsets is not None:
                self._offsets.close()
                self._offsets = None


# --------------------------------------------------------------------------- helpers


def api_keys(settings: Settings) -> list[str]:
    """The keys in GATEWAY_API_KEYS (comma-separated, blanks ignored); none: auth is off."""
    if settings.gateway_api_keys is None:
        return []
    return [key.strip() for key in settings.gateway_api_keys.get_secret_value().split(",") if key.strip()]


def secret_values(settings: Settings) -> list[str]:
    """Every secret in ``settings``, each API key on its own, longest first (scrubbed before shorter parts)."""
    found = set(api_keys(settings))
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr) and value.get_secret_value():
            found.add(value.get_secret_value())
    return sorted(found, key=len, reverse=True)


def scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` (a text, or dicts and lists holding texts) with every secret replaced by ``***``."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {key: scrub(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub(item, secrets) for item in value]
    return value


def image_url(product_id: str, image_id: str) -> str:
    return f"/api/products/{quote(product_id, safe='')}/images/{quote(image_id, safe='')}.jpg"


def _parse_box(text: str | None, width: int, height: int) -> Box | None:
    if text is None or not text.strip():
        return None
    try:
        values = json.loads(text) if text.strip().startswith(("[", "{")) else [float(v) for v in text.split(",")]
        box = Box(**values) if isinstance(values, dict) else Box(x1=values[0], y1=values[1], x2=values[2],
                                                                 y2=values[3]) if len(values) == 4 else None
    except (ValueError, TypeError, IndexError, ValidationError) as e:
        raise HTTPException(400, f"box must be x1,y1,x2,y2 in pixels of the photo with x2 > x1 and y2 > y1: {e}")
    if box is None:
        raise HTTPException(400, "box must have exactly four numbers: x1,y1,x2,y2")
    if box.misses(width, height):
        raise HTTPException(400, f"box {box.as_list()} lies outside the {width}x{height} photo")
    return box


def _parse_filters(text: str | None) -> SearchFilters:
    if text is None or not text.strip():
        return SearchFilters()
    try:
        return SearchFilters.model_validate_json(text)
    except ValidationError as e:
        raise HTTPException(400, f"filters: {describe_errors(e.errors(), most=10)}") from None


def _parse_top_k(text: str | None) -> int:
    if text is None or not str(text).strip():
        return 10
    try:
        top_k = int(text)
    except ValueError:
        raise HTTPException(400, f"top_k must be an integer, got {text!r}") from None
    if not 1 <= top_k <= MAX_TOP_K:
        raise HTTPException(400, f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    return top_k


def _normalize_photo(raw: bytes, settings: Settings) -> tuple[bytes, int, int, float]:
    """The photo as the JPEG the pipeline works on: (jpeg, width, height, scale).

    ``width``/``height`` are the upright upload's, ``scale`` maps them onto the JPEG;
    413/400 with a reason when the photo isn't acceptable.
    """
    if len(raw) > settings.max_image_bytes:
        raise HTTPException(413, f"photo is {len(raw)} bytes, more than the limit of {settings.max_image_bytes}")
    try:
        decoded = decode(raw, settings.image_max_side, settings.max_image_pixels)
    except ImageTooLarge as e:
        raise HTTPException(413, f"photo: {e}") from None
    except PoisonMessage as e:
        raise HTTPException(400, f"photo: {e}") from None
    width, height = decoded.source_size
    return to_jpeg(decoded.image), width, height, decoded.scale


def _enrich(result: SearchResult, scale: float = 1.0) -> dict:
    """The SearchResult as JSON, with thumbnail URLs and boxes in pixels of the uploaded photo."""
    out = jsonable_encoder(result.model_dump(exclude_none=False))
    for obj in out["objects"]:
        if obj.get("box"):
            obj["box"] = {k: round(v / scale, 1) for k, v in obj["box"].items()}
        for p in obj["products"]:
            p["thumbnail_url"] = image_url(p["product_id"], p["image_id"]) if p.get("image_id") else None
    return out


class RecommendBody(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    positive: list[ProductId] = Field(min_length=1, max_length=MAX_LIST_ITEMS,
                                      description="product ids the shopper liked/viewed")
    negative: list[ProductId] = Field(default_factory=list, max_length=MAX_LIST_ITEMS,
                                      description="product ids to move away from")
    top_k: int = Field(default=10, ge=1, le=MAX_TOP_K)
    filters: SearchFilters = Field(default_factory=SearchFilters)


class BodyTooLarge(HTTPException):
    """Raised from the counting ``receive``: FastAPI turns other errors while parsing a body into 400."""


class BodyLimit:
    """Refuses POST bodies larger than ``max_image_bytes`` plus form overhead with 413.

    Content-Length is checked before anything is read; bytes are also counted as they
    arrive, so a chunked body (or one lying about its length) is cut off right past the limit.
    """

    def __init__(self, app: ASGIApp, max_image_bytes: int):
        self.app = app
        self.max_image_bytes = max_image_bytes
        self.limit = max_image_bytes + FORM_OVERHEAD_BYTES

    def _refusal(self, size: str) -> BodyTooLarge:
        # Connection: close, or the server would go on reading (and dropping) the body to reuse the connection.
        return BodyTooLarge(413, f"request body is {size} bytes; photos may have at most {self.max_image_bytes} "
                                 "bytes", headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await _refuse(scope, receive, send, self._refusal(length))
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._refusal(f"more than {self.limit}")
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as e:  # tripped outside a route (whose handler answers it): answer here
            if started:
                raise
            await _refuse(scope, receive, send, e)


class InflightLimit:
    """At most ``limit`` requests to ``paths`` at once; beyond that 429 at once, never a queue."""

    def __init__(self, app: ASGIApp, limit: int, paths: tuple[str, ...], routes: list[BaseRoute]):
        self.app = app
        self.limit = limit
        self.paths = paths
        self.routes = routes
        self._slots = threading.BoundedSemaphore(limit)  # only ever tried, never waited on: fine in any event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(self.routes, scope) not in self.paths:
            return await self.app(scope, receive, send)
        if not self._slots.acquire(blocking=False):
            # Connection: close, or the server would read (and drop) the whole refused upload first.
            busy = HTTPException(429, f"the gateway is busy with {self.limit} requests; try again in a moment",
                                 headers={"Retry-After": "1", "Connection": "close"})
            return await _refuse(scope, receive, send, busy)
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()


def route_path(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The template of the route that will answer ``scope`` (e.g. ``/api/products/{product_id:path}``), or None.

    Matched the way the router matches (root path and percent-escapes included), so a
    middleware that decides by it cannot be side-stepped by spelling a path differently.
    """
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", None)
        if match == Match.PARTIAL and partial is None:  # the path matches, not the method: a 405 from there
            partial = getattr(route, "path", None)
    return partial


class RequestMetrics:
    """Counts every request (``REQUESTS``) and times it (``REQUEST_SECONDS``), by route template."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(self.routes, scope) or "other"  # raw paths would make a label value per URL
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
        status = 500  # unless a response starts: an exception escaping the app becomes a 500
        start = time.perf_counter()

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            REQUESTS.labels(path, method, str(status)).inc()
            REQUEST_SECONDS.labels(path).observe(time.perf_counter() - start)


class ApiKeyAuth:
    """Every route under ``/api/`` needs one of ``keys`` in the X-API-Key header; 401 otherwise.

    Keys are compared as SHA-256 digests with ``hmac.compare_digest``, all of them every
    time, so the timing tells neither a key's characters nor its length nor which matched.
    The key found is remembered in the scope by its position (``api_key_index``) for the
    rate limit; the key itself is never logged or echoed.
    """

    def __init__(self, app: ASGIApp, keys: list[str], routes: list[BaseRoute]):
        self.app = app
        self.routes = routes
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def key_index(self, given: bytes) -> int | None:
        digest = hashlib.sha256(given).digest()
        matches = [hmac.compare_digest(digest, known) for known in self._digests]  # no early exit
        return matches.index(True) if any(matches) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(self.routes, scope)
        if path is None or not path.startswith("/api/"):  # the page, health, metrics, docs; unknown paths are 404s
            return await self.app(scope, receive, send)
        # Raw header bytes: a key is compared as the client sent it, whatever its encoding.
        given = next((value for name, value in scope["headers"] if name == b"x-api-key"), None)
        index = self.key_index(given) if given is not None else None
        if index is None:
            reason = "no API key" if given is None else "a wrong API key"
            log.info("refused %s %s from %s: %s", scope["method"], path, _client_address(scope), reason)
            # Connection: close, or the server would read (and drop) the whole refused upload first.
            refusal = HTTPException(401, f"{reason}: send one of this gateway's API keys in the {API_KEY_HEADER} "
                                         "header", headers={"WWW-Authenticate": "ApiKey", "Connection": "close"})
            return await _refuse(scope, receive, send, refusal)
        scope["api_key_index"] = index
        await self.app(scope, receive, send)


class TokenBuckets:
    """Per-client token buckets: ``per_minute`` tokens a minute each, at most ``per_minute`` saved up.

    Memory is bounded: at most ``max_clients`` buckets, the least recently used dropped
    first. A dropped client comes back with a full bucket, which is what any client idle for
    a minute has anyway, so the limit loosens only when more than ``max_clients`` clients
    are active within one minute.
    """

    def __init__(self, per_minute: int, max_clients: int = MAX_RATE_LIMITED_CLIENTS,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = float(per_minute)
        self.per_second = per_minute / 60.0
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, as of when)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Take a token for ``client``: 0 when there was one, else the seconds until there is."""
        now = self.clock()
        tokens, then = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.per_second)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[client] = (tokens, now)  # (re)inserted last: the most recently used
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1 - tokens) / self.per_second


class RateLimit:
    """At most ``per_minute`` POSTs to ``paths`` per client a minute; 429 with Retry-After beyond.

    A client is its API key when auth is on (ApiKeyAuth runs first), else its address.
    The buckets live in this process: with several gateway replicas the limit is per replica.
    """

    def __init__(self, app: ASGIApp, per_minute: int, paths: tuple[str, ...], routes: list[BaseRoute]):
        self.app = app
        self.per_minute = per_minute
        self.paths = paths
        self.routes = routes
        # Only used from the event loop, with no await in between: no lock needed.
        self.buckets = TokenBuckets(per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = route_path(self.routes, scope)
        if path not in self.paths:
            return await self.app(scope, receive, send)
        index = scope.get("api_key_index")
        client = f"api key #{index}" if index is not None else _client_address(scope)
        wait_s = self.buckets.take(client)
        if wait_s:
            RATE_LIMITED.labels(path).inc()
            retry_after = str(max(1, math.ceil(wait_s)))
            limited = HTTPException(429, f"more than {self.per_minute} searches and recommendations a minute; "
                                         f"try again in {retry_after} s",
                                    headers={"Retry-After": retry_after, "Connection": "close"})
            return await _refuse(scope, receive, send, limited)
        await self.app(scope, receive, send)


def _client_address(scope: Scope) -> str:
    # uvicorn takes it from X-Forwarded-For only behind a trusted proxy (FORWARDED_ALLOW_IPS).
    client = scope.get("client")
    return client[0] if client else "unknown"


async def _refuse(scope: Scope, receive: Receive, send: Send, error: HTTPException) -> None:
    """Answer ``error`` as the app's exception handler would, from a middleware."""
    await JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)(
        scope, receive, send)


# --------------------------------------------------------------------------- app


def create_app(bootstrap_servers: str, store: VectorStore, indexes: Indexes, settings: Settings | None = None,
               function_health: Callable[[], dict[str, dict]] | None = None,
               refresh_metrics: Callable[[], None] | None = None) -> FastAPI:
    """The gateway app; ``function_health`` reports each pipeline function for /healthz (503 if one is not ok),
    ``refresh_metrics`` reads their gauges (lag, dead letters, points) before /metrics answers."""
    settings = settings or Settings()
    keys = api_keys(settings)
    gw = Gateway(bootstrap_servers, store, indexes, settings, function_health)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            gw.listener.start()
        except Exception as e:  # the broker may come later; requests start the listener again
            log.warning("results listener not started: %s", e)
        gw.follow_freshness()
        yield
        gw.close()

    app = FastAPI(title="lookalike gateway", version="0.1.0", lifespan=lifespan,
                  description="Search a product catalogue by photo; price comparison across shops.")
    app.state.gateway = gw

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": describe_errors(list(exc.errors()), most=10)}, status_code=400)

    @app.exception_handler(GatewayTimeout)
    async def _timeout(request: Request, exc: GatewayTimeout):
        return JSONResponse({"detail": str(exc)}, status_code=504)

    # The last added runs first: metrics see every answer; CORS answers preflights (which carry no key) and
    # adds its headers to refusals too; auth comes before the rate limit, which counts per key; refused
    # requests take no in-flight slot.
    routes = app.router.routes  # the list the routes below are added to
    app.add_middleware(BodyLimit, max_image_bytes=settings.max_image_bytes)
    app.add_middleware(InflightLimit, limit=settings.gateway_max_inflight, paths=PIPELINE_PATHS, routes=routes)
    if settings.gateway_rate_limit_per_min > 0:
        app.add_middleware(RateLimit, per_minute=settings.gateway_rate_limit_per_min, paths=PIPELINE_PATHS,
                           routes=routes)
    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys, routes=routes)
    origins = [origin.strip() for origin in settings.gateway_cors_origins.split(",") if origin.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", API_KEY_HEADER], expose_headers=["Retry-After"])
    app.add_middleware(RequestMetrics, routes=routes)
    # Only documents the key (the "Authorize" button of /docs); ApiKeyAuth checks it.
    api_key = [Security(APIKeyHeader(name=API_KEY_HEADER, auto_error=False))] if keys else []

    @app.post("/api/search", summary="Search by photo", dependencies=api_key, responses={
        400: {"description": "undecodable photo, bad box/filters/top_k"}, 413: {"description": "photo too large"},
        415: {"description": "not an image"}, 401: {"description": "no or a wrong API key (when keys are set)"},
        429: {"description": "too many searches at once or this minute; retry (Retry-After)"},
        504: {"description": "the pipeline did not answer in time"}})
    def search(photo: UploadFile = File(..., description="the shopper's photo (JPEG, PNG, WebP, HEIC...)"),
               box: str | None = Form(None, description="x1,y1,x2,y2 in pixels of the photo: search only there"),
               filters: str | None = Form(None, description='SearchFilters as JSON, e.g. {"categories":["drinks"]}'),
               top_k: str | None = Form(None, description="results per object, 1-100 (default 10)")) -> dict:
        """Publishes a search request and returns the pipeline's answer.

        Boxes (given and returned) are in pixels of the uploaded photo after EXIF rotation.
        """
        ctype = (photo.content_type or "").lower()
        if ctype and not ctype.startswith(ACCEPTED_TYPES):
            raise HTTPException(415, f"upload a photo (image/*), not {ctype}")
        top_k, filters = _parse_top_k(top_k), _parse_filters(filters)
        raw = photo.file.read(settings.max_image_bytes + 1)
        jpeg, width, height, scale = _normalize_photo(raw, settings)
        user_box = _parse_box(box, width, height)  # in pixels of the uploaded photo, published scaled alike
        request = SearchRequest(image=ImageRef.from_bytes(jpeg), box=user_box.scaled(scale) if user_box else None,
                                top_k=top_k, filters=filters)
        start = time.monotonic()
        result, trace = gw.request(SEARCH_REQUESTS, request)
        if result.status != "ok":
            raise HTTPException(422, result.error or "the search failed")
        out = _enrich(result, scale)
        out["trace_id"] = trace
        out["catalogue_as_of"] = gw.catalogue_as_of
        out["image"] = {"width": width, "height": height, "scale": scale}
        out["took_ms"] = round((time.monotonic() - start) * 1000)
        return out

    @app.post("/api/recommend", summary="More like these products", dependencies=api_key, responses={
        400: {"description": "bad request"}, 401: {"description": "no or a wrong API key (when keys are set)"},
        422: {"description": "none of the products is indexed"},
        429: {"description": "too many requests at once or this minute; retry (Retry-After)"},
        504: {"description": "the pipeline did not answer in time"}})
    def recommend(body: RecommendBody) -> dict:
        request = RecommendRequest(positive=body.positive, negative=body.negative, top_k=body.top_k,
                                   filters=body.filters)
        start = time.monotonic()
        result, trace = gw.request(RECOMMEND_REQUESTS, request)
        if result.status != "ok":
            raise HTTPException(422, result.error or "the recommendation failed")
        out = _enrich(result)
        out["trace_id"] = trace
        out["catalogue_as_of"] = gw.catalogue_as_of
        out["took_ms"] = round((time.monotonic() - start) * 1000)
        return out

    @app.get("/api/products/{product_id:path}/images/{image_id}.jpg", summary="A product image's thumbnail",
             response_class=Response, dependencies=api_key,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
    def product_image(product_id: str, image_id: str) -> Response:
        for payload in store.product_payloads(gw.indexes.active_collection(), product_id):
            if payload.get("image_id") == image_id and payload.get("thumbnail"):
                try:
                    jpeg = base64.b64decode(payload["thumbnail"], validate=True)
                except (binascii.Error, ValueError):
                    continue
                return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})
        raise HTTPException(404, f"no thumbnail for image {image_id} of product {product_id}")

    @app.get("/api/products/{product_id:path}", summary="A product: catalogue fields, offers, images",
             dependencies=api_key)
    def product(product_id: str) -> dict:
        payloads = store.product_payloads(gw.indexes.active_collection(), product_id)
        if not payloads:
            raise HTTPException(404, f"product {product_id} is not indexed")
        first = payloads[0]
        images: dict[str, dict] = {}
        for p in sorted(payloads, key=lambda p: (p.get("image_index", 0), p.get("point_id"))):
            iid = p.get("image_id")
            if iid and iid not in images:
                images[iid] = {"image_id": iid, "image_url": p.get("image_url"),
                               "thumbnail_url": image_url(product_id, iid) if p.get("thumbnail") else None}
        return {
            "product_id": product_id,
            **{k: first.get(k) for k in ("title", "category", "brand", "min_price", "shops", "in_stock")},
            "offers": sorted(first.get("offers") or [], key=lambda o: o["price"]),
            "images": list(images.values()),
            "points": len(payloads),
        }

    @app.get("/healthz", summary="Broker, store, each function's state and consumer lag")
    def healthz() -> JSONResponse:
        healthy, body = gw.health()
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text: the gateway's metrics and, in the embedded stack, the functions' (same registry)."""
        if refresh_metrics is not None:
            refresh_metrics()
        return Response(generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
