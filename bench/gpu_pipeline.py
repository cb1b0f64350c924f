"""End to end on a GPU host, with and without the CUDA warm-up: ``python3 -m bench.gpu_pipeline``.

Each variant indexes the sample catalogue through the embedded stack and times sequential photo
searches (``bench/pipeline.py``'s ``run``: ``--products`` events of 4 photos, 20 searches,
detection off), in a fresh process each time (cuDNN keeps its tuning per process), the two
variants alternated ``--rounds`` times. "off" replaces ``TorchEmbedder._warm_up`` with nothing, so
cuDNN tunes each batch shape when a batch of that size first comes; "on" is the product as it is,
and reports the warm-up's seconds. One JSON line per run, then one with all of them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

KEYS = ("photos_per_second", "index_seconds", "search_ms_median", "search_ms_p95", "search_ms_max", "top1_correct",
        "precision", "model")


def child(warm: bool, products: int) -> dict:
    from lookalike.shared import embedders

    seconds: dict = {}
    original = embedders.TorchEmbedder._warm_up

    def timed(self) -> None:
        started = time.perf_counter()
        original(self)
        seconds["warm_up_s"] = round(time.perf_counter() - started, 2)

    embedders.TorchEmbedder._warm_up = timed if warm else (lambda self: None)
    from bench import pipeline

    started = time.perf_counter()
    result = pipeline.run(products, 4, 20)
    return {"warm_up": warm, **seconds, "run_s": round(time.perf_counter() - started, 1),
            **{k: result[k] for k in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.products)), flush=True)
        return
    runs = []
    for _ in range(args.rounds):
        for variant in ("off", "on"):
            done = subprocess.run([sys.executable, "-m", "bench.gpu_pipeline", "--child", variant,
                                   "--products", str(args.products)], capture_output=True, text=True, timeout=300)
            lines = done.stdout.strip().splitlines()
            runs.append(json.loads(lines[-1]) if lines and lines[-1].startswith("{")
                        else {"warm_up": variant == "on", "error": done.stderr[-1500:]})
            print(json.dumps(runs[-1]), flush=True)
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()
