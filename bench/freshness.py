"""Event-to-searchable latency on the embedded stack: price updates, new products, deletes.

    python -m bench.freshness --events 100 [--photos 4] [--detect none]

One event at a time (no queueing behind other events): the clock starts before the event is
published and stops when the store, which every search reads, shows its effect:

- a new product with ``--photos`` photos: every photo has its points and the product's payload;
- a price-only update of an indexed product (same photos, new offers): the new lowest price;
- a delete: no point of the product is left.

The store is polled every 5 ms in the benchmark's process (the embedded stack's own Qdrant
Edge, as the query function reads it). Prints p50/p95/max per kind and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lookalike.client import Client, read_catalog
from lookalike.sample_catalog import generate
from lookalike.shared.config import Settings
from lookalike.shared.logs import setup_logging
from lookalike.shared.messages import CATALOG_EVENTS, CatalogDelete, CatalogUpsert, Offer, new_id
from lookalike.stack import Stack

POLL_S = 0.005
TIMEOUT_S = 60.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(client: Client, event, visible) -> float:
    """Seconds from publishing ``event`` until ``visible()`` holds."""
    start = time.monotonic()
    client.publish(CATALOG_EVENTS, [event])
    while not visible():
        if time.monotonic() - start > TIMEOUT_S:
            raise TimeoutError(f"{event.type} of {event.product_id} not visible after {TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)
    return time.monotonic() - start


def run(events: int = 100, photos: int = 4, detect: str = "none", model: str = "efficientnet_lite0") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sample = generate(Path(tmp) / "sample", n_products=events, photos_per_product=photos, seed=7)
        products: list[CatalogUpsert] = read_catalog(sample.catalog_path)
        settings = Settings(LOOKALIKE_DATA_DIR=str(Path(tmp) / "data"), embed_model=model, detect_weights=detect)
        with Stack(settings) as stack:
            store, collection = stack.resources.store, stack.resources.collection
            client = Client(stack.bootstrap_servers)

            def payloads(pid: str) -> list[dict]:
                return store.product_payloads(collection, pid)

            latency: dict[str, list[float]] = {"new_product": [], "price_update": [], "delete": []}
            for product in products:  # new products, each with its photos
                latency["new_product"].append(timed(client, product, lambda p=product: (
                    len(store.product_image_ids(collection, p.product_id)) == len(p.images)
                    and bool(payloads(p.product_id)))))
            for k, product in enumerate(products):  # price-only updates: same photos, new offers
                offers = [Offer(shop=o.shop, price=round(o.price * 0.9 + 0.01 * (k % 7), 2), currency=o.currency,
                                in_stock=o.in_stock) for o in product.offers]
                update = product.model_copy(update={"event_id": new_id(), "offers": offers})
                lowest = min(o.price for o in offers)
                latency["price_update"].append(timed(client, update, lambda p=product, low=lowest: all(
                    x.get("min_price") == low for x in payloads(p.product_id) or [{}])))
            for product in products:
                latency["delete"].append(timed(client, CatalogDelete(product_id=product.product_id),
                                               lambda p=product: not store.product_image_ids(collection, p.product_id)))
            client.close()
    out: dict = {"events_per_kind": events, "photos_per_product": photos, "detect": detect, "model": model}
    for kind, values in latency.items():
        out[f"{kind}.p50_s"] = round(percentile(values, 0.5), 3)
        out[f"{kind}.p95_s"] = round(percentile(values, 0.95), 3)
        out[f"{kind}.max_s"] = round(max(values), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100, help="events of each kind")
    parser.add_argument("--photos", type=int, default=4, help="photos per new product")
    parser.add_argument("--detect", default="none", help="DETECT_WEIGHTS (none, auto, a local model)")
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()
    setup_logging("WARNING")
    result = run(args.events, args.photos, args.detect, args.model)
    for kind in ("price_update", "new_product", "delete"):
        print(f"{kind:13s} p50 {result[f'{kind}.p50_s']:.3f} s  p95 {result[f'{kind}.p95_s']:.3f} s  "
              f"max {result[f'{kind}.max_s']:.3f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
