"""One benchmark run of every stage, ending with one JSON line: ``python -m bench --json`` (``make bench``).

- embed.*: bench/embed.py (naive loop, batched path, model alone, peak fraction, bf16 cosine);
- detect.ms_per_image: the team's COCO YOLOv8n TFLite on 640 px photos (skipped without ../shared);
- search.*: grouped product search in a Qdrant Edge store of ``--points`` 1280-d points
  (synthetic clustered vectors) once they are indexed, and the longest pause a 10 ms
  heartbeat thread saw while those points were written and indexed (Qdrant Edge holds the
  GIL while it works: that pause stalls Kafka heartbeats too);
- e2e.*: bench/pipeline.py through the embedded stack (Tansu, four functions, Qdrant Edge);
  e2e.index_vs_embed divides its index rate by standalone batched embedding of the same photos
  (e2e.embed_img_per_s: the sample catalogue's renders, cheaper to decode than the synthetic
  640x480 JPEGs of embed.*), same model and precision, timed with the stack stopped.

Every ratio is computed within the run. Sized to finish in about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from bench import embed as embed_bench
from bench import pipeline as pipeline_bench

TEAM = Path(__file__).resolve().parents[1].parent / "shared"
DETECTOR = TEAM / "models" / "yolov8n-coco" / "yolov8n_int8.tflite"


def detect_ms_per_image(n: int = 20) -> float | None:
    if not DETECTOR.is_file():
        return None
    from lookalike.shared.detector import load_detector
    from lookalike.shared.images import open_jpeg

    detector = load_detector(str(DETECTOR))
    images = [open_jpeg(raw) for raw in embed_bench.photos(n)]
    detector.detect(images[0])
    t0 = time.perf_counter()
    for im in images:
        detector.detect(im)
    return round((time.perf_counter() - t0) * 1000 / n, 1)


def search_at_scale(points: int, dim: int = 1280, queries: int = 200) -> dict:
    """p50 of a grouped product search over ``points`` indexed points, and the longest stall of
    the process while they were written and indexed (background builds, then a last build)."""
    from lookalike.shared.stores import CollectionSpec, EdgeStore, PointRecord

    rng = np.random.default_rng(0)
    centres = pipeline_bench.vector_centres(rng, dim)
    stall = {"max": 0.0}
    done = threading.Event()

    def heartbeat() -> None:  # what a Kafka heartbeat thread experiences
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.01)
            now = time.perf_counter()
            stall["max"] = max(stall["max"], now - last - 0.01)
            last = now

    def vectors(n: int) -> np.ndarray:
        return pipeline_bench.clustered_vectors(rng, centres, n)

    with tempfile.TemporaryDirectory() as tmp:
        store = EdgeStore(Path(tmp))
        store.ensure_collection(CollectionSpec("bench", dim))
        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        t0 = time.perf_counter()
        for start in range(0, points, 1000):
            batch = vectors(min(1000, points - start))
            store.upsert("bench", [PointRecord(id=str(uuid.UUID(int=start + i + 1)), vector=v,
                                               payload={"product_id": f"p{(start + i) // 4}", "image_id": "x"})
                                   for i, v in enumerate(batch)])
        write_s = time.perf_counter() - t0
        store.optimize("bench")  # the last build, for what the background builds had not reached
        index_s = time.perf_counter() - t0
        done.set()
        beat.join()
        # Steady state: the float vectors are memory-mapped (Memory.Cold), so the first
        # searches after a swap fault their pages in; warm them as serving traffic would.
        for q in vectors(queries):
            store.search("bench", q, limit=50)
        latencies = []
        for q in vectors(queries):
            t = time.perf_counter()
            store.search("bench", q, limit=50)  # top_k 10 x SEARCH_OVERSAMPLE 5, collapsed per product
            latencies.append((time.perf_counter() - t) * 1000)
        unindexed = store.unindexed("bench")
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        rss = rss_mb()
        store.close()
    latencies.sort()
    return {"search.points": points, "search.edge_p50_ms": round(statistics.median(latencies), 2),
            "search.edge_p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
            "search.max_stall_ms": round(stall["max"] * 1000, 1), "search.write_points_per_s": round(points / write_s),
            "search.indexed_in_s": round(index_s, 1), "search.unindexed": unindexed,
            "search.disk_mb": round(disk / 2**20), "search.rss_mb": rss}


def rss_mb() -> int:
    """This process's resident memory now (the peak, ru_maxrss, only ever grows)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                        help="auto: what the product picks for this model on this machine")
    parser.add_argument("--images", type=int, default=96, help="photos for the embedding figures")
    parser.add_argument("--points", type=int, default=100_000, help="points for the search figures")
    parser.add_argument("--products", type=int, default=100,
                        help="catalogue events (4 photos each) for the end-to-end figures")
    parser.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = parser.parse_args()
    from lookalike.shared.embedders import REGISTRY, auto_precision
    from lookalike.shared.logs import setup_logging

    setup_logging("WARNING")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision if args.precision != "auto" else auto_precision(
        device, "auto", REGISTRY[args.model], embed_bench.model_for(args.model))
    out: dict = {"device": device, "model": args.model, "precision": precision}
    steps = [
        ("embed", lambda: embed_bench.run(args.model, args.images, precision, 0, device)),
        ("detect", lambda: {"detect.ms_per_image": detect_ms_per_image()}),
        ("search", lambda: search_at_scale(args.points)),
        ("e2e", lambda: pipeline_bench.run(args.products, 4, 20, args.model, precision, baseline=True)),
    ]
    for name, step in steps:
        t0 = time.monotonic()
        result = step()
        if name == "e2e":
            result = {"e2e.index_img_per_s": result["photos_per_second"],
                      "e2e.embed_img_per_s": result["standalone_img_per_s"],
                      "e2e.index_vs_embed": result["index_vs_embed"],
                      "e2e.search_p50_ms": result["search_ms_median"], "e2e.search_p95_ms": result["search_ms_p95"],
                      "e2e.photos": result["photos"], "e2e.stack_start_s": result["stack_start_s"]}
        if name == "embed":
            out["runtime"] = result["runtime"]
            out["embed.warm_up_s"] = result["warm_up_s"]  # the CUDA warm-up at load (None on a CPU)
        out.update({k: v for k, v in result.items() if k.startswith(f"{name}.")})
        if not args.json:
            print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
    out["e2e.rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
