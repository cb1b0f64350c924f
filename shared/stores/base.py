"""The vector-store interface and the logic both adapters share.

A collection holds one point per detected object of a catalogue image. Point ids
come from :func:`lookalike.shared.messages.point_id`, so redelivering an image overwrites
its points. Every point of a product carries the product's catalogue fields
(:meth:`lookalike.shared.messages.ProductInfo.payload`), which is what filters run on.

Filters are described here once, backend-neutrally (:class:`Conditions`); each
adapter translates them into its own filter classes and hands them to the engine,
so they are applied inside the vector search, never to a short list afterwards.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy

from lookalike.shared.messages import SearchFilters

Distance = Literal["cosine", "euclid"]

# Payload fields a search hit leaves out. The thumbnail (a base64 JPEG, most of a point's
# payload) is served by the gateway from ``product_payloads``; no search result shows it, and
# reading it back cost about 1 ms of a 6-object photo search at 100k points (docs/benchmarks.md).
SEARCH_OMITS = ("thumbnail",)

# Payload fields indexed in every collection, with their index kind.
PAYLOAD_INDEXES: dict[str, Literal["keyword", "float", "bool"]] = {
    "product_id": "keyword",  # image_id has none: it is only ever matched within one product
    "category": "keyword",
    "shops": "keyword",
    "min_price": "float",
    "in_stock": "bool",
}

# Page size when scrolling through a product's points.
SCROLL_PAGE = 256


@dataclass(frozen=True)
class CollectionSpec:
    name: str  # e.g. "lookalike__efficientnet_lite0"
    dim: int
    distance: Distance = "cosine"

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"collection {self.name!r}: dim must be positive, got {self.dim}")
        if self.distance not in ("cosine", "euclid"):
            raise ValueError(f"collection {self.name!r}: unknown distance {self.distance!r}")

    def check_matches(self, dim: int, distance: str) -> None:
        """Raise ValueError naming both when the stored ``dim``/``distance`` differ from this spec."""
        if (dim, distance) != (self.dim, self.distance):
            raise ValueError(
                f"collection {self.name!r} exists with dim={dim} distance={distance}, "
                f"but dim={self.dim} distance={self.distance} was asked for"
            )


@dataclass
class PointRecord:
    id: str  # uuid string (from lookalike.shared.messages.point_id)
    vector: Sequence[float] | numpy.ndarray
    payload: dict


@dataclass
class Hit:
    id: str
    # As Qdrant returns it: cosine similarity (higher is closer) or euclidean
    # distance (lower is closer). Lists of hits are always best-first.
    score: float
    payload: dict
    point: Any = field(default=None, repr=False, compare=False)  # the engine's, when vectors were asked for

    @functools.cached_property
    def vector(self) -> numpy.ndarray | None:
        """The point's vector (``search(..., with_vectors=True)``; else None), converted at first read.

        Grouping reads only each product's best hit; converting all 50 hits' vectors took 2 ms of a
        3.3 ms search at 100k points (1280-d, docs/benchmarks.md)."""
        if self.point is None:
            return None
        return numpy.asarray(plain_vector(self.point.vector), dtype=numpy.float32)


# --------------------------------------------------------------------------- neutral filter description


@dataclass(frozen=True)
class MatchAny:
    """The field (or one element of a list field) equals one of ``values``."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class MatchValue:
    key: str
    value: str | bool


@dataclass(frozen=True)
class Range:
    """Numeric range, both ends inclusive; a missing/null field never matches."""

    key: str
    gte: float | None = None
    lte: float | None = None


Condition = MatchAny | MatchValue | Range


@dataclass(frozen=True)
class Conditions:
    """AND of ``must``, none of ``must_not``. Empty means "every point"."""

    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.must or self.must_not)


def search_conditions(filters: SearchFilters | None, exclude_product_ids: Collection[str] = ()) -> Conditions:
    """What a shopper's filters mean as payload conditions.

    An empty list (``categories=[]``) means "no filter on that field", not "match
    nothing": clients send empty lists for untouched facets.
    """
    must: list[Condition] = []
    if filters is not None:
        if filters.categories:
            must.append(MatchAny("category", tuple(filters.categories)))
        if filters.shops:
            must.append(MatchAny("shops", tuple(filters.shops)))
        if filters.price_min is not None or filters.price_max is not None:
            must.append(Range("min_price", gte=filters.price_min, lte=filters.price_max))
        if filters.in_stock is not None:
            must.append(MatchValue("in_stock", filters.in_stock))
    must_not: list[Condition] = []
    if exclude_product_ids:
        must_not.append(MatchAny("product_id", tuple(exclude_product_ids)))
    return Conditions(must=tuple(must), must_not=tuple(must_not))


def product_conditions(product_ids: str | Sequence[str], image_ids: Collection[str] | None = None) -> Conditions:
    """Points of these products (and, if given, of these images of them only)."""
    ids = (product_ids,) if isinstance(product_ids, str) else tuple(product_ids)
    must: list[Condition] = [MatchValue("product_id", ids[0]) if len(ids) == 1 else MatchAny("product_id", ids)]
    if image_ids is not None:
        must.append(MatchAny("image_id", tuple(image_ids)))
    return Conditions(must=tuple(must))


def plain_vector(vector: Any) -> Any:
    """The default (unnamed) vector comes back as a list; a dict would mean named vectors."""
    return vector[""] if isinstance(vector, dict) else vector


def to_hits(found: Sequence[Any], with_vectors: bool) -> list[Hit]:
    """Engine results as ``Hit``s; ids as canonical strings (Edge returns uuid.UUID)."""
    return [
        Hit(id=str(p.id), score=p.score, payload=p.payload or {}, point=p if with_vectors else None)
        for p in found
    ]


def as_vector(vector: Any, dim: int | None = None) -> list[float]:
    """A flat list of floats (what both engines take), checked against ``dim`` when known."""
    flat = numpy.asarray(vector, dtype=numpy.float32).reshape(-1)
    if dim is not None and flat.shape[0] != dim:
        raise ValueError(f"vector has dim {flat.shape[0]}, collection expects {dim}")
    return flat.tolist()


# --------------------------------------------------------------------------- interface


class VectorStore(ABC):
    """One collection per embedding model; see the module docstring for the data model.

    Transport/engine I/O failures raise :class:`lookalike.shared.errors.StoreUnavailable`
    (retry later); programmer errors stay ``KeyError`` (unknown collection) or
    ``ValueError`` (wrong dim, spec mismatch).
    """

    backend: str  # "qdrant-edge" | "qdrant-client"

    @abstractmethod
    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection with its payload indexes; no-op if it exists with this spec.

        Raises ValueError naming both specs if it exists with another dim or distance.
        """

    @abstractmethod
    def upsert(self, collection: str, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points; returns once the write is acknowledged/durable."""

    @abstractmethod
    def delete_points(self, collection: str, ids: Sequence[str]) -> None:
        """Delete points by id (unknown ids are ignored)."""

    @abstractmethod
    def delete_product(self, collection: str, product_id: str) -> None:
        """Delete every point of the product."""

    @abstractmethod
    def delete_product_images(self, collection: str, product_id: str, image_ids: Collection[str]) -> None:
        """Delete the points of these images of the product only."""

    @abstractmethod
    def set_product_payload(self, collection: str, product_id: str, payload: dict) -> None:
        """Merge ``payload`` into every point of the product (vectors untouched)."""

    def product_image_ids(self, collection: str, product_id: str) -> set[str]:
        """Image ids that have points for this product."""
        records = self._scroll(collection, product_conditions(product_id), ["image_id"], with_vector=False)
        return {r.payload["image_id"] for r in records if r.payload and "image_id" in r.payload}

    # -------------------------------------------------------------- built on the primitives

    def retain_product_images(self, collection: str, product_id: str, keep_image_ids: Collection[str]) -> None:
        """Delete the product's points whose image is not in ``keep_image_ids`` (all, if empty)."""
        if not keep_image_ids:
            self.delete_product(collection, product_id)
            return
        stale = self.product_image_ids(collection, product_id) - set(keep_image_ids)
        if stale:
            self.delete_product_images(collection, product_id, stale)

    def product_payloads(self, collection: str, product_id: str) -> list[dict]:
        """Payload of every point of a product, each with its ``point_id`` added."""
        records = self._scroll(collection, product_conditions(product_id), None, with_vector=False)
        return [{**(r.payload or {}), "point_id": str(r.id)} for r in records]

    def product_vectors(self, collection: str, product_ids: Sequence[str]) -> dict[str, list[numpy.ndarray]]:
        """Stored vectors per product (float32; cosine collections hold them unit-normalised).

        Products without points are absent from the result.
        """
        if not product_ids:
            return {}
        records = self._scroll(collection, product_conditions(product_ids), ["product_id"], with_vector=True)
        return group_vectors([(r.payload["product_id"], plain_vector(r.vector)) for r in records])

    @abstractmethod
    def _scroll(self, collection: str, conds: Conditions, fields: list[str] | None, with_vector: bool) -> Iterator[Any]:
        """Every point matching ``conds`` (records with ``id``, ``payload``, ``vector``), page by page.

        ``fields``: payload keys to return (None: all of them).
        """

    @abstractmethod
    def search(
        self,
        collection: str,
        vector: Any,
        limit: int,
        filters: SearchFilters | None = None,
        exclude_product_ids: Collection[str] = (),
        with_vectors: bool = False,
    ) -> list[Hit]:
        """Nearest points, best first, filtered inside the search; payloads without ``SEARCH_OMITS``."""

    @abstractmethod
    def count(self, collection: str) -> int:
        """Exact number of points."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Names of the existing collections, sorted."""

    @abstractmethod
    def drop_collection(self, name: str) -> None:
        """Remove the collection and its points; no-op when it does not exist."""

    @abstractmethod
    def read_doc(self, name: str) -> dict | None:
        """A small JSON document kept beside the collections (the index state); None if never written."""

    @abstractmethod
    def write_doc(self, name: str, doc: dict) -> None:
        """Replace the document ``name`` atomically: a reader sees the old one or the new one."""

    @abstractmethod
    def optimize(self, collection: str) -> None:
        """Build search indexes now where the backend needs it (see adapters)."""

    @abstractmethod
    def close(self) -> None:
        """Release the store; the object is unusable afterwards."""

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def group_vectors(records: list[tuple[str, Any]]) -> dict[str, list[numpy.ndarray]]:
    """``[(product_id, vector), ...]`` -> ``{product_id: [float32 array, ...]}``."""
    out: dict[str, list[numpy.ndarray]] = {}
    for product_id, vector in records:
        out.setdefault(product_id, []).append(numpy.asarray(vector, dtype=numpy.float32))
    return out


__all__ = [
    "PAYLOAD_INDEXES",
    "SEARCH_OMITS",
    "CollectionSpec",
    "Conditions",
    "Hit",
    "MatchAny",
    "MatchValue",
    "PointRecord",
    "Range",
    "VectorStore",
    "as_vector",
    "group_vectors",
    "product_conditions",
    "search_conditions",
]
