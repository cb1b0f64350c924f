"""The embedder as the functions see it: which model it is, and images in, vectors out.

The concrete embedders (shared/embedders.py) need torch; the embed handler needs only
this protocol, so it imports no ML framework and tests can hand it any object of this shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from lookalike.shared.images import crop, open_jpeg, thumbnail
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


def embed_jobs_with_pil(embed: Callable[[Sequence[Image.Image]], np.ndarray],
                        jobs: Sequence[ImageJob]) -> list[Embedded | Exception]:
    """The plain way to run jobs: decode each with PIL, crop its boxes, embed every crop in one call.

    For embedders that have no faster path of their own (test doubles); the real ones
    decode in a worker thread or on the GPU (shared/embedders.py).
    """
    results: list[Embedded | Exception] = []
    crops, owners = [], []
    for i, job in enumerate(jobs):
        try:
            image = open_jpeg(job.jpeg)
        except Exception as e:  # noqa: BLE001 - the job's own failure, reported per job
            results.append(e)
            continue
        results.append(Embedded(np.empty((0, 0), np.float32),
                                thumbnail(image, job.thumbnail_side) if job.thumbnail_side else None))
        for box in job.boxes:
            crops.append(crop(image, box))
            owners.append(i)
    rows = embed(crops) if crops else np.empty((0, 0), np.float32)
    for i, result in enumerate(results):
        if isinstance(result, Embedded):
            result.vectors = rows[[k for k, owner in enumerate(owners) if owner == i]]
    return results
