"""Vector stores: one interface (:class:`VectorStore`), two adapters.

``EdgeStore`` embeds Qdrant Edge in this process (files under ``data_dir``);
``QdrantClientStore`` talks to a Qdrant server (or qdrant-client's ``":memory:"``).
Each adapter loads its engine's library when first named, so code that only writes through
the interface (the embed handler, a GPU benchmark) needs neither installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from lookalike.shared.stores.base import CollectionSpec, Hit, PointRecord, VectorStore

if TYPE_CHECKING:
    from lookalike.shared.stores.client import QdrantClientStore
    from lookalike.shared.stores.edge import EdgeStore


def __getattr__(name: str) -> Any:
    if name == "QdrantClientStore":
        from lookalike.shared.stores.client import QdrantClientStore

        return QdrantClientStore
    if name == "EdgeStore":
        from lookalike.shared.stores.edge import EdgeStore

        return EdgeStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(qdrant_url: str | None, data_dir: Path, api_key: SecretStr | str | None = None,
               **server_options: Any) -> VectorStore:
    """A Qdrant server store when ``qdrant_url`` is set (``":memory:"`` allowed; ``https://`` for TLS),
    else Qdrant Edge under ``data_dir / "qdrant-edge"``. ``server_options``: ``QdrantClientStore``'s
    collection layout (``Settings.qdrant_options()``), for a server only."""
    if qdrant_url:
        from lookalike.shared.stores.client import QdrantClientStore

        if isinstance(api_key, SecretStr):
            api_key = api_key.get_secret_value()
        return QdrantClientStore(qdrant_url, api_key=api_key, **server_options)
    from lookalike.shared.stores.edge import EdgeStore

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
