"""kill -9 while catalogue events flow: nothing lost, nothing duplicated, nothing claimed falsely.

Real broker (Tansu), real store (Qdrant Edge), real functions as the processes a user
runs (`lookalike up`, `python -m lookalike.functions detect`). Crash points are drawn at random
(the seed is printed and written to test-output/faults/); every run then checks the
store itself: each product holds exactly one point per image (detection is off, so one
object per image), with the image ids of its catalogue photos, and no other point.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lookalike.shared.images import image_id
from lookalike.stack import read_stack_file
from tests.conftest import OUTPUT_DIR

pytestmark = pytest.mark.e2e

LOOKALIKE = [sys.executable, "-m", "lookalike.cli"]
N_PRODUCTS = 500
SEED = int(os.environ.get("FAULT_SEED", random.randrange(1 << 30)))


def write_catalog(folder: Path, n: int, rng: random.Random) -> tuple[Path, dict[str, set[str]]]:
    """``n`` products with 1-2 small distinct photos each; returns the file and each product's image ids."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    np_rng = np.random.default_rng(rng.randrange(1 << 30))
    expected: dict[str, set[str]] = {}
    lines = []
    for i in range(n):
        pid = f"sku-{i:04d}"
        images = []
        for k in range(1 + i % 2):
            path = folder / f"{pid}-{k}.png"
            Image.fromarray(np_rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
            images.append({"path": path.name})
            expected.setdefault(pid, set()).add(image_id(path.read_bytes()))
        lines.append(json.dumps({"type": "upsert", "product_id": pid, "title": f"Product {i}", "images": images,
                                 "offers": [{"shop": "A", "price": 1 + i % 50}]}))
    catalog = folder / "catalog.jsonl"
    catalog.write_text("\n".join(lines) + "\n")
    return catalog, expected


def env_for(data_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "QDRANT_URL")}
    env.update(LOOKALIKE_DATA_DIR=str(data_dir), EMBED_MODEL="efficientnet_lite0", DETECT_WEIGHTS="none",
               GATEWAY_PORT="0", **extra)
    return env


def start_up(env: dict, *args: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    data_dir = Path(env["LOOKALIKE_DATA_DIR"])
    (data_dir / "stack.json").unlink(missing_ok=True)  # a killed stack leaves its file behind
    proc = subprocess.Popen(LOOKALIKE + ["up", "--no-gateway", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=stderr)
    wait(lambda: read_stack_file(data_dir) is not None or proc.poll() is not None, 180, "stack start")
    assert proc.poll() is None, "lookalike up exited"
    return proc


def points_now(data_dir: Path) -> int:
    return (read_stack_file(data_dir) or {}).get("points") or 0


def wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def check_store(data_dir: Path, expected: dict[str, set[str]]) -> dict:
    """Every product exactly once with all its images: compared point by point with the catalogue."""
    from lookalike.shared.config import Settings
    from lookalike.shared.stores import open_store

    store = open_store(None, data_dir)
    try:
        collection = Settings(embed_model="efficientnet_lite0").collection_name("efficientnet_lite0")
        wrong = {}
        for pid, image_ids in expected.items():
            payloads = store.product_payloads(collection, pid)
            got = sorted(p["image_id"] for p in payloads)
            if got != sorted(image_ids):
                wrong[pid] = got
        total = store.count(collection)
    finally:
        store.close()
    want = sum(len(v) for v in expected.values())
    assert not wrong, f"{len(wrong)} products differ from the catalogue, e.g. {list(wrong.items())[:3]}"
    assert total == want, f"{total} points in the store, {want} expected (duplicates or strays)"
    return {"products": len(expected), "points": total}


def summary_counts(stdout: str) -> dict[str, int]:
    """``{"indexed": 3, "unchanged": 497, ...}`` from `lookalike index`'s summary line."""
    found = re.search(r"(\d+) indexed, (\d+) unchanged, (\d+) deleted, (\d+) incomplete, (\d+) dead-lettered", stdout)
    assert found, stdout
    return dict(zip(["indexed", "unchanged", "deleted", "incomplete", "dead-lettered"], map(int, found.groups())))


def record(name: str, figures: dict) -> None:
    out = OUTPUT_DIR / "faults"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2))
    print(name, json.dumps(figures))


def test_kill_9_of_the_embedded_stack_then_the_same_index_converges(tmp_path):
    rng = random.Random(SEED)
    catalog, expected = write_catalog(tmp_path / "catalog", N_PRODUCTS, rng)
    want = sum(len(v) for v in expected.values())
    env = env_for(tmp_path / "data")
    crashes = []
    # GIVEN `lookalike up` and `lookalike index` of 500 products, killed -9 twice at random points
    for _ in range(2):
        up = start_up(env)
        index = subprocess.Popen(LOOKALIKE + ["index", str(catalog), "--quiet"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at = points_now(tmp_path / "data") + rng.randint(1, max(2, (want - points_now(tmp_path / "data")) // 2))
        try:
            wait(lambda: points_now(tmp_path / "data") >= at or index.poll() is not None, 300, f"{at} points")
        finally:
            os.kill(up.pid, signal.SIGKILL)  # the broker (memory only) dies with it
            up.wait(30)
            index.kill()
            index.wait(30)
        crashes.append(points_now(tmp_path / "data"))
    # WHEN the stack is started again and the same `lookalike index` is run
    up = start_up(env)
    try:
        done = subprocess.run(LOOKALIKE + ["index", str(catalog), "--quiet"], env=env, capture_output=True,
                              text=True, timeout=900)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    # THEN it reports every product done, and "unchanged" only for products whose points were there
    assert done.returncode == 0, done.stdout + done.stderr
    counts = summary_counts(done.stdout)
    assert counts["indexed"] + counts["unchanged"] == N_PRODUCTS, done.stdout
    assert counts["incomplete"] == 0 and counts["dead-lettered"] == 0, done.stdout
    # AND the store holds every product exactly once with all its images
    figures = check_store(tmp_path / "data", expected)
    record("kill_stack", {"seed": SEED, "events": N_PRODUCTS, "images": want, "kills": len(crashes),
                          "points_when_killed": crashes, "rerun": counts, **figures, "lost": 0})


def test_kill_9_of_each_function_process_with_a_surviving_broker_resumes_by_itself(tmp_path):
    from lookalike.shared.bus import TansuBroker

    rng = random.Random(SEED + 1)
    catalog, expected = write_catalog(tmp_path / "catalog", N_PRODUCTS, rng)
    want = sum(len(v) for v in expected.values())
    data_dir = tmp_path / "data"
    with TansuBroker(log_path=tmp_path / "tansu.log") as broker:
        env = env_for(data_dir, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers)

        def start_detect() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "lookalike.functions", "detect"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        # GIVEN ingest+embed+query in one process (they share the embedded store) and detect in another
        procs = {"stack": start_up(env, "--functions", "ingest,embed,query"), "detect": start_detect()}
        restart = {"stack": lambda: start_up(env, "--functions", "ingest,embed,query"), "detect": start_detect}
        published = subprocess.run(LOOKALIKE + ["index", str(catalog), "--no-wait"], env=env, capture_output=True,
                                   text=True, timeout=300)
        assert published.returncode == 0, published.stderr
        kills = []
        try:
            # WHEN each process is killed -9 twice at random points while the 500 events flow
            for victim in ["detect", "stack", "detect", "stack"]:
                at = min(want - 1, points_now(data_dir) + rng.randint(1, max(2, (want - points_now(data_dir)) // 3)))
                wait(lambda: points_now(data_dir) >= at, 600, f"{at} points")
                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].wait(30)
                kills.append({"process": victim, "points": points_now(data_dir)})
                procs[victim] = restart[victim]()
            # THEN the pipeline finishes by itself from the committed offsets, without a re-send
            wait(lambda: points_now(data_dir) >= want, 900, f"all {want} points")
            status = json.loads(subprocess.run(LOOKALIKE + ["status", "--json"], env=env, capture_output=True,
                                               text=True, timeout=120).stdout)
            assert status["dlq"]["catalog.events.dlq"] == 0 and status["dlq"]["images.normalized.dlq"] == 0
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(60)
    # AND the store holds every product exactly once with all its images
    figures = check_store(data_dir, expected)
    record("kill_functions", {"seed": SEED + 1, "events": N_PRODUCTS, "images": want, "kills": kills,
                              **figures, "lost": 0})
