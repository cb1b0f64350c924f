"""Embedded store: one Qdrant Edge shard per collection, inside this process.

Layout: ``<root>/<collection>/`` is the shard directory; next to Qdrant's own files
it holds ``lookalike-collection.json`` (our :class:`CollectionSpec`) so that
``ensure_collection`` can verify dim and distance on reopen.

Only one process may open a shard (its WAL is locked); a second open fails and is
reported as :class:`StoreUnavailable` (e.g. the old process is still shutting down).

Durability: we do not call ``shard.flush()`` after each write. With the WAL enabled
(the default) ``update()`` returns after the operation is appended to the WAL, and a
reopen replays it: a point written right before ``os._exit`` is there after reload,
so a process crash loses nothing acknowledged. ``flush()`` would also write the
segments out: I/O per batch for nothing the WAL doesn't already give us against a
crash; ``close()`` flushes. (Power loss was not tested: that depends on the WAL's
fsync policy, which the binding does not document.)
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import qdrant_edge as qe

from lookalike.shared.errors import StoreUnavailable
from lookalike.shared.messages import SearchFilters
from lookalike.shared.stores.base import (
    PAYLOAD_INDEXES,
    SCROLL_PAGE,
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

SPEC_FILE = "lookalike-collection.json"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a collection name is a directory name
_DISTANCES = {"cosine": qe.Distance.Cosine, "euclid": qe.Distance.Euclid}
_INDEX_TYPES = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "float": qe.PayloadSchemaType.Float,
    "bool": qe.PayloadSchemaType.Bool,
}
# The binding raises plain ``Exception``; these message prefixes are the caller's fault.
_CALLER_ERRORS = ("Wrong input", "Bad input", "Bad request", "Vector dimension error", "Not found", "Format error")


@contextmanager
def _engine_errors(what: str) -> Iterator[None]:
    """Engine I/O failures -> StoreUnavailable; caller mistakes stay ValueError/KeyError/TypeError."""
    try:
        yield
    except (KeyError, ValueError, TypeError):
        raise
    except Exception as e:
        if type(e) is Exception and str(e).startswith(_CALLER_ERRORS):
            raise ValueError(f"qdrant-edge {what}: {e}") from e
        raise StoreUnavailable(f"qdrant-edge {what}: {e}") from e


@dataclass
class _Open:
    shard: Any  # qe.EdgeShard
    spec: CollectionSpec


class EdgeStore(VectorStore):
    """Qdrant Edge shards under ``root``, shared by the threads of one process.

    Writes (and opening, optimising, closing) are serialised by one lock; reads take
    no lock and may run concurrently with each other and with a write.

    ``indexing_threshold_kb`` (EdgeOptimizersConfig.indexing_threshold, in KB of
    vectors) is the segment size from which ``optimize()`` builds an HNSW index;
    smaller segments stay plain (brute force, fast at catalogue sizes). It keeps
    each optimisation bounded to segments worth indexing. ``None`` keeps the
    engine's default.
    """

    backend = "qdrant-edge"

    def __init__(self, root: Path, indexing_threshold_kb: int | None = 20_000) -> None:
        self.root = Path(root)
        self._indexing_threshold_kb = indexing_threshold_kb
        self._shards: dict[str, _Open] = {}
        self._lock = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------------ collections

    def ensure_collection(self, spec: CollectionSpec) -> None:
        with self._lock:
            self._check_open()
            opened = self._shards.get(spec.name)
            if opened is not None:
                spec.check_matches(opened.spec.dim, opened.spec.distance)
                return
            existing = self._read_spec(spec.name)
            if existing is not None:
                spec.check_matches(existing.dim, existing.distance)
                self._load(existing)
                return
            path = self._path(spec.name)
            with _engine_errors(f"create {spec.name}"):
                path.mkdir(parents=True, exist_ok=True)
                shard = qe.EdgeShard.create(str(path), self._config(spec))
                self._ensure_indexes(shard)
                self._write_spec(spec)  # last: a spec file means "fully created"
            self._shards[spec.name] = _Open(shard, spec)

    def collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if _NAME.match(d.name) and self._read_spec(d.name) is not None
        )

    def count(self, collection: str) -> int:
        shard = self._shard(collection).shard
        with _engine_errors(f"count {collection}"):
            return shard.count(qe.CountRequest(exact=True))

    # ------------------------------------------------------------------ writes

    def upsert(self, collection: str, points: Sequence[PointRecord]) -> None:
        opened = self._shard(collection)
        batch = [qe.Point(p.id, as_vector(p.vector, opened.spec.dim), dict(p.payload)) for p in points]
        if batch:
            self._update(collection, qe.UpdateOperation.upsert_points(batch))

    def delete_points(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            self._update(collection, qe.UpdateOperation.delete_points(list(ids)))

    def delete_product(self, collection: str, product_id: str) -> None:
        flt = _filter(product_conditions(product_id))
        self._update(collection, qe.UpdateOperation.delete_points_by_filter(flt))

    def delete_product_images(self, collection: str, product_id: str, image_ids: Collection[str]) -> None:
        if image_ids:
            flt = _filter(product_conditions(product_id, image_ids))
            self._update(collection, qe.UpdateOperation.delete_points_by_filter(flt))

    def set_product_payload(self, collection: str, product_id: str, payload: dict) -> None:
        flt = _filter(product_conditions(product_id))
        self._update(collection, qe.UpdateOperation.set_payload_by_filter(flt, dict(payload)))

    def optimize(self, collection: str) -> None:
        """Build the HNSW index now (segments above ``indexing_threshold_kb``).

        Blocks until done and holds the GIL for the whole run: every other thread of
        the process stalls meanwhile (30k x 512-d took ~12 s). Call it from a quiet
        moment, not from a request path. Until it runs, searches scan plainly.
        """
        opened = self._shard(collection)
        with self._lock:
            self._check_open()
            with _engine_errors(f"optimize {collection}"):
                opened.shard.optimize()

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
        opened = self._shard(collection)
        conds = search_conditions(filters, exclude_product_ids)
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(as_vector(vector, opened.spec.dim)),
            filter=_filter(conds) if conds else None,
            with_payload=True,
            with_vector=with_vectors,
        )
        with _engine_errors(f"search {collection}"):
            found = opened.shard.query(request)
        return to_hits(found, with_vectors)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            shards, self._shards = self._shards, {}
            first_error: Exception | None = None
            for name, opened in shards.items():
                try:
                    with _engine_errors(f"close {name}"):
                        opened.shard.flush()
                        opened.shard.close()
                except Exception as e:  # close the others anyway
                    first_error = first_error or e
            if first_error is not None:
                raise first_error

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EdgeStore is closed")

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"invalid collection name {name!r}")
        return self.root / name

    def _config(self, spec: CollectionSpec) -> Any:
        optimizers = None
        if self._indexing_threshold_kb is not None:
            optimizers = qe.EdgeOptimizersConfig(indexing_threshold=self._indexing_threshold_kb)
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=spec.dim, distance=_DISTANCES[spec.distance]),
            optimizers=optimizers,
        )

    def _shard(self, name: str) -> _Open:
        """The open shard of a collection, loading it from disk on first use."""
        opened = self._shards.get(name)  # fast path, no lock: reads stay concurrent
        if opened is not None:
            return opened
        with self._lock:
            self._check_open()
            opened = self._shards.get(name)
            if opened is not None:
                return opened
            spec = self._read_spec(name)
            if spec is None:
                raise KeyError(f"unknown collection {name!r}")
            return self._load(spec)

    def _load(self, spec: CollectionSpec) -> _Open:
        # Passing the config re-checks compatibility and applies our optimizer settings.
        with _engine_errors(f"load {spec.name}"):
            shard = qe.EdgeShard.load(str(self._path(spec.name)), self._config(spec))
            self._ensure_indexes(shard)
        opened = self._shards[spec.name] = _Open(shard, spec)
        return opened

    @staticmethod
    def _ensure_indexes(shard: Any) -> None:
        present = set(shard.info().payload_schema)
        for field, kind in PAYLOAD_INDEXES.items():
            if field not in present:
                shard.update(qe.UpdateOperation.create_field_index(field, _INDEX_TYPES[kind]))

    def _read_spec(self, name: str) -> CollectionSpec | None:
        """Our spec file, else what Qdrant's own edge_config.json says; None if neither."""
        path = self._path(name)
        try:
            data = json.loads((path / SPEC_FILE).read_text())
            return CollectionSpec(name=name, dim=int(data["dim"]), distance=data["distance"])
        except FileNotFoundError:
            pass
        try:  # created, but we died before writing our spec file
            vectors = json.loads((path / "edge_config.json").read_text())["vectors"][""]
            return CollectionSpec(name=name, dim=int(vectors["size"]), distance=vectors["distance"].lower())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write_spec(self, spec: CollectionSpec) -> None:
        path = self._path(spec.name) / SPEC_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dim": spec.dim, "distance": spec.distance}))
        os.replace(tmp, path)

    def _update(self, collection: str, operation: Any) -> None:
        opened = self._shard(collection)
        with self._lock:
            self._check_open()
            with _engine_errors(f"write {collection}"):
                opened.shard.update(operation)

    def _scroll(
        self, collection: str, conds: Conditions, fields: list[str] | None, with_vector: bool
    ) -> Iterator[Any]:
        shard = self._shard(collection).shard
        flt = _filter(conds)
        offset = None
        while True:
            request = qe.ScrollRequest(
                offset=offset,
                limit=SCROLL_PAGE,
                filter=flt,
                with_payload=True if fields is None else qe.PayloadSelector.Include(fields),
                with_vector=with_vector,
            )
            with _engine_errors(f"scroll {collection}"):
                records, offset = shard.scroll(request)
            yield from records
            if offset is None:
                return


def _condition(c: MatchAny | MatchValue | Range) -> Any:
    if isinstance(c, MatchAny):
        return qe.FieldCondition(c.key, match=qe.MatchAny(list(c.values)))
    if isinstance(c, MatchValue):
        # Quirk (qdrant-edge 0.9): MatchValue(True) is read as the integer 1 (bool is an int
        # subclass) and never matches a bool payload. numpy.bool_ is not an int, so it
        # reaches the binding's bool branch and matches.
        value = numpy.bool_(c.value) if isinstance(c.value, bool) else c.value
        return qe.FieldCondition(c.key, match=qe.MatchValue(value))
    return qe.FieldCondition(c.key, range=qe.RangeFloat(gte=c.gte, lte=c.lte))


def _filter(conds: Conditions) -> Any:
    return qe.Filter(
        must=[_condition(c) for c in conds.must] or None,
        must_not=[_condition(c) for c in conds.must_not] or None,
    )

