"""Qdrant server store (REST via qdrant-client), or qdrant-client's in-process
``":memory:"`` mode for tests and demos."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import httpx
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from lookalike.shared.errors import StoreUnavailable
from lookalike.shared.messages import SearchFilters
from lookalike.shared.stores.base import (
    PAYLOAD_INDEXES,
    SCROLL_PAGE,
    SEARCH_OMITS,
    CollectionSpec,
    Conditions,
    Hit,
    MatchAny,
    MatchValue,
    PointRecord,
    Range,
    VectorStore,
    as_vector,
    product_conditions,
    search_conditions,
    to_hits,
)

try:  # grpc comes with qdrant-client; only used if someone turns prefer_grpc on
    import grpc
except ImportError:  # pragma: no cover
    grpc = None

_DISTANCES = {"cosine": models.Distance.COSINE, "euclid": models.Distance.EUCLID}


def _quantization(kind: str) -> models.QuantizationConfig | None:
    """The collection's quantized copy, kept in RAM (the float vectors rescore from disk)."""
    if kind == "int8":
        return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
    if kind == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    return None
_INDEX_TYPES = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "float": models.PayloadSchemaType.FLOAT,
    "bool": models.PayloadSchemaType.BOOL,
}


QUANTIZATIONS = ("none", "int8", "binary")


# Documents (read_doc/write_doc) live in a collection no model id can name: model collections
# are "lookalike__<model id>".
DOCS_COLLECTION = "lookalike_docs"


def _doc_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"lookalike-doc/{name}"))


class QdrantClientStore(VectorStore):
    """A Qdrant server at ``url`` (``":memory:"``: qdrant-client's local mode).

    Collections it creates on a cluster get ``shards`` and ``replication_factor``, and with
    ``quantization`` int8 (or binary) the quantized vectors stay in RAM while the float
    vectors go to disk and rescore the best candidates (sizing: docs/deploy.md).
    """

    backend = "qdrant-client"

    def __init__(self, url: str, api_key: str | None = None, timeout: int = 10, shards: int = 1,
                 replication_factor: int = 1, quantization: str = "none") -> None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"QDRANT_QUANTIZATION must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
        self.url = url
        self.shards, self.replication_factor, self.quantization = shards, replication_factor, quantization
        self._local = url == ":memory:"
        if self._local:
            self._client = QdrantClient(":memory:")
        else:
            # check_compatibility=False: no request at construction; the first call tells.
            self._client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
        # Local mode is plain Python dicts with no locking of its own; the server needs none.
        self._guard = threading.RLock() if self._local else nullcontext()

    # ------------------------------------------------------------------ collections

    def ensure_collection(self, spec: CollectionSpec) -> None:
        with self._errors(spec.name):
            if not self._client.collection_exists(spec.name):
                try:
                    self._client.create_collection(
                        spec.name,
                        vectors_config=models.VectorParams(size=spec.dim, distance=_DISTANCES[spec.distance],
                                                           on_disk=self.quantization != "none"),
                        shard_number=self.shards,
                        replication_factor=self.replication_factor,
                        # Two replicas must take a write before it is acknowledged, when there are two.
                        write_consistency_factor=min(2, self.replication_factor),
                        quantization_config=_quantization(self.quantization),
                    )
                except (UnexpectedResponse, ValueError):
                    # Another worker may have created it meanwhile: then verify it below.
                    if not self._client.collection_exists(spec.name):
                        raise
            info = self._client.get_collection(spec.name)
            params = info.config.params.vectors
            if not isinstance(params, models.VectorParams):
                raise ValueError(f"collection {spec.name!r} uses named vectors {sorted(params or {})}")
            spec.check_matches(params.size, str(params.distance.value).lower())
            # Local mode ignores payload indexes (and warns about each), so skip them there.
            if not self._local:
                present = set(info.payload_schema or {})
                for field, kind in PAYLOAD_INDEXES.items():
                    if field not in present:
                        self._client.create_payload_index(spec.name, field, _INDEX_TYPES[kind], wait=True)

    def collections(self) -> list[str]:
        with self._errors(None):
            return sorted(c.name for c in self._client.get_collections().collections if c.name != DOCS_COLLECTION)

    def count(self, collection: str) -> int:
        with self._errors(collection):
            return self._client.count(collection, exact=True).count

    # ------------------------------------------------------------------ writes

    def upsert(self, collection: str, points: Sequence[PointRecord]) -> None:
        batch = [models.PointStruct(id=p.id, vector=as_vector(p.vector), payload=dict(p.payload)) for p in points]
        if batch:
            with self._errors(collection):
                self._client.upsert(collection, batch, wait=True)

    def delete_points(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            with self._errors(collection):
                self._client.delete(collection, models.PointIdsList(points=list(ids)), wait=True)

    def delete_product(self, collection: str, product_id: str) -> None:
        selector = models.FilterSelector(filter=_filter(product_conditions(product_id)))
        with self._errors(collection):
            self._client.delete(collection, selector, wait=True)

    def delete_product_images(self, collection: str, product_id: str, image_ids: Collection[str]) -> None:
        if image_ids:
            selector = models.FilterSelector(filter=_filter(product_conditions(product_id, image_ids)))
            with self._errors(collection):
                self._client.delete(collection, selector, wait=True)

    def set_product_payload(self, collection: str, product_id: str, payload: dict) -> None:
        with self._errors(collection):
            self._client.set_payload(
                collection, dict(payload), points=_filter(product_conditions(product_id)), wait=True
            )

    def drop_collection(self, name: str) -> None:
        with self._errors(name):
            self._client.delete_collection(name)

    def read_doc(self, name: str) -> dict | None:
        with self._errors(DOCS_COLLECTION):
            if not self._client.collection_exists(DOCS_COLLECTION):
                return None
            found = self._client.retrieve(DOCS_COLLECTION, [_doc_id(name)], with_payload=True)
        return dict(found[0].payload["doc"]) if found else None

    def write_doc(self, name: str, doc: dict) -> None:
        """One point of a one-dimensional collection: a single-point upsert is atomic on the server."""
        with self._errors(DOCS_COLLECTION):
            if not self._client.collection_exists(DOCS_COLLECTION):
                try:
                    self._client.create_collection(
                        DOCS_COLLECTION, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT),
                        replication_factor=self.replication_factor,
                        write_consistency_factor=min(2, self.replication_factor))
                except (UnexpectedResponse, ValueError):
                    if not self._client.collection_exists(DOCS_COLLECTION):  # else another worker made it
                        raise
            self._client.upsert(DOCS_COLLECTION, [models.PointStruct(id=_doc_id(name), vector=[1.0],
                                                                     payload={"name": name, "doc": doc})], wait=True)

    def optimize(self, collection: str) -> None:
        """No-op: the server optimises (and builds HNSW) in the background by itself."""

    # ------------------------------------------------------------------ reads

    def search(
        self,
        collection: str,
        vector: Any,
        limit: int,
        filters: SearchFilters | None = None,
        exclude_product_ids: Collection[str] = (),
        with_vectors: bool = False,
    ) -> list[Hit]:
        conds = search_conditions(filters, exclude_product_ids)
        with self._errors(collection):
            found = self._client.query_points(
                collection,
                query=as_vector(vector),
                limit=limit,
                query_filter=_filter(conds) if conds else None,
                with_payload=models.PayloadSelectorExclude(exclude=list(SEARCH_OMITS)),
                with_vectors=with_vectors,
            ).points
        return to_hits(found, with_vectors)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ internals

    def _scroll(
        self, collection: str, conds: Conditions, fields: list[str] | None, with_vector: bool
    ) -> Iterator[Any]:
        flt = _filter(conds)
        offset = None
        while True:
            with self._errors(collection):
                records, offset = self._client.scroll(
                    collection,
                    scroll_filter=flt,
                    limit=SCROLL_PAGE,
                    offset=offset,
                    with_payload=True if fields is None else fields,
                    with_vectors=with_vector,
                )
            yield from records
            if offset is None:
                return

    @contextmanager
    def _errors(self, collection: str | None) -> Iterator[None]:
        """Transport failures -> StoreUnavailable; unknown collection -> KeyError; bad input -> ValueError."""
        what = f"qdrant at {self.url}" + (f", collection {collection!r}" if collection else "")
        try:
            with self._guard:
                yield
        except UnexpectedResponse as e:  # the server answered with an error status
            status = e.status_code
            if status == 404:
                raise KeyError(f"unknown collection {collection!r} ({what})") from e
            if status is None or status >= 500 or status == 429:
                raise StoreUnavailable(f"{what}: HTTP {status}") from e
            raise ValueError(f"{what} rejected the request: HTTP {status} {e.content[:500]!r}") from e
        except (ResponseHandlingException, httpx.TransportError) as e:  # no usable answer at all
            raise StoreUnavailable(f"{what}: {e}") from e
        except ValueError as e:
            # Local mode reports an unknown collection as ValueError("Collection x not found").
            if self._local and "not found" in str(e):
                raise KeyError(f"unknown collection {collection!r}") from e
            raise
        except Exception as e:
            if grpc is not None and isinstance(e, grpc.RpcError):
                code = e.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.NOT_FOUND:
                    raise KeyError(f"unknown collection {collection!r} ({what})") from e
                if code in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.ABORTED,
                ):
                    raise StoreUnavailable(f"{what}: {code.name}") from e
            raise


def _condition(c: MatchAny | MatchValue | Range) -> models.FieldCondition:
    if isinstance(c, MatchAny):
        return models.FieldCondition(key=c.key, match=models.MatchAny(any=list(c.values)))
    if isinstance(c, MatchValue):
        return models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value))
    return models.FieldCondition(key=c.key, range=models.Range(gte=c.gte, lte=c.lte))


def _filter(conds: Conditions) -> models.Filter:
    return models.Filter(
        must=[_condition(c) for c in conds.must] or None,
        must_not=[_condition(c) for c in conds.must_not] or None,
    )

