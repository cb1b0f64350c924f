"""Both vector stores behave the same: every test here runs against Qdrant Edge
(embedded, files in tmp_path) and qdrant-client's in-process ":memory:" mode.
A few edge-only tests at the end cover persistence, optimize() and threads."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from lookalike.shared.errors import StoreUnavailable
from lookalike.shared.messages import Offer, ProductInfo, SearchFilters, point_id
from lookalike.shared.stores import CollectionSpec, EdgeStore, PointRecord, QdrantClientStore, VectorStore, open_store

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
    store = EdgeStore(tmp_path, indexing_threshold_kb=1)
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
