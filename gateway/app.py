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
"""

from __future__ import annotations

import binascii
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pybase64 as base64  # SIMD base64: several times the stdlib's speed on image payloads
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lookalike.shared.bus import OffsetReader, make_producer
from lookalike.shared.config import Settings
from lookalike.shared.errors import PoisonMessage, describe_errors
from lookalike.shared.images import ImageTooLarge, decode, to_jpeg
from lookalike.shared.limits import FORM_OVERHEAD_BYTES, MAX_LIST_ITEMS, MAX_MESSAGE_BYTES, MAX_TOP_K, fits_message
from lookalike.shared.messages import (
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

log = logging.getLogger("lookalike.gateway")

STATIC_DIR = Path(__file__).parent / "static"
# Types that may carry a photo; browsers send application/octet-stream for unknown extensions.
ACCEPTED_TYPES = ("image/", "application/octet-stream")


class GatewayTimeout(Exception):
    pass


class Gateway:
    """What the endpoints share: producer, results listener, offsets reader, store."""

    def __init__(self, bootstrap_servers: str, store: VectorStore, collection: str, settings: Settings,
                 function_health: Callable[[], dict[str, dict]] | None = None):
        self.bootstrap_servers = bootstrap_servers
        self.store = store
        self.collection = collection
        self.settings = settings
        self.function_health = function_health  # {function: {"ok": bool, ...}}, from whoever runs them
        self.timeout_s = settings.gateway_timeout_s
        self.listener = ReplyListener(bootstrap_servers, client_id="lookalike-gateway")
        self._producer = None
        self._offsets: OffsetReader | None = None
        self._lock = threading.Lock()
        self._offsets_lock = threading.Lock()

    @property
    def producer(self):
        with self._lock:
            if self._producer is None:
                self._producer = make_producer(self.bootstrap_servers, client_id="lookalike-gateway")
            return self._producer

    def request(self, topic: str, message: SearchRequest | RecommendRequest) -> SearchResult:
        """Publish ``message`` and wait for its answer (registered first, unregistered always)."""
        key, value = message.key().encode(), message.to_bytes()
        if not fits_message(key, value):
            raise HTTPException(413, f"the request is {len(value)} bytes, more than one message may carry "
                                     f"({MAX_MESSAGE_BYTES})")

        def publish() -> None:
            try:
                self.producer.send(topic, key=key, value=value).get(timeout=10)
            except Exception as e:
                raise HTTPException(503, f"could not publish to {topic}: {e}") from None

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
            out["broker"] = {"ok": True, "bootstrap_servers": self.bootstrap_servers}
        except Exception as e:
            healthy = False
            out["broker"] = {"ok": False, "error": str(e) or type(e).__name__}
        try:
            out["store"] = {"ok": True, "backend": self.store.backend, "collection": self.collection,
                            "points": self.store.count(self.collection)}
        except Exception as e:
            healthy = False
            out["store"] = {"ok": False, "error": str(e) or type(e).__name__}
        if self.function_health is not None:
            out["functions"] = self.function_health()
            healthy = healthy and all(f.get("ok", True) for f in out["functions"].values())
        out["status"] = "ok" if healthy else "unavailable"
        return healthy, out

    def close(self) -> None:
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

    def __init__(self, app: ASGIApp, limit: int, paths: tuple[str, ...]):
        self.app = app
        self.limit = limit
        self.paths = paths
        self._slots = threading.BoundedSemaphore(limit)  # only ever tried, never waited on: fine in any event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
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


async def _refuse(scope: Scope, receive: Receive, send: Send, error: HTTPException) -> None:
    """Answer ``error`` as the app's exception handler would, from a middleware."""
    await JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)(
        scope, receive, send)


# --------------------------------------------------------------------------- app


def create_app(bootstrap_servers: str, store: VectorStore, collection: str, settings: Settings | None = None,
               function_health: Callable[[], dict[str, dict]] | None = None) -> FastAPI:
    """The gateway app; ``function_health`` reports each pipeline function for /healthz (503 if one is not ok)."""
    settings = settings or Settings()
    gw = Gateway(bootstrap_servers, store, collection, settings, function_health)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            gw.listener.start()
        except Exception as e:  # the broker may come later; requests start the listener again
            log.warning("results listener not started: %s", e)
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

    app.add_middleware(BodyLimit, max_image_bytes=settings.max_image_bytes)
    app.add_middleware(InflightLimit, limit=settings.gateway_max_inflight, paths=("/api/search", "/api/recommend"))

    @app.post("/api/search", summary="Search by photo", responses={
        400: {"description": "undecodable photo, bad box/filters/top_k"}, 413: {"description": "photo too large"},
        415: {"description": "not an image"}, 429: {"description": "too many searches at once; retry"},
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
        result = gw.request(SEARCH_REQUESTS, request)
        if result.status != "ok":
            raise HTTPException(422, result.error or "the search failed")
        out = _enrich(result, scale)
        out["image"] = {"width": width, "height": height, "scale": scale}
        out["took_ms"] = round((time.monotonic() - start) * 1000)
        return out

    @app.post("/api/recommend", summary="More like these products", responses={
        400: {"description": "bad request"}, 422: {"description": "none of the products is indexed"},
        429: {"description": "too many requests at once; retry"},
        504: {"description": "the pipeline did not answer in time"}})
    def recommend(body: RecommendBody) -> dict:
        request = RecommendRequest(positive=body.positive, negative=body.negative, top_k=body.top_k,
                                   filters=body.filters)
        start = time.monotonic()
        result = gw.request(RECOMMEND_REQUESTS, request)
        if result.status != "ok":
            raise HTTPException(422, result.error or "the recommendation failed")
        out = _enrich(result)
        out["took_ms"] = round((time.monotonic() - start) * 1000)
        return out

    @app.get("/api/products/{product_id:path}/images/{image_id}.jpg", summary="A product image's thumbnail",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
    def product_image(product_id: str, image_id: str) -> Response:
        for payload in store.product_payloads(collection, product_id):
            if payload.get("image_id") == image_id and payload.get("thumbnail"):
                try:
                    jpeg = base64.b64decode(payload["thumbnail"], validate=True)
                except (binascii.Error, ValueError):
                    continue
                return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})
        raise HTTPException(404, f"no thumbnail for image {image_id} of product {product_id}")

    @app.get("/api/products/{product_id:path}", summary="A product: catalogue fields, offers, images")
    def product(product_id: str) -> dict:
        payloads = store.product_payloads(collection, product_id)
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

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
