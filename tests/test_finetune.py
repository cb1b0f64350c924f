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
def test_reindex_fills_the_finetuned_models_own_collection(tiny_model, tmp_path, monkeypatch):
    from lookalike.evaluation import reindex
    from lookalike.shared.config import Settings
    from lookalike.shared.stores import EdgeStore

    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DETECT_WEIGHTS", "none")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("QDRANT_URL", raising=False)
    catalog = tiny_model["out"] / "sample" / "catalog.jsonl"
    r = reindex(Settings(), str(tiny_model["dir"]), catalog, timeout_s=120)
    assert r["model"] == "ft-test" and r["collection"] == "lookalike__ft-test"
    assert r["events"] == 4 and r["points"] >= 12  # 4 products x 3 images (whole image each)
    again = reindex(Settings(), str(tiny_model["dir"]), catalog, timeout_s=120)
    assert again["points"] == r["points"]  # rebuilt in place: same point ids, nothing duplicated
    store = EdgeStore(tmp_path / "qdrant-edge")
    try:
        assert "lookalike__ft-test" in store.collections()
    finally:
        store.close()
