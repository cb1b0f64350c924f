"""End-to-end timings on the embedded stack: index N catalogue events, then photo searches.

    python bench/pipeline.py --products 100 --photos 4 --searches 20 [--resend 2]

Prints one JSON object: time from the first publish until embed has reported every event
applied (``Client.index``, what ``lookalike index`` waits for), points stored, and search
latency (publish -> result received, through ingest, detect, embed and query) as median /
p95 / max over sequential searches. ``--resend N`` then publishes the same catalogue N more
times (a nightly full feed with nothing new) and adds the time each took to be closed.
``--baseline`` then times standalone batched embedding of the same photos with the stack
stopped, and their ratio (``index_vs_embed``). ``--filler N`` adds N synthetic points of other
products to the collection after indexing (and builds their index) before the searches, so that
searches run against a store of catalogue scale. ``--stages`` adds where the searches' time went:
each function's span and each Kafka hop, at the median and for the slowest searches (bench/spans.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `python bench/pipeline.py` finds the bench package

from bench import embed as embed_bench  # noqa: E402
from bench import spans as spans_bench  # noqa: E402
from lookalike.client import Client, read_catalog  # noqa: E402
from lookalike.sample_catalog import generate  # noqa: E402
from lookalike.shared.config import Settings  # noqa: E402
from lookalike.shared.images import normalize  # noqa: E402
from lookalike.shared.limits import IMAGE_MAX_SIDE, MAX_IMAGE_PIXELS  # noqa: E402
from lookalike.shared.logs import setup_logging  # noqa: E402
from lookalike.shared.stores import PointRecord  # noqa: E402
from lookalike.stack import Stack  # noqa: E402


def vector_centres(rng: np.random.Generator, dim: int, non_negative: bool = True, clusters: int = 2000) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    return np.maximum(centres, 0) if non_negative else centres


def clustered_vectors(rng: np.random.Generator, centres: np.ndarray, n: int, non_negative: bool = True) -> np.ndarray:
    """``n`` vectors around ``centres``; non-negative ones are like pooled CNN features (ReLU). Random
    Gaussian vectors have no neighbours and are the worst case of an HNSW graph, not a catalogue."""
    picked = centres[rng.integers(0, len(centres), n)]
    vectors = picked + 0.3 * rng.standard_normal(picked.shape, dtype=np.float32)
    return np.maximum(vectors, 0) if non_negative else vectors


def add_filler(store, collection: str, template: dict, points: int, dim: int) -> float:
    """``points`` synthetic points of other products (4 a product, a real point's payload without
    its thumbnail), then the index build: the seconds it took.

    Their vectors are clustered but signed, so they sit far from the catalogue's non-negative CNN
    features: the searches pay for a store of this size, and their top-1 still says whether the
    right catalogue product was found (non-negative filler outranked it in 12 of 20 searches)."""
    rng = np.random.default_rng(0)
    centres = vector_centres(rng, dim, non_negative=False)
    payload = {k: v for k, v in template.items() if k != "point_id"} | {"thumbnail": ""}
    t0 = time.perf_counter()
    for start in range(0, points, 1000):
        batch = clustered_vectors(rng, centres, min(1000, points - start), non_negative=False)
        store.upsert(collection, [
            PointRecord(id=str(uuid.UUID(int=k + 1)), vector=v,
                        payload={**payload, "product_id": f"filler-{k // 4}", "image_id": f"filler-{k}"})
            for k, v in enumerate(batch, start)])
    store.optimize(collection)
    return time.perf_counter() - t0


def catalogue_photos(events: list) -> list[bytes]:
    """The catalogue's photos as ingest passes them on to embed (normalised JPEG bytes)."""
    return [normalize(base64.b64decode(ref.data), IMAGE_MAX_SIDE, MAX_IMAGE_PIXELS)[0]
            for event in events for ref in event.images]


def run(products: int = 100, photos: int = 4, searches: int = 20, model: str = "efficientnet_lite0",
        precision: str = "auto", detect: str = "none", resend: int = 0, baseline: bool = False,
        filler: int = 0, stages: bool = False) -> dict:
    """Index a generated catalogue through the embedded stack, then time sequential photo searches.

    ``baseline``: also time standalone batched embedding of the same photos (``standalone_img_per_s``)
    and divide (``index_vs_embed``). ``stages``: each search's stages from its spans (bench/spans.py)."""
    recorder = spans_bench.SpanRecorder() if stages else None
    with tempfile.TemporaryDirectory() as tmp:
        sample = generate(Path(tmp) / "sample", n_products=products, photos_per_product=photos)
        events = read_catalog(sample.catalog_path)
        settings = Settings(LOOKALIKE_DATA_DIR=str(Path(tmp) / "data"), embed_model=model,
                            embed_precision=precision, detect_weights=detect)
        started = time.monotonic()
        with Stack(settings) as stack:
            start_s = time.monotonic() - started  # the broker, the models (a CUDA warm-up included), the joins
            precision = stack.resources.embedder.precision  # what auto picked
            device = stack.resources.embedder.device  # the baseline runs where embed ran
            compiled = "on" if stack.resources.embedder.compile_s is not None else "off"  # and so
            client = Client(stack.bootstrap_servers)
            # `lookalike index`'s way: publish, then follow embed's reports until every event is applied.
            report = client.index(events)
            index_s = report.seconds
            if report.finished != len(events) or report.failed:
                raise RuntimeError(f"the catalogue did not index cleanly: {report.summary()}")
            store, collection = stack.resources.store, stack.resources.collection
            points = store.count(collection)
            resend_s = [round(client.index(read_catalog(sample.catalog_path)).seconds, 2) for _ in range(resend)]
            if filler:
                template = store.product_payloads(collection, events[0].product_id)[0]
                filler_s = add_filler(store, collection, template, filler, stack.resources.embedder.spec.dim)
                # The vectors are memory-mapped: the first searches after a build fault their pages in, which
                # serving traffic has long done (the harness's search figures warm likewise). Warm with the
                # catalogue's own vectors, the region of the index the searches below visit.
                for vectors in store.product_vectors(collection, [e.product_id for e in events]).values():
                    for vector in vectors:
                        store.search(collection, vector, 50)

            latencies, correct, wall = [], 0, []
            for i in range(searches):
                photo, product_id = sample.queries[i % len(sample.queries)]
                sent, t0 = time.time_ns(), time.monotonic()
                result = client.search(photo.read_bytes(), top_k=10)
                latencies.append((time.monotonic() - t0) * 1000)
                wall.append((sent, time.time_ns()))
                found = result.objects[-1].products
                correct += bool(found) and found[0].product_id == product_id
            client.close()
        # The denominator of e2e.index_vs_embed: the same photos, as ingest leaves them, through
        # the same model and precision standalone (measured with the stack stopped).
        standalone = (embed_bench.batched_img_per_s(model, catalogue_photos(events), precision, device, compiled)
                      if baseline else None)

    latencies.sort()
    n_photos = sum(len(e.images) for e in events)
    return {
        "events": len(events), "photos": n_photos, "points": points,
        **({"filler_points": filler, "filler_seconds": round(filler_s, 1)} if filler else {}),
        "model": model, "precision": precision, "detect": detect, "stack_start_s": round(start_s, 1),
        "index_seconds": round(index_s, 2), "events_per_second": round(len(events) / index_s, 1),
        "photos_per_second": round(n_photos / index_s, 1),
        "search_ms_median": round(statistics.median(latencies), 1),
        "search_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "search_ms_max": round(latencies[-1], 1),
        "searches": len(latencies), "top1_correct": correct,
        **({"resend_seconds": resend_s} if resend else {}),
        **(spans_bench.breakdown(recorder, wall) if recorder else {}),
        **({"standalone_img_per_s": round(standalone, 1),
            "index_vs_embed": round(n_photos / index_s / standalone, 2)} if baseline else {}),
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
    parser.add_argument("--filler", type=int, default=0,
                        help="synthetic points of other products added before the searches (e.g. 100000)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time standalone embedding of the same photos, and the ratio (index_vs_embed)")
    parser.add_argument("--stages", action="store_true",
                        help="also report each function's and each hop's share of the searches (from their spans)")
    args = parser.parse_args()
    setup_logging("WARNING")
    print(json.dumps(run(args.products, args.photos, args.searches, args.model, args.precision, args.detect,
                         args.resend, args.baseline, args.filler, args.stages)))


if __name__ == "__main__":
    main()
