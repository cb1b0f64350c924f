"""Model upgrades without downtime: the index states, and the functions that follow them.

The handler tests wire ingest, detect, embed and query by hand around an Edge store with
two small models ("colour": channel means and spreads; "means": channel means only, another
dimension), so each step of `lookalike reindex` can be checked between any two messages.
The end-to-end test runs a real reindex through the embedded stack while a shopper searches.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from lookalike.functions.detect.handler import Detect
from lookalike.functions.embed.handler import LOADING, NOT_CAUGHT_UP, Embed
from lookalike.functions.ingest.handler import Ingest
from lookalike.functions.query.handler import Query
from lookalike.shared.detector import WholeImageDetector
from lookalike.shared.embedding import Embedded
from lookalike.shared.images import crop, open_jpeg, thumbnail
from lookalike.shared.indexes import Indexes, IndexState, ModelRef
from lookalike.shared.messages import (
    CatalogDelete,
    IndexCommand,
    NormalizedImage,
    Offer,
    QueryObject,
    QueryVectors,
    SearchFilters,
    SearchRequest,
)
from lookalike.shared.stores import CollectionSpec, EdgeStore
from tests.test_handlers import ColourEmbedder, data, photo, upsert

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


class MeansEmbedder(ColourEmbedder):
    """Another model: the channel means only (3-d), so its vectors cannot be mixed with colour's."""

    spec = SimpleNamespace(id="means", dim=3)

    def __init__(self):
        super().__init__()
        self.jobs = 0

    def embed(self, images):
        rows = [np.asarray(img, dtype=np.float32).mean(axis=(0, 1)) / 255.0 + 1e-3 for img in images]
        return np.stack([r / np.linalg.norm(r) for r in rows])

    def embed_jobs(self, jobs):
        self.jobs += len(jobs)
        results = []
        for job in jobs:
            image = open_jpeg(job.jpeg)
            thumb = thumbnail(image, job.thumbnail_side) if job.thumbnail_side else None
            results.append(Embedded(self.embed([crop(image, box) for box in job.boxes]), thumb))
        return results


# ----------------------------------------------------------------------------- the states


def test_an_upgrade_goes_build_switch_rollback_finish_and_a_redelivery_changes_nothing():
    old, new = ModelRef("old", "old"), ModelRef("new", "/models/new")
    s = IndexState(active=old)
    assert s.live() == [old]
    s = s.apply("c1", "build", new)
    assert (s.active, s.building, s.live()) == (old, new, [old, new])
    assert s.apply("c1", "build", new) is s  # the same command again: nothing happens
    s = s.apply("c2", "switch", new)
    assert (s.active, s.building, s.previous) == (new, None, old)
    assert s.live() == [new, old]  # the previous model still receives changes: a rollback loses nothing
    rolled = s.apply("c3", "rollback")
    assert (rolled.active, rolled.previous) == (old, new)
    assert rolled.apply("c3", "rollback") is rolled  # a redelivered rollback does not roll forward again
    done = s.apply("c4", "finish")
    assert (done.active, done.previous, done.retired, done.live()) == (new, None, old, [new])
    assert IndexState.from_doc(done.to_doc()) == done


@pytest.mark.parametrize("state, action, model, reason", [
    (IndexState(ModelRef("a", "a")), "switch", None, "nothing is being built"),
    (IndexState(ModelRef("a", "a")), "rollback", None, "no previous model"),
    (IndexState(ModelRef("a", "a")), "build", "a", "already active"),
    (IndexState(ModelRef("a", "a"), building=ModelRef("b", "b")), "build", "c", "b is being built"),
    (IndexState(ModelRef("a", "a"), building=ModelRef("b", "b")), "switch", "c", "b is being built, not c"),
    (IndexState(ModelRef("b", "b"), previous=ModelRef("a", "a")), "build", "c", "finish or roll back first"),
])
def test_a_step_that_cannot_follow_says_why(state, action, model, reason):
    with pytest.raises(ValueError, match=reason):
        state.apply("x", action, ModelRef(model, model) if model else None)


# ----------------------------------------------------------------------------- the functions


@pytest.fixture
def settings(tmp_path):
    from lookalike.shared.config import Settings

    return Settings(LOOKALIKE_DATA_DIR=str(tmp_path))


@pytest.fixture
def upgrade(tmp_path, settings):
    store = EdgeStore(tmp_path / "edge", background_index=False)
    indexes = Indexes.fixed(store, "test__colour", "colour")
    store.ensure_collection(CollectionSpec("test__colour", 6))
    colour, means = ColourEmbedder(), MeansEmbedder()
    loaded = []

    def load(ref):
        loaded.append(ref)
        return means

    ingest, detect = Ingest(settings, indexes), Detect(WholeImageDetector())
    embed, query = Embed(colour, indexes, load), Query(indexes)

    def send(message):
        """A catalogue event or index command through ingest, detect and embed, as one batch at embed;
        returns embed's reports."""
        detected = [d.message for e in ingest.on_catalog_event(message) for d in detect.on_image(e.message)]
        outcomes = embed.on_batch(detected)
        assert not any(isinstance(o, Exception) for o in outcomes), outcomes
        return [emit.message for outcome in outcomes for emit in outcome]

    def command(action, model=None, **fields):
        """Sent again while embed loads the model in the background, as `lookalike reindex` does."""
        for _ in range(500):
            (report,) = send(IndexCommand(action=action, model=model, **fields))
            if not (report.detail or "").startswith(LOADING):
                return report
            time.sleep(0.01)
        raise AssertionError("the model never loaded")

    def search(raw):
        (normalized,) = ingest.on_search_request(SearchRequest(image=data(raw)))
        (detected,) = detect.on_image(normalized.message)
        ((vectors,),) = embed.on_batch([detected.message])
        (result,) = query.on_vectors(vectors.message)
        return result.message

    def points(model):
        return {p["product_id"]: p for p in store.product_payloads(indexes.collection(model), "red")} | {
            pid: p for pid in ("blue", "green") for p in store.product_payloads(indexes.collection(model), pid)}

    yield SimpleNamespace(store=store, indexes=indexes, send=send, command=command, search=search, points=points,
                          colour=colour, means=means, loaded=loaded, embed=embed, query=query)
    store.close()


def test_searches_stay_on_the_old_model_until_the_switch_and_changes_reach_both(upgrade):
    u = upgrade
    u.send(upsert("red", colors=[RED]))
    u.send(upsert("blue", colors=[BLUE]))
    # WHEN a build of "means" starts
    assert u.command("build", "means", model_spec="means").outcome == "indexed"
    assert [r.id for r in u.loaded] == ["means"] and "test__colour__means" in u.store.collections()
    # THEN searches still come from colour's (whole) collection
    result = u.search(photo(RED))
    assert result.model == "colour" and result.objects[0].products[0].product_id == "red"
    # AND a new product and a price change reach both collections
    u.send(upsert("green", colors=[GREEN]))
    u.send(upsert("red", colors=[RED], offers=[Offer(shop="a", price=5.0)]))
    assert set(u.points("means")) == {"green", "red"} and u.points("means")["red"]["min_price"] == 5.0
    assert u.points("colour")["red"]["min_price"] == 5.0
    # AND a switch now is refused: blue is not in the new collection yet
    refused = u.command("switch", "means")
    assert refused.outcome == "incomplete" and refused.detail.startswith(NOT_CAUGHT_UP)
    assert u.search(photo(RED)).model == "colour"
    # WHEN the catalogue is sent again (the reindex's backfill)
    colour_jobs = u.colour.thumbnails_made
    for event in (upsert("red", colors=[RED], offers=[Offer(shop="a", price=5.0)]), upsert("blue", colors=[BLUE]),
                  upsert("green", colors=[GREEN])):
        u.send(event)
    # THEN only the new model embedded what it lacked (colour had every image already)
    assert u.colour.thumbnails_made == colour_jobs
    assert set(u.points("means")) == {"red", "blue", "green"}
    # AND the switch goes through; searches use the new model from the next photo on
    assert u.command("switch", "means").outcome == "indexed"
    result = u.search(photo(BLUE))
    assert result.model == "means" and result.objects[0].products[0].product_id == "blue"


def test_rollback_is_instant_and_loses_nothing_and_finish_drops_the_old_collection(upgrade):
    u = upgrade
    u.send(upsert("red", colors=[RED]))
    u.command("build", "means", model_spec="means")
    u.send(upsert("red", colors=[RED]))
    switch = IndexCommand(action="switch", model="means")
    (report,) = u.send(switch)
    assert report.outcome == "indexed"
    # WHEN, after the switch, a product is deleted and a price changes
    u.send(upsert("blue", colors=[BLUE], offers=[Offer(shop="a", price=3.0)]))
    u.send(CatalogDelete(product_id="red"))
    # AND the switch command is delivered again (a crash before its commit)
    assert u.send(switch)[0].outcome == "indexed"
    assert u.indexes.state().active.id == "means"  # not switched twice
    # THEN a rollback brings the old model back with both changes
    assert u.command("rollback").outcome == "indexed"
    result = u.search(photo(BLUE))
    assert result.model == "colour" and [p.product_id for p in result.objects[0].products] == ["blue"]
    assert result.objects[0].products[0].best_offer.price == 3.0
    # WHEN the upgrade is finished (here: the rollback kept, so "means" is the one dropped)
    assert u.command("finish").outcome == "indexed"
    assert "test__colour__means" not in u.store.collections() and u.indexes.state().live()[0].id == "colour"
    assert "means" not in u.embed.embedders  # its model is let go
    # THEN a photo embedded by the dropped model just before gets a clear error, not a crash
    stale = QueryVectors(request_id="r1", model="means", top_k=3, filters=SearchFilters(),
                         objects=[QueryObject(box=result.objects[0].box, label="x", score=1.0, vector=[1, 0, 0])])
    (emit,) = u.query.on_vectors(stale)
    assert emit.message.status == "error" and "no longer served" in emit.message.error


def test_a_build_that_cannot_load_its_model_is_refused_with_the_reason(upgrade):
    def broken(ref):
        raise FileNotFoundError(f"{ref.spec}/model.pt")

    upgrade.embed.load = broken
    report = upgrade.command("build", "means", model_spec="/models/means")
    assert report.outcome == "incomplete" and "cannot load model means" in report.detail
    assert "model.pt" in report.detail and upgrade.indexes.state().building is None


def test_searches_do_not_wait_for_the_new_model_to_load(upgrade):
    u = upgrade
    u.send(upsert("red", colors=[RED]))
    slow = threading.Event()

    def load(ref):
        slow.wait(10)
        return u.means

    u.embed.load = load
    # WHEN a build starts and its model takes long to load
    t0 = time.monotonic()
    (report,) = u.send(IndexCommand(action="build", model="means", model_spec="means"))
    # THEN the build is refused for now, at once, and searches go on with the active model meanwhile
    assert report.outcome == "incomplete" and report.detail.startswith(LOADING)
    result = u.search(photo(RED))
    assert result.model == "colour" and time.monotonic() - t0 < 5
    # AND once the model is there, the build sent again goes through
    slow.set()
    assert u.command("build", "means", model_spec="means").outcome == "indexed"
    assert u.indexes.state().building.id == "means"


def test_images_name_only_the_models_that_lack_them(upgrade, settings):
    u = upgrade
    u.send(upsert("red", colors=[RED]))
    u.command("build", "means", model_spec="means")
    ingest = Ingest(settings, u.indexes)
    emits = ingest.on_catalog_event(upsert("red", colors=[RED, BLUE]))
    images = [e.message for e in emits if isinstance(e.message, NormalizedImage)]
    # the red photo is in colour's collection already: only "means" needs it; the blue one, both
    assert sorted(tuple(i.index.models or ["all"]) for i in images) == [("all",), ("means",)]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_searches_never_fail_during_a_reindex_switch_and_rollback(stack, client, sample_catalog):
    """A shopper searches without pause while the catalogue moves from Lite0 to Lite2 + R-MAC and
    back: every search is answered, the right product first, from one whole collection."""
    from lookalike.client import read_catalog
    from lookalike.reindex import reindex, send

    products = read_catalog(sample_catalog.catalog_path)[:8]
    catalog = sample_catalog.catalog_path.parent / "reindex-catalog.jsonl"
    catalog.write_text("".join(e.model_dump_json() + "\n" for e in products))
    report = client.index(products, timeout_s=300)
    assert not report.failed
    queries = [(pid, path.read_bytes()) for path, pid in sample_catalog.queries
               if pid in {e.product_id for e in products}][:4]
    answers: list[tuple[float, str, str | None, str | None]] = []  # (time, expected, model, first) or error
    failures: list[str] = []
    stop = threading.Event()

    def shop():
        k = 0
        while not stop.is_set():
            expected, raw = queries[k % len(queries)]
            k += 1
            try:
                result = client.search(raw, timeout_s=60)
            except Exception as e:  # noqa: BLE001 - counted: the test fails on any
                failures.append(repr(e))
                continue
            if result.status != "ok":
                failures.append(result.error)
                continue
            first = max((o.products[0] for o in result.objects if o.products), key=lambda p: p.score, default=None)
            answers.append((time.monotonic(), expected, result.model, first.product_id if first else None))

    shopper = threading.Thread(target=shop, daemon=True)
    shopper.start()
    try:
        time.sleep(2)
        r = reindex(client, stack.settings, "efficientnet_lite2_rmac", catalog, timeout_s=400)
        switched_at = time.monotonic()
        time.sleep(3)
        send(client, "rollback", timeout_s=60)
        rolled_at = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        shopper.join(timeout=90)
    assert r["switched"] and r["model"] == "efficientnet_lite2_rmac"
    assert not failures, failures[:3]
    # every answer had the photographed product first, whichever collection answered
    wrong = [(e, m, f) for _, e, m, f in answers if f != e]
    assert not wrong, wrong[:5]
    # the new model answered only once the switch was sent (never from its collection while it was
    # being built), and no more soon after the rollback
    switch_sent = switched_at - r["switch_wait_s"] - 0.2
    before = {m for t, _, m, _ in answers if t < switch_sent}
    lite2 = [t for t, _, m, _ in answers if m == "efficientnet_lite2_rmac"]
    assert before == {"efficientnet_lite0"} and len([t for t in lite2 if t < switch_sent]) == 0
    assert lite2 and max(lite2) < rolled_at + 2
    assert answers[-1][2] == "efficientnet_lite0" and len(answers) >= 10
    send(client, "finish", timeout_s=60)
    assert stack.resources.store.collections().count("lookalike__efficientnet_lite2_rmac") == 0


def test_a_restarted_function_follows_the_stores_state_not_embed_model(tmp_path):
    from lookalike.functions.wiring import Resources
    from lookalike.shared.config import Settings
    from lookalike.shared.indexes import STATE_DOC

    # GIVEN a store whose reindex switched to Lite0 while EMBED_MODEL still names Lite2
    settings = Settings(LOOKALIKE_DATA_DIR=str(tmp_path), EMBED_MODEL="efficientnet_lite2_rmac")
    store = EdgeStore(tmp_path / "qdrant-edge", background_index=False)
    store.ensure_collection(CollectionSpec("lookalike__efficientnet_lite0", 1280))
    state = IndexState(active=ModelRef("efficientnet_lite0", "efficientnet_lite0"),
                       previous=ModelRef("efficientnet_lite2_rmac", "efficientnet_lite2_rmac"))
    store.write_doc(STATE_DOC, state.to_doc())
    store.close()
    # WHEN embed starts
    res = Resources.load(settings, ("embed",))
    try:
        # THEN it embeds with the active model, and says why EMBED_MODEL is not used
        assert res.embedder.spec.id == "efficientnet_lite0" and res.model_id == "efficientnet_lite0"
        assert res.collection == "lookalike__efficientnet_lite0"
        assert any("is not what searches use" in n for n in res.notes)
        assert res.live_collections() == ["lookalike__efficientnet_lite0", "lookalike__efficientnet_lite2_rmac"]
    finally:
        res.store.close()


def test_changing_embed_model_by_hand_on_a_full_store_is_pointed_out(tmp_path):
    from lookalike.functions.wiring import Resources
    from lookalike.shared.config import Settings
    from lookalike.shared.stores import PointRecord

    # GIVEN a store whose catalogue is in Lite0's collection, and no reindex ever ran
    store = EdgeStore(tmp_path / "qdrant-edge", background_index=False)
    store.ensure_collection(CollectionSpec("lookalike__efficientnet_lite0", 3))
    store.upsert("lookalike__efficientnet_lite0", [PointRecord("00000000-0000-0000-0000-000000000001", [1, 0, 0],
                                                               {"product_id": "p"})])
    store.close()
    # WHEN ingest starts with EMBED_MODEL set to another model
    res = Resources.load(Settings(LOOKALIKE_DATA_DIR=str(tmp_path), EMBED_MODEL="efficientnet_lite2_rmac"),
                         ("ingest",))
    try:
        # THEN its notes say the new collection is empty and how to change models instead
        assert any("lookalike__efficientnet_lite2_rmac is new and empty" in n and "lookalike reindex" in n
                   for n in res.notes)
    finally:
        res.store.close()
