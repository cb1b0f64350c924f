"""`lookalike finetune`: a few steps on a tiny generated set give a registered, loadable model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lookalike.finetune import FinetuneConfig, _series_holdout, _stratified_holdout, finetune


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from lookalike.sample_catalog import generate

    out = tmp_path_factory.mktemp("ft")
    sample = generate(out / "sample", n_products=4, photos_per_product=3, query_photos_per_product=1)
    train = [(out / "sample" / img, p["product_id"]) for p in sample.products for img in p["images"]]
    val = list(sample.queries)
    # series_distance=0: hold out single photos, so this tiny set always has a hold-out to select on
    cfg = FinetuneConfig(model_id="ft-test", dim=32, views=1, epochs=2, batch_size=16, holdout=0.34, series_distance=0,
                         resize=160, crop=160)
    manifest = finetune(train, out / "model", cfg, val=val)
    return {"dir": out / "model", "manifest": manifest, "train": train, "val": val, "out": out}


def test_holdout_is_stratified_and_keeps_one_per_product():
    labels = ["a"] * 10 + ["b"] * 2 + ["c"]
    held = _stratified_holdout(labels, 0.3, seed=0)
    assert held[:10].sum() == 3 and held[10:12].sum() == 1 and not held[12]


def test_series_are_held_out_whole_and_never_all_of_a_product():
    # GIVEN product a photographed in 3 series of 4 near-identical shots, product b in 2 series of 3
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16))
    series = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3 + [4] * 3
    emb = np.stack([centres[s] + 0.01 * rng.normal(size=16) for s in series])
    labels = ["a"] * 12 + ["b"] * 6
    # WHEN holding out 30 % by series
    held = _series_holdout(emb, labels, 0.3, distance=0.25, seed=0)
    # THEN every series is held out whole or not at all, and each product keeps a series to train on
    for s in set(series):
        members = held[[i for i, x in enumerate(series) if x == s]]
        assert members.all() or not members.any()
    assert held[:12].sum() == 4 and held[12:].sum() == 3


def test_finetune_writes_manifest_and_weights(tiny_model):
    d, m = tiny_model["dir"], tiny_model["manifest"]
    assert (d / "model.pt").is_file()
    on_disk = json.loads((d / "model.json").read_text())
    assert on_disk["id"] == "ft-test" and on_disk["dim"] == 32
    assert {"train_leave_one_out", "holdout", "val"} <= set(m["metrics"])
    assert m["metrics"]["val"]["model"] == "ft-test"
    assert 0 <= m["best_epoch"] <= 2
    # the saved model was refitted on every photo for the selected number of epochs
    assert m["data"]["holdout_photos"] > 0 and m["data"]["refit_epochs"] == m["best_epoch"]


def test_finetuned_model_loads_by_path_and_by_id(tiny_model, monkeypatch):
    from PIL import Image

    from lookalike.shared.embedders import REGISTRY, load_embedder, resolve_model_id

    assert resolve_model_id(str(tiny_model["dir"])) == "ft-test"
    # the input size it was trained at travels with it
    assert (REGISTRY["ft-test"].preprocessing.resize, REGISTRY["ft-test"].preprocessing.crop) == (160, 160)
    emb = load_embedder(str(tiny_model["dir"]), device="cpu")
    rows = emb.embed([Image.open(tiny_model["train"][0][0])])
    assert rows.shape == (1, 32) and rows.dtype == np.float32
    assert np.linalg.norm(rows[0]) == pytest.approx(1.0, abs=1e-5)

    REGISTRY.pop("ft-test", None)
    models = tiny_model["out"] / "models"
    models.mkdir(exist_ok=True)
    (models / "ft-test").symlink_to(tiny_model["dir"], target_is_directory=True)
    from lookalike.shared.config import Settings

    monkeypatch.setenv("LOOKALIKE_MODELS_DIR", str(models))  # the setting, read by Settings
    assert resolve_model_id("ft-test", **Settings().embedder_options()) == "ft-test"
    assert REGISTRY["ft-test"].dim == 32


def test_eval_uses_the_finetuned_model(tiny_model, tmp_path, capsys):
    import csv

    from lookalike.cli import main

    for name, rows in (("g.csv", tiny_model["train"]), ("q.csv", tiny_model["val"])):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows((str(p), lab) for p, lab in rows)
    main(["eval", "--gallery", str(tmp_path / "g.csv"), "--queries", str(tmp_path / "q.csv"),
          "--model", str(tiny_model["dir"]), "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["model"] == "ft-test" and r["recall@10"] == 1.0


def test_builtin_ids_cannot_be_taken(tmp_path):
    from lookalike.shared.embedders import register_model_dir

    (tmp_path / "model.json").write_text(json.dumps({"id": "efficientnet_lite0", "dim": 8}))
    with pytest.raises(ValueError, match="built-in"):
        register_model_dir(tmp_path)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_reindex_builds_the_finetuned_models_collection_and_switches_to_it(tiny_model, tmp_path, monkeypatch):
    from lookalike.reindex import ReindexFailed, reindex
    from lookalike.shared.config import Settings
    from lookalike.shared.indexes import STATE_DOC
    from lookalike.shared.stores import EdgeStore
    from lookalike.stack import running_pipeline

    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DETECT_WEIGHTS", "none")
    monkeypatch.setenv("EMBED_MODEL", "efficientnet_lite0")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("QDRANT_URL", raising=False)
    catalog = tiny_model["out"] / "sample" / "catalog.jsonl"
    settings = Settings()
    # WHEN no stack runs: the command starts an embedded one for itself
    with running_pipeline(settings) as client:
        r = reindex(client, settings, str(tiny_model["dir"]), catalog, timeout_s=120)
        assert r["model"] == "ft-test" and r["collection"] == "lookalike__ft-test" and r["switched"]
        assert r["events"] == 4 and r["outcomes"]["indexed"] + r["outcomes"]["unchanged"] == 4
        # AND building the model that is active already is refused, saying so
        with pytest.raises(ReindexFailed, match="already active"):
            reindex(client, settings, str(tiny_model["dir"]), catalog, timeout_s=120)
    store = EdgeStore(tmp_path / "qdrant-edge")
    try:
        assert store.count("lookalike__ft-test") >= 12  # 4 products x 3 images (whole image each)
        assert store.count("lookalike__ft-test") == store.count("lookalike__efficientnet_lite0")
        state = store.read_doc(STATE_DOC)
        assert state["active"] == {"id": "ft-test", "spec": str(tiny_model["dir"].resolve())}
        assert state["previous"]["id"] == "efficientnet_lite0"
    finally:
        store.close()


# --------------------------------------------------------------------------- `lookalike finetune --catalog`


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A generated catalogue: 4 products x 3 photos, local paths relative to catalog.jsonl."""
    from lookalike.sample_catalog import generate

    return generate(tmp_path_factory.mktemp("cat") / "sample", n_products=4, photos_per_product=3,
                    query_photos_per_product=1)


def _write_lines(path, events):
    path.write_text("\n".join(e if isinstance(e, str) else json.dumps(e) for e in events) + "\n")
    return path


def _upsert(pid, images, **extra):
    return {"type": "upsert", "product_id": pid, "images": [{"path": p} for p in images], **extra}


def test_catalog_gives_the_same_pairs_as_the_equivalent_csv(sample):
    import csv

    from lookalike.evaluation import read_labelled_csv
    from lookalike.finetune import read_catalog_photos

    root = sample.catalog_path.parent
    # GIVEN the CSV a person would have written for the same photos (paths relative to the CSV)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((img, p["product_id"]) for p in sample.products for img in p["images"])
    # WHEN the catalogue file is read as training data
    photos = read_catalog_photos(sample.catalog_path)
    # THEN finetune() gets exactly the CSV's (path, label) list, in the same order
    assert photos.pairs == read_labelled_csv(root / "train.csv")
    assert (photos.products, photos.labels, photos.local_images, photos.singletons) == (4, 4, 12, 0)


def test_catalog_deletes_and_later_upserts_apply_as_indexing_would(sample, tmp_path):
    from lookalike.finetune import read_catalog_photos

    img = [str(sample.catalog_path.parent / p) for p in sample.products[0]["images"]]
    other = [str(sample.catalog_path.parent / p) for p in sample.products[1]["images"]]
    cat = _write_lines(tmp_path / "c.jsonl", [
        _upsert("a", img[:2]),
        _upsert("b", other),
        "",
        {"type": "delete", "product_id": "b"},
        _upsert("a", img[2:] + other[:1], title="a again"),  # replaces a's first upsert, images included
        {"type": "delete", "product_id": "never-indexed"},
        _upsert("c", img[:1]),
        {"type": "delete", "product_id": "c"},
        _upsert("c", other[1:]),  # back after its delete
    ])
    photos = read_catalog_photos(cat)
    assert [(str(p), lab) for p, lab in photos.pairs] == [(img[2], "a"), (other[0], "a"),
                                                          (other[1], "c"), (other[2], "c")]
    assert (photos.events, photos.upserts, photos.replaced, photos.deleted) == (8, 5, 1, 2)
    assert "1 replaced by a later upsert, 2 products deleted" in photos.summary()


def test_single_photo_products_are_kept_as_negatives(sample, tmp_path):
    import torch
    from pytorch_metric_learning.utils.loss_and_miner_utils import get_all_pairs_indices

    from lookalike.finetune import FinetuneConfig, _sampler, read_catalog_photos

    root = sample.catalog_path.parent
    events = [_upsert(p["product_id"], [str(root / i) for i in p["images"]]) for p in sample.products[:2]]
    events += [_upsert(p["product_id"], [str(root / p["images"][0])]) for p in sample.products[2:]]
    photos = read_catalog_photos(_write_lines(tmp_path / "c.jsonl", events))
    # the two one-photo products are training data (labels of their own), not dropped
    assert photos.singletons == 2 and photos.labels == 4 and len(photos.pairs) == 8
    assert {lab for _, lab in photos.pairs} == {p["product_id"] for p in sample.products}

    # In training, each photo is 1 + views items; the sampler draws the one-photo products like
    # any other, so they sit in batches with other products: negative pairs of the loss.
    cfg = FinetuneConfig(views=1, batch_size=16)
    photo_y = np.array([sorted({lab for _, lab in photos.pairs}).index(lab) for _, lab in photos.pairs])
    item_y = np.repeat(photo_y, 1 + cfg.views)
    singles = {photo_y[i] for i in range(len(photo_y)) if (photo_y == photo_y[i]).sum() == 1}
    sampler, batch = _sampler(item_y, cfg)
    order = np.asarray(list(iter(sampler)))
    negatives_with_singles = 0
    for s in range(0, len(order) - batch + 1, batch):
        yy = torch.as_tensor(item_y[order[s : s + batch]])
        _, _, a2, n = get_all_pairs_indices(yy)
        negatives_with_singles += sum(int(yy[i]) in singles or int(yy[j]) in singles for i, j in zip(a2, n))
    assert set(item_y[order]) >= singles and negatives_with_singles > 0


def test_finetune_from_a_catalog_with_single_photo_products(sample, tmp_path, capsys):
    from lookalike.cli import main

    root = sample.catalog_path.parent
    events = [_upsert(p["product_id"], [str(root / i) for i in p["images"]]) for p in sample.products]
    events += [_upsert("single-1", [str(root / sample.products[0]["images"][0])]),
               {"type": "upsert", "product_id": "single-2", "images": [{"path": str(sample.queries[1][0])}]}]
    cat = _write_lines(tmp_path / "c.jsonl", events)
    main(["finetune", "--catalog", str(cat), "--out", str(tmp_path / "m"), "--id", "ft-cat-test", "--dim", "16",
          "--views", "1", "--epochs", "1", "--batch-size", "16", "--holdout", "0.34", "--series-distance", "0",
          "--resize", "128", "--crop", "128", "--json"])
    out = capsys.readouterr().out
    assert "6 labels, 14 photos (14 local" in out and "2 labels with one photo (kept as negatives)" in out
    m = json.loads((tmp_path / "m" / "model.json").read_text())
    assert m["data"]["products"] == 6 and m["data"]["single_photo_products"] == 2
    assert m["data"]["train_photos"] + m["data"]["holdout_photos"] == 14
    # the one-photo products are never held out, and never leave-one-out queries (nothing to find)
    assert m["metrics"]["train_leave_one_out"]["queries"] == m["data"]["train_photos"] - 2


def test_a_bad_catalog_line_is_named(sample, tmp_path, capsys):
    from lookalike.cli import main
    from lookalike.finetune import read_catalog_photos

    good = _upsert("a", [str(sample.catalog_path.parent / sample.products[0]["images"][0])])
    bad_json = _write_lines(tmp_path / "bad.jsonl", [good, "", '{"type": "upsert", "product_id": "b", '])
    with pytest.raises(ValueError, match=r"(?s)bad\.jsonl:3: .*Invalid JSON"):
        read_catalog_photos(bad_json)
    no_images = _write_lines(tmp_path / "schema.jsonl", [good, {"type": "upsert", "product_id": "b", "images": []}])
    with pytest.raises(ValueError, match=r"(?s)schema\.jsonl:2: .*images"):
        read_catalog_photos(no_images)
    missing = _write_lines(tmp_path / "missing.jsonl", [good, _upsert("b", ["images/nowhere.jpg"])])
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: image .*nowhere\.jpg of product b: no such file"):
        read_catalog_photos(missing)
    # the command says it and exits 1, before any training
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--catalog", str(bad_json), "--out", str(tmp_path / "m")])
    assert e.value.code == 1 and "bad.jsonl:3:" in capsys.readouterr().err
    # --train and --catalog are one or the other
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--catalog", str(bad_json), "--train", "t.csv", "--out", str(tmp_path / "m")])
    assert e.value.code == 2


def test_catalog_url_images_are_fetched_as_ingest_does_or_skipped(sample, tmp_path, monkeypatch):
    import base64
    import http.server
    import threading
    from functools import partial

    from PIL import Image

    from lookalike.finetune import catalog_label, read_catalog_photos
    from lookalike.shared.config import Settings

    root = sample.catalog_path.parent
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    imgs = sample.products[0]["images"]
    try:
        cat = _write_lines(tmp_path / "c.jsonl", [
            {"type": "upsert", "product_id": "a", "images": [
                {"url": f"{base}/{imgs[0]}"}, {"url": f"{base}/missing.jpg"},
                {"data": base64.b64encode((root / imgs[1]).read_bytes()).decode()}, {"path": str(root / imgs[2])}]},
            {"type": "upsert", "product_id": "a#2", "images": [{"url": f"{base}/gone.jpg"}]},
        ])
        # loopback is refused unless ALLOW_PRIVATE_URLS (as ingest): every url is skipped, with its reason
        refused = read_catalog_photos(cat, image_dir=tmp_path / "img0", settings=Settings())
        assert len(refused.pairs) == 2 and len(refused.skipped) == 3 and refused.empty_products == ["a#2"]
        monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
        photos = read_catalog_photos(cat, image_dir=tmp_path / "img", settings=Settings(), split_mark="#")
    finally:
        server.shutdown()
        server.server_close()
    assert [lab for _, lab in photos.pairs] == ["a", "a", "a"]  # url, inline data, local path; a#2 lost its only image
    assert (photos.remote_images, photos.fetched, photos.local_images) == (4, 2, 1)
    assert [pid for pid, _ in photos.skipped] == ["a", "a#2"] and "404" in photos.skipped[0][1]
    fetched = photos.pairs[0][0]
    assert fetched.parent == tmp_path / "img" and Image.open(fetched).size == Image.open(root / imgs[0]).size
    # with the image dir kept, a second read reuses what was fetched (no server now)
    again = read_catalog_photos(cat, image_dir=tmp_path / "img", settings=Settings(), split_mark="#")
    assert again.pairs[:2] == photos.pairs[:2]
    # --skip-urls: local photos only
    local = read_catalog_photos(cat, fetch_remote=False)
    assert [str(p) for p, _ in local.pairs] == [str(root / imgs[2])] and len(local.skipped) == 4
    assert [catalog_label(p, "#") for p in ("sku#2", "sku#x", "#3", "a#b#12")] == ["sku", "sku#x", "#3", "a#b"]
    assert catalog_label("sku#2", None) == "sku#2"
