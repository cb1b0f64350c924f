"""End-to-end timings on the embedded stack: index N catalogue events, then photo searches.

    python bench/pipeline.py --products 100 --photos 4 --searches 20 [--resend 2]

Prints one JSON object: time from the first publish until the last event is indexed
(all stages committed), points stored, and search latency (publish -> result received,
through ingest, detect, embed and query) as median / p95 / max over sequential searches.
``--resend N`` then publishes the same catalogue N more times (a nightly full feed with
nothing new) and adds the time each took to be closed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from lookalike.client import Client, read_catalog
from lookalike.sample_catalog import generate
from lookalike.shared.config import Settings
from lookalike.shared.logs import setup_logging
from lookalike.shared.messages import CATALOG_EVENTS
from lookalike.stack import Stack


def run(products: int = 100, photos: int = 4, searches: int = 20, model: str = "efficientnet_lite0",
        precision: str = "auto", detect: str = "none", resend: int = 0) -> dict:
    """Index a generated catalogue through the embedded stack, then time sequential photo searches."""
    with tempfile.TemporaryDirectory() as tmp:
        sample = generate(Path(tmp) / "sample", n_products=products, photos_per_product=photos)
        events = read_catalog(sample.catalog_path)
        settings = Settings(LOOKALIKE_DATA_DIR=str(Path(tmp) / "data"), embed_model=model,
                            embed_precision=precision, detect_weights=detect)
        with Stack(settings) as stack:
            precision = stack.resources.embedder.precision  # what auto picked
            client = Client(stack.bootstrap_servers)
            start = time.monotonic()
            client.publish(CATALOG_EVENTS, events)
            client.wait_indexed(poll_s=0.05)
            index_s = time.monotonic() - start
            points = stack.resources.store.count(stack.resources.collection)
            resend_s = []
            for _ in range(resend):
                t0 = time.monotonic()
                client.publish(CATALOG_EVENTS, read_catalog(sample.catalog_path))
                client.wait_indexed(poll_s=0.05)
                resend_s.append(round(time.monotonic() - t0, 2))

            latencies, correct = [], 0
            for i in range(searches):
                photo, product_id = sample.queries[i % len(sample.queries)]
                t0 = time.monotonic()
                result = client.search(photo.read_bytes(), top_k=10)
                latencies.append((time.monotonic() - t0) * 1000)
                found = result.objects[-1].products
                correct += bool(found) and found[0].product_id == product_id
            client.close()

    latencies.sort()
    n_photos = sum(len(e.images) for e in events)
    return {
        "events": len(events), "photos": n_photos, "points": points,
        "model": model, "precision": precision, "detect": detect,
        "index_seconds": round(index_s, 2), "events_per_second": round(len(events) / index_s, 1),
        "photos_per_second": round(n_photos / index_s, 1),
        "search_ms_median": round(statistics.median(latencies), 1),
        "search_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "search_ms_max": round(latencies[-1], 1),
        "searches": len(latencies), "top1_correct": correct,
        **({"resend_seconds": resend_s} if resend else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--photos", type=int, default=4, help="catalogue photos per product")
    parser.add_argument("--searches", type=int, default=20)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--precision", default="auto", help="auto: what the product picks on this machine")
    parser.add_argument("--detect", default="none")
    parser.add_argument("--resend", type=int, default=0, help="publish the same catalogue this many more times")
    args = parser.parse_args()
    setup_logging("WARNING")
    print(json.dumps(run(args.products, args.photos, args.searches, args.model, args.precision, args.detect,
                         args.resend)))


if __name__ == "__main__":
    main()
