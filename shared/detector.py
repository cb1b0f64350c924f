"""Object detection: which regions of a photo are products worth searching for.

Ultralytics YOLO (any format it loads: .pt, .onnx, .tflite...) with COCO labels
that are not products (people, vehicles, animals, street furniture) dropped.
Ultralytics is imported only when a YOLO model is loaded, so importing this
module stays cheap, and it runs with ``YOLO_OFFLINE=true`` unless told otherwise.

    detector = load_detector("none" | "auto" | "yolo11n.pt" | "/models/yolov8n_int8.tflite")
    objects = detector.detect(pil_image)   # list[DetectedObject], best first
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from PIL import Image

from lookalike.shared.messages import Box, DetectedObject

log = logging.getLogger("lookalike.detector")

# Before ultralytics is ever imported: no update checks, no telemetry, no surprise downloads.
os.environ.setdefault("YOLO_OFFLINE", "true")

AUTO_WEIGHTS = "yolo11n.pt"
MODEL_SUFFIXES = (".pt", ".onnx", ".tflite", ".torchscript", ".engine", ".mlpackage", ".xml")

# COCO classes that are never catalogue products.
NOT_PRODUCTS = frozenset(
    {
        "person",
        # vehicles
        "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
        # animals
        "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
        # street furniture
        "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    }
)  # fmt: skip


def whole_image_object(width: int, height: int) -> DetectedObject:
    """The whole picture as one object (what is searched when nothing is detected)."""
    return DetectedObject(box=Box(x1=0, y1=0, x2=float(width), y2=float(height)), label="image", score=1.0)


class Detector(Protocol):
    def detect(self, image: Image.Image) -> list[DetectedObject]: ...


class WholeImageDetector:
    """Detects nothing: callers fall back to the whole image (DETECT_WEIGHTS=none)."""

    weights = "none"

    def detect(self, image: Image.Image) -> list[DetectedObject]:
        return []


def _offline() -> bool:
    return os.environ.get("YOLO_OFFLINE", "true").strip().lower() in ("1", "true", "yes", "on")


class YoloDetector:
    """An Ultralytics YOLO detection model, filtered to product labels."""

    def __init__(
        self,
        weights: str,
        conf: float = 0.25,
        max_objects: int = 5,
        product_labels: frozenset[str] | None = None,
        exclude_labels: frozenset[str] = NOT_PRODUCTS,
    ):
        from ultralytics import YOLO  # lazy: heavy import

        if weights.endswith(".tflite"):
            _litert_threads(os.cpu_count() or 1)
        self.weights = weights
        self.conf = conf
        self.max_objects = max_objects
        self.product_labels = product_labels
        self.exclude_labels = exclude_labels
        self.model = YOLO(weights, task="detect")
        # Ultralytics predictors keep per-call state: one prediction at a time.
        self._lock = threading.Lock()

    def is_product(self, label: str) -> bool:
        if self.product_labels is not None:
            return label in self.product_labels
        return label not in self.exclude_labels

    def detect(self, image: Image.Image) -> list[DetectedObject]:
        image = image.convert("RGB")
        with self._lock:
            result = self.model.predict(image, conf=self.conf, verbose=False)[0]
        names, boxes = result.names, result.boxes
        rows = zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
        found = []
        for (x1, y1, x2, y2), score, cls in rows:
            label = names[int(cls)]
            if not self.is_product(label):
                continue
            # Clip to the picture; drop boxes that collapse (Box needs x2 > x1, y2 > y1).
            x1, x2 = max(0.0, x1), min(float(image.width), x2)
            y1, y2 = max(0.0, y1), min(float(image.height), y2)
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            found.append(DetectedObject(box=Box(x1=x1, y1=y1, x2=x2, y2=y2), label=label, score=float(score)))
        found.sort(key=lambda o: o.score, reverse=True)
        return found[: self.max_objects]


def _litert_threads(threads: int) -> None:
    """Threads of the LiteRT interpreters Ultralytics creates from now on (it reads a module constant).

    Ultralytics leaves one core free (``NUM_THREADS`` = cores - 1, for its data loaders), so on a
    2-core machine YOLOv8n int8 ran on one thread: 44 ms a 640 px photo, against 31 ms on both
    (docs/benchmarks.md). A search waits for detection, so it gets every core.
    """
    try:
        from ultralytics.nn.backends import litert
    except ImportError:  # an Ultralytics before its backends package: its own choice stands
        return
    litert.NUM_THREADS = threads


def _ultralytics_weights_dir() -> Path | None:
    try:
        from ultralytics.utils import SETTINGS
    except ImportError:
        return None
    return Path(SETTINGS["weights_dir"])


def _find_local(name: str) -> Path | None:
    """A bare model name as a file here or in ultralytics' weights dir."""
    candidates = [Path(name)]
    weights_dir = _ultralytics_weights_dir()
    if weights_dir is not None:
        candidates.append(weights_dir / name)
    return next((p for p in candidates if p.exists()), None)


def load_detector(
    weights: str,
    conf: float = 0.25,
    max_objects: int = 5,
    product_labels: frozenset[str] | None = None,
    exclude_labels: frozenset[str] = NOT_PRODUCTS,
) -> Detector:
    """Detector for DETECT_WEIGHTS.

    "none" -> whole image only; "auto" -> yolo11n.pt if present locally, else whole image
    (logged); a model name ("yolo11n.pt") or a local model file -> YoloDetector.
    """
    options = dict(conf=conf, max_objects=max_objects, product_labels=product_labels, exclude_labels=exclude_labels)
    weights = weights.strip()
    if weights.lower() == "none":
        return WholeImageDetector()

    if weights.lower() == "auto":
        path = _find_local(AUTO_WEIGHTS)
        if path is None:
            log.warning(
                "DETECT_WEIGHTS=auto: %s not found locally (here or in ultralytics' weights dir); "
                "searching whole images only. Set DETECT_WEIGHTS to a local model file to detect objects.",
                AUTO_WEIGHTS,
            )
            return WholeImageDetector()
        log.info("DETECT_WEIGHTS=auto -> %s", path)
        return YoloDetector(str(path), **options)

    ways_out = (
        "set DETECT_WEIGHTS=none to search whole images, "
        "or point DETECT_WEIGHTS at a local model file (.pt, .onnx, .tflite)"
    )
    is_path = "/" in weights or os.sep in weights or weights.startswith(".") or Path(weights).exists()
    if is_path:
        path = Path(weights).expanduser()
        if not path.exists():
            raise RuntimeError(f"detector weights not found: {path}; {ways_out}")
        try:
            return YoloDetector(str(path), **options)
        except Exception as exc:  # wrong format, missing runtime (e.g. ai-edge-litert for .tflite)...
            raise RuntimeError(f"could not load detector weights {path} ({exc}); {ways_out}") from exc

    # A bare name ("yolo11n.pt"): a local copy, or a download when explicitly allowed.
    if not weights.endswith(MODEL_SUFFIXES):
        raise RuntimeError(f"unknown detector weights {weights!r}; {ways_out}")
    path = _find_local(weights)
    if path is not None:
        return YoloDetector(str(path), **options)
    if _offline():
        raise RuntimeError(
            f"detector weights {weights!r} are not available offline (YOLO_OFFLINE is set and no local copy "
            f"exists here or in ultralytics' weights dir); {ways_out}, or set YOLO_OFFLINE=false to download"
        )
    try:
        return YoloDetector(weights, **options)  # ultralytics downloads its own release assets
    except Exception as exc:
        raise RuntimeError(f"could not load detector weights {weights!r} ({exc}); {ways_out}") from exc
