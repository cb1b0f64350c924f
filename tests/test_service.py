"""Start-up wiring: what the process decides from its settings, and says about it."""

from __future__ import annotations

from lookalike.functions.wiring import Resources
from lookalike.shared.config import Settings


def test_auto_model_says_which_model_it_chose_and_why(tmp_path, monkeypatch):
    # GIVEN no resnet50 weights anywhere and no network
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("LOOKALIKE_ALLOW_DOWNLOAD", "0")
    monkeypatch.delenv("EMBED_WEIGHTS", raising=False)
    # WHEN the functions start with EMBED_MODEL=auto
    res = Resources.load(Settings(LOOKALIKE_DATA_DIR=str(tmp_path), embed_model="auto"), ("ingest",))
    # THEN the best stock model without labels is used (docs/quality.md), in its own collection, and the
    # reason is recorded for `lookalike status`
    assert res.model_id == "efficientnet_lite2_rmac" and res.collection == "lookalike__efficientnet_lite2_rmac"
    assert any("auto chose efficientnet_lite2_rmac" in n and "resnet50 weights" in n for n in res.notes)
    res.store.close()


def test_detector_label_settings(tmp_path):
    from lookalike.shared.detector import NOT_PRODUCTS

    default = Settings(LOOKALIKE_DATA_DIR=str(tmp_path)).detector_labels()
    assert default == {"product_labels": None, "exclude_labels": NOT_PRODUCTS}
    custom = Settings(LOOKALIKE_DATA_DIR=str(tmp_path), detect_labels="cup, bottle", detect_exclude="person")
    custom = custom.detector_labels()
    assert custom == {"product_labels": frozenset({"cup", "bottle"}), "exclude_labels": frozenset({"person"})}


def test_euclid_distance_gets_its_own_collection(tmp_path):
    cosine = Settings(LOOKALIKE_DATA_DIR=str(tmp_path))
    euclid = Settings(LOOKALIKE_DATA_DIR=str(tmp_path), distance="euclid")
    assert cosine.collection_name("resnet50") != euclid.collection_name("resnet50")


def test_consumer_groups_named_for_status_and_health_match_the_functions_routes(tmp_path):
    # GIVEN the four functions as the stack builds them (no models or store are touched for routes)
    from lookalike.shared.indexes import Indexes
    from lookalike.shared.runtime import CONSUMER_GROUPS, consumer_group

    res = Resources(Settings(LOOKALIKE_DATA_DIR=str(tmp_path)), indexes=Indexes.fixed(None, "c"))
    groups = {}
    for name in ("ingest", "detect", "embed", "query"):
        fn = res.build(name)
        for lane in fn.lanes():
            groups[consumer_group(name, lane)] = tuple(r.topic for r in fn.routes() if r.lane == lane)
    # THEN the one table that status, lag and /healthz read names exactly these groups and topics
    assert groups == CONSUMER_GROUPS
    # AND shopper searches have a group of their own, apart from catalogue events
    assert CONSUMER_GROUPS["lookalike-ingest-search"] == ("search.requests",)
