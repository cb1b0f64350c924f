"""How search and indexing grow with the collection: a table and a PNG plot.

    python -m bench.growth --points 1000 10000 50000 100000 [--png docs/growth.png]

For each size, a fresh Qdrant Edge store gets that many 1280-d points (synthetic, clustered
like CNN features) through ``EdgeStore.upsert`` with its background index builds on, then one
last build; then 50 grouped searches. Printed per size: points written per second, seconds
until everything is indexed, search p50/p95, the longest pause of a 10 ms heartbeat thread
through it all, the serving process's resident memory and the store's size on disk.
Ends with one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.__main__ import search_at_scale

COLUMNS = [("search.points", "points"), ("search.write_points_per_s", "written/s"),
           ("search.indexed_in_s", "indexed in s"), ("search.edge_p50_ms", "p50 ms"), ("search.edge_p95_ms", "p95 ms"),
           ("search.max_stall_ms", "max stall ms"), ("search.rss_mb", "RSS MB"), ("search.disk_mb", "disk MB")]


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r["search.points"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(points, [r["search.edge_p50_ms"] for r in rows], "o-", label="search p50")
    left.plot(points, [r["search.edge_p95_ms"] for r in rows], "o--", label="search p95")
    left.plot(points, [r["search.max_stall_ms"] / 100 for r in rows], "s:", label="longest stall / 100")
    left.set_xscale("log")
    left.set_xlabel("points (1280-d)")
    left.set_ylabel("ms")
    left.legend()
    left.set_title("search latency and stalls")
    right.plot(points, [r["search.rss_mb"] for r in rows], "o-", label="RSS MB (serving process)")
    right.plot(points, [r["search.disk_mb"] for r in rows], "o--", label="disk MB")
    right.plot(points, [r["search.indexed_in_s"] for r in rows], "s:", label="written + indexed, s")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("points (1280-d)")
    right.legend()
    right.set_title("memory, disk, time to index")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[1000, 10_000, 50_000, 100_000])
    parser.add_argument("--png", type=Path, help="write the plot here")
    args = parser.parse_args()
    rows = []
    print("| " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for n in args.points:
        row = search_at_scale(n)
        rows.append(row)
        print("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |", flush=True)
    if args.png:
        plot(rows, args.png)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
