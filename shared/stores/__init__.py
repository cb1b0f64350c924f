"""Vector stores: one interface (:class:`VectorStore`), two adapters.

``EdgeStore`` embeds Qdrant Edge in this process (files under ``data_dir``);
``QdrantClientStore`` talks to a Qdrant server (or qdrant-client's ``":memory:"``).
"""

from __future__ import annotations

from pathlib import Path

from lookalike.shared.stores.base import CollectionSpec, Hit, PointRecord, VectorStore
from lookalike.shared.stores.client import QdrantClientStore
from lookalike.shared.stores.edge import EdgeStore


def open_store(qdrant_url: str | None, data_dir: Path, api_key: str | None = None) -> VectorStore:
    """A Qdrant server store when ``qdrant_url`` is set (``":memory:"`` allowed), else Qdrant Edge
    under ``data_dir / "qdrant-edge"``."""
    if qdrant_url:
        return QdrantClientStore(qdrant_url, api_key=api_key)
    return EdgeStore(Path(data_dir) / "qdrant-edge")


__all__ = [
    "CollectionSpec",
    "EdgeStore",
    "Hit",
    "PointRecord",
    "QdrantClientStore",
    "VectorStore",
    "open_store",
]
