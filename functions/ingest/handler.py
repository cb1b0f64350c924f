"""ingest: validate events, fetch and normalise images, short-cut unchanged catalogue upserts.

catalog.events  -> images.normalized (intent index), or a payload-only store update
search.requests -> search.normalized (intent query), in a lane (consumer group) of its own

Catalogue changes reach every collection that receives them (``lookalike.shared.indexes``:
two during a model upgrade); index commands pass on to embed, which applies them.

"Unchanged" is decided from the points really in the store, never from a note ingest
made itself: an image counts as indexed only once embed has written its points. So a
redelivered or re-sent event after any crash, failed send or dead letter re-processes
exactly the images that are missing, and a product is never reported unchanged while
its points are not there.
"""

from __future__ import annotations

import time

import pybase64 as base64  # SIMD base64: several times the stdlib's speed on image payloads

from lookalike.shared.config import Settings
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.images import image_id, load_source, normalize
from lookalike.shared.indexes import Indexes
from lookalike.shared.messages import (
    CATALOG_EVENTS,
    IMAGES_NORMALIZED,
    SEARCH_NORMALIZED,
    SEARCH_REQUESTS,
    CatalogDelete,
    CatalogEvent,
    CatalogUpsert,
    IndexCommand,
    IndexContext,
    NormalizedImage,
    ProductSync,
    QueryContext,
    SearchRequest,
)
from lookalike.shared.runtime import Emit, Function, Route


class Ingest(Function):
    name = "ingest"

    def __init__(self, settings: Settings, indexes: Indexes):
        super().__init__()
        self.settings = settings
        self.indexes = indexes
        self.store = indexes.store

    def routes(self) -> list[Route]:
        return [
            Route(CATALOG_EVENTS, CatalogEvent, self.on_catalog_event),
            # Own lane: a slow catalogue image URL must not hold up shoppers' searches.
            Route(SEARCH_REQUESTS, SearchRequest, self.on_search_request, lane="search"),
        ]

    def _fetch(self, ref) -> bytes:
        s = self.settings
        return load_source(ref, s.max_image_bytes, s.url_timeout_s, s.allow_private_urls)

    def _normalize(self, raw: bytes) -> tuple[bytes, int, int, float]:
        s = self.settings
        return normalize(raw, s.image_max_side, s.max_image_pixels)

    def on_catalog_event(self, event: CatalogUpsert | CatalogDelete | IndexCommand) -> list[Emit]:
        """Images a collection does not have go on to detection; a ``ProductSync`` closes the event.

        Order per product holds end to end: everything is keyed by product id, and the
        sync reaches embed after the images, where it drops stale points.
        """
        if isinstance(event, IndexCommand):
            self.counters["index_commands"] += 1
            return [Emit(IMAGES_NORMALIZED, event)]  # embed applies it, or says why not
        models = [m.id for m in self.indexes.state().live()]
        collections = {m: self.indexes.collection(m) for m in models}
        if isinstance(event, CatalogDelete):
            # Delete now (shoppers stop seeing it at once); the sync also removes any of its
            # images still in flight when they land.
            for collection in collections.values():
                self.store.delete_product(collection, event.product_id)
            self.counters["deleted"] += 1
            sync = ProductSync(event_id=event.event_id, product_id=event.product_id, outcome="deleted")
            return [Emit(IMAGES_NORMALIZED, sync)]

        indexed = {m: self.store.product_image_ids(c, event.product_id) for m, c in collections.items()}
        # Decode every image the store lacks first: one bad image makes the whole event poison,
        # so a product is never half-updated. An image already indexed (the same bytes) decoded
        # fine before, so a re-sent catalogue costs no decoding at all.
        new: dict[str, tuple[int, bytes, int, int, str | None]] = {}  # image id -> what goes on
        lacking: dict[str, list[str]] = {}  # every image id of the event -> models whose collection lacks it
        for index, ref in enumerate(event.images):
            try:
                raw = self._fetch(ref)
                iid = image_id(raw)
                if iid in lacking:
                    continue
                lacking[iid] = [m for m in models if iid not in indexed[m]]
                if lacking[iid]:
                    new[iid] = (index, *self._normalize(raw)[:3], ref.url)
            except PoisonMessage as e:
                raise PoisonMessage(f"image {index} of product {event.product_id}: {e}") from None

        product = event.product()
        if not new:
            # Title, offers and prices change in place now: no detection, no embedding.
            for collection in collections.values():
                self.store.set_product_payload(collection, event.product_id,
                                               {**product.payload(), "applied_at": time.time()})
            self.counters["unchanged"] += 1
        self.counters["images_out"] += len(new)
        emits = [
            Emit(IMAGES_NORMALIZED, NormalizedImage(
                intent="index", image_id=iid, jpeg=base64.b64encode(jpeg).decode(), width=w, height=h,
                index=IndexContext(event_id=event.event_id, product=product, image_index=index, image_url=url,
                                   # only the models that lack it (a collection being built, mostly)
                                   models=None if len(lacking[iid]) == len(models) else lacking[iid]),
            ))
            for iid, (index, jpeg, w, h, url) in new.items()
        ]
        sync = ProductSync(event_id=event.event_id, product_id=event.product_id, keep_image_ids=sorted(lacking),
                           product=product, outcome="indexed" if new else "unchanged", new_images=len(new))
        return emits + [Emit(IMAGES_NORMALIZED, sync)]

    def on_search_request(self, request: SearchRequest) -> list[Emit]:
        raw = self._fetch(request.image)
        iid = image_id(raw)
        jpeg, w, h, scale = self._normalize(raw)
        box = None
        if request.box is not None:  # given in pixels of the uploaded photo
            box = request.box.scaled(scale)
            if box.misses(w, h):
                raise PoisonMessage(f"box {request.box.as_list()} lies outside the photo")
        return [Emit(SEARCH_NORMALIZED, NormalizedImage(
            intent="query", image_id=iid, jpeg=base64.b64encode(jpeg).decode(), width=w, height=h, box=box,
            query=QueryContext(request_id=request.request_id, top_k=request.top_k, filters=request.filters),
        ))]
