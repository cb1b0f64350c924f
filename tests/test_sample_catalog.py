"""Sample catalogue generator: files, wire format, determinism, and that it is searchable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lookalike.sample_catalog import SHOPS, generate
from lookalike.shared.messages import CatalogUpsert


@pytest.fixture(scope="module")
def catalog0(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("sample0"), seed=0)


def test_files_and_catalog_lines(catalog0):
    root = catalog0.catalog_path.parent
    lines = catalog0.catalog_path.read_text().splitlines()
    assert len(lines) == len(catalog0.products) == 24
    events = [CatalogUpsert.model_validate_json(line) for line in lines]

    assert [e.product_id for e in events] == [f"sku-{i:04d}" for i in range(1, 25)]
    assert len({e.title for e in events}) == 24  # every product is a distinct design
    for e in events:
        assert e.title and e.category and e.brand
        assert len(e.images) == 4
        for ref in e.images:
            assert ref.path and not ref.path.startswith("/")  # relative to the jsonl's folder
            with Image.open(root / ref.path) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
        shops = {o.shop for o in e.offers}
        assert len(shops) >= 3 and shops <= set(SHOPS)
        assert len({o.price for o in e.offers}) > 1
    offers = [o for e in events for o in e.offers]
    assert any(not o.in_stock for o in offers) and any(o.in_stock for o in offers)
    assert "null" not in catalog0.catalog_path.read_text()  # exclude_none

    assert len(catalog0.queries) == 24
    for path, product_id in catalog0.queries:
        assert path.is_file() and path.parent.name == "queries"
        assert product_id in {e.product_id for e in events}


def test_deterministic_for_a_seed(tmp_path):
    def snapshot(seed, name):
        root = tmp_path / name
        cat = generate(root, n_products=4, photos_per_product=2, seed=seed)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return cat, {str(p.relative_to(root)): p.read_bytes() for p in files}

    a_cat, a = snapshot(5, "a")
    b_cat, b = snapshot(5, "b")
    _, c = snapshot(6, "c")
    assert a == b
    assert a_cat.products == b_cat.products
    assert a["catalog.jsonl"] != c["catalog.jsonl"]
    assert json.loads(a["catalog.jsonl"].splitlines()[0])["event_id"]  # fixed, not random


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((64, 64)), np.float32)


def test_query_photos_are_new_photos(catalog0):
    root = catalog0.catalog_path.parent
    by_id = {p["product_id"]: p for p in catalog0.products}
    for path, product_id in catalog0.queries:
        q = _pixels(path)
        for rel in by_id[product_id]["images"]:
            assert np.abs(q - _pixels(root / rel)).mean() > 8, (path, rel)


@pytest.fixture(scope="module")
def lite0():
    from lookalike.shared.embedders import load_embedder

    return load_embedder("efficientnet_lite0", device="cpu", batch_size=16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_catalogue_photo_is_the_right_product(seed, catalog0, lite0, tmp_path):
    cat = catalog0 if seed == 0 else generate(tmp_path, seed=seed)
    root = cat.catalog_path.parent
    photos, owners = [], []
    for p in cat.products:
        for rel in p["images"]:
            photos.append(Image.open(root / rel))
            owners.append(p["product_id"])
    index = lite0.embed(photos)
    queries = lite0.embed([Image.open(path) for path, _ in cat.queries])

    nearest = (queries @ index.T).argmax(axis=1)
    hits = [owners[j] == product_id for j, (_, product_id) in zip(nearest, cat.queries, strict=True)]
    rate = float(np.mean(hits))
    print(f"seed {seed}: top-1 product hit rate {rate:.3f}")
    assert rate >= 0.9
