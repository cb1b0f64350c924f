"""A flood of concurrent photo searches against the real gateway, pipeline and store.

Work in flight is bounded (GATEWAY_MAX_INFLIGHT): what is over the bound gets 429 at
once instead of queueing, no request fails otherwise, and memory levels off from one
round to the next instead of growing. Figures go to test-output/faults/search_flood.json.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from lookalike.client import Client, read_catalog
from lookalike.shared.messages import CATALOG_EVENTS
from tests.conftest import OUTPUT_DIR, make_settings

pytestmark = pytest.mark.e2e

ROUNDS, CONCURRENT, INFLIGHT = 3, 200, 16


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def phone_photo() -> bytes:
    """A 3000x2250 JPEG of about 3 MB, like a phone's."""
    rng = np.random.default_rng(7)
    base = np.kron(rng.integers(0, 255, (75, 100, 3), dtype=np.uint8), np.ones((30, 30, 1), dtype=np.uint8))
    noisy = np.clip(base.astype(np.int16) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format="JPEG", quality=92)
    return out.getvalue()


def test_a_flood_of_searches_is_bounded_and_memory_levels_off(tmp_path, sample_catalog):
    from lookalike.shared.bus import TansuBroker
    from lookalike.stack import Stack

    photo = phone_photo()
    with TansuBroker() as broker:
        settings = make_settings(tmp_path / "data", kafka_bootstrap_servers=broker.bootstrap_servers,
                                 gateway_port=0, gateway_max_inflight=INFLIGHT, gateway_timeout_s=60.0)
        with Stack(settings, gateway=True) as stack:
            client = Client(stack.bootstrap_servers)
            client.publish(CATALOG_EVENTS, read_catalog(sample_catalog.catalog_path))
            client.wait_indexed(timeout_s=600)
            client.close()
            url = stack.gateway.url + "api/search"

            def search(_):
                started = time.monotonic()
                r = httpx.post(url, files={"photo": ("phone.jpg", photo, "image/jpeg")}, data={"top_k": "3"},
                               timeout=120)
                return r.status_code, time.monotonic() - started

            rounds = []
            before = rss_mb()
            for _ in range(ROUNDS):
                with ThreadPoolExecutor(CONCURRENT) as pool:
                    answers = list(pool.map(search, range(CONCURRENT)))
                codes = [code for code, _ in answers]
                ok_s = sorted(s for code, s in answers if code == 200)
                rounds.append({"ok": codes.count(200), "busy_429": codes.count(429),
                               "other": len(codes) - codes.count(200) - codes.count(429),
                               "ok_p50_s": round(ok_s[len(ok_s) // 2], 2) if ok_s else None,
                               "rss_mb": round(rss_mb())})
                # THEN every answer is a result or an immediate "busy", never an error or a timeout
                assert rounds[-1]["other"] == 0, rounds
                assert rounds[-1]["ok"] >= INFLIGHT and rounds[-1]["busy_429"] > 0, rounds
            # AND once the flood is over a search is answered as usual (the photo upload included)
            alone = [search(0) for _ in range(3)]
            assert all(code == 200 for code, _ in alone), alone
            health = httpx.get(stack.gateway.url + "healthz", timeout=30).json()
    # AND memory levels off: the last round adds little to what the first one took
    growth_after_first = rounds[-1]["rss_mb"] - rounds[0]["rss_mb"]
    figures = {"concurrent": CONCURRENT, "inflight_bound": INFLIGHT, "photo_bytes": len(photo),
               "rss_before_mb": round(before), "rounds": rounds, "growth_after_first_round_mb": growth_after_first,
               "alone_after_s": [round(s, 2) for _, s in alone]}
    (OUTPUT_DIR / "faults").mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / "faults" / "search_flood.json").write_text(json.dumps(figures, indent=2))
    print("search_flood", json.dumps(figures))
    assert growth_after_first < 150, figures
    assert health["pending_requests"] == 0
