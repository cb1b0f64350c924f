"""embed: crop objects, embed them in shared batches, then store or forward the vectors.

images.detected -> vector store upsert (intent index) or query.vectors (intent query).
Crops from every message of the polled batch go through the CNN together, so
catalogue indexing and shopper queries share the batching. The thumbnail a result
card shows is made here, from the image being stored, once per image.
"""

from __future__ import annotations

import time

import pybase64 as base64  # SIMD base64: several times the stdlib's speed on image payloads

from lookalike.shared.embedding import Embedded, Embedder, ImageJob
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.messages import (
    CATALOG_INDEXED,
    IMAGES_DETECTED,
    QUERY_VECTORS,
    THUMBNAIL_SIDE,
    CatalogIndexed,
    DetectedImage,
    DetectedMessage,
    ProductSync,
    QueryObject,
    QueryVectors,
    point_id,
)
from lookalike.shared.runtime import Emit, Function, Outcome, Route
from lookalike.shared.stores.base import PointRecord, VectorStore


class Embed(Function):
    name = "embed"

    def __init__(self, embedder: Embedder, store: VectorStore, collection: str):
        super().__init__()
        self.embedder = embedder
        self.store = store
        self.collection = collection

    def routes(self) -> list[Route]:
        return [Route(IMAGES_DETECTED, DetectedMessage, self.on_batch, batch=True)]

    def on_batch(self, messages: list[DetectedImage | ProductSync]) -> list[Outcome]:
        outcomes: list[Outcome] = [[] for _ in messages]
        images = [i for i, msg in enumerate(messages) if not isinstance(msg, ProductSync)]
        # One pass through the CNN for every box of the batch, both intents together; the
        # embedder decodes (on the GPU when it runs there) and makes each index image's thumbnail.
        results: dict[int, Embedded | Exception] = {}
        jobs: dict[int, ImageJob] = {}
        for i in images:
            try:
                jpeg = messages[i].jpeg_bytes()
            except ValueError as e:  # binascii.Error: not base64
                results[i] = e
                continue
            jobs[i] = ImageJob(jpeg, [obj.box for obj in messages[i].objects],
                               THUMBNAIL_SIDE if messages[i].intent == "index" else 0)
        if jobs:
            results.update(zip(jobs, self.embedder.embed_jobs(list(jobs.values())), strict=True))
        self.counters["crops"] += sum(len(r.vectors) for r in results.values() if isinstance(r, Embedded))

        # Store writes in message order (a sync must follow the images before it), with
        # consecutive upserts sent as one write. Each is acknowledged before the runner
        # commits; a crash means redelivery, which deterministic point ids make an overwrite.
        pending: list[PointRecord] = []
        for i, msg in enumerate(messages):
            if isinstance(msg, ProductSync):
                self._flush(pending)
                outcomes[i] = [Emit(CATALOG_INDEXED, self._sync(msg))]
                continue
            result = results[i]
            if isinstance(result, Exception):
                outcomes[i] = PoisonMessage(f"detected image cannot be decoded: {result}")
            elif msg.intent == "index":
                pending.extend(self._points(msg, result))
            else:
                outcomes[i] = [Emit(QUERY_VECTORS, self._query(msg, result.vectors))]
        self._flush(pending)
        return outcomes

    def _flush(self, points: list[PointRecord]) -> None:
        if points:
            self.store.upsert(self.collection, points)
            self.counters["points_upserted"] += len(points)
            points.clear()

    def _sync(self, msg: ProductSync) -> CatalogIndexed:
        """Close a catalogue event: drop stale points, apply the payload, report what the store holds.

        The report is checked against the points: an image of the event that has none
        (dead-lettered on its way here) makes the outcome ``incomplete``, never "indexed".
        """
        self.store.retain_product_images(self.collection, msg.product_id, msg.keep_image_ids)
        if msg.product is not None and msg.keep_image_ids:
            # applied_at: what "as of" a result's price means (a redelivery moves it to the redo's time).
            self.store.set_product_payload(self.collection, msg.product_id,
                                           {**msg.product.payload(), "applied_at": time.time()})
        self.counters["syncs"] += 1
        present = self.store.product_image_ids(self.collection, msg.product_id) if msg.keep_image_ids else set()
        missing = len(set(msg.keep_image_ids) - present)
        if missing:
            self.counters["incomplete"] += 1
        return CatalogIndexed(event_id=msg.event_id, product_id=msg.product_id,
                              outcome="incomplete" if missing else msg.outcome, new_images=msg.new_images,
                              images=len(present), missing_images=missing)

    def _points(self, msg: DetectedImage, embedded: Embedded) -> list[PointRecord]:
        ctx = msg.index
        base = ctx.product.payload()
        thumb = base64.b64encode(embedded.thumbnail).decode()
        return [
            PointRecord(
                id=point_id(ctx.product.product_id, msg.image_id, k),
                vector=vector,
                payload={
                    **base,
                    "image_id": msg.image_id,
                    "image_index": ctx.image_index,
                    "image_url": ctx.image_url,
                    "thumbnail": thumb,
                    "object_index": k,
                    "box": obj.box.as_list(),
                    "image_size": [msg.width, msg.height],  # the box's frame (the thumbnail's proportions)
                    "label": obj.label,
                    "det_score": obj.score,
                    "model": self.embedder.spec.id,
                },
            )
            for k, (obj, vector) in enumerate(zip(msg.objects, embedded.vectors))
        ]

    def _query(self, msg: DetectedImage, vectors) -> QueryVectors:
        ctx = msg.query
        return QueryVectors(
            request_id=ctx.request_id,
            model=self.embedder.spec.id,
            top_k=ctx.top_k,
            filters=ctx.filters,
            objects=[
                QueryObject(box=obj.box, label=obj.label, score=obj.score, vector=[float(x) for x in vector])
                for obj, vector in zip(msg.objects, vectors)
            ],
        )
