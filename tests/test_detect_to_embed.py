"""A real detector on a real photo: boxes found by YOLO become crops that embed turns into vectors.

Uses the team folder's COCO YOLOv8n (TFLite) and Ultralytics' own sample photos;
skips with the reason when ../shared/models/yolov8n-coco is absent.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest

from lookalike.functions.detect.handler import Detect
from lookalike.functions.embed.handler import Embed
from lookalike.functions.ingest.handler import Ingest
from lookalike.functions.query.handler import Query
from lookalike.shared.config import Settings
from lookalike.shared.detector import load_detector
from lookalike.shared.embedders import load_embedder
from lookalike.shared.indexes import Indexes
from lookalike.shared.messages import CatalogUpsert, ImageRef, Offer, SearchRequest
from lookalike.shared.stores import CollectionSpec, EdgeStore

pytestmark = pytest.mark.shared_data
MODEL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "yolov8n-coco"
TFLITE = MODEL_DIR / "yolov8n_int8.tflite"
if not TFLITE.is_file():
    pytest.skip(f"team model folder absent: {MODEL_DIR} (../shared relative to the repo)", allow_module_level=True)


def asset(name: str) -> bytes:
    import ultralytics

    return (Path(ultralytics.__file__).parent / "assets" / name).read_bytes()


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("efficientnet_lite0", device="cpu")


def settings_with(tmp_path, **kw) -> Settings:
    return Settings(LOOKALIKE_DATA_DIR=str(tmp_path), detect_weights=str(TFLITE), **kw)


def test_detected_boxes_flow_to_embed_as_crops(tmp_path, embedder):
    # GIVEN the YOLO detector counting everything but people as a product (zidane.jpg: two people, ties)
    settings = settings_with(tmp_path, detect_exclude="person")
    detector = load_detector(settings.detect_weights, **settings.detector_labels())
    store = EdgeStore(tmp_path / "edge")
    store.ensure_collection(CollectionSpec("c", embedder.spec.dim))
    indexes = Indexes.fixed(store, "c", embedder.spec.id)
    ingest, detect, embed = Ingest(settings, indexes), Detect(detector), Embed(embedder, indexes)
    # WHEN the photo is searched
    request = SearchRequest(image=ImageRef(data=base64.b64encode(asset("zidane.jpg")).decode()))
    (normalized,) = ingest.on_search_request(request)
    (detected,) = detect.on_image(normalized.message)
    objects = detected.message.objects
    # THEN at least one tie is found (people are not products), the whole image comes last
    labels = [o.label for o in objects]
    assert "tie" in labels and "person" not in labels and labels[-1] == "image"
    ((vectors,),) = embed.on_batch([detected.message])
    got = vectors.message.objects
    # AND every object got its own unit vector, and a tie crop differs from the whole photo
    assert len(got) == len(objects)
    v = np.array([o.vector for o in got])
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert float(v[0] @ v[-1]) < 0.95
    store.close()


def test_default_labels_exclude_people_and_vehicles(tmp_path):
    detector = load_detector(str(TFLITE), **Settings(LOOKALIKE_DATA_DIR=str(tmp_path)).detector_labels())
    from PIL import Image

    found = detector.detect(Image.open(io.BytesIO(asset("bus.jpg"))))
    assert all(o.label not in ("person", "bus") for o in found)


def test_allow_list_limits_labels(tmp_path):
    settings = settings_with(tmp_path, detect_labels="person")
    detector = load_detector(settings.detect_weights, **settings.detector_labels())
    from PIL import Image

    found = detector.detect(Image.open(io.BytesIO(asset("bus.jpg"))))
    assert found and {o.label for o in found} == {"person"}


def test_indexed_crop_is_found_from_a_search_of_the_same_region(tmp_path, embedder):
    # GIVEN a catalogue product photographed in a scene (bus.jpg), indexed with detection on
    settings = settings_with(tmp_path, detect_exclude="")  # count every COCO label: the bus is "the product"
    detector = load_detector(settings.detect_weights, conf=0.25, max_objects=4, **settings.detector_labels())
    store = EdgeStore(tmp_path / "edge")
    store.ensure_collection(CollectionSpec("c", embedder.spec.dim))
    indexes = Indexes.fixed(store, "c", embedder.spec.id)
    ingest, detect, embed = Ingest(settings, indexes), Detect(detector), Embed(embedder, indexes)
    query = Query(indexes)
    for pid, name in (("bus-poster", "bus.jpg"), ("zidane-poster", "zidane.jpg")):
        event = CatalogUpsert(product_id=pid, images=[ImageRef(data=base64.b64encode(asset(name)).decode())],
                              offers=[Offer(shop="s", price=1.0)])
        for e in ingest.on_catalog_event(event):
            embed.on_batch([detect.on_image(e.message)[0].message])
    # THEN one point per detected object plus the whole image
    assert store.count("c") > 2
    (n,) = ingest.on_search_request(SearchRequest(image=ImageRef(data=base64.b64encode(asset("bus.jpg")).decode())))
    ((v,),) = embed.on_batch([detect.on_image(n.message)[0].message])
    result = query.on_vectors(v.message)[0].message
    assert all(o.products[0].product_id == "bus-poster" for o in result.objects)
    store.close()
