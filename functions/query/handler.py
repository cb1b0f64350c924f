"""query: nearest products for query vectors, and recommendations from a shopper's history.

query.vectors      -> search.results
recommend.requests -> search.results

Hits are collapsed to one entry per product (its best-scoring image wins and is
named), and every product carries its offers sorted by price with the best marked.
With thresholds from ``lookalike calibrate`` (:class:`Thresholds`, read from
``<data dir>/calibration/<model id>.json``) every search result says how sure it is:
entries are marked same/similar/other, each object gets an answer.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lookalike.shared.indexes import Indexes
from lookalike.shared.messages import (
    QUERY_VECTORS,
    RECOMMEND_REQUESTS,
    SEARCH_RESULTS,
    Box,
    ComparedOffer,
    MatchedProduct,
    ObjectResults,
    QueryVectors,
    RecommendRequest,
    SearchFilters,
    SearchResult,
)
from lookalike.shared.runtime import Emit, Function, Route
from lookalike.shared.stores import Hit


def _offers(payload: dict) -> list[ComparedOffer]:
    return [ComparedOffer(**o, product_id=payload["product_id"]) for o in payload.get("offers") or []]


def _price_sorted(offers: list[ComparedOffer]) -> tuple[list[ComparedOffer], ComparedOffer | None]:
    offers = sorted(offers, key=lambda o: o.price)
    return offers, next((o for o in offers if o.in_stock), offers[0] if offers else None)


def collapse(hits: list[Hit], top_k: int, merge_threshold: float = 1.0) -> list[MatchedProduct]:
    """One entry per product, in hit order (hits come best first).

    A product whose best-matching vector is at least ``merge_threshold`` similar
    (cosine) to that of an entry already kept is another shop's listing of the same
    item: its offers join that entry's price comparison instead of taking a place.
    """
    entries: list[MatchedProduct] = []
    anchors: list = []  # the best-matching vector of each entry, for duplicate detection
    seen: set[str] = set()
    for hit in hits:
        p = hit.payload
        pid = p.get("product_id")
        if pid is None or pid in seen:
            continue
        seen.add(pid)
        duplicate_of = None
        if merge_threshold < 1.0 and hit.vector is not None:
            for entry, anchor in zip(entries, anchors):
                if float(np.dot(anchor, hit.vector)) >= merge_threshold:
                    duplicate_of = entry
                    break
        if duplicate_of is not None:
            duplicate_of.merged_product_ids.append(pid)
            duplicate_of.offers, duplicate_of.best_offer = _price_sorted(duplicate_of.offers + _offers(p))
            continue
        if len(entries) == top_k:
            continue  # still scan the rest: later hits may be listings of kept entries
        offers, best = _price_sorted(_offers(p))
        box, size = p.get("box"), p.get("image_size")
        entries.append(MatchedProduct(
            product_id=pid, score=hit.score, title=p.get("title", ""), category=p.get("category", ""),
            brand=p.get("brand", ""), image_id=p.get("image_id", ""), image_url=p.get("image_url"),
            offers=offers, best_offer=best,
            matched_box=Box.from_list(box) if box and size else None, matched_label=p.get("label", ""),
            image_size=tuple(size) if box and size else None, applied_at=p.get("applied_at"),
        ))
        anchors.append(hit.vector)
    return entries


log = logging.getLogger("lookalike.query")

CALIBRATION_FORMAT = "lookalike-calibration-v1"


def calibration_path(data_dir: str | Path, model_id: str) -> Path:
    """Where ``lookalike calibrate`` writes, and the query function reads, a model's thresholds."""
    return Path(data_dir) / "calibration" / f"{model_id}.json"


@dataclass(frozen=True)
class Thresholds:
    """When a search result is a confident answer (fitted by ``lookalike calibrate``, docs/quality.md).

    * ``same_margin``: the first entry is the **same product** when its score beats the second
      entry's by at least this much (cosine). The margin, not the score itself: with these
      models the top score says how photo-like the match is, hardly whether it is the right
      product (docs/quality.md). Needs a second entry to compare with. None: never.
    * ``similar_score``: entries scoring at least this are **similar**; when the first one does,
      the photographed product was among the first five in at least the target share of the
      labelled searches. None: never.
    """

    same_margin: float | None
    similar_score: float | None
    info: dict = field(default_factory=dict, compare=False)  # what the file says about the fit

    def mark(self, products: list[MatchedProduct]) -> str:
        """Set each entry's ``match``; return the object's answer."""
        for p in products:
            p.match = "similar" if self.similar_score is not None and p.score >= self.similar_score else "other"
        if (len(products) >= 2 and self.same_margin is not None
                and products[0].score - products[1].score >= self.same_margin):
            products[0].match = "same"
            return "same product"
        return "similar" if products and products[0].match == "similar" else "no confident match"

    def to_dict(self) -> dict:
        return {"same_margin": self.same_margin, "similar_score": self.similar_score}

    def describe(self) -> str:
        def f(v):
            return "never" if v is None else f">= {v:.4f}"

        return f"same product: margin {f(self.same_margin)}, similar: score {f(self.similar_score)}"

    @classmethod
    def load(cls, path: str | Path, model_id: str, distance: str = "cosine") -> "Thresholds | None":
        """The thresholds in ``path`` for ``model_id``; None when there is no file or it is for another
        model or distance (logged). A file that cannot be read is an error: fix or remove it."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != CALIBRATION_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
            t = doc["thresholds"]
            values = [t["same_margin"], t["similar_score"]]
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v))
                   for v in values):
                raise ValueError(f"thresholds must be numbers or null: {t}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"calibration file {path} cannot be used ({e}): run `lookalike calibrate` "
                             "again or remove it") from None
        if doc.get("model") != model_id or doc.get("distance", "cosine") != distance:
            log.warning("ignoring %s: fitted for model %s (%s distance), this query function searches %s (%s)",
                        path, doc.get("model"), doc.get("distance", "cosine"), model_id, distance)
            return None
        info = {k: doc.get(k) for k in ("catalogue", "precision_target", "created")}
        return cls(*(None if v is None else float(v) for v in values), info=info)


class CollectionGone(Exception):
    """The collection searched does not exist (any more)."""


class Query(Function):
    name = "query"

    def __init__(self, indexes: Indexes, oversample: int = 5, merge_threshold: float = 0.95,
                 max_points: int = 1000, thresholds: Thresholds | None = None,
                 load_thresholds: Callable[[str], Thresholds | None] | None = None):
        """``thresholds``: the default model's; ``load_thresholds(model id)``: another's (after a reindex)."""
        super().__init__()
        self._thresholds = {indexes.default.id: thresholds}
        self.load_thresholds = load_thresholds
        self.merge_threshold = merge_threshold
        self.indexes = indexes
        self.store = indexes.store
        self.oversample = oversample
        self.max_points = max_points

    def routes(self) -> list[Route]:
        return [
            Route(QUERY_VECTORS, QueryVectors, self.on_vectors),
            Route(RECOMMEND_REQUESTS, RecommendRequest, self.on_recommend),
        ]

    def thresholds(self, model: str) -> Thresholds | None:
        if model not in self._thresholds:
            self._thresholds[model] = self.load_thresholds(model) if self.load_thresholds else None
        return self._thresholds[model]

    def _search(self, collection: str, vector, top_k: int, filters: SearchFilters,
                exclude=()) -> list[MatchedProduct]:
        """The ``top_k`` best products: fetch ``top_k * oversample`` points, collapse them per product.

        A product with many images (or objects) can fill the first fetch on its own; then the
        fetch widens (x4 each time, up to ``max_points``) until ``top_k`` products are found or
        the store has no more matching points."""
        merge = self.merge_threshold < 1.0
        limit = max(1, top_k * self.oversample)
        while True:
            try:
                hits = self.store.search(collection, vector, limit, filters, exclude, with_vectors=merge)
            except KeyError:  # the stores' "unknown collection"
                raise CollectionGone(collection) from None
            products = collapse(hits, top_k, self.merge_threshold)
            if len(products) >= top_k or len(hits) < limit or limit >= self.max_points:
                return products
            limit = min(limit * 4, self.max_points)
            self.counters["widened_searches"] += 1

    def on_vectors(self, msg: QueryVectors) -> list[Emit]:
        # The collection of the model that embedded the photo: it was the active one then,
        # so it is whole (a model upgrade switches which model embeds, lookalike.shared.indexes).
        collection = self.indexes.collection(msg.model)
        try:
            objects = [self._object(collection, msg.model, o, msg.top_k, msg.filters) for o in msg.objects]
        except CollectionGone:  # that model left service since (a finished upgrade)
            result = SearchResult(request_id=msg.request_id, status="error", model=msg.model,
                                  error=f"model {msg.model} is no longer served: search again")
            return [Emit(SEARCH_RESULTS, result)]
        self.counters["searches"] += 1
        return [Emit(SEARCH_RESULTS, SearchResult(request_id=msg.request_id, model=msg.model, objects=objects))]

    def _object(self, collection: str, model: str, o, top_k: int, filters: SearchFilters) -> ObjectResults:
        thresholds = self.thresholds(model)
        if thresholds is None:
            return ObjectResults(box=o.box, label=o.label, score=o.score,
                                 products=self._search(collection, o.vector, top_k, filters))
        # "same product" compares the first entry with the second: fetch one even for top_k=1
        products = self._search(collection, o.vector, max(top_k, 2), filters)
        answer = thresholds.mark(products)
        return ObjectResults(box=o.box, label=o.label, score=o.score, products=products[:top_k], answer=answer)

    def on_recommend(self, msg: RecommendRequest) -> list[Emit]:
        model = self.indexes.state().active.id
        collection = self.indexes.collection(model)
        vectors = self.store.product_vectors(collection, msg.positive + msg.negative)
        positive = [v for pid in msg.positive for v in vectors.get(pid, [])]
        negative = [v for pid in msg.negative for v in vectors.get(pid, [])]
        if not positive:
            result = SearchResult(request_id=msg.request_id, kind="recommend", status="error", model=model,
                                  error=f"none of the products {msg.positive} is indexed")
            return [Emit(SEARCH_RESULTS, result)]
        # Qdrant's "average vector" strategy: move towards what was liked, away from the rest.
        target = np.mean(positive, axis=0)
        if negative:
            target = target + (target - np.mean(negative, axis=0))
        target = target / (np.linalg.norm(target) or 1.0)
        products = self._search(collection, target, msg.top_k, msg.filters, exclude=msg.positive + msg.negative)
        self.counters["recommendations"] += 1
        return [Emit(SEARCH_RESULTS, SearchResult(request_id=msg.request_id, kind="recommend", model=model,
                                                  objects=[ObjectResults(label="history", products=products)]))]
