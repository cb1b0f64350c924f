"""Direct-mode baselines on grocery-dev for docs/quality.md (appends JSON lines to bench/results.jsonl).

    python bench/baselines.py [--models efficientnet_lite0 resnet50 resnet18 DIR...] [--precisions fp32 bf16]
                              [--detect none yolo]

Same code path as ``lookalike eval --mode direct`` (lookalike.evaluation), but each image set
(train, val, iconic) is embedded once per (model, precision, detection) and scored against
both galleries, and detection boxes are computed once and reused across models and
precisions. Each row records the equivalent ``lookalike eval`` command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from lookalike.evaluation import embed_paths, read_labelled_csv, retrieval_metrics, top_boxes  # noqa: E402

CSV = ROOT / "bench" / "grocery"
DET = ROOT.parent / "shared" / "models" / "yolov8n-coco" / "yolov8n_int8.tflite"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50", "resnet18"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--detect", nargs="+", default=["none", "yolo"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.jsonl"))
    a = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("baselines")
    sets = {name: read_labelled_csv(CSV / f"{name}.csv") for name in ("train", "val", "iconic")}
    boxes: dict[str, list] = {}
    if "yolo" in a.detect:
        from lookalike.shared.detector import load_detector

        cache = ROOT / "bench" / "logs" / "boxes.json"  # top boxes per image: detection is model-independent
        t0 = time.monotonic()
        if cache.is_file():
            boxes = {n: [tuple(b) if b else None for b in bx] for n, bx in json.loads(cache.read_text()).items()}
        else:
            det = load_detector(str(DET))
            for name, rows in sets.items():
                boxes[name] = top_boxes([p for p, _ in rows], det)
            cache.parent.mkdir(exist_ok=True)
            cache.write_text(json.dumps(boxes))
        log.info("detection boxes for %d images in %.0f s", sum(map(len, sets.values())), time.monotonic() - t0)
        found = {n: sum(b is not None for b in bx) / len(bx) for n, bx in boxes.items()}
        log.info("share of images with a product detection: %s", found)
        (ROOT / "bench" / "logs").mkdir(exist_ok=True)
        (ROOT / "bench" / "logs" / "detections.json").write_text(json.dumps({"share_detected": found}))

    from lookalike.shared.embedders import load_embedder

    out = open(a.out, "a")
    for model in a.models:
        for prec in a.precisions:
            base_cmd = f"lookalike eval --queries bench/grocery/val.csv --model {model} --precision {prec}"
            try:
                emb = load_embedder(model, device="cpu", precision=prec)
            except Exception as exc:  # weights not available offline
                for det in a.detect:
                    for gallery in ("train", "iconic"):
                        d = "none" if det == "none" else DET
                        row = {"command": f"{base_cmd} --gallery bench/grocery/{gallery}.csv --detect {d} --json",
                               "model": model, "precision": prec, "detect": det, "gallery_set": gallery,
                               "error": f"{type(exc).__name__}: {exc}"[:300]}
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                log.info("%s %s: %s", model, prec, exc)
                continue
            for det in a.detect:
                t0 = time.monotonic()
                vecs = {n: embed_paths(emb, [p for p, _ in rows], boxes.get(n) if det == "yolo" else None)
                        for n, rows in sets.items()}
                secs = time.monotonic() - t0
                for gallery in ("train", "iconic"):
                    r = retrieval_metrics(vecs[gallery], [lab for _, lab in sets[gallery]],
                                          vecs["val"], [lab for _, lab in sets["val"]])
                    d = "none" if det == "none" else DET
                    r.update(command=f"{base_cmd} --gallery bench/grocery/{gallery}.csv --detect {d} --json",
                             model=emb.spec.id, mode="direct", precision=prec, detect=det, gallery_set=gallery,
                             gallery=len(sets[gallery]), embed_seconds_all_sets=round(secs, 1))
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                    log.info("%s %s detect=%s gallery=%s: R@1 %.3f R@5 %.3f R@10 %.3f mAP@10 %.3f", emb.spec.id,
                             prec, det, gallery, r["recall@1"], r["recall@5"], r["recall@10"], r["map@10"])


if __name__ == "__main__":
    main()
