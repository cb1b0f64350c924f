"""Every message that travels on a lookalike topic, as pydantic v2 models.

JSON on the wire. Each message carries ``schema_version`` and a trace id
(``event_id`` for catalogue traffic, ``request_id`` for shopper traffic) that
every derived message copies, so one id follows a photo through all stages.
Catalogue messages are keyed by ``product_id`` (per-product order); query
messages by ``request_id``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import pybase64 as base64  # SIMD base64: several times the stdlib's speed on image payloads
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lookalike.shared import limits

SCHEMA_VERSION = 1
THUMBNAIL_SIDE = 160  # longest side of the JPEG thumbnail embed stores in every point's payload

# Topic names, in pipeline order. ``<topic>.dlq`` holds that topic's poison messages.
CATALOG_EVENTS = "catalog.events"
SEARCH_REQUESTS = "search.requests"
RECOMMEND_REQUESTS = "recommend.requests"
IMAGES_NORMALIZED = "images.normalized"
IMAGES_DETECTED = "images.detected"
# Shoppers' photos take topics of their own through detect and embed (the functions' "search"
# lanes), so a search never queues behind a catalogue import's images.
SEARCH_NORMALIZED = "search.normalized"
SEARCH_DETECTED = "search.detected"
QUERY_VECTORS = "query.vectors"
SEARCH_RESULTS = "search.results"
CATALOG_INDEXED = "catalog.indexed"
ALL_TOPICS = (
    CATALOG_EVENTS,
    SEARCH_REQUESTS,
    RECOMMEND_REQUESTS,
    IMAGES_NORMALIZED,
    IMAGES_DETECTED,
    SEARCH_NORMALIZED,
    SEARCH_DETECTED,
    QUERY_VECTORS,
    SEARCH_RESULTS,
    CATALOG_INDEXED,
)

# Which function reads which topic, in which consumer group: shared.runtime.CONSUMER_GROUPS.


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


# Point ids are uuid5 of (product, image, object): redelivery overwrites, never duplicates.
POINT_NAMESPACE = uuid.UUID("6f0c1f4e-6b1e-4d55-9a57-2f8a7f6f1c01")


def point_id(product_id: str, image_id: str, object_index: int) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{product_id}/{image_id}/{object_index}"))


def new_id() -> str:
    return uuid.uuid4().hex


# Text a client can send, capped so that the largest valid message fits the wire (shared/limits.py).
Id = Annotated[str, Field(min_length=1, max_length=limits.MAX_ID_CHARS)]
ProductId = Annotated[str, Field(min_length=1, max_length=limits.MAX_PRODUCT_ID_CHARS)]
Title = Annotated[str, Field(max_length=limits.MAX_TITLE_CHARS)]
Name = Annotated[str, Field(max_length=limits.MAX_NAME_CHARS)]  # category, brand, shop, filter value
Url = Annotated[str, Field(max_length=limits.MAX_URL_CHARS)]


class Part(BaseModel):
    """Base of every model on the wire: unknown fields and non-finite floats (1e999, NaN) are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _without(data: Any, retired: frozenset[str]) -> Any:
    """``data`` less the ``retired`` fields: ones the previous release wrote and this one dropped.

    A tolerant reader for one release: a message the previous release left in a topic (or a
    DLQ, for a later replay) during an upgrade is read, not poison. Remove a field from its
    model's list once no topic or DLQ can hold such a message; then it is unknown like any other.
    """
    if isinstance(data, dict) and not retired.isdisjoint(data):
        return {k: v for k, v in data.items() if k not in retired}
    return data


class Message(Part):
    """Base of every wire message: versioned, keyed."""

    schema_version: Literal[1] = SCHEMA_VERSION

    def key(self) -> str:
        """Kafka key of this message (ordering unit)."""
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# --------------------------------------------------------------------------- parts


class Offer(Part):
    shop: Name = Field(min_length=1)
    price: float = Field(ge=0)
    currency: str = Field(default="EUR", min_length=limits.CURRENCY_CHARS, max_length=limits.CURRENCY_CHARS)
    url: Url | None = None
    in_stock: bool = True


class ImageRef(Part):
    """Where an image comes from: exactly one of ``url`` (http/https) or ``data`` (base64).

    ``path`` is only accepted in catalogue files read by ``lookalike index``, which
    inlines the bytes as ``data`` before publishing; it never travels on a topic.
    """

    url: Url | None = None
    data: str | None = Field(default=None, max_length=limits.MAX_MESSAGE_BYTES)
    path: Url | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        given = [n for n in ("url", "data", "path") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"an image needs exactly one of url, data or path (got {given or 'none'})")
        return self

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ImageRef":
        return cls(data=base64.b64encode(raw).decode())


class Box(Part):
    """Pixel box ``[x1, y1, x2, y2]`` in the coordinates of the normalised image."""

    x1: float
    y1: float
    x2: float
    y2: float

    @model_validator(mode="after")
    def _ordered(self) -> "Box":
        if not (self.x2 > self.x1 and self.y2 > self.y1):
            raise ValueError("box needs x2 > x1 and y2 > y1")
        return self

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    @classmethod
    def from_list(cls, xyxy: list[float]) -> "Box":
        x1, y1, x2, y2 = xyxy
        return cls(x1=x1, y1=y1, x2=x2, y2=y2)

    def scaled(self, factor: float) -> "Box":
        """The same region in an image resized by ``factor``."""
        return Box(x1=self.x1 * factor, y1=self.y1 * factor, x2=self.x2 * factor, y2=self.y2 * factor)

    def misses(self, width: float, height: float) -> bool:
        """True when the box has no pixel in common with a ``width`` x ``height`` image."""
        return self.x1 >= width or self.y1 >= height or self.x2 <= 0 or self.y2 <= 0


class SearchFilters(Part):
    """Filters applied inside the vector search (payload conditions), not afterwards."""

    categories: list[Name] | None = Field(default=None, max_length=limits.MAX_LIST_ITEMS)
    shops: list[Name] | None = Field(default=None, max_length=limits.MAX_LIST_ITEMS)
    price_min: float | None = Field(default=None, ge=0)
    price_max: float | None = Field(default=None, ge=0)
    in_stock: bool | None = None


class ProductInfo(Part):
    """The catalogue fields stored with every point of a product."""

    product_id: ProductId
    title: Title = ""
    category: Name = ""
    brand: Name = ""
    offers: list[Offer] = Field(default_factory=list, max_length=limits.MAX_OFFERS)

    def payload(self) -> dict:
        """Store payload fields derived from the product (shared by all its points)."""
        offers = sorted(self.offers, key=lambda o: o.price)
        return {
            "product_id": self.product_id,
            "title": self.title,
            "category": self.category,
            "brand": self.brand,
            "offers": [o.model_dump() for o in offers],
            "min_price": offers[0].price if offers else None,
            "shops": sorted({o.shop for o in offers}),
            "in_stock": any(o.in_stock for o in offers),
        }


# --------------------------------------------------------------------------- catalog.events


class CatalogUpsert(Message):
    """A product was created or changed (catalog.events, keyed by product_id)."""

    type: Literal["upsert"] = "upsert"
    event_id: Id = Field(default_factory=new_id)
    product_id: ProductId
    title: Title = ""
    category: Name = ""
    brand: Name = ""
    images: list[ImageRef] = Field(min_length=1, max_length=limits.MAX_IMAGES_PER_EVENT)
    offers: list[Offer] = Field(default_factory=list, max_length=limits.MAX_OFFERS)

    def key(self) -> str:
        return self.product_id

    def product(self) -> ProductInfo:
        return ProductInfo(
            product_id=self.product_id,
            title=self.title,
            category=self.category,
            brand=self.brand,
            offers=self.offers,
        )


class CatalogDelete(Message):
    """A product left the catalogue: every point of it is removed."""

    type: Literal["delete"] = "delete"
    event_id: Id = Field(default_factory=new_id)
    product_id: ProductId

    def key(self) -> str:
        return self.product_id


# The key of index commands: one partition, so they apply in the order they were sent.
INDEX_KEY = "lookalike.index"


class IndexCommand(Message):
    """A step of a model upgrade (``lookalike reindex``; states in ``lookalike.shared.indexes``).

    Sent on catalog.events (``type`` "index"); ingest passes it on (``intent`` "command")
    through images.normalized and images.detected to embed, which holds the models: embed
    applies it, or refuses it with the reason, and reports it on catalog.indexed.
    """

    type: Literal["index"] = "index"
    intent: Literal["command"] = "command"
    event_id: Id = Field(default_factory=new_id)
    product_id: Literal["lookalike.index"] = INDEX_KEY  # what reports and dead letters name
    action: Literal["build", "switch", "rollback", "finish", "abort"]
    model: Id | None = None  # model id: build (required), switch and abort (checked when given)
    model_spec: Url | None = None  # build: what loads it, a registered id or a fine-tuned model directory
    force: bool = False  # switch: even when the new collection does not hold as many points as the active one

    def key(self) -> str:
        return INDEX_KEY


CatalogEvent = Annotated[CatalogUpsert | CatalogDelete | IndexCommand, Field(discriminator="type")]


# --------------------------------------------------------------------------- search / recommend requests


class SearchRequest(Message):
    """A shopper's photo search (search.requests, keyed by request_id)."""

    request_id: Id = Field(default_factory=new_id)
    image: ImageRef
    box: Box | None = None  # user-selected region: detection is skipped
    top_k: int = Field(default=10, ge=1, le=limits.MAX_TOP_K)
    filters: SearchFilters = Field(default_factory=SearchFilters)

    def key(self) -> str:
        return self.request_id


class RecommendRequest(Message):
    """"More like what I viewed" (recommend.requests, keyed by request_id)."""

    request_id: Id = Field(default_factory=new_id)
    positive: list[ProductId] = Field(min_length=1, max_length=limits.MAX_LIST_ITEMS)
    negative: list[ProductId] = Field(default_factory=list, max_length=limits.MAX_LIST_ITEMS)
    top_k: int = Field(default=10, ge=1, le=limits.MAX_TOP_K)
    filters: SearchFilters = Field(default_factory=SearchFilters)

    def key(self) -> str:
        return self.request_id


# --------------------------------------------------------------------------- pipeline stages


class IndexContext(Part):
    """What an index-intent image carries for the store."""

    event_id: Id
    product: ProductInfo
    image_index: int = Field(ge=0)
    image_url: Url | None = None
    # The models whose collections lack this image (ingest decides from the points); None: every
    # collection that receives catalogue changes (lookalike.shared.indexes).
    models: list[Id] | None = Field(default=None, max_length=3)

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        return _without(data, frozenset({"thumbnail"}))  # embed makes the thumbnail now


class QueryContext(Part):
    """What a query-intent image carries for the query function."""

    request_id: Id
    top_k: int
    filters: SearchFilters


class NormalizedImage(Message):
    """images.normalized: RGB JPEG, EXIF-rotated, longest side capped, bytes inline."""

    intent: Literal["index", "query"]
    image_id: Id  # sha256 of the source bytes
    jpeg: str  # base64
    width: int
    height: int
    box: Box | None = None  # user-selected region (query only)
    index: IndexContext | None = None
    query: QueryContext | None = None

    @model_validator(mode="after")
    def _context_matches_intent(self) -> "NormalizedImage":
        if (self.intent == "index") != (self.index is not None) or (self.intent == "query") != (
            self.query is not None
        ):
            raise ValueError("intent 'index' needs an index context, 'query' a query context")
        return self

    @field_validator("jpeg")
    @classmethod
    def _b64(cls, v: str) -> str:
        if not v:
            raise ValueError("empty image")
        return v

    def key(self) -> str:
        return self.index.product.product_id if self.index else self.query.request_id  # type: ignore[union-attr]

    def jpeg_bytes(self) -> bytes:
        return base64.b64decode(self.jpeg, validate=True)


class ProductSync(Message):
    """Closes a catalogue event on images.normalized and images.detected.

    It travels behind the event's images, keyed by product like them, so it reaches
    embed after them: embed then drops the product's points of images not in
    ``keep_image_ids`` (every point when empty: a delete) and applies the product's
    payload. Images of older events still in flight can't outlive a newer event.
    """

    intent: Literal["sync"] = "sync"
    event_id: Id
    product_id: ProductId
    keep_image_ids: list[Id] = Field(default_factory=list, max_length=limits.MAX_IMAGES_PER_EVENT)
    product: ProductInfo | None = None  # None for a delete
    outcome: Literal["indexed", "unchanged", "deleted"] = "indexed"
    new_images: int = 0

    def key(self) -> str:
        return self.product_id


class DetectedObject(Part):
    box: Box
    label: str
    score: float


class DetectedImage(NormalizedImage):
    """images.detected: the normalised image plus its objects (the whole image is always last)."""

    objects: list[DetectedObject] = Field(min_length=1)


class CatalogIndexed(Message):
    """catalog.indexed: a catalogue event reached the store (progress and audit).

    ``incomplete``: some of its images have no points (one was dead-lettered on the way);
    the product is not "unchanged" for the next send of the event, which indexes them.
    """

    event_id: str
    product_id: str
    outcome: Literal["indexed", "unchanged", "deleted", "incomplete"]
    new_images: int = 0  # images that went through detect and embed
    images: int = 0  # images the product has points for after the event
    missing_images: int = 0  # images the event named that have no points
    detail: Title | None = None  # an index command: why it was not applied ("incomplete")

    def key(self) -> str:
        return self.product_id


NormalizedMessage = Annotated[NormalizedImage | ProductSync | IndexCommand, Field(discriminator="intent")]
DetectedMessage = Annotated[DetectedImage | ProductSync | IndexCommand, Field(discriminator="intent")]


class QueryObject(Part):
    box: Box
    label: str
    score: float
    vector: list[float]


class QueryVectors(Message):
    """query.vectors: one search's embedded objects."""

    request_id: Id
    model: str
    top_k: int
    filters: SearchFilters
    objects: list[QueryObject] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        return _without(data, frozenset({"width", "height"}))  # nobody read them

    def key(self) -> str:
        return self.request_id


# --------------------------------------------------------------------------- results


class ComparedOffer(Offer):
    """An offer in a result, naming the listing (product id) it comes from."""

    product_id: str


class MatchedProduct(Part):
    """One result entry: a product, or several listings of the same item merged for price comparison."""

    product_id: str
    score: float
    title: str = ""
    category: str = ""
    brand: str = ""
    image_id: str = ""  # the image of this product that matched best
    image_url: str | None = None
    # Where in that image the matching object is, in pixels of an image of ``image_size``
    # (the stored, normalised one; its thumbnail has the same proportions): what the shopper's
    # photo matched. None for points written before these fields existed.
    matched_box: Box | None = None
    matched_label: str = ""
    image_size: tuple[int, int] | None = None
    # When the catalogue event that last changed this product was applied (Unix seconds): its
    # price and stock are as of then.
    applied_at: float | None = None
    offers: list[ComparedOffer] = Field(default_factory=list)  # every listing's offers, cheapest first
    best_offer: ComparedOffer | None = None  # cheapest in stock (cheapest at all when none is)
    merged_product_ids: list[str] = Field(default_factory=list)  # other listings of the same item
    # How sure the search is, from the thresholds `lookalike calibrate` fitted for this model and
    # catalogue (docs/quality.md): "same" (the photographed product; only the first entry),
    # "similar" or "other". None: not calibrated, or a recommendation. Left off the wire when None.
    match: Literal["same", "similar", "other"] | None = None


class ObjectResults(Part):
    box: Box | None = None
    label: str = "image"
    score: float = 1.0
    products: list[MatchedProduct]
    # The answer for this object: "same product" (the first entry is the photographed product),
    # "similar" (it is probably among the similar entries, which one is not sure) or "no confident
    # match" (the entries are only the closest there are). None: not calibrated, or a recommendation.
    answer: Literal["same product", "similar", "no confident match"] | None = None


class SearchResult(Message):
    """search.results: answers for one search or recommendation request."""

    request_id: str
    kind: Literal["search", "recommend"] = "search"
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    model: str | None = None
    objects: list[ObjectResults] = Field(default_factory=list)

    def key(self) -> str:
        return self.request_id
