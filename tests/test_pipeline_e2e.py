"""End to end through a real broker: catalogue events index themselves, photos find products.

GIVEN the embedded stack (broker, ingest, detect, embed, query, Qdrant Edge)
WHEN catalogue events and search requests are published on their topics
THEN the results a shopper sees come back on search.results
"""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image

from lookalike.client import read_catalog
from lookalike.shared.messages import CATALOG_EVENTS, THUMBNAIL_SIDE, CatalogDelete, CatalogUpsert, ImageRef, Offer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def indexed(stack, client, sample_catalog):
    events = read_catalog(sample_catalog.catalog_path)
    assert len(events) >= 20
    client.publish(CATALOG_EVENTS, events)
    client.wait_indexed(timeout_s=600)
    return events


def test_catalogue_events_index_every_photo(stack, indexed):
    # THEN every photo of every product is a point (whole-image object, detection off)
    photos = sum(len(e.images) for e in indexed)
    assert stack.resources.store.count(stack.resources.collection) == photos


def test_every_indexed_photo_has_a_thumbnail_made_by_embed(stack, indexed):
    # THEN every point carries its photo's thumbnail, a JPEG of THUMBNAIL_SIDE px (no topic carried it)
    store, collection = stack.resources.store, stack.resources.collection
    for event in indexed[:3]:
        payloads = store.product_payloads(collection, event.product_id)
        assert len(payloads) == len(event.images)
        for payload in payloads:
            thumb = Image.open(io.BytesIO(base64.b64decode(payload["thumbnail"], validate=True)))
            assert thumb.format == "JPEG" and max(thumb.size) == THUMBNAIL_SIDE


def test_new_photo_of_indexed_product_ranks_it_first(client, indexed, sample_catalog):
    # GIVEN a photo of a catalogue product that is not one of its catalogue photos
    photo, product_id = sample_catalog.queries[3]
    # WHEN a shopper searches with it
    result = client.search(photo.read_bytes(), top_k=5)
    # THEN that product ranks first, once, with its offers sorted by price
    assert result.status == "ok"
    products = result.objects[-1].products
    assert products[0].product_id == product_id
    assert len({p.product_id for p in products}) == len(products)
    prices = [o.price for o in products[0].offers]
    assert prices == sorted(prices) and len({o.shop for o in products[0].offers}) >= 3
    assert products[0].best_offer is not None and products[0].best_offer.in_stock


def test_filters_apply_inside_the_search(client, indexed, sample_catalog):
    photo, product_id = sample_catalog.queries[3]
    category = next(e.category for e in indexed if e.product_id == product_id)
    # WHEN the shopper filters on another category
    result = client.search(photo.read_bytes(), top_k=5, filters={"categories": ["no-such-category"]})
    # THEN nothing comes back; with the product's own category, it is first
    assert result.objects[-1].products == []
    result = client.search(photo.read_bytes(), top_k=5, filters={"categories": [category]})
    assert result.objects[-1].products[0].product_id == product_id
    assert all(p.category == category for p in result.objects[-1].products)


def test_price_update_with_same_photos_skips_detect_and_embed(stack, client, indexed):
    # GIVEN an indexed product
    event = next(e for e in indexed if isinstance(e, CatalogUpsert))
    detected_before = stack.functions["detect"].counters["images"]
    embedded_before = stack.functions["embed"].counters["crops"]
    unchanged_before = stack.functions["ingest"].counters["unchanged"]
    store, collection = stack.resources.store, stack.resources.collection
    applied_before = max(p["applied_at"] for p in store.product_payloads(collection, event.product_id))
    # WHEN only its offers change
    changed = event.model_copy(update={"offers": [Offer(shop="newshop", price=0.5)], "event_id": "price-1"})
    sent_at = time.time()
    client.publish(CATALOG_EVENTS, [changed])
    client.wait_indexed()
    # THEN the stored payload changed and nothing was re-embedded
    assert stack.functions["ingest"].counters["unchanged"] == unchanged_before + 1
    assert stack.functions["detect"].counters["images"] == detected_before
    assert stack.functions["embed"].counters["crops"] == embedded_before
    vector = store.product_vectors(collection, [event.product_id])[event.product_id][0]
    hit = store.search(collection, vector, 1)[0]
    assert hit.payload["product_id"] == event.product_id
    assert [o["shop"] for o in hit.payload["offers"]] == ["newshop"] and hit.payload["min_price"] == 0.5
    # AND its results say the price is as of this update
    assert hit.payload["applied_at"] >= sent_at > applied_before


def test_delete_removes_every_point_of_the_product(stack, client, indexed):
    victim = indexed[-1].product_id
    store, collection = stack.resources.store, stack.resources.collection
    assert store.product_image_ids(collection, victim)
    client.publish(CATALOG_EVENTS, [CatalogDelete(product_id=victim)])
    client.wait_indexed()
    assert store.product_image_ids(collection, victim) == set()


def publish_raw(client, topic: str, key: bytes, value: bytes) -> None:
    """Send bytes that are no message at all (the client only publishes messages)."""
    client.producer.send(topic, key=key, value=value).get(timeout=30)


def _jpeg(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def test_poison_messages_go_to_the_dlq_and_the_pipeline_keeps_going(stack, client):
    # GIVEN a non-JSON message, an event whose image is corrupt, then a good event
    publish_raw(client, CATALOG_EVENTS, b"poison-json", b"{this is not json")
    not_a_jpeg = ImageRef(data=base64.b64encode(b"\xff\xd8 not a jpeg").decode())
    corrupt = CatalogUpsert(product_id="poison-image", images=[not_a_jpeg])
    good = CatalogUpsert(product_id="after-poison", title="Plain red card", images=[ImageRef(data=_jpeg("red"))],
                         offers=[Offer(shop="a", price=1.0)])
    client.publish(CATALOG_EVENTS, [corrupt, good])
    # WHEN the pipeline has worked through them
    client.wait_indexed()
    # THEN both bad ones are in catalog.events.dlq with a reason, and the good one is indexed
    dlq = {r["key"]: r for r in client.dlq_records(CATALOG_EVENTS)}
    assert "bad JSON" in dlq[b"poison-json"]["reason"]
    assert dlq[b"poison-json"]["value"] == b"{this is not json"
    assert "cannot be decoded" in dlq[b"poison-image"]["reason"]
    assert dlq[b"poison-image"]["headers"]["dlq.function"] == "ingest"
    assert stack.resources.store.product_image_ids(stack.resources.collection, "after-poison")


def test_recommendations_through_the_topic(client, indexed):
    # GIVEN a shopper who viewed one product
    viewed = indexed[0]
    # WHEN asking for more like it, in stock only
    result = client.recommend([viewed.product_id], top_k=5, filters={"in_stock": True})
    # THEN similar products come back, not the viewed one, each with an in-stock offer
    assert result.kind == "recommend" and result.status == "ok"
    products = result.objects[0].products
    assert len(products) == 5 and viewed.product_id not in {p.product_id for p in products}
    assert all(p.best_offer.in_stock for p in products)


def test_events_for_one_product_apply_in_order(stack, client, sample_catalog):
    # GIVEN four quick events for one product: photo A, photo B, delete, photo C
    photos = sorted((sample_catalog.catalog_path.parent / "images").glob("*.jpg"))[:3]
    refs = [ImageRef(data=base64.b64encode(p.read_bytes()).decode()) for p in photos]
    pid = "ordered-product"
    client.publish(CATALOG_EVENTS, [
        CatalogUpsert(product_id=pid, images=[refs[0]]),
        CatalogUpsert(product_id=pid, images=[refs[1]]),
        CatalogDelete(product_id=pid),
        CatalogUpsert(product_id=pid, images=[refs[2]]),
    ])
    client.wait_indexed()
    # THEN only the last event's photo is indexed for it
    from lookalike.shared.images import image_id

    indexed_images = stack.resources.store.product_image_ids(stack.resources.collection, pid)
    assert indexed_images == {image_id(photos[2].read_bytes())}
