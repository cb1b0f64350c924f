"""Searches during a model upgrade: latency before, during and after `lookalike reindex`.

    python -m bench.reindex --products 50 [--photos 4] [--to efficientnet_lite2_rmac]

On the embedded stack (Tansu, the four functions, Qdrant Edge) with ``--from``'s collection
indexed, one shopper thread searches without pause (photo searches through the topics,
one at a time) while the catalogue is rebuilt for ``--to`` and searches switch to it, and
then rolled back. Every answer is checked: answered, the photographed product first.
Prints search latency p50/p95/max per phase, the reindex's own times, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from bench.freshness import percentile
from lookalike.client import Client, read_catalog
from lookalike.reindex import reindex, send
from lookalike.sample_catalog import generate
from lookalike.shared.config import Settings
from lookalike.shared.logs import setup_logging
from lookalike.stack import Stack


def run(products: int = 50, photos: int = 4, source: str = "efficientnet_lite0",
        target: str = "efficientnet_lite2_rmac") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sample = generate(Path(tmp) / "sample", n_products=products, photos_per_product=photos, seed=11)
        settings = Settings(LOOKALIKE_DATA_DIR=str(Path(tmp) / "data"), embed_model=source, detect_weights="none")
        with Stack(settings) as stack:
            client = Client(stack.bootstrap_servers)
            report = client.index(read_catalog(sample.catalog_path), timeout_s=1800)
            assert not report.failed, report.summary()
            queries = [(pid, path.read_bytes()) for path, pid in sample.queries]
            phase = ["before"]
            answers: list[tuple[str, float, str | None, bool]] = []  # phase, seconds, model, right product first
            failures: list[str] = []
            stop = threading.Event()

            def shop() -> None:
                k = 0
                while not stop.is_set():
                    expected, raw = queries[k % len(queries)]
                    k += 1
                    t0 = time.monotonic()
                    try:
                        result = client.search(raw, timeout_s=60)
                    except Exception as e:  # noqa: BLE001 - counted and reported
                        failures.append(repr(e))
                        continue
                    took = time.monotonic() - t0
                    if result.status != "ok":
                        failures.append(result.error or "error")
                        continue
                    first = max((o.products[0] for o in result.objects if o.products), key=lambda p: p.score,
                                default=None)
                    answers.append((phase[0], took, result.model, first is not None and first.product_id == expected))

            shopper = threading.Thread(target=shop, daemon=True)
            shopper.start()
            time.sleep(10)
            phase[0] = "reindex"
            r = reindex(client, settings, target, sample.catalog_path, timeout_s=1800)
            phase[0] = "after switch"
            time.sleep(10)
            t0 = time.monotonic()
            send(client, "rollback", timeout_s=60)
            rollback_s = time.monotonic() - t0
            phase[0] = "after rollback"
            time.sleep(10)
            stop.set()
            shopper.join(timeout=90)
            client.close()
    out = {"products": products, "photos": photos, "from": source, "to": target, "reindex_s": r["seconds"],
           "build_s": r["build_s"], "index_s": r["index_s"], "switch_wait_s": r["switch_wait_s"],
           "rollback_s": round(rollback_s, 2), "failed_searches": len(failures), "failures": failures[:3],
           "wrong_first": sum(1 for a in answers if not a[3])}
    for name in ("before", "reindex", "after switch", "after rollback"):
        took = [a[1] * 1000 for a in answers if a[0] == name]
        models = sorted({a[2] for a in answers if a[0] == name})
        out[name] = {"searches": len(took), "models": models,
                     "wrong_first": sum(1 for a in answers if a[0] == name and not a[3]),
                     "p50_ms": round(percentile(took, 0.5)),
                     "p95_ms": round(percentile(took, 0.95)), "max_ms": round(max(took))} if took else {}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=int, default=50)
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--from", dest="source", default="efficientnet_lite0")
    p.add_argument("--to", dest="target", default="efficientnet_lite2_rmac")
    args = p.parse_args()
    setup_logging("WARNING")
    out = run(args.products, args.photos, args.source, args.target)
    print(f"reindex {out['from']} -> {out['to']}: {out['products']} products x {out['photos']} photos in "
          f"{out['reindex_s']} s (build command {out['build_s']} s, catalogue {out['index_s']} s, switch "
          f"{out['switch_wait_s']} s); rollback {out['rollback_s']} s")
    for name in ("before", "reindex", "after switch", "after rollback"):
        row = out[name]
        if row:
            print(f"  {name:15s} {row['searches']:4d} searches  p50 {row['p50_ms']} ms  p95 {row['p95_ms']} ms  "
                  f"max {row['max_ms']} ms  wrong first {row['wrong_first']}  models {', '.join(row['models'])}")
    print(f"  failed searches {out['failed_searches']}, wrong product first {out['wrong_first']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
