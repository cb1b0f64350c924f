"""Every message that travels on a lookalike topic, as pydantic v2 models.

JSON on the wire. Each message carries ``schema_version`` and a trace id
(``event_id`` for catalogue traffic, ``request_id`` for shopper traffic) that
every derived message copies, so one id follows a photo through all stages.
Catalogue messages are keyed by ``product_id`` (per-product order); query
messages by ``request_id``.
"""

from __future__ import annotations

import base64
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
THUMBNAIL_SIDE = 160

# Topic names, in pipeline order. ``<topic>.dlq`` holds that topic's poison messages.
CATALOG_EVENTS = "catalog.events"
SEARCH_REQUESTS = "search.requests"
RECOMMEND_REQUESTS = "recommend.requests"
IMAGES_NORMALIZED = "images.normalized"
IMAGES_DETECTED = "images.detected"
QUERY_VECTORS = "query.vectors"
SEARCH_RESULTS = "search.results"
CATALOG_INDEXED = "catalog.indexed"
ALL_TOPICS = (
    CATALOG_EVENTS,
    SEARCH_REQUESTS,
    RECOMMEND_REQUESTS,
    IMAGES_NORMALIZED,
    IMAGES_DETECTED,
    QUERY_VECTORS,
    SEARCH_RESULTS,
    CATALOG_INDEXED,
)

# Each function's input topics (its consumer group is lookalike-<function>).
FUNCTION_INPUTS = {
    "ingest": (CATALOG_EVENTS, SEARCH_REQUESTS),
    "detect": (IMAGES_NORMALIZED,),
    "embed": (IMAGES_DETECTED,),
    "query": (QUERY_VECTORS, RECOMMEND_REQUESTS),
}


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


# Point ids are uuid5 of (product, image, object): redelivery overwrites, never duplicates.
POINT_NAMESPACE = uuid.UUID("6f0c1f4e-6b1e-4d55-9a57-2f8a7f6f1c01")


def point_id(product_id: str, image_id: str, object_index: int) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{product_id}/{image_id}/{object_index}"))


def new_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """Base of every wire message: strict about unknown fields, versioned."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION

    def key(self) -> str:
        """Kafka key of this message (ordering unit)."""
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# --------------------------------------------------------------------------- parts


class Offer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shop: str = Field(min_length=1)
    price: float = Field(ge=0)
    currency: str = Field(default="EUR", min_length=3, max_length=3)
    url: str | None = None
    in_stock: bool = True


class ImageRef(BaseModel):
    """Where an image comes from: exactly one of ``url`` (http/https) or ``data`` (base64).

    ``path`` is only accepted in catalogue files read by ``lookalike index``, which
    inlines the bytes as ``data`` before publishing; it never travels on a topic.
    """

    model_config = ConfigDict(extra="forbid")
    url: str | None = None
    data: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        given = [n for n in ("url", "data", "path") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"an image needs exactly one of url, data or path (got {given or 'none'})")
        return self

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ImageRef":
        return cls(data=base64.b64encode(raw).decode())


class Box(BaseModel):
    """Pixel box ``[x1, y1, x2, y2]`` in the coordinates of the normalised image."""

    model_config = ConfigDict(extra="forbid")
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


class SearchFilters(BaseModel):
    """Filters applied inside the vector search (payload conditions), not afterwards."""

    model_config = ConfigDict(extra="forbid")
    categories: list[str] | None = None
    shops: list[str] | None = None
    price_min: float | None = Field(default=None, ge=0)
    price_max: float | None = Field(default=None, ge=0)
    in_stock: bool | None = None


class ProductInfo(BaseModel):
    """The catalogue fields stored with every point of a product."""

    model_config = ConfigDict(extra="forbid")
    product_id: str
    title: str = ""
    category: str = ""
    brand: str = ""
    offers: list[Offer] = Field(default_factory=list)

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
    event_id: str = Field(default_factory=new_id)
    product_id: str = Field(min_length=1, max_length=200)
    title: str = ""
    category: str = ""
    brand: str = ""
    images: list[ImageRef] = Field(min_length=1, max_length=20)
    offers: list[Offer] = Field(default_factory=list)

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
    event_id: str = Field(default_factory=new_id)
    product_id: str = Field(min_length=1, max_length=200)

    def key(self) -> str:
        return self.product_id


CatalogEvent = Annotated[CatalogUpsert | CatalogDelete, Field(discriminator="type")]


# --------------------------------------------------------------------------- search / recommend requests


class SearchRequest(Message):
    """A shopper's photo search (search.requests, keyed by request_id)."""

    request_id: str = Field(default_factory=new_id)
    image: ImageRef
    box: Box | None = None  # user-selected region: detection is skipped
    top_k: int = Field(default=10, ge=1, le=100)
    filters: SearchFilters = Field(default_factory=SearchFilters)

    def key(self) -> str:
        return self.request_id


class RecommendRequest(Message):
    """"More like what I viewed" (recommend.requests, keyed by request_id)."""

    request_id: str = Field(default_factory=new_id)
    positive: list[str] = Field(min_length=1, max_length=50)
    negative: list[str] = Field(default_factory=list, max_length=50)
    top_k: int = Field(default=10, ge=1, le=100)
    filters: SearchFilters = Field(default_factory=SearchFilters)

    def key(self) -> str:
        return self.request_id


# --------------------------------------------------------------------------- pipeline stages


class IndexContext(BaseModel):
    """What an index-intent image carries for the store."""

    model_config = ConfigDict(extra="forbid")
    event_id: str
    product: ProductInfo
    image_index: int = Field(ge=0)
    image_url: str | None = None
    thumbnail: str | None = None  # base64 JPEG, longest side THUMBNAIL_SIDE: result pages show it


class QueryContext(BaseModel):
    """What a query-intent image carries for the query function."""

    model_config = ConfigDict(extra="forbid")
    request_id: str
    top_k: int
    filters: SearchFilters


class NormalizedImage(Message):
    """images.normalized: RGB JPEG, EXIF-rotated, longest side capped, bytes inline."""

    intent: Literal["index", "query"]
    image_id: str  # sha256 of the source bytes
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

    def trace_id(self) -> str:
        return self.index.event_id if self.index else self.query.request_id  # type: ignore[union-attr]

    def key(self) -> str:
        return self.index.product.product_id if self.index else self.query.request_id  # type: ignore[union-attr]

    def jpeg_bytes(self) -> bytes:
        return base64.b64decode(self.jpeg)


class ProductSync(Message):
    """Closes a catalogue event on images.normalized and images.detected.

    It travels behind the event's images, keyed by product like them, so it reaches
    embed after them: embed then drops the product's points of images not in
    ``keep_image_ids`` (every point when empty: a delete) and applies the product's
    payload. Images of older events still in flight can't outlive a newer event.
    """

    intent: Literal["sync"] = "sync"
    event_id: str
    product_id: str
    keep_image_ids: list[str] = Field(default_factory=list)
    product: ProductInfo | None = None  # None for a delete
    outcome: Literal["indexed", "unchanged", "deleted"] = "indexed"
    new_images: int = 0

    def key(self) -> str:
        return self.product_id


class DetectedObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    box: Box
    label: str
    score: float


class DetectedImage(NormalizedImage):
    """images.detected: the normalised image plus its objects (the whole image is always last)."""

    objects: list[DetectedObject] = Field(min_length=1)


class CatalogIndexed(Message):
    """catalog.indexed: a catalogue event is fully applied to the store (progress and audit)."""

    event_id: str
    product_id: str
    outcome: Literal["indexed", "unchanged", "deleted"]
    new_images: int = 0  # images that went through detect and embed
    images: int = 0  # images the product has after the event

    def key(self) -> str:
        return self.product_id


NormalizedMessage = Annotated[NormalizedImage | ProductSync, Field(discriminator="intent")]
DetectedMessage = Annotated[DetectedImage | ProductSync, Field(discriminator="intent")]


class QueryObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    box: Box
    label: str
    score: float
    vector: list[float]


class QueryVectors(Message):
    """query.vectors: one search's embedded objects."""

    request_id: str
    model: str
    top_k: int
    filters: SearchFilters
    width: int
    height: int
    objects: list[QueryObject] = Field(min_length=1)

    def key(self) -> str:
        return self.request_id


# --------------------------------------------------------------------------- results


class ComparedOffer(Offer):
    """An offer in a result, naming the listing (product id) it comes from."""

    product_id: str


class MatchedProduct(BaseModel):
    """One result entry: a product, or several listings of the same item merged for price comparison."""

    model_config = ConfigDict(extra="forbid")
    product_id: str
    score: float
    title: str = ""
    category: str = ""
    brand: str = ""
    image_id: str = ""  # the image of this product that matched best
    image_url: str | None = None
    offers: list[ComparedOffer] = Field(default_factory=list)  # every listing's offers, cheapest first
    best_offer: ComparedOffer | None = None  # cheapest in stock (cheapest at all when none is)
    merged_product_ids: list[str] = Field(default_factory=list)  # other listings of the same item


class ObjectResults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    box: Box | None = None
    label: str = "image"
    score: float = 1.0
    products: list[MatchedProduct]


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
