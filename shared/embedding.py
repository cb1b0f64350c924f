"""The embedder as the functions see it: which model it is, and images in, vectors out.

The concrete embedders (shared/embedders.py) need torch; the embed handler needs only
this protocol, so it imports no ML framework and tests can hand it any object of this shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from lookalike.shared.messages import Box


class ModelInfo(Protocol):
    id: str  # the registry id; also names the model's collection
    dim: int


@dataclass(frozen=True)
class ImageJob:
    """One stored JPEG (as ingest wrote it) and what embed needs of it."""

    jpeg: bytes
    boxes: Sequence[Box]  # the regions to embed, in the image's pixel coordinates
    thumbnail_side: int = 0  # > 0: also a JPEG thumbnail whose longest side is this


@dataclass
class Embedded:
    """What came of one ImageJob: one L2-normalised row per box, and the thumbnail if asked."""

    vectors: np.ndarray  # (len(boxes), dim) float32
    thumbnail: bytes | None = None


class Embedder(Protocol):
    spec: ModelInfo

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One L2-normalised float32 row per image."""
        ...

    def embed_jobs(self, jobs: Sequence[ImageJob]) -> list[Embedded | Exception]:
        """One result per job, in order; a job whose JPEG cannot be decoded gets the exception instead."""
        ...

