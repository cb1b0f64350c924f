"""Build a Qdrant Edge shard's HNSW index and quantization in a process of its own.

    python -m lookalike.shared.stores.edge_build SHARD_DIR

``EdgeStore.optimize`` runs this on a copy of a collection's shard: Qdrant Edge holds the
GIL while it optimizes, so building in the serving process would freeze every thread of
it for as long as the build takes. The shard's persisted config (written by the store)
says what to build. Exit status 0 means the shard is optimized, flushed and closed.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import os

    import qdrant_edge as qe

    # The serving process comes first when the cores are busy: a build that takes longer
    # costs nothing, a serving process starved of CPU stalls searches and heartbeats.
    os.nice(10)
    t0 = time.monotonic()
    shard = qe.EdgeShard.load(sys.argv[1])
    shard.optimize()
    shard.close()
    print(f"built {sys.argv[1]} in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
