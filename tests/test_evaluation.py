"""`lookalike eval`: metrics, CSV reading, direct and pipeline modes on a tiny generated catalogue."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lookalike.evaluation import (
    SPLIT_MARK,
    gallery_events,
    product_rankings,
    ranking_metrics,
    read_labelled_csv,
)

KEYS = {"recall@1", "recall@5", "recall@10", "map@10", "model", "mode", "queries", "gallery"}


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((str(p), lab) for p, lab in rows)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lookalike.sample_catalog import generate

    out = tmp_path_factory.mktemp("tiny")
    sample = generate(out / "sample", n_products=4, photos_per_product=2, query_photos_per_product=1)
    gallery = [(out / "sample" / img, p["product_id"]) for p in sample.products for img in p["images"]]
    queries = [(photo, pid) for photo, pid in sample.queries]
    return {
        "gallery": write_csv(out / "gallery.csv", gallery),
        "queries": write_csv(out / "queries.csv", queries),
        "n_gallery": len(gallery),
        "n_queries": len(queries),
    }


def test_ranking_metrics_by_hand():
    rankings = [["a", "b", "c"], ["b", "c", "a"], ["b", "c", "d"]]
    m = ranking_metrics(rankings, ["a", "a", "a"])
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    # one relevant product per query: mAP@10 is MRR@10 = (1 + 1/3 + 0) / 3
    assert m["map@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["queries"] == 3


def test_rank_beyond_ten_is_a_miss_and_duplicates_collapse():
    ranking = [f"p{i}" for i in range(10)] + ["a"]
    assert ranking_metrics([ranking], ["a"])["recall@10"] == 0.0
    assert ranking_metrics([["b", "b", "a"]], ["a"])["recall@1"] == 0.0
    assert ranking_metrics([["b", "b", "a"]], ["a"])["map@10"] == pytest.approx(0.5)


def test_product_rankings_collapse_to_best_image_per_product():
    g = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], dtype=np.float32)
    labels = ["x", "y", "y", "z"]
    q = np.array([[0.7071, 0.7071]], dtype=np.float32)
    (ranking,) = product_rankings(g, labels, q)
    assert ranking == ["y", "z", "x"]  # y's best image (0.8, 0.6) ~ (0.6, 0.8) tie broken by product order
    # Leave-one-out: a query never finds itself.
    rk = product_rankings(g, labels, g, exclude_self=True)
    assert rk[0][0] != "x" or labels.count("x") > 1


def test_read_csv_relative_paths_and_header(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    p = tmp_path / "g.csv"
    p.write_text("path,label\na.jpg,apple\n")
    assert read_labelled_csv(p) == [(tmp_path / "a.jpg", "apple")]
    p.write_text("file,class\na.jpg,apple\n")
    with pytest.raises(ValueError, match="path,label"):
        read_labelled_csv(p)


def test_gallery_events_one_product_per_label_split_over_the_event_cap(tmp_path):
    img = tmp_path / "x.jpg"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(img)
    events = gallery_events([(img, "apple")] * 25 + [(img, "pear")], max_images=20)
    ids = sorted(e.product_id for e in events)
    assert ids == ["apple", f"apple{SPLIT_MARK}2", "pear"]
    assert sum(len(e.images) for e in events) == 26


def test_eval_direct_gallery_equals_queries_is_perfect(tiny, capsys):
    from lookalike.cli import main

    main(["eval", "--gallery", str(tiny["gallery"]), "--queries", str(tiny["gallery"]),
          "--model", "efficientnet_lite0", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= set(r)
    assert r["recall@1"] == r["recall@10"] == r["map@10"] == 1.0
    assert (r["mode"], r["model"], r["gallery"], r["queries"]) == ("direct", "efficientnet_lite0",
                                                                   tiny["n_gallery"], tiny["n_gallery"])


def test_eval_direct_new_photos(tiny, capsys):
    from lookalike.cli import main

    main(["eval", "--gallery", str(tiny["gallery"]), "--queries", str(tiny["queries"]),
          "--model", "efficientnet_lite0", "--precision", "bf16", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["queries"] == tiny["n_queries"]
    assert r["recall@10"] == 1.0  # 4 products: all of them are in the top 10
    assert 0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0
    assert r["precision"] == "bf16"


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_eval_pipeline_mode(tiny, capsys):
    from lookalike.cli import main

    main(["eval", "--gallery", str(tiny["gallery"]), "--queries", str(tiny["queries"]),
          "--model", "efficientnet_lite0", "--mode", "pipeline", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= set(r)
    assert r["mode"] == "pipeline" and r["queries"] == tiny["n_queries"]
    assert r["points"] >= tiny["n_gallery"]
    assert r["recall@10"] == 1.0
