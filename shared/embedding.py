"""The embedder as the functions see it: which model it is, and images in, vectors out.

The concrete embedders (shared/embedders.py) need torch; the embed handler needs only
this protocol, so it imports no ML framework and tests can hand it any object of this shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image


class ModelInfo(Protocol):
    id: str  # the registry id; also names the model's collection
    dim: int


class Embedder(Protocol):
    spec: ModelInfo

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One L2-normalised float32 row per image."""
        ...
