"""Outages while catalogue events flow: a failed send, a store that is down, an image host
that answers 503 or hangs. Nothing is lost, nothing good is dead-lettered, searches go on.

One embedded stack on a broker of its own, with switches to inject each fault; image
URLs point at an HTTP server on 127.0.0.1 (the stack allows loopback URLs for this).
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from kafka.errors import KafkaError
from PIL import Image

from lookalike.shared.errors import StoreUnavailable
from lookalike.shared.messages import IMAGES_NORMALIZED, CatalogUpsert, ImageRef, Offer
from tests.conftest import make_settings

pytestmark = pytest.mark.e2e


def photo(seed: int, size: int = 48) -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def upsert(pid: str, *images: ImageRef) -> CatalogUpsert:
    return CatalogUpsert(product_id=pid, title=pid, images=list(images), offers=[Offer(shop="A", price=3.5)])


class ImageHost:
    """Serves ``/<name>.png`` as told by ``mode``: ok, 503, or hang (answer nothing for ``hang_s``)."""

    def __init__(self):
        self.mode = "ok"
        self.hang_s = 0.0
        self.requests = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                host.requests += 1
                if host.mode == "503":
                    self.send_error(503)
                    return
                if host.mode == "hang":
                    time.sleep(host.hang_s)
                body = photo(abs(hash(self.path)) % 1000)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{name}.png"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Faults:
    """Switches the stack's producers and store read before each call."""

    fail_sends = 0  # the next N sends to images.normalized are refused by the "broker"
    store_down_until = 0.0


class _Failed:
    def get(self, timeout=None):
        raise KafkaError("injected: the broker did not take this record")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    import lookalike.shared.runtime
    from lookalike.client import Client
    from lookalike.shared.bus import TansuBroker
    from lookalike.stack import Stack

    real_make_producer = lookalike.shared.runtime.make_producer

    def flaky_producer(*args, **kwargs):
        producer = real_make_producer(*args, **kwargs)
        send = producer.send

        def maybe_fail(topic, *a, **kw):
            if topic == IMAGES_NORMALIZED and Faults.fail_sends > 0:
                Faults.fail_sends -= 1
                return _Failed()
            return send(topic, *a, **kw)

        producer.send = maybe_fail
        return producer

    host = ImageHost()
    mp = pytest.MonkeyPatch()
    mp.setattr(lookalike.shared.runtime, "make_producer", flaky_producer)
    broker = TansuBroker()
    settings = make_settings(tmp_path_factory.mktemp("outages"), kafka_bootstrap_servers=broker.bootstrap_servers,
                             allow_private_urls=True, url_timeout_s=20.0, max_attempts=3)
    stack = Stack(settings).start()
    store = stack.resources.store
    real_upsert = store.upsert

    def upsert_unless_down(*args, **kwargs):
        if time.monotonic() < Faults.store_down_until:
            raise StoreUnavailable("injected: store unreachable")
        return real_upsert(*args, **kwargs)

    mp.setattr(store, "upsert", upsert_unless_down)
    client = Client(stack.bootstrap_servers)
    try:
        yield stack, client, host
    finally:
        client.close()
        stack.stop()
        broker.stop()
        host.close()
        mp.undo()


def images_of(stack, pid: str) -> set[str]:
    return stack.resources.store.product_image_ids(stack.resources.collection, pid)


def test_a_send_that_fails_once_loses_nothing(rig):
    stack, client, _ = rig
    # GIVEN the broker refuses the first two image sends of ingest
    Faults.fail_sends = 2
    events = [upsert(f"send-{i}", ImageRef.from_bytes(photo(100 + i)), ImageRef.from_bytes(photo(200 + i)))
              for i in range(6)]
    # WHEN six products with two photos each are indexed
    report = client.index(events, timeout_s=300)
    # THEN every product is reported indexed (none "unchanged") and has both photos in the store
    assert Faults.fail_sends == 0
    assert report.outcomes["indexed"] == 6 and report.failed == 0, report.summary()
    assert all(len(images_of(stack, e.product_id)) == 2 for e in events)
    assert stack.functions["ingest"].counters["retries"] >= 1


def test_the_store_down_for_a_while_delays_but_loses_and_dead_letters_nothing(rig):
    stack, client, _ = rig
    # GIVEN the store refuses writes for the next 4 seconds
    Faults.store_down_until = time.monotonic() + 4
    retries_before = stack.functions["embed"].counters["retries"]
    events = [upsert(f"down-{i}", ImageRef.from_bytes(photo(300 + i))) for i in range(5)]
    # WHEN products are indexed meanwhile
    report = client.index(events, timeout_s=300)
    # THEN all of them arrive once the store is back, none in the DLQ
    assert report.outcomes["indexed"] == 5 and report.failed == 0, report.summary()
    assert all(images_of(stack, e.product_id) for e in events)
    assert stack.functions["embed"].counters["retries"] > retries_before
    assert time.monotonic() >= Faults.store_down_until


def test_an_image_host_answering_503_is_dead_lettered_after_bounded_tries_then_replayed(rig):
    stack, client, host = rig
    # GIVEN the image host answers 503
    host.mode = "503"
    before = host.requests
    event = upsert("url-503", ImageRef(url=host.url("url-503")))
    # WHEN the product is indexed
    report = client.index([event], timeout_s=120)
    # THEN it is tried max_attempts times, then dead-lettered with the reason, not retried forever
    assert host.requests - before == 3
    assert report.dead_lettered and "source unavailable after 3 attempts" in report.dead_lettered[0][1]
    assert "503" in report.dead_lettered[0][1]
    # WHEN the host is back and the operator replays the DLQ (`lookalike dlq replay catalog.events`)
    host.mode = "ok"
    replayed = client.replay_dlq("catalog.events")
    # THEN the event goes through the pipeline again and the product is indexed; a second replay has nothing left
    assert [r["key"] for r in replayed] == [b"url-503"]
    deadline = time.monotonic() + 120
    while not images_of(stack, "url-503"):
        assert time.monotonic() < deadline, "replayed event was not indexed"
        time.sleep(0.2)
    assert client.replay_dlq("catalog.events") == []


def test_searches_are_answered_while_a_catalogue_image_host_hangs(rig, sample_catalog):
    stack, client, host = rig
    # GIVEN a catalogue image whose host answers nothing for 15 s
    host.mode, host.hang_s = "hang", 15.0
    started = time.monotonic()
    client.publish("catalog.events", [upsert("slow-host", ImageRef(url=host.url("slow-host")))])
    time.sleep(1.0)  # ingest is now waiting on that host
    # WHEN a shopper searches meanwhile
    photo_path, _ = sample_catalog.queries[0]
    result = client.search(photo_path.read_bytes(), top_k=3, timeout_s=12)
    # THEN the answer comes before the catalogue fetch is over (searches have their own consumer lane)
    assert result.status == "ok"
    assert time.monotonic() - started < host.hang_s
    host.mode = "ok"
