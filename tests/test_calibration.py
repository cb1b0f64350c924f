"""Confident answers (`lookalike calibrate`): fitting thresholds, marking results, the stored file, the CLI.

Fitting runs on synthetic scores (where the right threshold is known); marking runs through the
real handlers with the colour stand-in embedder of test_handlers.py; the CLI runs the real
embedder on a tiny generated catalogue.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lookalike.calibration import (
    calibrate_scores,
    fit_threshold,
    label_folds,
    search_features,
    write_calibration,
)
from lookalike.functions.detect.handler import Detect
from lookalike.functions.embed.handler import Embed
from lookalike.functions.ingest.handler import Ingest
from lookalike.functions.query.handler import CALIBRATION_FORMAT, Query, Thresholds, calibration_path
from lookalike.shared.config import Settings
from lookalike.shared.detector import WholeImageDetector
from lookalike.shared.indexes import Indexes
from lookalike.shared.messages import MatchedProduct, ObjectResults, RecommendRequest, SearchRequest, SearchResult
from lookalike.shared.stores import CollectionSpec, EdgeStore
from tests.test_evaluation import write_csv  # the labelled-CSV writer the eval tests use
from tests.test_handlers import ColourEmbedder, data, photo, upsert

COLLECTION = "test__colour"


# ----------------------------------------------------------------------------- fitting


def test_threshold_is_the_lowest_value_that_keeps_the_precision():
    values = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    right = [1, 1, 1, 0, 1, 0]  # running precision 1, 1, 1, .75, .8, .67
    assert fit_threshold(values, right, 1.0) == 0.7
    assert fit_threshold(values, right, 0.8) == 0.5  # the dip at 0.6 is passed: 0.5 keeps 4 of 5
    assert fit_threshold(values, right, 0.6) == 0.4
    assert fit_threshold(values, [0] * 6, 0.5) is None  # nothing reaches it: never
    assert fit_threshold([], [], 0.9) is None


def test_threshold_keeps_ties_together_and_skips_nan():
    # 0.8 is one right and one wrong: a threshold cannot take the right one alone
    assert fit_threshold([0.9, 0.8, 0.8, 0.7], [1, 1, 0, 1], 1.0) == 0.9
    assert fit_threshold([np.nan, 0.9, 0.5], [0, 1, 0], 1.0) == 0.9  # NaN (no runner-up) never passes


def synthetic_searches(n_products=20, per_product=10, seed=0, clear_margin=(0.1, 0.1)):
    """Scores where the top score says nothing and the margin says everything.

    Every query's top score is drawn from U(0.6, 0.9). "Clear" queries (3 of 5): their own product
    has it, the others score at least 0.1 below. "Ambiguous" ones: another product has it, their
    own is 0.005-0.015 below (a wrong first product by a tiny margin), the rest 0.02 below or more.
    """
    rng = np.random.default_rng(seed)
    products = [f"p{j:02d}" for j in range(n_products)]
    rows, labels, clear = [], [], []
    for j in range(n_products):
        for i in range(per_product):
            top = rng.uniform(0.6, 0.9)
            is_clear = i % 5 < 3
            row = rng.uniform(0.3, top - (rng.uniform(*clear_margin) if is_clear else 0.02), n_products)
            if is_clear:
                row[j] = top
            else:
                row[(j + 1) % n_products], row[j] = top, top - rng.uniform(0.005, 0.015)
            rows.append(row)
            labels.append(products[j])
            clear.append(is_clear)
    return np.array(rows, dtype=np.float32), products, labels, np.array(clear)


def test_fit_on_synthetic_searches_finds_the_margin_that_separates_right_from_wrong():
    scores, products, labels, clear = synthetic_searches()
    f = search_features(scores, products, labels)
    assert f["top1"].tolist() == clear.tolist()
    assert f["topk"].all()  # the right product is never worse than second
    report = calibrate_scores(scores, products, labels, target=1.0, holdout=0.2, repeats=2)
    t = report["thresholds"]
    # "same product" at precision 1: exactly the clear queries (margin 0.1; the ambiguous ones' 0.015 at most)
    assert t["same_margin"] == pytest.approx(f["margin"][clear].min())
    fitted = report["fitted"]
    assert fitted["same_precision"] == 1.0 and fitted["same_coverage"] == pytest.approx(0.6)
    # "similar": the right product is always in the top 5, so every score is similar enough
    assert t["similar_score"] == pytest.approx(f["top"].min())
    assert fitted["answers"] == {"same product": pytest.approx(0.6), "similar": pytest.approx(0.4),
                                 "no confident match": 0.0}
    # the top score alone cannot do it: right and wrong first products score alike
    assert report["top_score_only"]["coverage"] < 0.2
    # cross-validated on held-out labels; the open set searches every photo once without its product
    assert report["closed"]["same_precision"] == 1.0
    assert report["closed"]["queries"] == report["open_set"]["queries"] == len(labels)
    assert sum(report["open_set"]["answers"].values()) == pytest.approx(1.0)
    assert report["open_set"]["same_precision"] in (None, 0.0)  # its product is not there: never right
    # at 0.95 the threshold goes as low as the precision allows: a few ambiguous queries join
    relaxed = calibrate_scores(scores, products, labels, target=0.95, holdout=0.2, repeats=2, select="fit")
    assert 0.005 <= relaxed["thresholds"]["same_margin"] <= 0.015
    assert relaxed["fitted"]["same_precision"] >= 0.95
    assert 0.6 < relaxed["fitted"]["same_coverage"] <= 120 / 0.95 / 200


def test_label_folds_partition_the_labels_reproducibly():
    labels = [f"l{i}" for i in range(11)] * 2
    folds = label_folds(labels, 5, seed=3)
    assert sorted(x for f in folds for x in f) == sorted(set(labels)) and len(folds) == 5
    assert folds == label_folds(labels, 5, seed=3) != label_folds(labels, 5, seed=4)


def test_cross_validation_picks_the_lowest_fit_level_that_holds_on_held_out_labels():
    from lookalike.calibration import cross_validate

    # clear margins from 0.003 up: they overlap the ambiguous ones, so a fit is optimistic on new labels
    scores, products, labels, _ = synthetic_searches(seed=1, clear_margin=(0.003, 0.15))
    fit_only = calibrate_scores(scores, products, labels, target=0.9, holdout=0.2, repeats=3, select="fit")
    chosen = calibrate_scores(scores, products, labels, target=0.9, holdout=0.2, repeats=3, select="cv")
    assert fit_only["levels"]["same"] == 0.9
    level = chosen["levels"]["same"]
    assert chosen["levels"]["same_reached"]

    def held_out_precision(lvl):
        return cross_validate(scores, products, labels, lvl, lvl, k=5, seed=0, repeats=3)["closed"]["same_precision"]

    assert held_out_precision(level) >= 0.9
    if level > 0.9:
        assert held_out_precision(round(level - 0.01, 4)) < 0.9
    # a stricter level never lowers the threshold
    assert chosen["thresholds"]["same_margin"] >= fit_only["thresholds"]["same_margin"]


def test_bad_arguments():
    scores, products, labels, _ = synthetic_searches(4, 2)
    with pytest.raises(ValueError, match="precision target"):
        calibrate_scores(scores, products, labels, target=1.5)
    with pytest.raises(ValueError, match="holdout"):
        calibrate_scores(scores, products, labels, holdout=0.9)
    # no cross-validation: still fitted, said to be optimistic
    report = calibrate_scores(scores, products, labels, holdout=0)
    assert "closed" not in report and report["levels"]["select"] == "fit"


# ----------------------------------------------------------------------------- marking


def entries(*scores):
    return [MatchedProduct(product_id=f"p{i}", score=s) for i, s in enumerate(scores)]


def test_thresholds_mark_same_similar_and_other():
    t = Thresholds(same_margin=0.05, similar_score=0.6)
    products = entries(0.9, 0.8, 0.55)
    assert t.mark(products) == "same product"
    assert [p.match for p in products] == ["same", "similar", "other"]
    products = entries(0.9, 0.88, 0.7)  # no clear winner
    assert t.mark(products) == "similar"
    assert [p.match for p in products] == ["similar", "similar", "similar"]
    products = entries(0.5, 0.3)  # a clear winner, but far from anything: still the margin decides
    assert t.mark(products) == "same product" and [p.match for p in products] == ["same", "other"]
    products = entries(0.55, 0.54)
    assert t.mark(products) == "no confident match" and [p.match for p in products] == ["other", "other"]
    # one entry: nothing to compare it with, never "same product"
    assert t.mark(entries(0.99)) == "similar"
    assert t.mark([]) == "no confident match"
    never = Thresholds(same_margin=None, similar_score=None)
    products = entries(0.99, 0.1)
    assert never.mark(products) == "no confident match" and products[0].match == "other"


@pytest.fixture
def store(tmp_path):
    s = EdgeStore(tmp_path / "edge")
    s.ensure_collection(CollectionSpec(COLLECTION, ColourEmbedder.spec.dim))
    yield s
    s.close()


@pytest.fixture
def functions(tmp_path, store):
    """ingest -> detect -> embed by hand, red and orange-red and blue products indexed."""
    settings = Settings(LOOKALIKE_DATA_DIR=str(tmp_path))
    indexes = Indexes.fixed(store, COLLECTION, "colour")
    ingest, detect, embed = Ingest(settings, indexes), Detect(WholeImageDetector()), Embed(ColourEmbedder(), indexes)
    for event in (upsert("red", colors=[(200, 30, 30)]), upsert("orange", colors=[(200, 90, 30)]),
                  upsert("blue", colors=[(30, 30, 200)])):
        for e in ingest.on_catalog_event(event):
            (detected,) = detect.on_image(e.message)
            embed.on_batch([detected.message])

    def search(query: Query, raw: bytes, **kw) -> SearchResult:
        (normalized,) = ingest.on_search_request(SearchRequest(image=data(raw), **kw))
        (detected,) = detect.on_image(normalized.message)
        ((vectors,),) = embed.on_batch([detected.message])
        (result,) = query.on_vectors(vectors.message)
        return result.message

    return search


def test_query_marks_its_results_from_the_thresholds(functions, store):
    red = photo((205, 28, 28))
    # GIVEN an uncalibrated query function (no merging: orange is close to red): results as before,
    # nothing new on the wire
    plain = functions(Query(Indexes.fixed(store, COLLECTION, "colour"), merge_threshold=1.0), red)
    obj = plain.objects[0]
    assert obj.answer is None and all(p.match is None for p in obj.products)
    assert b'"answer"' not in plain.to_bytes() and b'"match"' not in plain.to_bytes()
    scores = [p.score for p in obj.products]
    assert [p.product_id for p in obj.products] == ["red", "orange", "blue"]
    margin = scores[0] - scores[1]
    # WHEN it has thresholds the red photo's margin passes THEN red is the same product, orange similar
    query = Query(Indexes.fixed(store, COLLECTION, "colour"), merge_threshold=1.0,
                  thresholds=Thresholds(same_margin=margin / 2, similar_score=(scores[1] + scores[2]) / 2))
    obj = functions(query, red).objects[0]
    assert obj.answer == "same product"
    assert [(p.product_id, p.match) for p in obj.products] == [("red", "same"), ("orange", "similar"),
                                                                ("blue", "other")]
    # AND asking for one product still compares it with the runner-up
    obj = functions(query, red, top_k=1).objects[0]
    assert obj.answer == "same product" and [p.product_id for p in obj.products] == ["red"]
    # WHEN the margin needed is more than red's THEN no product is the same: similar items
    query = Query(Indexes.fixed(store, COLLECTION, "colour"), merge_threshold=1.0,
                  thresholds=Thresholds(same_margin=margin * 2, similar_score=(scores[1] + scores[2]) / 2))
    obj = functions(query, red).objects[0]
    assert obj.answer == "similar" and [p.match for p in obj.products] == ["similar", "similar", "other"]
    # WHEN even the best score is below "similar" THEN no confident match, the closest still listed
    query = Query(Indexes.fixed(store, COLLECTION, "colour"), merge_threshold=1.0,
                  thresholds=Thresholds(same_margin=None, similar_score=1.01))
    result = functions(query, red)
    assert result.objects[0].answer == "no confident match" and len(result.objects[0].products) == 3
    # AND the marks travel on the wire
    wire = json.loads(result.to_bytes())
    assert wire["objects"][0]["answer"] == "no confident match"
    assert {p["match"] for p in wire["objects"][0]["products"]} == {"other"}
    # AND recommendations are not marked (the thresholds are for photos)
    (emit,) = query.on_recommend(RecommendRequest(positive=["red"], top_k=5))
    assert emit.message.objects[0].answer is None


# ----------------------------------------------------------------------------- the stored file


def report(model="efficientnet_lite0", same=0.07, similar=0.71, **kw) -> dict:
    return {"format": CALIBRATION_FORMAT, "model": model, "distance": "cosine", "precision_target": 0.95,
            "thresholds": {"same_margin": same, "similar_score": similar},
            "catalogue": {"fingerprint": "abc", "products": 3, "images": 9}, **kw}


def test_query_function_loads_the_thresholds_stored_for_its_model(tmp_path):
    from lookalike.functions.wiring import Resources
    from tests.conftest import make_settings

    settings = make_settings(tmp_path)
    path = calibration_path(tmp_path, "efficientnet_lite0")
    assert path == tmp_path / "calibration" / "efficientnet_lite0.json"

    def load():
        res = Resources.load(settings, ("query",))
        try:
            return res, res.build("query")
        finally:
            res.store.close()

    # no file: uncalibrated, as before
    res, query = load()
    assert res.thresholds is None and query.thresholds(res.model_id) is None
    # a file for this model: loaded, and said at start
    write_calibration(path, report(same=0.07, similar=None))
    res, query = load()
    assert query.thresholds(res.model_id) == Thresholds(same_margin=0.07, similar_score=None)
    assert query.thresholds(res.model_id).info["catalogue"]["fingerprint"] == "abc"
    assert any("calibrated answers" in n and "margin >= 0.0700" in n for n in res.notes)
    # a file fitted for another model or distance: ignored
    write_calibration(path, report(model="resnet50"))
    assert load()[1].thresholds(res.model_id) is None
    write_calibration(path, report(distance="euclid"))
    assert load()[1].thresholds(res.model_id) is None
    # a broken file: an error at start, not a silently uncalibrated service
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be used"):
        load()
    write_calibration(path, report(same="high"))
    with pytest.raises(ValueError, match="numbers or null"):
        load()


# ----------------------------------------------------------------------------- the CLI



def test_cli_calibrate_on_a_generated_catalogue_stores_the_thresholds(tmp_path, capsys):
    from lookalike.cli import main
    from lookalike.sample_catalog import generate

    sample = generate(tmp_path / "sample", n_products=6, photos_per_product=2, query_photos_per_product=2)
    gallery = write_csv(tmp_path / "gallery.csv", [(tmp_path / "sample" / img, p["product_id"])
                                                   for p in sample.products for img in p["images"]])
    queries = write_csv(tmp_path / "queries.csv", sample.queries)
    data_dir = tmp_path / "data"
    main(["--data-dir", str(data_dir), "calibrate", "--gallery", str(gallery), "--queries", str(queries),
          "--model", "efficientnet_lite0", "--precision", "0.9", "--holdout", "0.5", "--repeats", "2", "--json"])
    out = capsys.readouterr().out.splitlines()
    # in the precision the embed function serves here (EMBED_PRECISION=auto), which the thresholds must fit
    from lookalike.shared import int8

    served = "int8" if int8.vnni_supported() else "fp32"  # Lite0: its int8 ranges ship; else ONNX Runtime's fp32
    assert out[0].startswith(f"model efficientnet_lite0 ({served}), detect none: 12 queries vs 12 gallery images "
                             "(6 products")
    assert out[1].startswith("thresholds: same product = top-1 margin")
    assert any(line.strip().startswith("cross-validated (2 folds x2)") for line in out)
    assert any(line.strip().startswith("open set: 12 photos") for line in out)
    path = data_dir / "calibration" / "efficientnet_lite0.json"
    assert any(line.startswith(f"wrote {path}") for line in out)
    printed = json.loads(out[-1])
    stored = json.loads(path.read_text())
    assert stored == printed
    assert stored["format"] == CALIBRATION_FORMAT and stored["model"] == "efficientnet_lite0"
    assert stored["embed_precision"] == served
    assert stored["catalogue"]["products"] == 6 and stored["catalogue"]["images"] == 12
    assert stored["fitted"]["queries"] == 12
    # the query function reads what was written
    t = Thresholds.load(path, "efficientnet_lite0")
    assert t is not None and t.to_dict() == stored["thresholds"]
    # --dry-run writes nothing
    path.unlink()
    main(["--data-dir", str(data_dir), "calibrate", "--gallery", str(gallery), "--queries", str(queries),
          "--model", "efficientnet_lite0", "--holdout", "0", "--dry-run"])
    assert not path.exists()
    assert "not cross-validated" in capsys.readouterr().out


def test_search_output_shows_the_answer_and_the_marks():
    from lookalike.client import format_result

    def result(answer, *marks):
        products = [MatchedProduct(product_id=f"sku-{i}", score=0.9 - i / 10, title=f"product {i}", match=m)
                    for i, m in enumerate(marks)]
        return SearchResult(request_id="r", objects=[ObjectResults(products=products, answer=answer)])

    # uncalibrated: no answer, no mark column
    plain = format_result(result(None, None, None)).splitlines()
    assert plain[0] == "image (score 1.00):" and plain[1].startswith("   1. 0.900  sku-0")
    lines = format_result(result("same product", "same", "similar", "other")).splitlines()
    assert lines[0] == "image (score 1.00): same product"
    assert "SAME PRODUCT" in lines[1] and "sku-0" in lines[1]
    assert "similar" in lines[3] and "sku-1" in lines[3]
    assert "SAME" not in lines[5] and "similar" not in lines[5]
    lines = format_result(result("similar", "similar", "other")).splitlines()
    assert lines[0] == "image (score 1.00): no confident match \u2014 similar items:"
    lines = format_result(result("no confident match", "other")).splitlines()
    assert lines[0].startswith("image (score 1.00): no confident match \u2014 nothing similar")
