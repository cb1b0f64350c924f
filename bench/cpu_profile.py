"""Where the CPU goes while the embedded stack indexes: ``python -m bench.cpu_profile``.

    python -m bench.cpu_profile [--products 100] [--model efficientnet_lite0] [--interval 0.1] [--timeline]

Indexes the sample catalogue (``--products`` events of 4 photos, detection off) through the
embedded stack as ``lookalike index`` does, and reads from /proc:

- each thread group's CPU seconds over the index (from the first publish to embed's last
  report; ``bench.gpu_embed.thread_cpu``: Python's thread names, native threads such as ONNX
  Runtime's pool as ``native:`` and their kernel name), and the broker process's;
- every ``--interval`` seconds, how many cores the machine, this process and the broker were
  using, and how many records each function had finished (``--timeline`` prints them).

Ends with one JSON line. On a GPU host the same command shows which stage bounds the
one-process stack there. Figures: docs/benchmarks.md ("The CPU bound of e2e.index_vs_embed").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `python bench/cpu_profile.py` finds the bench package

from bench.gpu_embed import thread_cpu  # noqa: E402
from bench.scale import cpu_seconds, machine_busy_seconds  # noqa: E402
from lookalike.client import Client, read_catalog  # noqa: E402
from lookalike.sample_catalog import generate  # noqa: E402
from lookalike.shared.config import Settings  # noqa: E402
from lookalike.shared.logs import setup_logging  # noqa: E402
from lookalike.stack import Stack  # noqa: E402


def run(products: int = 100, model: str = "efficientnet_lite0", interval: float = 0.1) -> dict:
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        sample = generate(Path(tmp) / "sample", n_products=products, photos_per_product=4)
        events = read_catalog(sample.catalog_path)
        settings = Settings(LOOKALIKE_DATA_DIR=str(Path(tmp) / "data"), embed_model=model, detect_weights="none")
        started = time.monotonic()
        with Stack(settings) as stack:
            start_s = time.monotonic() - started  # the broker, the functions' models (CUDA warm-up included), the joins
            broker = stack.broker.process.pid if stack.broker else None
            client = Client(stack.bootstrap_servers)
            timeline: list[dict] = []
            stop = threading.Event()

            def sample_load() -> None:
                started = last_t = time.monotonic()
                last = (machine_busy_seconds(), cpu_seconds(os.getpid()), broker and cpu_seconds(broker))
                while not stop.wait(interval):
                    now_t = time.monotonic()
                    now = (machine_busy_seconds(), cpu_seconds(os.getpid()), broker and cpu_seconds(broker))
                    dt = now_t - last_t
                    timeline.append({"t": round(now_t - started, 2), "machine": round((now[0] - last[0]) / dt, 2),
                                     "process": round((now[1] - last[1]) / dt, 2),
                                     "broker": round((now[2] - last[2]) / dt, 2) if broker else None,
                                     "records": {n: f.counters.get("records", 0) for n, f in stack.functions.items()}})
                    last, last_t = now, now_t

            before, broker_before = thread_cpu(), broker and cpu_seconds(broker)
            sampler = threading.Thread(target=sample_load, name="bench-sampler", daemon=True)
            sampler.start()
            report = client.index(events)
            stop.set()
            sampler.join()
            after, broker_after = thread_cpu(), broker and cpu_seconds(broker)
            client.close()
    threads = {group: seconds - before.get(group, 0.0) for group, seconds in after.items()}
    photos = sum(len(e.images) for e in events)
    process_s = sum(threads.values())
    broker_s = (broker_after - broker_before) if broker else 0.0
    busy = [row["machine"] for row in timeline]
    return {
        "photos": photos, "stack_start_s": round(start_s, 1), "index_seconds": round(report.seconds, 2),
        "photos_per_second": round(photos / report.seconds, 1),
        "cpu_seconds": {name: round(s, 2) for name, s in sorted(threads.items(), key=lambda kv: -kv[1]) if s >= 0.01},
        "process_cpu_s": round(process_s, 2), "broker_cpu_s": round(broker_s, 2),
        "cpu_ms_per_photo": round(1000 * (process_s + broker_s) / photos, 1),
        "machine_cores_busy_mean": round(sum(busy) / len(busy), 2) if busy else None,
        "cores": os.cpu_count(), "timeline": timeline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between load samples")
    parser.add_argument("--timeline", action="store_true", help="print the load samples")
    args = parser.parse_args()
    result = run(args.products, args.model, args.interval)
    print(f"the stack started in {result['stack_start_s']} s")
    print(f"{result['photos']} photos in {result['index_seconds']} s ({result['photos_per_second']} photos/s); "
          f"{result['cpu_ms_per_photo']} ms of CPU a photo; machine {result['machine_cores_busy_mean']} of "
          f"{result['cores']} cores busy on average")
    for name, seconds in result["cpu_seconds"].items():
        print(f"  {name:32s} {seconds:6.2f} s")
    print(f"  {'broker (process)':32s} {result['broker_cpu_s']:6.2f} s")
    if args.timeline:
        for row in result["timeline"]:
            print(f"  t={row['t']:5.2f} machine {row['machine']:4.2f} process {row['process']:4.2f} "
                  f"broker {row['broker']} records {row['records']}")
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))


if __name__ == "__main__":
    main()
