"""Detector loading and product filtering (YOLO part needs the team's ../shared model folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lookalike.shared.detector import NOT_PRODUCTS, WholeImageDetector, YoloDetector, load_detector, whole_image_object

MODEL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "yolov8n-coco"
TFLITE = MODEL_DIR / "yolov8n_int8.tflite"
needs_model = pytest.mark.skipif(
    not TFLITE.is_file(), reason=f"team model folder absent: {MODEL_DIR} (../shared relative to the repo)"
)


def _asset(name: str) -> Image.Image:
    import ultralytics

    return Image.open(Path(ultralytics.__file__).parent / "assets" / name)


def test_import_is_cheap_and_offline():
    code = "import sys, os, lookalike.shared.detector; print('ultralytics' in sys.modules, os.environ['YOLO_OFFLINE'])"
    env = {k: v for k, v in os.environ.items() if k != "YOLO_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "true"]


def test_none_is_whole_image_only():
    det = load_detector("none")
    assert isinstance(det, WholeImageDetector)
    assert det.detect(Image.new("RGB", (64, 48))) == []
    obj = whole_image_object(64, 48)
    assert (obj.label, obj.score, obj.box.as_list()) == ("image", 1.0, [0, 0, 64, 48])


def test_missing_local_file_says_how_to_get_out(tmp_path):
    with pytest.raises(RuntimeError, match=r"not found.*DETECT_WEIGHTS=none"):
        load_detector(str(tmp_path / "nope.tflite"))


def test_unknown_name_offline_says_how_to_get_out(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    monkeypatch.chdir(tmp_path)  # no stray yolo file in the working directory
    with pytest.raises(RuntimeError, match=r"not available offline.*DETECT_WEIGHTS=none.*local"):
        load_detector("yolo-does-not-exist.pt")


def test_auto_without_weights_falls_back(monkeypatch, tmp_path, caplog):
    from lookalike.shared import detector

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(detector, "_ultralytics_weights_dir", lambda: tmp_path / "weights")
    caplog.set_level("WARNING", logger="lookalike.detector")
    assert isinstance(load_detector("auto"), WholeImageDetector)
    assert "yolo11n.pt" in caplog.text


@pytest.fixture(scope="module")
def bus():
    return _asset("bus.jpg")


@needs_model
def test_yolo_tflite_excludes_people_and_vehicles(bus):
    everything = YoloDetector(str(TFLITE), exclude_labels=frozenset())
    found = everything.detect(bus)
    assert found, "the COCO model finds nothing on bus.jpg"
    labels = {o.label for o in found}
    assert {"person", "bus"} <= labels
    scores = [o.score for o in found]
    assert scores == sorted(scores, reverse=True)
    for o in found:
        assert 0 <= o.box.x1 < o.box.x2 <= bus.width and 0 <= o.box.y1 < o.box.y2 <= bus.height

    default = load_detector(str(TFLITE))
    assert isinstance(default, YoloDetector)
    assert not {o.label for o in default.detect(bus)} & NOT_PRODUCTS

    people = YoloDetector(str(TFLITE), product_labels=frozenset({"person"}), max_objects=2)
    found = people.detect(bus)
    assert len(found) == 2 and {o.label for o in found} == {"person"}


@needs_model
def test_yolo_tflite_keeps_products():
    # zidane.jpg: two people and a tie; only the tie counts as a product.
    labels = {o.label for o in load_detector(str(TFLITE)).detect(_asset("zidane.jpg"))}
    assert "tie" in labels and "person" not in labels
