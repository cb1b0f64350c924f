"""Retrieval quality: Recall@K and mAP@10 of catalogue-to-photo search.

    lookalike eval --gallery G.csv --queries Q.csv [--model ID] [--precision auto|fp32|bf16|int8]
                   [--mode direct|pipeline] [--detect WEIGHTS|none] [--json]

CSV files have a header and columns ``path,label``. Every gallery image is indexed as
an image of the product named by its label (one product per label); every query photo
is searched and the result is read as a ranking of **distinct products** (hits are
collapsed to one entry per product, best hit wins, as the query function does).

* ``recall@K``: fraction of queries whose label is among the top-K products.
* ``map@10``: mean average precision over the top 10 products. With exactly one relevant
  product per query this equals MRR truncated at 10 (1/rank of the right product, 0 when
  it is not in the top 10).
* A query whose label has no gallery image still counts (as a miss).

Modes:

* ``direct``: in-process. Images are embedded with ``load_embedder(model, precision)``
  and ranked by exact cosine similarity (numpy; per product the best gallery image), which
  is what an exact vector search followed by the query function's collapse returns. With
  ``--detect WEIGHTS`` every image (gallery and query) is replaced by its most confident
  detection crop (product labels only, as in the pipeline), or kept whole when nothing
  is detected.
* ``pipeline``: through the real stack (Tansu, ingest/detect/embed/query, Qdrant Edge) in a
  temporary data dir. Gallery images are published as ``CatalogUpsert`` events, one per
  label (a label with more images than an event may carry is split into ``label#2``,
  ``label#3``..., which count as the label when scoring). Each query goes through
  ``Client.search``; the products of all its searched objects (detections + whole image)
  are merged by best score into one ranking; listings the query function merged into one
  entry (``MERGE_THRESHOLD``) share that entry's score.
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.shared.limits import MAX_IMAGES_PER_EVENT

log = logging.getLogger("lookalike.evaluation")

KS = (1, 5, 10)
SPLIT_MARK = "#"  # label#2: the second event of one label in pipeline mode


def read_labelled_csv(path: str | Path) -> list[tuple[Path, str]]:
    """Rows of a ``path,label`` CSV (header required); relative paths are relative to the CSV."""
    path = Path(path)
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= {h.strip() for h in reader.fieldnames}:
            raise ValueError(f"{path}: expected a header with columns path,label, got {reader.fieldnames}")
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row["path"]:
                continue
            p = Path(row["path"]).expanduser()
            if not p.is_absolute():
                p = path.parent / p
            rows.append((p, row["label"]))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------- metrics


def ranking_metrics(rankings: Sequence[Sequence[str]], truth: Sequence[str], k_max: int = 10) -> dict:
    """Recall@1/5/10 and mAP@10 from per-query rankings of distinct products (best first)."""
    n = len(truth)
    hits = {k: 0 for k in KS}
    ap = 0.0
    for ranking, label in zip(rankings, truth, strict=True):
        top = list(dict.fromkeys(ranking))[:k_max]  # distinct, in order
        if label in top:
            rank = top.index(label) + 1
            ap += 1.0 / rank
            for k in KS:
                hits[k] += rank <= k
    out = {f"recall@{k}": hits[k] / n if n else 0.0 for k in KS}
    out["map@10"] = ap / n if n else 0.0
    out["queries"] = n
    return out


def product_rankings(gallery: np.ndarray, gallery_labels: Sequence[str], queries: np.ndarray,
                     k: int = 10, exclude_self: bool = False) -> list[list[str]]:
    """Top-k distinct products per query: cosine (rows are unit norm), best gallery image per product."""
    products = sorted(set(gallery_labels))
    col = {p: i for i, p in enumerate(products)}
    g_idx = np.array([col[lab] for lab in gallery_labels])
    sims = queries.astype(np.float32) @ gallery.astype(np.float32).T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    per_product = np.full((len(queries), len(products)), -np.inf, dtype=np.float32)
    for j in range(len(products)):
        cols = sims[:, g_idx == j]
        if cols.shape[1]:
            per_product[:, j] = cols.max(axis=1)
    order = np.argsort(-per_product, axis=1, kind="stable")[:, :k]
    return [[products[j] for j in row if np.isfinite(per_product[i, j])] for i, row in enumerate(order)]


def retrieval_metrics(gallery: np.ndarray, gallery_labels: Sequence[str], queries: np.ndarray,
                      query_labels: Sequence[str], exclude_self: bool = False) -> dict:
    rankings = product_rankings(gallery, gallery_labels, queries, exclude_self=exclude_self)
    return ranking_metrics(rankings, query_labels)


# --------------------------------------------------------------------------- direct mode


def _load_images(paths: Sequence[Path]):
    from PIL import Image, ImageOps

    for p in paths:
        with Image.open(p) as im:
            yield ImageOps.exif_transpose(im).convert("RGB")


def top_boxes(paths: Sequence[Path], detector) -> list[tuple[int, int, int, int] | None]:
    """The most confident product detection of each image (pixels), None when nothing is detected."""
    out = []
    for im in _load_images(paths):
        objects = detector.detect(im)
        b = objects[0].box if objects else None
        out.append((int(b.x1), int(b.y1), int(round(b.x2)), int(round(b.y2))) if b is not None else None)
    return out


def embed_paths(embedder, paths: Sequence[Path], boxes: Sequence | None = None, chunk: int = 64) -> np.ndarray:
    """Embeddings of the images (of their ``boxes`` crops where given)."""
    rows = []
    for s in range(0, len(paths), chunk):
        images = list(_load_images(paths[s : s + chunk]))
        if boxes is not None:
            images = [im.crop(b) if b is not None else im for im, b in zip(images, boxes[s : s + chunk], strict=True)]
        rows.append(embedder.embed(images))
    return np.concatenate(rows) if rows else np.zeros((0, embedder.dim), np.float32)


def embed_labelled(gallery: Sequence[tuple[Path, str]], queries: Sequence[tuple[Path, str]],
                   model_id: str = "efficientnet_lite0", precision: str = "fp32", detect_weights: str = "none",
                   embedder=None, detector=None) -> tuple[Any, np.ndarray, np.ndarray]:
    """(embedder, gallery vectors, query vectors) as direct mode computes them (``eval``, ``calibrate``)."""
    from lookalike.shared.embedders import load_embedder

    if embedder is None:
        embedder = load_embedder(model_id, device="cpu", precision=precision)
    if detector is None and detect_weights.strip().lower() != "none":
        from lookalike.shared.detector import load_detector

        detector = load_detector(detect_weights)
    g_paths, q_paths = [p for p, _ in gallery], [p for p, _ in queries]
    g = embed_paths(embedder, g_paths, top_boxes(g_paths, detector) if detector is not None else None)
    q = embed_paths(embedder, q_paths, top_boxes(q_paths, detector) if detector is not None else None)
    return embedder, g, q


def evaluate_direct(gallery: Sequence[tuple[Path, str]], queries: Sequence[tuple[Path, str]],
                    model_id: str = "efficientnet_lite0", precision: str = "fp32",
                    detect_weights: str = "none", embedder=None, detector=None) -> dict:
    """Embed in-process and rank by exact cosine; see the module docstring."""
    t0 = time.monotonic()
    embedder, g, q = embed_labelled(gallery, queries, model_id, precision, detect_weights, embedder, detector)
    result = retrieval_metrics(g, [lab for _, lab in gallery], q, [lab for _, lab in queries])
    result.update(model=embedder.spec.id,
                  mode="direct", precision=embedder.precision, detect=detect_weights,
                  gallery=len(gallery), products=len({lab for _, lab in gallery}),
                  seconds=round(time.monotonic() - t0, 1))
    return result


# --------------------------------------------------------------------------- pipeline mode


def gallery_events(gallery: Sequence[tuple[Path, str]], max_images: int):
    """One CatalogUpsert per label (chunks of ``max_images`` become label#2, label#3...)."""
    import base64

    from lookalike.shared.messages import CatalogUpsert

    by_label: dict[str, list[Path]] = {}
    for p, lab in gallery:
        by_label.setdefault(lab, []).append(p)
    events = []
    for lab, paths in by_label.items():
        for n, s in enumerate(range(0, len(paths), max_images)):
            pid = lab if n == 0 else f"{lab}{SPLIT_MARK}{n + 1}"
            images = [{"data": base64.b64encode(p.read_bytes()).decode()} for p in paths[s : s + max_images]]
            events.append(CatalogUpsert.model_validate({"product_id": pid, "title": lab, "images": images}))
    return events


def evaluate_pipeline(gallery: Sequence[tuple[Path, str]], queries: Sequence[tuple[Path, str]],
                      model_id: str = "efficientnet_lite0", precision: str = "fp32",
                      detect_weights: str = "none", timeout_s: float = 3600.0) -> dict:
    """Index the gallery through the real topics and functions, then search every query."""
    import tempfile

    from lookalike.client import Client
    from lookalike.shared.config import Settings
    from lookalike.shared.messages import CATALOG_EVENTS
    from lookalike.stack import Stack

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        # A fresh embedded broker and store of its own, whatever the environment points at.
        settings = Settings(LOOKALIKE_DATA_DIR=tmp, embed_model=model_id, embed_precision=precision,
                            detect_weights=detect_weights, embed_device="cpu", kafka_bootstrap_servers=None,
                            qdrant_url=None)
        with Stack(settings) as stack:
            client = Client(stack.bootstrap_servers)
            try:
                events = gallery_events(gallery, MAX_IMAGES_PER_EVENT)
                client.publish(CATALOG_EVENTS, events)
                client.wait_indexed(timeout_s)
                points = stack.resources.store.count(stack.resources.collection)
                index_s = time.monotonic() - t0
                # A label split into n products can fill n places of a top-10 list: ask for
                # n x 10 products so that 10 distinct labels can be ranked.
                splits = max(collections.Counter(e.product_id.split(SPLIT_MARK)[0] for e in events).values())
                top_k = min(100, 10 * splits)
                rankings = []
                for p, _ in queries:
                    result = client.search(p.read_bytes(), top_k=top_k, timeout_s=120)
                    best: dict[str, float] = {}
                    for obj in result.objects:
                        for prod in obj.products:
                            # Listings merged into one entry (MERGE_THRESHOLD) share its rank.
                            for pid in (prod.product_id, *prod.merged_product_ids):
                                lab = pid.split(SPLIT_MARK)[0]
                                best[lab] = max(best.get(lab, -np.inf), float(prod.score))
                    rankings.append(sorted(best, key=lambda k: -best[k]))
                model = stack.resources.model_id
            finally:
                client.close()
    result = ranking_metrics(rankings, [lab for _, lab in queries])
    result.update(model=model, mode="pipeline", precision=precision, detect=detect_weights,
                  gallery=len(gallery), products=len({lab for _, lab in gallery}), points=points,
                  index_seconds=round(index_s, 1), seconds=round(time.monotonic() - t0, 1))
    return result


def evaluate(gallery_csv: str | Path, queries_csv: str | Path, model_id: str = "efficientnet_lite0",
             mode: str = "direct", precision: str = "fp32", detect_weights: str = "none") -> dict:
    gallery, queries = read_labelled_csv(gallery_csv), read_labelled_csv(queries_csv)
    if mode == "direct":
        return evaluate_direct(gallery, queries, model_id, precision, detect_weights)
    if mode == "pipeline":
        return evaluate_pipeline(gallery, queries, model_id, precision, detect_weights)
    raise ValueError(f"mode must be direct or pipeline, not {mode!r}")


def format_result(r: dict) -> str:
    return (f"model {r['model']} ({r['precision']}), mode {r['mode']}, detect {r['detect']}: "
            f"{r['queries']} queries vs {r['gallery']} gallery images ({r['products']} products)\n"
            f"Recall@1 {r['recall@1']:.3f}  Recall@5 {r['recall@5']:.3f}  Recall@10 {r['recall@10']:.3f}  "
            f"mAP@10 {r['map@10']:.3f}  ({r['seconds']} s)")


def json_line(r: dict) -> str:
    return json.dumps(r, sort_keys=True)
