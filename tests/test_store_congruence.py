"""Both vector stores behave the same, checked in two tiers.

Behaviour tier: every test runs against Qdrant Edge (embedded, files in tmp_path)
and qdrant-client's in-process ":memory:" mode, each with its own expectations.
A few edge-only tests cover persistence, optimize() and threads.

Congruence tier (last section, modelled on qdrant-client's tests/congruence_tests):
one seeded catalogue is loaded into every backend, the same operation runs on
each, and the results are compared with the reference backend's (ids in order up
to ties, scores, payloads, vectors). The Qdrant server backend comes from
QDRANT_URL, else testcontainers when a Docker engine answers, else it is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from lookalike.shared.errors import StoreUnavailable
from lookalike.shared.messages import Offer, ProductInfo, SearchFilters, point_id
from lookalike.shared.stores import (
    CollectionSpec,
    EdgeStore,
    Hit,
    PointRecord,
    QdrantClientStore,
    VectorStore,
    open_store,
)
from tests.conftest import docker_available

DIM = 64
COLL = "lookalike__test"


# --------------------------------------------------------------------------- factories


def unit(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def near(v: np.ndarray, rng: np.random.Generator, eps: float = 0.05) -> np.ndarray:
    """A unit vector very close to ``v`` (cosine similarity ~0.99)."""
    w = v + eps * rng.normal(size=v.shape)
    return (w / np.linalg.norm(w)).astype(np.float32)


def payload(
    product_id: str,
    image_id: str = "img0",
    object_index: int = 0,
    *,
    title: str | None = None,
    category: str = "shoes",
    offers: list[tuple[str, float, bool]] | None = None,
) -> dict:
    """A point payload as the indexer builds it: product fields + image/object fields."""
    offers = [("shopA", 10.0, True)] if offers is None else offers
    info = ProductInfo(
        product_id=product_id,
        title=title if title is not None else f"title of {product_id}",
        category=category,
        brand="acme",
        offers=[Offer(shop=s, price=p, in_stock=st) for s, p, st in offers],
    )
    return {
        **info.payload(),
        "image_id": image_id,
        "object_index": object_index,
        "image_url": f"https://img.example/{image_id}.jpg",
        "box": [0.0, 0.0, 10.0, 10.0],
        "label": "image",
        "det_score": 1.0,
        "model": "test-model",
    }


def point(vector, product_id: str, image_id: str = "img0", object_index: int = 0, **fields) -> PointRecord:
    return PointRecord(
        id=point_id(product_id, image_id, object_index),
        vector=vector,
        payload=payload(product_id, image_id, object_index, **fields),
    )


def product_points(rng, product_id: str, images=("img0", "img1"), objects: int = 2, **fields) -> list[PointRecord]:
    return [point(unit(rng), product_id, img, k, **fields) for img in images for k in range(objects)]


def all_product_ids(store: VectorStore, coll: str, probe) -> set[str]:
    return {h.payload["product_id"] for h in store.search(coll, probe, limit=1000)}


# --------------------------------------------------------------------------- fixtures


def make_store(backend: str, root) -> VectorStore:
    return EdgeStore(root / "edge") if backend == "qdrant-edge" else QdrantClientStore(":memory:")


@pytest.fixture(params=["qdrant-edge", "qdrant-client"])
def store(request, tmp_path):
    s = make_store(request.param, tmp_path)
    yield s
    s.close()


@pytest.fixture
def coll(store) -> str:
    store.ensure_collection(CollectionSpec(COLL, DIM))
    return COLL


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------- ranking


def test_nearest_point_ranks_first_with_cosine(store, coll, rng):
    # GIVEN 50 random points and a query very close to one of them
    points = [point(unit(rng), f"p{i}") for i in range(50)]
    store.upsert(coll, points)
    target = points[17]
    # WHEN searching
    hits = store.search(coll, near(np.asarray(target.vector), rng), limit=5)
    # THEN that point comes first, scores are similarities, best first, with its payload
    assert hits[0].id == target.id
    assert hits[0].payload["product_id"] == "p17"
    assert hits[0].score > 0.9
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(hits) == 5


def test_search_returns_stored_vectors_when_asked(store, coll, rng):
    points = [point(unit(rng), f"p{i}") for i in range(5)]
    store.upsert(coll, points)
    plain = store.search(coll, points[2].vector, limit=1)
    (hit,) = store.search(coll, points[2].vector, limit=1, with_vectors=True)
    assert plain[0].vector is None
    assert hit.vector.dtype == np.float32 and np.allclose(hit.vector, points[2].vector, atol=1e-5)


def test_euclid_collection_ranks_closest_first(store, rng):
    # GIVEN a euclid collection with points at known distances from the query
    store.ensure_collection(CollectionSpec("lookalike__euclid", 4, "euclid"))
    q = np.array([1.0, 0.0, 0.0, 0.0])
    store.upsert(
        "lookalike__euclid",
        [point(q + d * np.array([0, 1, 0, 0]), f"p{d}") for d in (3.0, 0.5, 2.0, 1.0)],
    )
    # WHEN searching
    hits = store.search("lookalike__euclid", q, limit=4)
    # THEN the closest ranks first and scores are distances, ascending
    assert [h.payload["product_id"] for h in hits] == ["p0.5", "p1.0", "p2.0", "p3.0"]
    assert [h.score for h in hits] == pytest.approx([0.5, 1.0, 2.0, 3.0], abs=1e-4)


def test_search_accepts_lists_and_numpy(store, coll, rng):
    # GIVEN one point
    v = unit(rng)
    store.upsert(coll, [point(v, "p")])
    # WHEN querying with a list, a float32 array and a float64 array
    # THEN all find it, and the hit id is the canonical uuid string
    for query in (v.tolist(), v, v.astype(np.float64)):
        (hit,) = store.search(coll, query, limit=3)
        assert hit.id == point_id("p", "img0", 0)


# --------------------------------------------------------------------------- writes


def test_redelivery_overwrites_instead_of_duplicating(store, coll, rng):
    # GIVEN a product indexed once
    points = product_points(rng, "p1")
    store.upsert(coll, points)
    assert store.count(coll) == 4
    # WHEN the same images are delivered again with a new title
    again = [PointRecord(p.id, p.vector, {**p.payload, "title": "new title"}) for p in points]
    store.upsert(coll, again)
    # THEN nothing is duplicated and the payload is the new one
    assert store.count(coll) == 4
    hits = store.search(coll, points[0].vector, limit=10)
    assert {h.payload["title"] for h in hits} == {"new title"}


def test_delete_product_removes_exactly_that_product(store, coll, rng):
    # GIVEN three products with four points each
    for pid in ("a", "b", "c"):
        store.upsert(coll, product_points(rng, pid))
    # WHEN product b is deleted
    store.delete_product(coll, "b")
    # THEN its points are gone and the others are intact
    assert store.count(coll) == 8
    assert all_product_ids(store, coll, unit(rng)) == {"a", "c"}
    assert store.product_image_ids(coll, "b") == set()


def test_delete_points_by_id(store, coll, rng):
    # GIVEN a product with four points
    points = product_points(rng, "a")
    store.upsert(coll, points)
    # WHEN two of them are deleted by id (plus an id that does not exist)
    store.delete_points(coll, [points[0].id, points[3].id, point_id("zz", "zz", 0)])
    # THEN exactly the other two remain
    assert {h.id for h in store.search(coll, unit(rng), limit=10)} == {points[1].id, points[2].id}


def test_delete_product_images_removes_only_those_images(store, coll, rng):
    # GIVEN product a with images img0..img2 and product b that shares the image id img0
    store.upsert(coll, product_points(rng, "a", images=("img0", "img1", "img2")))
    store.upsert(coll, product_points(rng, "b", images=("img0",)))
    # WHEN a's images img0 and img2 are deleted
    store.delete_product_images(coll, "a", {"img0", "img2"})
    # THEN a keeps img1 only, and b's img0 is untouched
    assert store.product_image_ids(coll, "a") == {"img1"}
    assert store.product_image_ids(coll, "b") == {"img0"}
    assert store.count(coll) == 4


def test_set_product_payload_updates_every_point_and_keeps_vectors(store, coll, rng):
    # GIVEN two products
    store.upsert(coll, product_points(rng, "a"))
    store.upsert(coll, product_points(rng, "b"))
    before = store.product_vectors(coll, ["a"])["a"]
    # WHEN a's title and offers change
    new_offers = [Offer(shop="shopZ", price=5.0).model_dump()]
    store.set_product_payload(coll, "a", {"title": "renamed", "offers": new_offers, "min_price": 5.0})
    # THEN every point of a carries them, its other fields stay, vectors are unchanged, b is untouched
    hits = store.search(coll, unit(rng), limit=100)
    a_hits = [h for h in hits if h.payload["product_id"] == "a"]
    assert len(a_hits) == 4
    for h in a_hits:
        assert h.payload["title"] == "renamed"
        assert h.payload["offers"] == new_offers
        assert h.payload["min_price"] == 5.0
        assert h.payload["image_id"] in {"img0", "img1"}  # merged, not replaced
    assert {h.payload["title"] for h in hits if h.payload["product_id"] == "b"} == {"title of b"}
    after = store.product_vectors(coll, ["a"])["a"]
    assert sorted(map(tuple, np.round(before, 5))) == sorted(map(tuple, np.round(after, 5)))


# --------------------------------------------------------------------------- product reads


def test_product_image_ids(store, coll, rng):
    # GIVEN a product with several objects per image, and another product
    store.upsert(coll, product_points(rng, "a", images=("x", "y", "z"), objects=3))
    store.upsert(coll, product_points(rng, "b", images=("w",)))
    # WHEN/THEN its image ids are listed once each; unknown products have none
    assert store.product_image_ids(coll, "a") == {"x", "y", "z"}
    assert store.product_image_ids(coll, "nope") == set()


def test_product_payloads(store, coll, rng):
    # GIVEN a product with two images of two objects each
    points = product_points(rng, "a", images=("x", "y"), objects=2)
    store.upsert(coll, points + product_points(rng, "b", images=("w",)))
    # WHEN its payloads are read THEN every point of it comes back, with its id, and nothing else
    got = store.product_payloads(coll, "a")
    assert sorted(p["point_id"] for p in got) == sorted(p.id for p in points)
    assert {p["product_id"] for p in got} == {"a"} and {p["image_id"] for p in got} == {"x", "y"}
    assert store.product_payloads(coll, "nope") == []


def test_search_hits_leave_the_thumbnail_to_the_product_reads(store, coll, rng):
    # GIVEN a point whose payload holds a thumbnail, as embed stores it
    p = point(unit(rng), "a")
    p.payload["thumbnail"] = "data" * 2000
    store.upsert(coll, [p])
    # WHEN it is found by a search THEN the hit has every other field but not the thumbnail,
    # which the result card fetches through the product reads (the gateway's image route)
    (hit,) = store.search(coll, p.vector, limit=5)
    assert "thumbnail" not in hit.payload
    assert hit.payload == {k: v for k, v in p.payload.items() if k != "thumbnail"}
    (stored,) = store.product_payloads(coll, "a")
    assert stored["thumbnail"] == p.payload["thumbnail"]


def test_product_image_ids_pages_through_many_points(store, coll, rng):
    # GIVEN a product with more points than one scroll page
    store.upsert(coll, product_points(rng, "big", images=[f"i{k}" for k in range(150)], objects=3))
    # WHEN/THEN every image id is found
    assert len(store.product_image_ids(coll, "big")) == 150


def test_product_vectors(store, coll, rng):
    # GIVEN products a (4 points) and b (2 points)
    a = product_points(rng, "a")
    b = product_points(rng, "b", images=("img0",))
    store.upsert(coll, a + b)
    # WHEN their vectors are fetched (plus a product that does not exist)
    got = store.product_vectors(coll, ["a", "b", "missing"])
    # THEN each product maps to its stored vectors, missing products are absent
    assert set(got) == {"a", "b"}
    assert len(got["a"]) == 4 and len(got["b"]) == 2
    assert all(v.dtype == np.float32 and v.shape == (DIM,) for v in got["a"])
    expected = {tuple(np.round(np.asarray(p.vector), 4)) for p in a}
    assert {tuple(np.round(v, 4)) for v in got["a"]} == expected
    assert store.product_vectors(coll, []) == {}


# --------------------------------------------------------------------------- filters

# name -> (filters, fields of matching points, fields of decoys (cycled))
FILTER_CASES = {
    "category": (
        SearchFilters(categories=["shoes", "boots"]),
        [dict(category="boots")],
        [dict(category="bags"), dict(category="hats")],
    ),
    "shop": (
        SearchFilters(shops=["zalando"]),
        [dict(offers=[("amazon", 40.0, True), ("zalando", 50.0, True)])],
        [dict(offers=[("amazon", 40.0, True)]), dict(offers=[])],
    ),
    "price range": (
        SearchFilters(price_min=20, price_max=30),
        [dict(offers=[("a", 20.0, True)]), dict(offers=[("a", 25.0, True), ("b", 99.0, True)])],
        [dict(offers=[("a", 5.0, True)]), dict(offers=[("a", 99.0, True)]), dict(offers=[])],
    ),
    "price min only": (
        SearchFilters(price_min=50),
        [dict(offers=[("a", 60.0, True)])],
        [dict(offers=[("a", 49.99, True)]), dict(offers=[])],
    ),
    "in stock": (
        SearchFilters(in_stock=True),
        [dict(offers=[("a", 10.0, False), ("b", 12.0, True)])],
        [dict(offers=[("a", 10.0, False)]), dict(offers=[])],
    ),
    "out of stock": (
        SearchFilters(in_stock=False),
        [dict(offers=[("a", 10.0, False)])],
        [dict(offers=[("a", 10.0, True)])],
    ),
    "category and price together": (
        SearchFilters(categories=["shoes"], price_max=30),
        [dict(category="shoes", offers=[("a", 25.0, True)])],
        [dict(category="shoes", offers=[("a", 35.0, True)]), dict(category="bags", offers=[("a", 25.0, True)])],
    ),
}


@pytest.mark.parametrize("case", FILTER_CASES, ids=list(FILTER_CASES))
def test_filter_applies_inside_the_search(store, coll, rng, case):
    filters, match_fields, decoy_fields = FILTER_CASES[case]
    q = unit(rng)
    # GIVEN 197 decoys right next to the query that fail the filter ...
    decoys = [point(near(q, rng), f"decoy{i}", **decoy_fields[i % len(decoy_fields)]) for i in range(197)]
    # ... and 3 matching points far from it
    matches = [point(unit(rng), f"match{i}", **match_fields[i % len(match_fields)]) for i in range(3)]
    store.upsert(coll, decoys + matches)
    unfiltered = store.search(coll, q, limit=3)
    assert all(h.payload["product_id"].startswith("decoy") for h in unfiltered)
    # WHEN searching with the filter and limit=3
    hits = store.search(coll, q, limit=3, filters=filters)
    # THEN all three matching points come back (a post-filtered top-3 would be empty)
    assert {h.id for h in hits} == {p.id for p in matches}


def test_exclude_product_ids_applies_inside_the_search(store, coll, rng):
    q = unit(rng)
    # GIVEN 5 products with 39 images each right next to the query, and 3 products far away
    close = [point(near(q, rng), f"seen{i % 5}", f"img{i}") for i in range(195)]
    far = [point(unit(rng), f"other{i}") for i in range(3)]
    store.upsert(coll, close + far)
    # WHEN the shopper's viewed products are excluded
    hits = store.search(coll, q, limit=3, exclude_product_ids=[f"seen{i}" for i in range(5)])
    # THEN the far products fill the results
    assert {h.payload["product_id"] for h in hits} == {"other0", "other1", "other2"}


def test_empty_filter_lists_do_not_filter(store, coll, rng):
    # GIVEN two points
    store.upsert(coll, [point(unit(rng), "a"), point(unit(rng), "b", category="bags")])
    # WHEN searching with empty lists and no exclusions
    no_filters = SearchFilters(categories=[], shops=[])
    hits = store.search(coll, unit(rng), limit=10, filters=no_filters, exclude_product_ids=[])
    # THEN both come back
    assert len(hits) == 2


# --------------------------------------------------------------------------- collections


def test_ensure_collection_is_idempotent_and_keeps_data(store, coll, rng):
    # GIVEN a collection with points
    store.upsert(coll, product_points(rng, "a"))
    # WHEN it is ensured again with the same spec
    store.ensure_collection(CollectionSpec(COLL, DIM))
    # THEN nothing changed
    assert store.count(coll) == 4
    assert store.collections().count(COLL) == 1


def test_ensure_collection_rejects_another_dim_or_distance(store, coll):
    # WHEN the same name is ensured with another dim or distance
    # THEN ValueError names both
    with pytest.raises(ValueError, match=r"dim=64.*dim=32"):
        store.ensure_collection(CollectionSpec(COLL, 32))
    with pytest.raises(ValueError, match=r"cosine.*euclid"):
        store.ensure_collection(CollectionSpec(COLL, DIM, "euclid"))


def test_collections_and_count(store, rng):
    # GIVEN an empty store
    assert store.collections() == []
    # WHEN two collections are created and one gets points
    store.ensure_collection(CollectionSpec("lookalike__b", DIM))
    store.ensure_collection(CollectionSpec("lookalike__a", 8))
    store.upsert("lookalike__b", product_points(rng, "p", images=("i0", "i1", "i2"), objects=1))
    # THEN both are listed, sorted, with their counts
    assert store.collections() == ["lookalike__a", "lookalike__b"]
    assert store.count("lookalike__b") == 3
    assert store.count("lookalike__a") == 0


def test_drop_collection_removes_it_and_its_points_and_is_safe_to_redo(store, rng):
    # GIVEN two collections with points
    store.ensure_collection(CollectionSpec("lookalike__a", DIM))
    store.ensure_collection(CollectionSpec("lookalike__b", DIM))
    for name in ("lookalike__a", "lookalike__b"):
        store.upsert(name, product_points(rng, "p", images=("i0", "i1"), objects=1))
    # WHEN one is dropped, twice (a redone command)
    store.drop_collection("lookalike__b")
    store.drop_collection("lookalike__b")
    # THEN it is gone, the other untouched, and a new one of that name starts empty
    assert store.collections() == ["lookalike__a"] and store.count("lookalike__a") == 2
    with pytest.raises(KeyError):
        store.count("lookalike__b")
    store.ensure_collection(CollectionSpec("lookalike__b", 8))
    assert store.count("lookalike__b") == 0


def test_documents_are_kept_beside_the_collections(store):
    # GIVEN no document WHEN one is written and replaced THEN the last one is read back
    assert store.read_doc("index_state") is None
    store.write_doc("index_state", {"active": {"id": "a", "spec": "a"}, "building": None})
    store.write_doc("index_state", {"active": {"id": "b", "spec": "/m/b"}, "building": None})
    assert store.read_doc("index_state") == {"active": {"id": "b", "spec": "/m/b"}, "building": None}
    # AND documents are not collections
    assert store.collections() == []


def test_unknown_collection_raises_key_error(store, rng):
    with pytest.raises(KeyError):
        store.search("lookalike__nope", unit(rng), limit=3)
    with pytest.raises(KeyError):
        store.count("lookalike__nope")


def test_wrong_vector_dim_raises_value_error(store, coll, rng):
    with pytest.raises(ValueError):
        store.upsert(coll, [point(unit(rng, DIM + 1), "a")])
    with pytest.raises(ValueError):
        store.search(coll, unit(rng, DIM - 1), limit=3)


def test_backend_names(store):
    assert store.backend in {"qdrant-edge", "qdrant-client"}
    assert store.backend == ("qdrant-edge" if isinstance(store, EdgeStore) else "qdrant-client")


# --------------------------------------------------------------------------- open_store / errors


def test_open_store_picks_the_backend(tmp_path):
    edge = open_store(None, tmp_path)
    client = open_store(":memory:", tmp_path)
    try:
        assert isinstance(edge, EdgeStore) and edge.root == tmp_path / "qdrant-edge"
        assert isinstance(client, QdrantClientStore)
    finally:
        edge.close()
        client.close()


def test_unreachable_server_raises_store_unavailable():
    # GIVEN a loopback port nobody listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = QdrantClientStore(f"http://127.0.0.1:{port}", timeout=2)
    # WHEN/THEN calls fail as StoreUnavailable (retry later), cause chained
    with pytest.raises(StoreUnavailable) as err:
        store.count(COLL)
    assert err.value.__cause__ is not None
    with pytest.raises(StoreUnavailable):
        store.ensure_collection(CollectionSpec(COLL, DIM))
    store.close()


# --------------------------------------------------------------------------- edge only


def test_edge_data_survives_close_and_reopen(tmp_path, rng):
    # GIVEN an edge store with points and an updated payload, closed
    first = EdgeStore(tmp_path)
    first.ensure_collection(CollectionSpec(COLL, DIM))
    points = product_points(rng, "a") + product_points(rng, "b")
    first.upsert(COLL, points)
    first.set_product_payload(COLL, "a", {"title": "kept"})
    first.close()
    # WHEN a new store opens the same directory
    second = EdgeStore(tmp_path)
    try:
        # THEN the collection, points and payload are there, even before ensure_collection
        assert second.collections() == [COLL]
        assert second.count(COLL) == 8
        hit = second.search(COLL, points[0].vector, limit=1)[0]
        assert hit.id == points[0].id and hit.payload["title"] == "kept"
        # AND ensure_collection verifies the persisted spec
        second.ensure_collection(CollectionSpec(COLL, DIM))
        with pytest.raises(ValueError, match="dim=64"):
            second.ensure_collection(CollectionSpec(COLL, 128))
    finally:
        second.close()


def test_edge_optimize_then_search(tmp_path, rng):
    # GIVEN an edge store whose indexing threshold is low enough for 2000 x 64-d to get HNSW
    store = EdgeStore(tmp_path, index_after_points=100, background_index=False)
    store.ensure_collection(CollectionSpec(COLL, DIM))
    points = [point(unit(rng), f"p{i}") for i in range(2000)]
    store.upsert(COLL, points)
    try:
        # WHEN optimize() runs
        store.optimize(COLL)
        # THEN the vectors are indexed (internal check) and search still finds the nearest
        assert store._shard(COLL).shard.info().indexed_vectors_count == 2000
        for target in points[:20]:
            assert store.search(COLL, near(np.asarray(target.vector), rng, 0.01), limit=1)[0].id == target.id
        hits = store.search(COLL, unit(rng), limit=5, filters=SearchFilters(categories=["shoes"]))
        assert len(hits) == 5
    finally:
        store.close()


def test_edge_second_store_on_same_directory_is_unavailable(tmp_path):
    # GIVEN one store holding a collection open
    first = EdgeStore(tmp_path)
    first.ensure_collection(CollectionSpec(COLL, DIM))
    second = EdgeStore(tmp_path)
    try:
        # WHEN/THEN a second opener gets StoreUnavailable (the shard's WAL is locked)
        with pytest.raises(StoreUnavailable):
            second.count(COLL)
    finally:
        second.close()
        first.close()


def test_edge_one_writer_two_readers(tmp_path, rng):
    # GIVEN one edge store shared by a writer thread and two reader threads
    store = EdgeStore(tmp_path)
    store.ensure_collection(CollectionSpec(COLL, DIM))
    batches = [[point(unit(rng), f"p{b}", f"img{k}") for k in range(10)] for b in range(20)]
    queries = [unit(rng) for _ in range(50)]
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for batch in batches:
                store.upsert(COLL, batch)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    def read() -> None:
        try:
            while not done.is_set():
                for q in queries:
                    store.search(COLL, q, limit=5, filters=SearchFilters(in_stock=True))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    # WHEN they all run at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # THEN nothing failed and every write landed
    assert errors == []
    assert store.count(COLL) == 200
    store.close()


# =========================================================================== congruence tier
#
# Modelled on qdrant-client's tests/congruence_tests (``compare_client_results``): one
# seeded catalogue is loaded into every backend, each operation runs on all of them,
# and every result must agree with the reference backend's. The reference is
# qdrant-client's ":memory:" mode (plain numpy; qdrant-client's own congruence tests
# hold it to the server); each peer (Qdrant Edge, a Qdrant server) is compared with it,
# so Edge and the server agree with each other to within twice the tolerances.

SCORE_TOL = 1e-4  # scores agree within this (relative above 1: euclid distances reach ~20)
TIE_TOL = 1e-5  # hits whose scores are this close may come back in either order
VECTOR_TOL = 1e-5
CG_DIM = 64
NO_DOCKER = (
    "no Docker engine: the Qdrant server backend is compared only where testcontainers can start it "
    "(or where QDRANT_URL points at a running server)"
)

CATEGORIES = ("shoes", "boots", "bags", "hats", "dresses")
BRANDS = ("acme", "northwind", "globex", "initech")
SHOPS = ("zalando", "amazon", "otto", "aboutyou")
# The filter bounds used below (19.99, 20.0, 50.0) are prices too, so inclusive ends are exercised.
PRICES = (9.99, 19.99, 20.0, 25.5, 30.0, 49.99, 50.0, 89.0, 120.0)
N_PRODUCTS = 48
# borrower -> donor: the borrower's catalogue reuses the donor's first photo, so both hold
# points with the same image_id (a hash of the bytes) and identical vectors: exact score ties.
SHARED_PHOTOS = {5: 4, 17: 16, 29: 28, 41: 40}


def pid_of(i: int) -> str:
    return f"sku-{i:04d}"


@dataclass
class Catalogue:
    """Points as the embed function writes them, plus the products and queries used below."""

    products: dict[str, ProductInfo]
    points: list[PointRecord]
    centers: dict[str, np.ndarray]
    queries: dict[str, np.ndarray]

    def points_of(self, product_id: str, image_ids: set[str] | None = None) -> list[PointRecord]:
        return [p for p in self.points if p.payload["product_id"] == product_id
                and (image_ids is None or p.payload["image_id"] in image_ids)]

    def image_ids(self, product_id: str) -> list[str]:
        """The product's image ids in catalogue order."""
        return list(dict.fromkeys(p.payload["image_id"] for p in self.points_of(product_id)))


def make_catalogue(seed: int = 20240611) -> Catalogue:
    """~300 points of 48 products, 1-4 photos each, 1-3 detected objects per photo.

    Payloads are ``ProductInfo.payload()`` plus the per-object fields of
    functions/embed/handler.py ``_points``. Vectors are not unit length (the cosine
    adapters must normalise alike); some products have no offers (min_price None).
    """
    rng = np.random.default_rng(seed)
    products: dict[str, ProductInfo] = {}
    points: list[PointRecord] = []
    centers: dict[str, np.ndarray] = {}
    photos: dict[int, list[tuple[str, list[np.ndarray]]]] = {}
    for i in range(N_PRODUCTS):
        pid = pid_of(i)
        shops = rng.choice(SHOPS, size=int(rng.choice([0, 1, 2, 3], p=[0.1, 0.4, 0.3, 0.2])), replace=False)
        offers = [Offer(shop=str(shop), price=float(rng.choice(PRICES)), in_stock=bool(rng.random() < 0.7),
                        url=f"https://{shop}.example/p/{pid}") for shop in shops]
        category, brand = CATEGORIES[i % len(CATEGORIES)], BRANDS[int(rng.integers(len(BRANDS)))]
        products[pid] = info = ProductInfo(product_id=pid, title=f"{brand} {category} no. {i}",
                                           category=category, brand=brand, offers=offers)
        centers[pid] = center = rng.normal(size=CG_DIM) * rng.uniform(0.5, 2.0)
        images = []
        for k in range(3 if i in SHARED_PHOTOS.values() else int(rng.integers(1, 5))):
            image = center + 0.35 * rng.normal(size=CG_DIM)
            objects = [image + 0.15 * rng.normal(size=CG_DIM) for _ in range(int(rng.integers(1, 4)))]
            images.append((hashlib.sha256(f"{pid}/photo{k}".encode()).hexdigest()[:32], objects))
        if i in SHARED_PHOTOS:
            images.append(photos[SHARED_PHOTOS[i]][0])
        photos[i] = images
        for image_index, (iid, objects) in enumerate(images):
            for k, vector in enumerate(objects):
                x, y = (float(round(v, 1)) for v in rng.uniform(0, 300, size=2))
                payload = {
                    **info.payload(),
                    "image_id": iid,
                    "image_index": image_index,
                    "image_url": f"https://cdn.example/{iid}.jpg" if image_index % 2 == 0 else None,
                    "thumbnail": hashlib.sha256(iid.encode()).hexdigest() * 2,  # stands in for base64 JPEG
                    "object_index": k,
                    "box": [x, y, x + 120.5, y + 80.0],
                    "label": "image" if len(objects) == 1 else ("shoe", "bag", "hat")[k],
                    "det_score": 1.0 if len(objects) == 1 else float(round(rng.uniform(0.3, 1.0), 4)),
                    "model": "efficientnet_lite0",
                }
                points.append(PointRecord(point_id(pid, iid, k), vector.astype(np.float32), payload))
    donor_photo = photos[4][0][1][0]
    queries = {
        "a stored photo shared by two products": donor_photo,  # ties at the top
        "near a product": centers[pid_of(10)] + 0.1 * rng.normal(size=CG_DIM),
        "random": rng.normal(size=CG_DIM),
        "random, long": 7.5 * rng.normal(size=CG_DIM),
        "a stored point": np.asarray(points[123].vector, dtype=np.float64) + 1e-3,
    }
    return Catalogue(products, points, centers, {k: v.astype(np.float32) for k, v in queries.items()})


DATA = make_catalogue()
ALL_PIDS = list(DATA.products)
SHARED_IID = DATA.image_ids(pid_of(4))[0]


# --------------------------------------------------------------------------- comparing results


def canonical(value: Any) -> str:
    """JSON with sorted keys: tells True from 1 and 1 from 1.0, unlike ``==``."""
    return json.dumps(value, sort_keys=True)


def payload_diff(ref: dict, got: dict) -> dict:
    """``{key: (reference value, other value)}`` for the keys whose values differ."""
    missing = "<absent>"
    return {k: (ref.get(k, missing), got.get(k, missing))
            for k in sorted(set(ref) | set(got)) if canonical(ref.get(k, missing)) != canonical(got.get(k, missing))}


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def tie_groups(scores: list[float]) -> list[tuple[int, int]]:
    """``[start, end)`` runs of consecutive hits whose scores tie within TIE_TOL."""
    groups, start = [], 0
    for i in range(1, len(scores) + 1):
        if i == len(scores) or not close(scores[i - 1], scores[i], TIE_TOL):
            groups.append((start, i))
            start = i
    return groups


def assert_hits_agree(ref: list[Hit], got: list[Hit], limit: int | None, label: str) -> None:
    """Same ids in the same order (swaps only among tied hits), scores, payloads, vectors."""
    assert len(got) == len(ref), f"{label}: {len(got)} hits, reference {len(ref)}"
    assert len({h.id for h in got}) == len(got), f"{label}: duplicate ids in {[h.id for h in got]}"
    for i, (r, g) in enumerate(zip(ref, got)):
        assert close(r.score, g.score, SCORE_TOL), f"{label}: hit {i} score {g.score}, reference {r.score}"
    truncated = limit is not None and len(ref) == limit
    for start, end in tie_groups([h.score for h in ref]):
        ref_ids, got_ids = {h.id for h in ref[start:end]}, {h.id for h in got[start:end]}
        if truncated and end == len(ref):
            # The tie with the last hit may be cut elsewhere: a hit the reference left out must tie too.
            for g in got[start:end]:
                assert g.id in ref_ids or close(g.score, ref[-1].score, 2 * TIE_TOL), (
                    f"{label}: hit {g.id} ({g.score}) not in the reference's last tie {sorted(ref_ids)}")
        else:
            assert got_ids == ref_ids, (
                f"{label}: hits {start}..{end - 1}: ids {[h.id for h in got[start:end]]}, "
                f"reference {[h.id for h in ref[start:end]]} (scores {[h.score for h in ref[start:end]]})")
    by_id = {h.id: h for h in ref}
    for g in got:
        r = by_id.get(g.id)
        if r is None:
            continue  # a tied hit beyond the reference's cut (checked above)
        assert canonical(g.payload) == canonical(r.payload), (
            f"{label}: payload of {g.id}: {payload_diff(r.payload, g.payload)}")
        if r.vector is None:
            assert g.vector is None, f"{label}: {g.id} came with a vector, the reference's without"
        else:
            assert g.vector is not None and g.vector.dtype == np.float32 and g.vector.shape == r.vector.shape
            err = float(np.max(np.abs(g.vector - r.vector)))
            assert err <= VECTOR_TOL, f"{label}: vector of {g.id} differs by {err}"


def assert_vectors_agree(ref: dict, got: dict, label: str) -> None:
    """``product_vectors`` results: same products, same vectors (in any order) within VECTOR_TOL."""
    assert sorted(got) == sorted(ref), f"{label}: products {sorted(got)}, reference {sorted(ref)}"
    for pid, ref_vectors in ref.items():
        assert len(got[pid]) == len(ref_vectors), (
            f"{label}: {pid} has {len(got[pid])} vectors, reference {len(ref_vectors)}")
        remaining = list(ref_vectors)
        for v in got[pid]:
            assert v.dtype == np.float32 and v.shape == (CG_DIM,), f"{label}: {pid} vector {v.dtype} {v.shape}"
            errors = [float(np.max(np.abs(v - r))) for r in remaining]
            j = int(np.argmin(errors))
            assert errors[j] <= VECTOR_TOL, f"{label}: a vector of {pid} is {errors[j]} from every reference vector"
            remaining.pop(j)


def assert_agree(ref: Any, got: Any, limit: int | None, label: str) -> None:
    if any(isinstance(r, list) and r and isinstance(r[0], Hit) for r in (ref, got)):
        assert_hits_agree(ref, got, limit, label)
    elif isinstance(ref, dict):  # product_vectors
        assert_vectors_agree(ref, got, label)
    elif isinstance(ref, list) and ref and isinstance(ref[0], dict):  # product_payloads: any order
        assert isinstance(got, list), f"{label}: {got!r}"
        ref_sorted, got_sorted = (sorted(r, key=lambda p: p["point_id"]) for r in (ref, got))
        assert [p["point_id"] for p in got_sorted] == [p["point_id"] for p in ref_sorted], f"{label}: point ids differ"
        for r, g in zip(ref_sorted, got_sorted):
            assert canonical(g) == canonical(r), f"{label}: payload of {r['point_id']}: {payload_diff(r, g)}"
    else:  # counts, collection names, image id sets
        assert type(got) is type(ref) and got == ref, f"{label}: {got!r}, reference {ref!r}"


def test_compare_tolerates_ties_and_rejects_disagreements():
    """The comparison itself: tied swaps and float noise pass; other differences fail."""

    def hits(*spec: tuple[str, float, dict]) -> list[Hit]:
        return [Hit(id=i, score=s, payload=p) for i, s, p in spec]

    # GIVEN a reference ranking where b and c tie (5e-6 apart)
    ref = hits(("a", 0.9, {"n": 1}), ("b", 0.8, {}), ("c", 0.8 - 5e-6, {}), ("d", 0.5, {}))
    # WHEN/THEN a swapped tie and scores 5e-5 off agree, also when the tie is cut by the limit
    assert_hits_agree(ref, hits(("a", 0.90005, {"n": 1}), ("c", 0.8, {}), ("b", 0.8, {}), ("d", 0.5, {})), None, "")
    assert_hits_agree(ref[:2], hits(("a", 0.9, {"n": 1}), ("c", 0.8 - 5e-6, {})), 2, "")
    # AND every real difference fails
    disagreements = {
        "swap of untied hits": hits(("b", 0.9, {}), ("a", 0.8, {"n": 1}), ("c", 0.8, {}), ("d", 0.5, {})),
        "score off by 2e-4": hits(("a", 0.9002, {"n": 1}), ("b", 0.8, {}), ("c", 0.8, {}), ("d", 0.5, {})),
        "True for 1": hits(("a", 0.9, {"n": True}), ("b", 0.8, {}), ("c", 0.8, {}), ("d", 0.5, {})),
        "1.0 for 1": hits(("a", 0.9, {"n": 1.0}), ("b", 0.8, {}), ("c", 0.8, {}), ("d", 0.5, {})),
        "a hit missing": hits(("a", 0.9, {"n": 1}), ("b", 0.8, {}), ("c", 0.8, {})),
        "another last hit": hits(("a", 0.9, {"n": 1}), ("b", 0.8, {}), ("c", 0.8, {}), ("e", 0.5, {})),
    }
    for name, got in disagreements.items():
        with pytest.raises(AssertionError):
            assert_hits_agree(ref, got, None, name)
    with pytest.raises(AssertionError):  # cut by the limit, but not a tie of the last hit
        assert_hits_agree(ref[:2], hits(("a", 0.9, {"n": 1}), ("d", 0.8 - 5e-5, {})), 2, "")
    v = np.ones(CG_DIM, np.float32)
    assert_agree({"p": [v, 2 * v]}, {"p": [2 * v, v + 5e-6]}, None, "")  # any order, within 1e-5
    for ref_value, got in [({"p": [v]}, {"p": [v + 1e-4]}), ({"p": [v]}, {}), ({1, 2}, {1}), (3, 4),
                           ([{"point_id": "x", "k": 1}], [{"point_id": "x", "k": "1"}])]:
        with pytest.raises(AssertionError):
            assert_agree(ref_value, got, None, "")


# Queries whose whole rankings are compared after each write (three of the five keep it quick).
STATE_QUERIES = ("a stored photo shared by two products", "near a product", "random, long")


@dataclass
class Backend:
    name: str
    store: VectorStore


@dataclass
class Congruence:
    """The same catalogue in every backend; ``compare`` runs one operation on all of them."""

    backends: list[Backend]  # [0] is the reference
    prefix: str  # every collection made here starts with it (a shared QDRANT_URL server has others)
    created: list[str] = field(default_factory=list)
    cosine: str = ""
    euclid: str = ""

    def new_collection(self, distance: str = "cosine") -> str:
        """A new collection holding the whole catalogue, in every backend."""
        name = f"{self.prefix}_{len(self.created)}_{distance}"
        self.created.append(name)
        for b in self.backends:
            b.store.ensure_collection(CollectionSpec(name, CG_DIM, distance))
            b.store.upsert(name, DATA.points)
        return name

    def apply(self, op: Callable[[VectorStore], Any]) -> None:
        """Run a write on every backend."""
        for b in self.backends:
            op(b.store)

    def compare(self, op: Callable[[VectorStore], Any], *, limit: int | None = None) -> Any:
        """Run ``op`` on every backend, assert each result agrees with the reference's, return that."""
        reference = self.backends[0]
        ref = op(reference.store)
        for b in self.backends[1:]:
            assert_agree(ref, op(b.store), limit, f"{b.name} vs {reference.name}")
        return ref

    def search(self, coll: str, vector: Any, limit: int, **kwargs: Any) -> list[Hit]:
        return self.compare(lambda s: s.search(coll, vector, limit, **kwargs), limit=limit)

    def assert_same_state(self, coll: str, products: tuple[str, ...] = ()) -> int:
        """Everything a reader sees of ``coll`` agrees; returns the count.

        Whole rankings (limit > count) carry every point's payload; the product reads
        run for ``products``, an unknown product and (vectors) every product.
        """
        count = self.compare(lambda s: s.count(coll))
        self.compare(lambda s: [c for c in s.collections() if c.startswith(self.prefix)])
        for name in STATE_QUERIES:
            self.search(coll, DATA.queries[name], 1000)
        self.search(coll, DATA.queries["near a product"], 8, with_vectors=True)
        for filters in (SearchFilters(in_stock=True), SearchFilters(in_stock=False),
                        SearchFilters(price_min=20, price_max=50), SearchFilters(categories=["boots", "bags"])):
            self.search(coll, DATA.queries["near a product"], 25, filters=filters)
        for pid in (*products, "sku-unknown"):
            self.compare(lambda s: s.product_image_ids(coll, pid))
            self.compare(lambda s: s.product_payloads(coll, pid))
        self.compare(lambda s: s.product_vectors(coll, [*ALL_PIDS, "sku-unknown"]))
        return count


# --------------------------------------------------------------------------- backends


@pytest.fixture(scope="module")
def qdrant_server() -> Iterator[tuple[str, str]]:
    """``(url, where from)`` of a Qdrant server: QDRANT_URL, else testcontainers, else skip."""
    if os.environ.get("QDRANT_URL"):
        yield os.environ["QDRANT_URL"], "QDRANT_URL"
        return
    if not docker_available():
        pytest.skip(NO_DOCKER)
    try:
        from testcontainers.community.qdrant import QdrantContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.qdrant import QdrantContainer
    with QdrantContainer() as qdrant:
        yield f"http://{qdrant.get_container_host_ip()}:{qdrant.get_exposed_port(6333)}", "testcontainers"


@pytest.fixture(scope="module", params=["qdrant-edge", "qdrant-server"])
def congruence(request, tmp_path_factory) -> Iterator[Congruence]:
    """The catalogue in the reference (":memory:") and in one peer, as cosine and euclid collections."""
    url = None
    reference = Backend("qdrant-client :memory:", QdrantClientStore(":memory:"))
    if request.param == "qdrant-edge":
        peer = Backend("qdrant-edge", EdgeStore(tmp_path_factory.mktemp("congruence-edge")))
    else:
        url, where = request.getfixturevalue("qdrant_server")
        peer = Backend(f"qdrant server ({where})", QdrantClientStore(url, api_key=os.environ.get("QDRANT_API_KEY")))
    cg = Congruence([reference, peer], prefix=f"congruence_{uuid.uuid4().hex[:8]}")
    try:
        cg.cosine, cg.euclid = cg.new_collection("cosine"), cg.new_collection("euclid")
        yield cg
    finally:
        if url not in (None, ":memory:"):  # leave a shared server as we found it
            from qdrant_client import QdrantClient

            admin = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"), check_compatibility=False)
            for name in cg.created:
                admin.delete_collection(name)
            admin.close()
        for b in cg.backends:
            b.store.close()


DISTANCES = ("cosine", "euclid")


def collection_of(cg: Congruence, distance: str) -> str:
    return cg.cosine if distance == "cosine" else cg.euclid


# --------------------------------------------------------------------------- congruence: reads


@pytest.mark.parametrize("limit", [1, 3, 10, 50, 1000])
@pytest.mark.parametrize("distance", DISTANCES)
def test_congruent_search(congruence, distance, limit):
    """Plain nearest-neighbour search ranks and scores alike at every limit."""
    coll = collection_of(congruence, distance)
    for name, query in DATA.queries.items():
        # WHEN every backend searches the same catalogue with the same query
        hits = congruence.search(coll, query, limit)
        # THEN they agree (compare) and return what was asked for
        assert len(hits) == min(limit, len(DATA.points)), name


@pytest.mark.parametrize("distance", DISTANCES)
def test_congruent_ties_of_a_shared_photo(congruence, distance):
    """A photo two products share gives tied top hits; both backends return the pair first."""
    coll = collection_of(congruence, distance)
    # WHEN searching with the shared photo's vector
    hits = congruence.search(coll, DATA.queries["a stored photo shared by two products"], 2)
    # THEN both copies come first, tied (the tie rule of compare is what lets them swap)
    assert {h.payload["product_id"] for h in hits} == {pid_of(4), pid_of(5)}
    assert close(hits[0].score, hits[1].score, TIE_TOL)


# name -> (filters, exclude_product_ids)
CONGRUENCE_FILTERS: dict[str, tuple[SearchFilters | None, tuple[str, ...]]] = {
    "one category": (SearchFilters(categories=["boots"]), ()),
    "several categories": (SearchFilters(categories=["shoes", "bags"]), ()),
    "unknown category": (SearchFilters(categories=["umbrellas"]), ()),
    "one shop": (SearchFilters(shops=["otto"]), ()),
    "several shops": (SearchFilters(shops=["zalando", "aboutyou"]), ()),
    "price range": (SearchFilters(price_min=20, price_max=50), ()),
    "price min only": (SearchFilters(price_min=49.99), ()),
    "price max only": (SearchFilters(price_max=20.0), ()),
    "price point": (SearchFilters(price_min=19.99, price_max=19.99), ()),
    "in stock": (SearchFilters(in_stock=True), ()),
    "out of stock": (SearchFilters(in_stock=False), ()),
    "category and shop": (SearchFilters(categories=["shoes", "boots"], shops=["amazon"]), ()),
    "category, price and stock": (SearchFilters(categories=["shoes", "hats"], price_max=60, in_stock=True), ()),
    "shop out of stock": (SearchFilters(shops=["zalando", "otto"], in_stock=False), ()),
    "empty lists": (SearchFilters(categories=[], shops=[]), ()),
    "exclude products": (None, tuple(pid_of(i) for i in (4, 5, 10, 11, 12))),
    "exclude and filter": (SearchFilters(in_stock=True, price_min=25.5), (pid_of(10), pid_of(4))),
}


def expected_match(payload: dict, filters: SearchFilters | None, exclude: tuple[str, ...]) -> bool:
    """What the filters mean, in plain Python (the ground truth for match counts)."""
    if payload["product_id"] in exclude:
        return False
    if filters is None:
        return True
    price = payload["min_price"]
    return not (
        (filters.categories and payload["category"] not in filters.categories)
        or (filters.shops and not set(filters.shops) & set(payload["shops"]))
        or ((filters.price_min is not None or filters.price_max is not None) and price is None)
        or (filters.price_min is not None and price < filters.price_min)
        or (filters.price_max is not None and price > filters.price_max)
        or (filters.in_stock is not None and payload["in_stock"] != filters.in_stock)
    )


def test_catalogue_exercises_every_filter():
    """Sanity of the data set: each filter case keeps some points and drops others (bar two)."""
    # GIVEN the seeded catalogue (266 points of 48 products; prices on the filter bounds)
    for case, (filters, exclude) in CONGRUENCE_FILTERS.items():
        # WHEN a case's meaning is evaluated in plain Python
        n = sum(expected_match(p.payload, filters, exclude) for p in DATA.points)
        # THEN it selects a real subset, so the congruent searches below compare something
        if case == "unknown category":
            assert n == 0
        elif case == "empty lists":
            assert n == len(DATA.points)
        else:
            assert 8 <= n < len(DATA.points) - 8, (case, n)


@pytest.mark.parametrize("case", CONGRUENCE_FILTERS, ids=list(CONGRUENCE_FILTERS))
@pytest.mark.parametrize("distance", DISTANCES)
def test_congruent_filtered_search(congruence, distance, case):
    """Every filter kind (SearchFilters, exclude_product_ids) selects and ranks alike."""
    filters, exclude = CONGRUENCE_FILTERS[case]
    coll = collection_of(congruence, distance)
    expected = {p.id for p in DATA.points if expected_match(p.payload, filters, exclude)}
    # WHEN every backend runs the same filtered search: top-5 for three queries, every match for one
    for name in STATE_QUERIES:
        top = congruence.search(coll, DATA.queries[name], 5, filters=filters, exclude_product_ids=exclude)
        # THEN they agree (compare), and the reference returns matching points only
        assert {h.id for h in top} <= expected and len(top) == min(5, len(expected))
    every = congruence.search(coll, DATA.queries["random"], 1000, filters=filters, exclude_product_ids=exclude)
    # AND the whole filtered ranking agrees and holds exactly the matching points
    assert {h.id for h in every} == expected


@pytest.mark.parametrize("distance", DISTANCES)
def test_congruent_search_with_vectors(congruence, distance):
    """``with_vectors=True`` returns the same stored vectors (cosine: normalised alike)."""
    coll = collection_of(congruence, distance)
    stored = {p.id: np.asarray(p.vector) for p in DATA.points}
    for query in DATA.queries.values():
        # WHEN searching with vectors
        hits = congruence.search(coll, query, 20, with_vectors=True, filters=SearchFilters(in_stock=True))
        # THEN they agree (compare), and are the catalogue's vectors (unit length in cosine)
        for h in hits:
            want = stored[h.id] / np.linalg.norm(stored[h.id]) if distance == "cosine" else stored[h.id]
            assert np.allclose(h.vector, want, atol=VECTOR_TOL)


@pytest.mark.parametrize("distance", DISTANCES)
def test_congruent_product_reads(congruence, distance):
    """``product_payloads``/``product_vectors``/``product_image_ids``/``count``/``collections`` agree."""
    coll = collection_of(congruence, distance)
    # WHEN products are read back from every backend (every payload is also in the whole
    # rankings above; here: every 3rd product, both sides of each shared photo, an unknown one)
    sample = sorted({*ALL_PIDS[::3], *(pid_of(i) for pair in SHARED_PHOTOS.items() for i in pair)})
    for pid in [*sample, "sku-unknown"]:
        ids = congruence.compare(lambda s: s.product_image_ids(coll, pid))
        payloads = congruence.compare(lambda s: s.product_payloads(coll, pid))
        # THEN they agree (compare) and hold the catalogue's points
        assert ids == set(DATA.image_ids(pid))
        assert sorted(p["point_id"] for p in payloads) == sorted(p.id for p in DATA.points_of(pid))
    vectors = congruence.compare(lambda s: s.product_vectors(coll, [*ALL_PIDS, "sku-unknown"]))
    assert sorted(vectors) == sorted(ALL_PIDS)
    assert congruence.compare(lambda s: s.product_vectors(coll, [])) == {}
    assert congruence.compare(lambda s: s.count(coll)) == len(DATA.points)
    names = congruence.compare(lambda s: [c for c in s.collections() if c.startswith(congruence.prefix)])
    assert congruence.cosine in names and congruence.euclid in names and names == sorted(names)


# --------------------------------------------------------------------------- congruence: writes
#
# Each case is a short sequence of writes on disjoint products, applied to a fresh copy
# of the catalogue in every backend (a fresh Qdrant Edge collection costs ~0.3 s, mostly
# its payload indexes, so related writes share one).


@dataclass(frozen=True)
class Writes:
    """Writes applied, in order, to every backend; ``delta``: expected change of the point count."""

    ops: tuple[Callable[[VectorStore, str], None], ...]
    delta: int
    products: tuple[str, ...]  # read back afterwards (product reads)
    effect: Callable[[Congruence, str], None]  # what the writes must show


def _renamed(pid: str) -> dict:
    """A catalogue update: new title, one out-of-stock offer at 35 (inside the 20..50 filter)."""
    return ProductInfo(product_id=pid, title="renamed", category="boots", brand="acme",
                       offers=[Offer(shop="otto", price=35.0, in_stock=False)]).payload()


def _overwritten(pid: str) -> list[PointRecord]:
    """The product's points redelivered under the same ids with new vectors and a new title."""
    rng = np.random.default_rng(99)
    return [PointRecord(p.id, rng.normal(size=CG_DIM).astype(np.float32), {**p.payload, "title": "second delivery"})
            for p in DATA.points_of(pid)]


def _new_point(k: int) -> PointRecord:
    """An object of a product the catalogue did not have."""
    vector = np.eye(CG_DIM, dtype=np.float32)[k] + 0.1
    payload = {**ProductInfo(product_id="sku-new", title="new", category="hats").payload(), "image_id": "n0",
               "image_index": 0, "image_url": None, "thumbnail": None, "object_index": k,
               "box": [0.0, 0.0, 10.0, 10.0], "label": "hat", "det_score": 0.9, "model": "efficientnet_lite0"}
    return PointRecord(point_id("sku-new", "n0", k), vector, payload)


def n_points(pid: str, image_ids: set[str] | None = None) -> int:
    return len(DATA.points_of(pid, image_ids))


RENAMED, NULLED, DELETED = pid_of(7), pid_of(8), pid_of(10)
DONOR, BORROWER = pid_of(4), pid_of(5)  # DONOR's first photo (SHARED_IID) is also BORROWER's
DONOR_DROPPED = {SHARED_IID, DATA.image_ids(DONOR)[1]}
MULTI, EMPTIED, KEPT = pid_of(16), pid_of(20), pid_of(24)
MULTI_KEPT = DATA.image_ids(MULTI)[1]
DELETED_IDS = [DATA.points_of(pid_of(i))[0].id for i in (2, 21, 33)]
OVERWRITTEN, RESENT = pid_of(12), pid_of(3)
NEW_POINTS = [_new_point(k) for k in range(3)]


def _effect_payloads(cg: Congruence, coll: str) -> None:
    assert {p["title"] for p in cg.compare(lambda s: s.product_payloads(coll, RENAMED))} == {"renamed"}
    hits = cg.search(coll, DATA.centers[RENAMED], 50, filters=SearchFilters(price_min=20, price_max=50, in_stock=False))
    assert RENAMED in {h.payload["product_id"] for h in hits}
    # Qdrant merges payloads so that a null value removes the key (the other keys stay).
    nulled = cg.compare(lambda s: s.product_payloads(coll, NULLED))
    assert nulled and all("brand" not in p and p["discontinued"] is True and p["image_id"] for p in nulled)


def _effect_delete_product(cg: Congruence, coll: str) -> None:
    assert cg.compare(lambda s: s.product_payloads(coll, DELETED)) == []
    assert cg.compare(lambda s: s.product_vectors(coll, [DELETED])) == {}


def _effect_delete_images(cg: Congruence, coll: str) -> None:
    assert cg.compare(lambda s: s.product_image_ids(coll, DONOR)) == set(DATA.image_ids(DONOR)) - DONOR_DROPPED
    assert SHARED_IID in cg.compare(lambda s: s.product_image_ids(coll, BORROWER))  # same photo, other product


def _effect_retain(cg: Congruence, coll: str) -> None:
    assert cg.compare(lambda s: s.product_image_ids(coll, MULTI)) == {MULTI_KEPT}
    assert cg.compare(lambda s: s.product_image_ids(coll, EMPTIED)) == set()
    assert cg.compare(lambda s: s.product_image_ids(coll, KEPT)) == set(DATA.image_ids(KEPT))


def _effect_delete_points(cg: Congruence, coll: str) -> None:
    left = {h.id for h in cg.search(coll, DATA.queries["random"], 1000)}
    assert not left & set(DELETED_IDS)


def _effect_upserts(cg: Congruence, coll: str) -> None:
    new = _overwritten(OVERWRITTEN)
    hit = cg.search(coll, new[0].vector, 1, with_vectors=True)[0]
    assert hit.id == new[0].id and hit.payload["title"] == "second delivery"
    assert np.allclose(hit.vector, np.asarray(new[0].vector) / np.linalg.norm(new[0].vector), atol=VECTOR_TOL)
    assert cg.compare(lambda s: s.product_image_ids(coll, "sku-new")) == {"n0"}


WRITES: dict[str, Writes] = {
    "set_product_payload: new fields, a null, a new key": Writes(
        (lambda s, c: s.set_product_payload(c, RENAMED, _renamed(RENAMED)),
         lambda s, c: s.set_product_payload(c, NULLED, {"brand": None, "discontinued": True})),
        0, (RENAMED, NULLED), _effect_payloads),
    "delete_product, and of an unknown product": Writes(
        (lambda s, c: s.delete_product(c, DELETED), lambda s, c: s.delete_product(c, "sku-unknown")),
        -n_points(DELETED), (DELETED,), _effect_delete_product),
    "delete_product_images incl. a shared photo and an unknown image": Writes(
        (lambda s, c: s.delete_product_images(c, DONOR, {*DONOR_DROPPED, "no-such-image"}),),
        -n_points(DONOR, DONOR_DROPPED), (DONOR, BORROWER), _effect_delete_images),
    "retain_product_images: keeps some, none, all and an unknown": Writes(
        (lambda s, c: s.retain_product_images(c, MULTI, [MULTI_KEPT]),
         lambda s, c: s.retain_product_images(c, EMPTIED, []),
         lambda s, c: s.retain_product_images(c, KEPT, [*DATA.image_ids(KEPT), "no-such-image"])),
        -n_points(MULTI) + n_points(MULTI, {MULTI_KEPT}) - n_points(EMPTIED), (MULTI, EMPTIED, KEPT, pid_of(17)),
        _effect_retain),
    "delete_points incl. an unknown id": Writes(
        (lambda s, c: s.delete_points(c, [*DELETED_IDS, point_id("sku-unknown", "x", 0)]),),
        -len(DELETED_IDS), (pid_of(2), pid_of(21), pid_of(33)), _effect_delete_points),
    "upserts: redeliver everything, overwrite one product, old and new ids together": Writes(
        (lambda s, c: s.upsert(c, DATA.points),
         lambda s, c: s.upsert(c, _overwritten(OVERWRITTEN)),
         lambda s, c: s.upsert(c, DATA.points_of(RESENT) + NEW_POINTS)),
        len(NEW_POINTS), (OVERWRITTEN, RESENT, "sku-new"), _effect_upserts),
}


@pytest.mark.parametrize("name", WRITES, ids=list(WRITES))
def test_congruent_after_writes(congruence, name):
    """After the same writes, everything a reader sees agrees (and shows the writes)."""
    writes = WRITES[name]
    # GIVEN a fresh collection holding the catalogue in every backend
    coll = congruence.new_collection("cosine")
    # WHEN the same writes run on each
    for op in writes.ops:
        congruence.apply(lambda s: op(s, coll))
    # THEN counts, rankings, payloads and vectors agree, and the count moved by exactly delta
    assert congruence.assert_same_state(coll, writes.products) == len(DATA.points) + writes.delta
    # AND the writes are visible (asserted on the reference; compare holds the peer to it)
    writes.effect(congruence, coll)


def test_congruent_overwrite_on_euclid(congruence):
    """Redelivering points under the same ids overwrites in a euclid collection too (no duplicates)."""
    # GIVEN a fresh euclid collection
    coll = congruence.new_collection("euclid")
    new = _overwritten(OVERWRITTEN)
    # WHEN one product is redelivered with new vectors
    congruence.apply(lambda s: s.upsert(coll, new))
    # THEN the state agrees, nothing is duplicated, and the new vector is found at distance ~0
    assert congruence.assert_same_state(coll, (OVERWRITTEN,)) == len(DATA.points)
    (hit,) = congruence.search(coll, new[0].vector, 1)
    assert hit.id == new[0].id and hit.score == pytest.approx(0.0, abs=1e-3)
