"""detect: find the products in a normalised image.

images.normalized -> images.detected (catalogue images), and search.normalized ->
search.detected (shoppers' photos, a lane of its own: they never queue behind catalogue
images). The objects are the detector's boxes (best first) followed by the whole image
as a fallback object. A user-selected box in a search request skips detection: that
region is the only object.
"""

from __future__ import annotations

import threading

from lookalike.shared.detector import Detector, WholeImageDetector, whole_image_object
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.images import open_jpeg
from lookalike.shared.messages import (
    IMAGES_DETECTED,
    IMAGES_NORMALIZED,
    SEARCH_DETECTED,
    SEARCH_NORMALIZED,
    DetectedImage,
    DetectedObject,
    IndexCommand,
    NormalizedImage,
    NormalizedMessage,
    ProductSync,
)
from lookalike.shared.runtime import Emit, Function, Route


class Detect(Function):
    name = "detect"

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector
        # The lanes run in threads of their own; YOLO and TFLite models are not thread-safe, so
        # one image at a time: a search waits for at most the one catalogue image in hand.
        self._detecting = threading.Lock()

    def routes(self) -> list[Route]:
        return [Route(IMAGES_NORMALIZED, NormalizedMessage, self.on_image),
                Route(SEARCH_NORMALIZED, NormalizedMessage, self.on_image, lane="search")]

    def on_image(self, msg: NormalizedImage | ProductSync | IndexCommand) -> list[Emit]:
        if isinstance(msg, ProductSync | IndexCommand):
            return [Emit(IMAGES_DETECTED, msg)]  # passes through, keeping its place behind the images
        # A query photo from a producer of the previous release, on images.normalized, goes on
        # to search.detected too: that is where embed's search lane reads.
        out = SEARCH_DETECTED if msg.intent == "query" else IMAGES_DETECTED
        self.counters["images"] += 1
        if msg.box is not None:
            objects = [DetectedObject(box=msg.box, label="selection", score=1.0)]
            self.counters["user_boxes"] += 1
        elif isinstance(self.detector, WholeImageDetector):
            # Detection is off: the whole image is the object. Nothing to decode here;
            # embed decodes it (and dead-letters it if it cannot).
            objects = [whole_image_object(msg.width, msg.height)]
        else:
            try:
                image = open_jpeg(msg.jpeg_bytes())
            except Exception as e:  # ingest wrote it, so this is corruption in transit
                raise PoisonMessage(f"normalised image cannot be decoded: {e}") from None
            with self._detecting:
                found = self.detector.detect(image)
            objects = found + [whole_image_object(msg.width, msg.height)]
            self.counters["objects"] += len(objects) - 1
        return [Emit(out, DetectedImage(**msg.model_dump(), objects=objects))]
