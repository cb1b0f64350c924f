"""Handlers without a broker: each function is a plain object fed pydantic messages.

GIVEN / WHEN / THEN, with factory helpers for photos and events. The embedder here
is a tiny colour-statistics stand-in so the tests are about the handlers' rules;
the real CNN is exercised in test_embedders.py and the end-to-end tests.
"""

from __future__ import annotations

import base64
import io
import json
import socket
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lookalike.functions.detect.handler import Detect
from lookalike.functions.embed.handler import Embed
from lookalike.functions.ingest.handler import Ingest
from lookalike.functions.query.handler import Query
from lookalike.shared.config import Settings
from lookalike.shared.detector import WholeImageDetector
from lookalike.shared.embedding import Embedded
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.images import crop, open_jpeg, thumbnail
from lookalike.shared.indexes import Indexes
from lookalike.shared.messages import (
    IMAGES_DETECTED,
    IMAGES_NORMALIZED,
    QUERY_VECTORS,
    SEARCH_DETECTED,
    SEARCH_NORMALIZED,
    SEARCH_RESULTS,
    THUMBNAIL_SIDE,
    Box,
    CatalogDelete,
    CatalogUpsert,
    DetectedImage,
    DetectedMessage,
    DetectedObject,
    ImageRef,
    NormalizedMessage,
    Offer,
    QueryVectors,
    RecommendRequest,
    SearchRequest,
    point_id,
)
from lookalike.shared.runtime import Route
from lookalike.shared.stores import CollectionSpec, EdgeStore

COLLECTION = "test__colour"
DIM = 6


class ColourEmbedder:
    """Mean and spread of each RGB channel, L2-normalised: enough to tell colours apart."""

    spec = SimpleNamespace(id="colour", dim=DIM)

    def embed(self, images):
        rows = []
        for img in images:
            a = np.asarray(img, dtype=np.float32) / 255.0
            v = np.concatenate([a.mean(axis=(0, 1)), a.std(axis=(0, 1))]) + 1e-3
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows)

    def __init__(self):
        self.thumbnails_made = 0

    def embed_jobs(self, jobs):
        """Decode with PIL, crop each box, embed the crops; the job's error when it cannot be decoded."""
        results = []
        for job in jobs:
            try:
                image = open_jpeg(job.jpeg)
            except Exception as e:  # noqa: BLE001 - reported per job, like the real embedders
                results.append(e)
                continue
            thumb = None
            if job.thumbnail_side:
                thumb = thumbnail(image, job.thumbnail_side)
                self.thumbnails_made += 1
            results.append(Embedded(self.embed([crop(image, box) for box in job.boxes]), thumb))
        return results


def photo(color=(200, 30, 30), size=(800, 600), fmt="JPEG", exif_orientation=None) -> bytes:
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 255), (0, 0, size[0] // 4, size[1] // 4))  # a marker in the top-left corner
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def data(raw: bytes) -> ImageRef:
    return ImageRef(data=base64.b64encode(raw).decode())


def upsert(pid="p1", colors=((200, 30, 30),), offers=None, **kw) -> CatalogUpsert:
    offers = offers or [Offer(shop="b", price=12.0), Offer(shop="a", price=9.5), Offer(shop="c", price=11.0)]
    fields = {"title": f"product {pid}", "category": "kitchen", **kw}
    return CatalogUpsert(product_id=pid, images=[data(photo(c)) for c in colors], offers=offers, **fields)


@pytest.fixture
def store(tmp_path):
    s = EdgeStore(tmp_path / "edge")
    s.ensure_collection(CollectionSpec(COLLECTION, DIM))
    yield s
    s.close()


@pytest.fixture
def settings(tmp_path):
    return Settings(LOOKALIKE_DATA_DIR=str(tmp_path))


@pytest.fixture
def pipeline(settings, store):
    """The four functions wired by hand: ingest -> detect -> embed (-> query)."""
    ingest = Ingest(settings, Indexes.fixed(store, COLLECTION, "colour"))
    detect = Detect(WholeImageDetector())
    embed = Embed(ColourEmbedder(), Indexes.fixed(store, COLLECTION, "colour"))
    query = Query(Indexes.fixed(store, COLLECTION, "colour"))

    def index(event):
        """One catalogue event through ingest, detect and embed (images, then the closing sync).

        Returns what embed reports on catalog.indexed for the event."""
        reports = []
        for e in ingest.on_catalog_event(event):
            (detected,) = detect.on_image(e.message)
            (outcome,) = embed.on_batch([detected.message])
            reports += [emit.message for emit in outcome]
        assert all(r.event_id == event.event_id for r in reports)
        return reports

    def search(raw, **kw):
        (normalized,) = ingest.on_search_request(SearchRequest(image=data(raw), **kw))
        (detected,) = detect.on_image(normalized.message)
        ((vectors,),) = embed.on_batch([detected.message])
        (result,) = query.on_vectors(vectors.message)
        return result.message

    return SimpleNamespace(ingest=ingest, detect=detect, embed=embed, query=query, index=index, search=search)


# ----------------------------------------------------------------------------- ingest


def test_ingest_normalises_to_capped_rgb_jpeg(pipeline):
    # GIVEN a large PNG with an alpha channel
    img = Image.new("RGBA", (2000, 1000), (10, 200, 10, 128))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    event = CatalogUpsert(product_id="png", images=[data(buf.getvalue())])
    # WHEN ingested
    emit, sync = pipeline.ingest.on_catalog_event(event)
    # THEN it leaves as an RGB JPEG with its longest side at 640, keyed by product
    assert emit.topic == IMAGES_NORMALIZED
    out = Image.open(io.BytesIO(emit.message.jpeg_bytes()))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (640, 320)
    assert emit.message.key() == "png" and emit.message.index.event_id == event.event_id
    # AND it carries no thumbnail: embed makes it from the image it stores (see the embed tests)
    assert "thumbnail" not in json.loads(emit.message.to_bytes())["index"]
    # AND a sync closes the event, on the same topic and key, naming the images to keep
    assert sync.topic == IMAGES_NORMALIZED and sync.message.key() == "png"
    assert sync.message.keep_image_ids == [emit.message.image_id]


def test_ingest_passes_a_plain_jpeg_on_as_it_came_and_strips_what_could_identify_a_shopper(pipeline):
    # GIVEN a baseline JPEG within 640 px that carries nothing but pixels
    plain = photo(size=(400, 300))
    # WHEN ingested, THEN the very same bytes go on (no second JPEG loss, no re-encoding's CPU)
    (emit,) = pipeline.ingest.on_search_request(SearchRequest(image=data(plain)))
    assert emit.message.jpeg_bytes() == plain and (emit.message.width, emit.message.height) == (400, 300)
    # GIVEN the same photo with a GPS position in its EXIF, or as a progressive JPEG
    exif = Image.Exif()
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)  # GPSLatitude
    for kwargs in ({"exif": exif}, {"progressive": True}):
        buf = io.BytesIO()
        Image.open(io.BytesIO(plain)).save(buf, "JPEG", **kwargs)
        (emit,) = pipeline.ingest.on_search_request(SearchRequest(image=data(buf.getvalue())))
        # THEN it is re-encoded: no metadata travels on, and the result is a baseline JPEG
        out = Image.open(io.BytesIO(emit.message.jpeg_bytes()))
        assert emit.message.jpeg_bytes() != buf.getvalue()
        assert not {"exif", "progressive"} & set(out.info) and out.size == (400, 300)


def test_ingest_applies_exif_rotation(pipeline):
    # GIVEN a landscape photo whose EXIF says "rotate 90°"
    event = CatalogUpsert(product_id="rot", images=[data(photo(size=(400, 200), exif_orientation=6))])
    emit, _ = pipeline.ingest.on_catalog_event(event)
    # THEN the normalised image is upright (portrait)
    assert (emit.message.width, emit.message.height) == (200, 400)


@pytest.mark.parametrize("raw, reason", [
    (b"\xff\xd8\xff\xe0 truncated", "cannot be decoded"),
    (b"GIF89a not really", "cannot be decoded"),
])
def test_ingest_rejects_undecodable_images_as_poison(pipeline, raw, reason):
    with pytest.raises(PoisonMessage, match=reason):
        pipeline.ingest.on_catalog_event(CatalogUpsert(product_id="bad", images=[data(raw)]))


def test_ingest_rejects_oversized_images(pipeline, settings):
    settings.max_image_pixels = 100 * 100
    with pytest.raises(PoisonMessage, match="more than 10000"):
        pipeline.ingest.on_catalog_event(upsert())


@pytest.fixture
def no_network(monkeypatch):
    """Any connection to a non-loopback address fails the test before a packet leaves."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if not str(host).startswith("127.") and host not in ("::1", "localhost"):
            pytest.fail(f"test tried to connect to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail(f"DNS lookup {a[0]}"))


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "ftp://10.0.0.1/x.jpg",
    "http://127.0.0.1:9/x.jpg",
    "http://10.1.2.3/x.jpg",
    "http://192.168.0.1/x.jpg",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]/x.jpg",
])
def test_ingest_refuses_urls_to_private_or_local_addresses(pipeline, no_network, url, monkeypatch):
    # getaddrinfo on an IP literal needs no DNS: let only those through
    monkeypatch.setattr(socket, "getaddrinfo", _literal_only)
    with pytest.raises(PoisonMessage, match="refused URL"):
        pipeline.ingest.on_catalog_event(CatalogUpsert(product_id="u", images=[ImageRef(url=url)]))


def _literal_only(host, port, *args, **kwargs):
    import ipaddress

    addr = ipaddress.ip_address(host.strip("[]"))
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    return [(family, socket.SOCK_STREAM, 6, "", (str(addr), port))]


def test_unchanged_images_update_the_payload_without_detect_or_embed(pipeline, store):
    # GIVEN an indexed product
    (report,) = pipeline.index(upsert())
    assert (report.outcome, report.new_images, report.images) == ("indexed", 1, 1)
    points = store.count(COLLECTION)
    # WHEN the same photos arrive with new offers
    emits = pipeline.ingest.on_catalog_event(upsert(offers=[Offer(shop="z", price=1.0)], title="renamed"))
    # THEN no image goes on to detection (only the closing sync), and the stored offers and title changed in place
    assert [type(e.message).__name__ for e in emits] == ["ProductSync"]
    assert pipeline.ingest.counters["unchanged"] == 1
    assert store.count(COLLECTION) == points
    hit = store.search(COLLECTION, ColourEmbedder().embed([Image.open(io.BytesIO(photo()))])[0], 1)[0]
    assert hit.payload["title"] == "renamed" and hit.payload["min_price"] == 1.0


def test_a_resent_catalogue_event_decodes_none_of_its_indexed_images(pipeline, store, monkeypatch):
    # GIVEN an indexed product
    pipeline.index(upsert())
    # WHEN the same event arrives again (a nightly full feed) and decoding would fail
    import lookalike.functions.ingest.handler as ingest_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("an indexed image was decoded again")

    monkeypatch.setattr(ingest_module, "normalize", no_decoding)
    emits = pipeline.ingest.on_catalog_event(upsert(offers=[Offer(shop="z", price=2.0)]))
    # THEN it is closed as unchanged from the stored image ids alone, keeping its image
    (sync,) = [e.message for e in emits]
    assert sync.outcome == "unchanged" and len(sync.keep_image_ids) == 1
    # AND a new photo of the product is still decoded (and a bad one still refused)
    with pytest.raises(AssertionError, match="decoded again"):
        pipeline.ingest.on_catalog_event(upsert(colors=((200, 30, 30), (0, 0, 255))))


def test_changed_images_replace_the_stale_points(pipeline, store):
    pipeline.index(upsert(colors=[(200, 30, 30), (30, 30, 200)]))
    before = store.product_image_ids(COLLECTION, "p1")
    # WHEN the product keeps its red photo and swaps the blue one for a green one
    pipeline.index(upsert(colors=[(200, 30, 30), (30, 200, 30)]))
    after = store.product_image_ids(COLLECTION, "p1")
    # THEN one image id stayed, one left, one arrived
    assert len(before) == len(after) == 2 and len(before & after) == 1
    assert store.count(COLLECTION) == 2


def test_images_still_in_flight_cannot_outlive_a_newer_event(pipeline, store):
    # GIVEN photo A's event is still on its way to embed when a second event replaces A by B
    first = pipeline.ingest.on_catalog_event(upsert(colors=[(200, 30, 30)]))
    second = pipeline.ingest.on_catalog_event(upsert(colors=[(30, 200, 30)]))
    third = pipeline.ingest.on_catalog_event(CatalogDelete(product_id="p1"))
    fourth = pipeline.ingest.on_catalog_event(upsert(colors=[(30, 30, 200)]))
    # WHEN they all reach embed afterwards, in order, in one batch
    detected = [pipeline.detect.on_image(e.message)[0].message for e in first + second + third + fourth]
    pipeline.embed.on_batch(detected)
    # THEN only the last event's photo is indexed
    (last_image,) = [e.message.image_id for e in fourth if hasattr(e.message, "image_id")]
    assert store.product_image_ids(COLLECTION, "p1") == {last_image}


def test_delete_removes_the_product(pipeline, store):
    pipeline.index(upsert("p1"))
    pipeline.index(upsert("p2", colors=[(30, 200, 30)]))
    (report,) = pipeline.index(CatalogDelete(product_id="p1"))
    assert report.outcome == "deleted"
    assert store.product_image_ids(COLLECTION, "p1") == set()
    assert store.product_image_ids(COLLECTION, "p2")


# ----------------------------------------------------------------------------- detect


def test_search_photos_and_catalogue_images_take_separate_lanes_through_detect_and_embed(pipeline):
    # GIVEN the routes of detect and embed
    lanes = {(r.topic, r.lane) for fn in (pipeline.detect, pipeline.embed) for r in fn.routes()}
    # THEN each reads shoppers' photos in a lane (consumer group, thread) of its own
    assert lanes == {(IMAGES_NORMALIZED, ""), (SEARCH_NORMALIZED, "search"),
                     (IMAGES_DETECTED, ""), (SEARCH_DETECTED, "search")}
    # AND a catalogue image stays on the catalogue topics
    normalized, _ = pipeline.ingest.on_catalog_event(upsert("p1"))
    assert (normalized.topic, pipeline.detect.on_image(normalized.message)[0].topic) == (IMAGES_NORMALIZED,
                                                                                        IMAGES_DETECTED)
    # AND a query photo an older ingest still put on images.normalized goes on to search.detected
    (query,) = pipeline.ingest.on_search_request(SearchRequest(image=data(photo())))
    assert pipeline.detect.on_image(query.message)[0].topic == SEARCH_DETECTED


def test_detect_appends_the_whole_image_and_honours_a_user_box(pipeline):
    (normalized,) = pipeline.ingest.on_search_request(SearchRequest(image=data(photo(size=(1280, 960)))))
    (detected,) = pipeline.detect.on_image(normalized.message)
    # shoppers' photos keep to their own topics: they never queue behind catalogue images
    assert (normalized.topic, detected.topic) == (SEARCH_NORMALIZED, SEARCH_DETECTED)
    assert [o.label for o in detected.message.objects] == ["image"]
    assert detected.message.objects[0].box.as_list() == [0, 0, 640, 480]
    # GIVEN a box drawn on the uploaded 1280x960 photo
    request = SearchRequest(image=data(photo(size=(1280, 960))), box=Box(x1=0, y1=0, x2=320, y2=240))
    (normalized,) = pipeline.ingest.on_search_request(request)
    (detected,) = pipeline.detect.on_image(normalized.message)
    # THEN only that region (scaled to the normalised image) is searched
    assert [o.label for o in detected.message.objects] == ["selection"]
    assert detected.message.objects[0].box.as_list() == [0, 0, 160, 120]


def test_search_box_outside_the_photo_is_poison(pipeline):
    with pytest.raises(PoisonMessage, match="outside"):
        pipeline.ingest.on_search_request(SearchRequest(image=data(photo()), box=Box(x1=900, y1=0, x2=950, y2=10)))


# ----------------------------------------------------------------------------- embed


def test_embed_redelivery_overwrites_instead_of_duplicating(pipeline, store):
    normalized, _ = pipeline.ingest.on_catalog_event(upsert())
    (detected,) = pipeline.detect.on_image(normalized.message)
    pipeline.embed.on_batch([detected.message])
    pipeline.embed.on_batch([detected.message])  # the same message delivered twice
    assert store.count(COLLECTION) == 1
    (payload,) = store.product_payloads(COLLECTION, "p1")
    # the thumbnail of the normalised image, byte for byte what ingest used to carry to embed
    assert payload["thumbnail"] == legacy_thumbnail(normalized.message) and payload["image_id"]
    expected = point_id("p1", normalized.message.image_id, 0)
    assert store.search(COLLECTION, store.product_vectors(COLLECTION, ["p1"])["p1"][0], 1)[0].id == expected


def test_embed_batches_both_intents_and_isolates_a_corrupt_message(pipeline, store):
    index_msg, _ = pipeline.ingest.on_catalog_event(upsert())
    (query_msg,) = pipeline.ingest.on_search_request(SearchRequest(image=data(photo())))
    index_det = pipeline.detect.on_image(index_msg.message)[0].message
    query_det = pipeline.detect.on_image(query_msg.message)[0].message
    corrupt = DetectedImage(**{**query_det.model_dump(), "jpeg": base64.b64encode(b"garbage").decode()})
    not_base64 = DetectedImage(**{**query_det.model_dump(), "jpeg": "not base64!"})
    # WHEN one batch holds an index image, a query image, a corrupt one and one that is not even base64
    outcomes = pipeline.embed.on_batch([index_det, not_base64, query_det, corrupt])
    # THEN the index image is stored, the query goes on with one vector per object, the other two are poison
    assert outcomes[0] == [] and store.count(COLLECTION) == 1
    (emit,) = outcomes[2]
    assert emit.topic == QUERY_VECTORS and len(emit.message.objects[0].vector) == DIM
    assert isinstance(outcomes[1], PoisonMessage) and isinstance(outcomes[3], PoisonMessage)


def legacy_thumbnail(normalized) -> str:
    """The thumbnail the previous release's ingest carried in ``index.thumbnail`` (base64 JPEG)."""
    return base64.b64encode(thumbnail(open_jpeg(normalized.jpeg_bytes()), THUMBNAIL_SIDE)).decode()


def with_fields(message, path: tuple[str, ...] = (), **fields) -> bytes:
    """``message`` as JSON with ``fields`` added (inside ``path``): what an older release wrote."""
    doc = json.loads(message.to_bytes())
    part = doc
    for key in path:
        part = part[key]
    part.update(fields)
    return json.dumps(doc).encode()


def test_embed_makes_one_thumbnail_per_image_for_all_its_points(pipeline, store):
    # GIVEN an index image on its way to embed (three objects: two detected plus the whole image),
    # and a count of the thumbnails embed makes
    pipeline.detect.detector = TwoBoxDetector()
    normalized, _ = pipeline.ingest.on_catalog_event(upsert(colors=[(30, 200, 30)]))
    (detected,) = pipeline.detect.on_image(normalized.message)
    assert len(detected.message.objects) == 3
    assert "thumbnail" not in json.loads(detected.message.to_bytes())["index"]
    embedder = pipeline.embed.embedders["colour"]
    made = embedder.thumbnails_made
    # WHEN embed stores it
    pipeline.embed.on_batch([detected.message])
    # THEN every point of the image has the same 160 px JPEG thumbnail, made once
    payloads = store.product_payloads(COLLECTION, "p1")
    assert len(payloads) == 3 and embedder.thumbnails_made - made == 1
    assert len({p["thumbnail"] for p in payloads}) == 1
    thumb = Image.open(io.BytesIO(base64.b64decode(payloads[0]["thumbnail"], validate=True)))
    assert thumb.format == "JPEG" and thumb.size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE * 3 // 4)
    # AND a query image gets none (nothing stores it)
    (query,) = pipeline.ingest.on_search_request(SearchRequest(image=data(photo())))
    pipeline.embed.on_batch([pipeline.detect.on_image(query.message)[0].message])
    assert embedder.thumbnails_made - made == 1


def test_messages_of_the_previous_release_still_parse_and_the_new_ones_are_smaller(pipeline):
    normalized_route = Route(IMAGES_NORMALIZED, NormalizedMessage, lambda m: [])
    detected_route = Route(IMAGES_DETECTED, DetectedMessage, lambda m: [])
    vectors_route = Route(QUERY_VECTORS, QueryVectors, lambda m: [])
    # GIVEN the messages this release writes for a catalogue photo and a search
    normalized, _ = pipeline.ingest.on_catalog_event(upsert())
    (detected,) = pipeline.detect.on_image(normalized.message)
    (query,) = pipeline.ingest.on_search_request(SearchRequest(image=data(photo())))
    ((vectors,),) = pipeline.embed.on_batch([pipeline.detect.on_image(query.message)[0].message])
    assert not {"width", "height"} & json.loads(vectors.message.to_bytes()).keys()
    # AND the same messages as the previous release wrote them (a thumbnail inline; the photo's size)
    thumb = legacy_thumbnail(normalized.message)
    old_normalized = with_fields(normalized.message, ("index",), thumbnail=thumb)
    old_detected = with_fields(detected.message, ("index",), thumbnail=thumb)
    old_vectors = with_fields(vectors.message, width=640, height=480)
    # THEN an old message still in a topic during an upgrade reads as the new one, not as poison
    assert normalized_route.parse(old_normalized) == normalized.message
    assert detected_route.parse(old_detected) == detected.message
    assert vectors_route.parse(old_vectors) == vectors.message
    # AND a normalised image is smaller by the whole thumbnail, kilobytes of base64
    saved = len(old_normalized) - len(normalized.message.to_bytes())
    assert saved >= len(thumb) > 1000
    # AND other unknown fields are still poison
    with pytest.raises(PoisonMessage, match="thumb"):
        normalized_route.parse(with_fields(normalized.message, ("index",), thumb=thumb))


# ----------------------------------------------------------------------------- query


def test_query_returns_one_entry_per_product_with_sorted_offers(pipeline):
    # GIVEN a red product with two red-ish photos and a blue product
    pipeline.index(upsert("red", colors=[(200, 30, 30), (190, 40, 35)]))
    pipeline.index(upsert("blue", colors=[(30, 30, 200)], offers=[Offer(shop="a", price=5.0)]))
    # WHEN searching with a red photo
    result = pipeline.search(photo((205, 28, 28)), top_k=5)
    assert result.objects[0].label == "image"
    products = result.objects[0].products
    # THEN red comes first, once, and offers are cheapest first with the best one marked
    assert [p.product_id for p in products] == ["red", "blue"]
    assert [o.price for o in products[0].offers] == [9.5, 11.0, 12.0]
    assert products[0].best_offer.shop == "a"


def test_a_product_with_many_photos_cannot_crowd_out_the_others(pipeline, store):
    # GIVEN a red product with eight red photos and one blue product,
    # and a query function that first fetches only top_k * 1 points
    reds = [(200 - i, 30 + i, 30) for i in range(8)]
    pipeline.index(upsert("red", colors=reds))
    pipeline.index(upsert("blue", colors=[(30, 30, 200)]))
    query = Query(Indexes.fixed(store, COLLECTION, "colour"), oversample=1)
    (normalized,) = pipeline.ingest.on_search_request(SearchRequest(image=data(photo((205, 28, 28))), top_k=2))
    ((vectors,),) = pipeline.embed.on_batch([pipeline.detect.on_image(normalized.message)[0].message])
    # WHEN searching for the two best products
    (result,) = query.on_vectors(vectors.message)
    # THEN the fetch widens past red's photos and both products come back
    assert [p.product_id for p in result.message.objects[0].products] == ["red", "blue"]
    assert query.counters["widened_searches"] >= 1


def test_best_offer_skips_out_of_stock_shops(pipeline):
    offers = [Offer(shop="cheap", price=1.0, in_stock=False), Offer(shop="dear", price=3.0)]
    pipeline.index(upsert("p", offers=offers))
    product = pipeline.search(photo()).objects[0].products[0]
    assert product.offers[0].shop == "cheap" and product.best_offer.shop == "dear"


def test_recommend_excludes_the_history_and_follows_it(pipeline):
    pipeline.index(upsert("red", colors=[(200, 30, 30)]))
    pipeline.index(upsert("red2", colors=[(180, 40, 40)]))
    pipeline.index(upsert("blue", colors=[(30, 30, 200)]))
    (emit,) = pipeline.query.on_recommend(RecommendRequest(positive=["red"], top_k=5))
    assert emit.topic == SEARCH_RESULTS
    ids = [p.product_id for p in emit.message.objects[0].products]
    assert ids[0] == "red2" and "red" not in ids
    (emit,) = pipeline.query.on_recommend(RecommendRequest(positive=["unknown"]))
    assert emit.message.status == "error" and "unknown" in emit.message.error


# ----------------------------------------------------------------------------- search features


def test_listings_of_the_same_item_merge_into_one_price_comparison(pipeline):
    # GIVEN the same red mug listed by two shops under their own product ids, and a blue one
    pipeline.index(upsert("shop1-mug", offers=[Offer(shop="one", price=10.0)]))
    pipeline.index(upsert("shop2-mug", offers=[Offer(shop="two", price=8.0), Offer(shop="three", price=12.0)]))
    pipeline.index(upsert("blue", colors=[(30, 30, 200)], offers=[Offer(shop="one", price=5.0)]))
    # WHEN a shopper searches with a red photo
    products = pipeline.search(photo((200, 30, 30))).objects[0].products
    # THEN the two listings are one entry listing every shop's price, cheapest first
    assert [p.product_id for p in products][:1] in (["shop1-mug"], ["shop2-mug"])
    merged = products[0]
    assert sorted([merged.product_id] + merged.merged_product_ids) == ["shop1-mug", "shop2-mug"]
    assert [(o.shop, o.price, o.product_id) for o in merged.offers] == [
        ("two", 8.0, "shop2-mug"), ("one", 10.0, "shop1-mug"), ("three", 12.0, "shop2-mug")]
    assert merged.best_offer.shop == "two"
    assert [p.product_id for p in products[1:]] == ["blue"]


def test_merging_is_off_at_threshold_one(pipeline):
    pipeline.query.merge_threshold = 1.0
    pipeline.index(upsert("shop1-mug"))
    pipeline.index(upsert("shop2-mug"))
    products = pipeline.search(photo()).objects[0].products
    assert {p.product_id for p in products} == {"shop1-mug", "shop2-mug"}
    assert all(p.merged_product_ids == [] for p in products)


class TwoBoxDetector:
    """Finds the left and the right half of every photo."""

    def detect(self, image):
        w, h = image.size
        return [DetectedObject(box=Box(x1=0, y1=0, x2=w / 2, y2=h), label="cup", score=0.9),
                DetectedObject(box=Box(x1=w / 2, y1=0, x2=w, y2=h), label="bottle", score=0.8)]


def test_multi_object_photo_returns_results_per_object_plus_whole_image(pipeline):
    # GIVEN a red and a blue product, and a photo with a red left half and a blue right half
    pipeline.index(upsert("red", colors=[(200, 30, 30)]))
    pipeline.index(upsert("blue", colors=[(30, 30, 200)]))
    pipeline.detect.detector = TwoBoxDetector()
    img = Image.new("RGB", (400, 200), (200, 30, 30))
    img.paste((30, 30, 200), (200, 0, 400, 200))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    # WHEN searching with it
    objects = pipeline.search(buf.getvalue()).objects
    # THEN each detected object has its own results, and the whole image comes last
    assert [o.label for o in objects] == ["cup", "bottle", "image"]
    assert objects[0].products[0].product_id == "red"
    assert objects[1].products[0].product_id == "blue"
    assert objects[2].box.as_list() == [0, 0, 400, 200]


def test_euclid_collection_ranks_the_closest_product_first(settings, tmp_path):
    store = EdgeStore(tmp_path / "euclid")
    store.ensure_collection(CollectionSpec("test__euclid", DIM, "euclid"))
    indexes = Indexes.fixed(store, "test__euclid", "colour")
    ingest, detect, embed = Ingest(settings, indexes), Detect(WholeImageDetector()), Embed(ColourEmbedder(), indexes)
    query = Query(indexes)
    for pid, color in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
        for e in ingest.on_catalog_event(upsert(pid, colors=[color])):
            embed.on_batch([detect.on_image(e.message)[0].message])
    (n,) = ingest.on_search_request(SearchRequest(image=data(photo((40, 40, 190)))))
    ((v,),) = embed.on_batch([detect.on_image(n.message)[0].message])
    products = query.on_vectors(v.message)[0].message.objects[0].products
    # THEN closest first: distances grow down the list
    assert products[0].product_id == "blue"
    assert [p.score for p in products] == sorted(p.score for p in products)
    store.close()


def test_recommend_applies_filters_and_pushes_away_from_negatives(pipeline):
    pipeline.index(upsert("red", colors=[(200, 30, 30)]))
    pipeline.index(upsert("red2", colors=[(180, 40, 40)], category="toys"))
    pipeline.index(upsert("orange", colors=[(220, 120, 30)]))
    pipeline.index(upsert("blue", colors=[(30, 30, 200)]))
    pipeline.query.merge_threshold = 1.0
    # WHEN the shopper liked red, with a category filter
    (emit,) = pipeline.query.on_recommend(RecommendRequest(positive=["red"], filters={"categories": ["kitchen"]}))
    ids = [p.product_id for p in emit.message.objects[0].products]
    # THEN only kitchen products, the history itself excluded
    assert "red2" not in ids and "red" not in ids and ids[0] == "orange"
    # WHEN they also disliked orange THEN it is gone from the list
    (emit,) = pipeline.query.on_recommend(RecommendRequest(positive=["red"], negative=["orange"]))
    ids = [p.product_id for p in emit.message.objects[0].products]
    assert "orange" not in ids and ids[0] == "red2"
