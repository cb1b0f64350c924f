"""embed: crop objects, embed them in shared batches, then store or forward the vectors.

images.detected -> vector store upsert (intent index); search.detected -> query.vectors
(intent query), in a lane of its own, so a shopper's photo never queues behind a
catalogue import. Crops from every message of the polled batch go through the CNN
together. The thumbnail a result card shows is made here, from the image being stored,
once per image.

During a model upgrade (``lookalike.shared.indexes``) two models are live: catalogue
images are embedded by each model whose collection lacks them and written to each;
a shopper's photo is embedded by the active model only. Embed also applies the
upgrade's index commands, in their place in the stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pybase64 as base64  # SIMD base64: several times the stdlib's speed on image payloads

from lookalike.shared import limits
from lookalike.shared.embedding import Embedded, Embedder, ImageJob
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.indexes import Indexes, IndexState, ModelRef
from lookalike.shared.messages import (
    CATALOG_INDEXED,
    IMAGES_DETECTED,
    QUERY_VECTORS,
    SEARCH_DETECTED,
    THUMBNAIL_SIDE,
    CatalogIndexed,
    DetectedImage,
    DetectedMessage,
    IndexCommand,
    ProductSync,
    QueryObject,
    QueryVectors,
    point_id,
)
from lookalike.shared.runtime import Emit, Function, Outcome, Route
from lookalike.shared.stores.base import CollectionSpec, PointRecord

log = logging.getLogger("lookalike.embed")

# The start of a refusal that passes: a switch while the new collection is behind, a build while
# its model loads (in the background: searches do not wait for it). The sender tries again.
NOT_CAUGHT_UP = "not caught up"
LOADING = "loading"


class IndexRefused(Exception):
    """An index command that cannot be applied now; the reason goes back on catalog.indexed."""


class Embed(Function):
    name = "embed"

    def __init__(self, embedder: Embedder | None, indexes: Indexes,
                 load: Callable[[ModelRef], Embedder] | None = None, distance: str = "cosine"):
        """``embedder``: the active model's (None: ``load`` loads it when first needed). ``load``: loads
        another model's (a reindex needs it)."""
        super().__init__()
        self.embedders: dict[str, Embedder] = {embedder.spec.id: embedder} if embedder is not None else {}
        self.indexes = indexes
        self.store = indexes.store
        self.load = load
        self.distance = distance
        self._loading: dict[str, Future] = {}  # a build's model, loading beside the batches
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-model-load")
        self._models = threading.Lock()  # the two lanes (threads) share the embedders

    def routes(self) -> list[Route]:
        return [Route(IMAGES_DETECTED, DetectedMessage, self.on_batch, batch=True),
                Route(SEARCH_DETECTED, DetectedMessage, self.on_batch, batch=True, lane="search")]

    def on_batch(self, messages: list[DetectedImage | ProductSync | IndexCommand]) -> list[Outcome]:
        outcomes: list[Outcome] = [[] for _ in messages]
        start = 0  # an index command splits the batch: what follows it sees the state it made
        for i, msg in enumerate(messages):
            if isinstance(msg, IndexCommand):
                self._run(messages, range(start, i), outcomes)
                outcomes[i] = self._command(msg)
                start = i + 1
        self._run(messages, range(start, len(messages)), outcomes)
        return outcomes

    def _run(self, messages: list, part: range, outcomes: list[Outcome]) -> None:
        if not len(part):
            return
        state = self.indexes.state()
        live = [m.id for m in state.live()]
        # One pass through each model's CNN for every box of the batch (a lane's: catalogue images or searches);
        # the embedder decodes (on the GPU when it runs there) and makes each index image's
        # thumbnail (once per image, by the first model that embeds it).
        results: dict[int, dict[str, Embedded]] = {}
        errors: dict[int, Exception] = {}
        jobs: dict[str, dict[int, ImageJob]] = {m: {} for m in live}
        for i in part:
            msg = messages[i]
            if isinstance(msg, ProductSync):
                continue
            try:
                jpeg = msg.jpeg_bytes()
            except ValueError as e:  # binascii.Error: not base64
                errors[i] = e
                continue
            boxes = [obj.box for obj in msg.objects]
            thumbnail = THUMBNAIL_SIDE if msg.intent == "index" else 0
            for model in self._targets(msg, state, live):
                jobs[model][i] = ImageJob(jpeg, boxes, thumbnail)
                thumbnail = 0
            results[i] = {}
        for model, model_jobs in jobs.items():
            if model_jobs:
                done = self._embedder(state, model).embed_jobs(list(model_jobs.values()))
                for i, result in zip(model_jobs, done, strict=True):
                    if isinstance(result, Exception):
                        errors.setdefault(i, result)
                    else:
                        results[i][model] = result
        self.counters["crops"] += sum(len(r.vectors) for by_model in results.values() for r in by_model.values())

        # Store writes in message order (a sync must follow the images before it), with
        # consecutive upserts to a collection sent as one write. Each is acknowledged before
        # the runner commits; a crash means redelivery, which deterministic point ids make an
        # overwrite.
        pending: dict[str, list[PointRecord]] = {m: [] for m in live}
        for i in part:
            msg = messages[i]
            if isinstance(msg, ProductSync):
                self._flush(pending)
                outcomes[i] = [Emit(CATALOG_INDEXED, self._sync(msg, live))]
            elif i in errors:
                outcomes[i] = PoisonMessage(f"detected image cannot be decoded: {errors[i]}")
            elif msg.intent == "index":
                # no result: every model that lacked it left service meanwhile (an aborted build)
                thumbnail = next((r.thumbnail for r in results[i].values() if r.thumbnail is not None), b"")
                for model, result in results[i].items():
                    pending[model].extend(self._points(msg, model, result, thumbnail))
            else:
                outcomes[i] = [Emit(QUERY_VECTORS, self._query(msg, state.active.id, results[i][state.active.id]))]
        self._flush(pending)

    @staticmethod
    def _targets(msg: DetectedImage, state: IndexState, live: list[str]) -> list[str]:
        """The models that embed this image: the active one for a search; for a catalogue image,
        those ingest found lacking it (all live ones when it did not say) that are still live."""
        if msg.intent == "query":
            return [state.active.id]
        wanted = msg.index.models
        return [m for m in live if wanted is None or m in wanted]

    def _embedder(self, state: IndexState, model: str) -> Embedder:
        """A live model's embedder, loaded here the first time (a replica that did not apply the build)."""
        with self._models:
            if model not in self.embedders:
                self.embedders[model] = self._load(next(m for m in state.live() if m.id == model))  # failure: retry
            return self.embedders[model]

    def _flush(self, pending: dict[str, list[PointRecord]]) -> None:
        for model, points in pending.items():
            if points:
                self.store.upsert(self.indexes.collection(model), points)
                self.counters["points_upserted"] += len(points)
                points.clear()

    def _sync(self, msg: ProductSync, live: list[str]) -> CatalogIndexed:
        """Close a catalogue event in every live collection: drop stale points, apply the payload,
        report what the store holds.

        The report is checked against the points: an image of the event that has none in a
        live collection (dead-lettered on its way here) makes the outcome ``incomplete``,
        never "indexed".
        """
        missing = 0
        present: set[str] = set()
        for k, model in enumerate(live):
            collection = self.indexes.collection(model)
            self.store.retain_product_images(collection, msg.product_id, msg.keep_image_ids)
            if msg.product is not None and msg.keep_image_ids:
                # applied_at: what "as of" a result's price means (a redelivery moves it to the redo's time).
                self.store.set_product_payload(collection, msg.product_id,
                                               {**msg.product.payload(), "applied_at": time.time()})
            held = self.store.product_image_ids(collection, msg.product_id) if msg.keep_image_ids else set()
            missing = max(missing, len(set(msg.keep_image_ids) - held))
            if k == 0:
                present = held  # the active collection's, for the report
        self.counters["syncs"] += 1
        if missing:
            self.counters["incomplete"] += 1
        return CatalogIndexed(event_id=msg.event_id, product_id=msg.product_id,
                              outcome="incomplete" if missing else msg.outcome, new_images=msg.new_images,
                              images=len(present), missing_images=missing)

    def _command(self, cmd: IndexCommand) -> list[Emit]:
        """Apply an index command (``lookalike.shared.indexes``) and report it; safe to redo at any line.

        build: load the model (in the background: the build is refused as "loading" until it is
        there, and sent again), start its collection empty, then record it as building. switch:
        only when the new collection holds as many points as the active one (the same images
        give the same objects, so the same points). finish/abort: record the model as retired,
        then drop its collection. A command that cannot be applied is reported with the reason."""
        try:
            self._apply(cmd)
            outcome, detail = "indexed", None
        except IndexRefused as e:
            outcome, detail = "incomplete", str(e)[:limits.MAX_TITLE_CHARS]
            log.warning("index %s %s refused: %s", cmd.action, cmd.model or "", e)
        self.counters[f"index_{cmd.action}" if outcome == "indexed" else "index_refused"] += 1
        return [Emit(CATALOG_INDEXED, CatalogIndexed(event_id=cmd.event_id, product_id=cmd.product_id,
                                                     outcome=outcome, detail=detail))]

    def _apply(self, cmd: IndexCommand) -> None:
        state = self.indexes.state()
        ref = ModelRef(cmd.model, cmd.model_spec or cmd.model) if cmd.model else None
        try:
            new = state.apply(cmd.event_id, cmd.action, ref)
        except ValueError as e:
            raise IndexRefused(e) from None
        if new is not state:
            if cmd.action == "build":
                embedder = self.embedders.get(ref.id) or self._loaded(ref)
                collection = self.indexes.collection(ref.id)
                if state.building is None:  # a fresh build starts empty (a rerun's goes on)
                    self.store.drop_collection(collection)
                self.store.ensure_collection(CollectionSpec(collection, embedder.spec.dim, self.distance))
                with self._models:
                    self.embedders[ref.id] = embedder
            if cmd.action == "switch" and not cmd.force:
                have = self.store.count(self.indexes.collection(state.building.id))
                want = self.store.count(self.indexes.collection(state.active.id))
                if have != want:
                    raise IndexRefused(f"{NOT_CAUGHT_UP}: {state.building.id} holds {have} points, "
                                       f"{state.active.id} {want} (images still on their way, or products "
                                       "the catalogue file did not name)")
            self.indexes.save(new)
            log.info("index %s %s: %s", cmd.action, cmd.model or "", new.describe())
        if new.retired is not None and new.retired.id not in {m.id for m in new.live()}:
            self.store.drop_collection(self.indexes.collection(new.retired.id))  # a redo drops it again
            with self._models:
                self.embedders.pop(new.retired.id, None)

    def _loaded(self, ref: ModelRef) -> Embedder:
        """The build's model once loaded; until then (it loads in the background) a refusal to retry."""
        loading = self._loading.get(ref.id)
        if loading is None:
            loading = self._loading[ref.id] = self._loader.submit(self._load, ref)
        if not loading.done():
            raise IndexRefused(f"{LOADING} model {ref.id} ({ref.spec})")
        del self._loading[ref.id]
        try:
            return loading.result()
        except Exception as e:  # not here, not loadable: say so to whoever sent the build
            raise IndexRefused(f"cannot load model {ref.id} ({ref.spec}): {e}") from None

    def _load(self, ref: ModelRef) -> Embedder:
        if self.load is None:
            raise RuntimeError(f"model {ref.id} is needed, and this embed function was given no way to load models")
        t0 = time.monotonic()
        embedder = self.load(ref)
        if embedder.spec.id != ref.id:
            raise ValueError(f"{ref.spec} loads model {embedder.spec.id}, not {ref.id}")
        log.info("loaded %s (%s) in %.1f s", ref.id, ref.spec, time.monotonic() - t0)
        return embedder

    def _points(self, msg: DetectedImage, model: str, embedded: Embedded, thumbnail: bytes) -> list[PointRecord]:
        ctx = msg.index
        base = ctx.product.payload()
        thumb = base64.b64encode(thumbnail).decode()
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
                    "model": model,
                },
            )
            for k, (obj, vector) in enumerate(zip(msg.objects, embedded.vectors))
        ]

    def _query(self, msg: DetectedImage, model: str, embedded: Embedded) -> QueryVectors:
        ctx = msg.query
        return QueryVectors(
            request_id=ctx.request_id,
            model=model,
            top_k=ctx.top_k,
            filters=ctx.filters,
            objects=[
                QueryObject(box=obj.box, label=obj.label, score=obj.score, vector=[float(x) for x in vector])
                for obj, vector in zip(msg.objects, embedded.vectors)
            ],
        )
