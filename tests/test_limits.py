"""One set of input limits that fits the broker's message size end to end (shared/limits.py).

What a shopper or a catalogue team would notice: oversized text and non-finite numbers are
poison with a reason, image bombs are refused before their pixels exist, phone photos are
downscaled to fit a message, the gateway stops reading oversized bodies early and answers
a flood with 429. No broker: the gateway's pipeline is a FakePipeline (ingest and detect
in-process) and the runner's Kafka is tests/fakes.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

from lookalike.functions.detect.handler import Detect
from lookalike.functions.ingest.handler import Ingest
from lookalike.shared import limits
from lookalike.shared.detector import WholeImageDetector
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.images import MAX_DECODE_BYTES, ImageTooLarge, decode_bytes, normalize
from lookalike.shared.indexes import Indexes
from lookalike.shared.limits import MAX_MESSAGE_BYTES, fits_message
from lookalike.shared.messages import (
    CATALOG_EVENTS,
    RECOMMEND_REQUESTS,
    SEARCH_REQUESTS,
    CatalogEvent,
    CatalogUpsert,
    ImageRef,
    IndexContext,
    NormalizedImage,
    ObjectResults,
    Offer,
    ProductInfo,
    SearchFilters,
    SearchRequest,
    SearchResult,
    dlq_topic,
)
from lookalike.shared.runtime import Route, Runner
from tests.conftest import REPO_ROOT, make_settings
from tests.fakes import FakeConsumer, FakeProducer, Log

# ----------------------------------------------------------------------------- helpers


def jpeg(img: Image.Image, quality: int = 90, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(out, format="JPEG", quality=quality, exif=exif)
    return out.getvalue()


def noise(size: tuple[int, int]) -> Image.Image:
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


def png16(width: int, height: int) -> bytes:
    """A 16-bit RGBA PNG of zeros: tiny on disk, 8 bytes a pixel once decoded (the RGB copy included)."""
    row = b"\x00" * (1 + width * 8)
    z = zlib.compressobj(1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)  # 16 bits, colour type 6: RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def phone_photo() -> bytes:
    """A 4000x3000 JPEG at quality 95 of about 3.6 MB: a phone photo's size and detail."""
    smooth = noise((40, 30)).resize((4000, 3000), Image.Resampling.BICUBIC)
    grain = Image.merge("RGB", [Image.effect_noise((4000, 3000), 6)] * 3)
    raw = jpeg(Image.blend(smooth, grain, 0.5), quality=95)
    assert 3_000_000 < len(raw) < 5_000_000
    return raw


def catalog_route() -> Route:
    return Route(CATALOG_EVENTS, CatalogEvent, lambda event: [])


def upsert_json(**fields) -> bytes:
    event = {"type": "upsert", "product_id": "p1", "images": [{"url": "https://shop.example/p1.jpg"}], **fields}
    return json.dumps(event).encode()


# ----------------------------------------------------------------------------- text and numbers


@pytest.mark.parametrize("fields, field", [
    ({"title": "t" * (limits.MAX_TITLE_CHARS + 1)}, "title"),
    ({"product_id": "p" * (limits.MAX_PRODUCT_ID_CHARS + 1)}, "product_id"),
    ({"brand": "b" * (limits.MAX_NAME_CHARS + 1)}, "brand"),
    ({"offers": [{"shop": "s" * (limits.MAX_NAME_CHARS + 1), "price": 1}]}, "shop"),
    ({"offers": [{"shop": "s", "price": 1, "url": "https://x/" + "u" * limits.MAX_URL_CHARS}]}, "url"),
    ({"offers": [{"shop": "s", "price": 1}] * (limits.MAX_OFFERS + 1)}, "offers"),
    ({"images": [{"url": "https://x/1.jpg"}] * (limits.MAX_IMAGES_PER_EVENT + 1)}, "images"),
    ({"event_id": "e" * (limits.MAX_ID_CHARS + 1)}, "event_id"),
])
def test_text_over_its_cap_is_poison_at_parse(fields, field):
    # GIVEN a catalogue event with one field past its cap (a 1.96 MB title used to get through)
    raw = upsert_json(**fields)
    # WHEN ingest parses it
    # THEN it is poison, naming the field: dead-lettered with that reason, never half-processed
    with pytest.raises(PoisonMessage, match=f"schema violation: .*{field}"):
        catalog_route().parse(raw)


@pytest.mark.parametrize("price", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", '"inf"', '"nan"'])
def test_a_non_finite_price_is_poison(price):
    # GIVEN a price the JSON parser reads as a non-finite float
    raw = upsert_json(offers=[{"shop": "a"}]).replace(b'"shop": "a"', f'"shop": "a", "price": {price}'.encode())
    # WHEN ingest parses it
    # THEN it is a schema violation, not a price of inf
    with pytest.raises(PoisonMessage, match="schema violation: upsert.offers.0.price: Input should be a finite number"):
        catalog_route().parse(raw)


@pytest.mark.parametrize("raw", [
    b'{"image": {"url": "https://x/1.jpg"}, "box": {"x1": 0, "y1": 0, "x2": Infinity, "y2": 1e999}}',
    b'{"image": {"url": "https://x/1.jpg"}, "filters": {"price_max": NaN}}',
])
def test_non_finite_numbers_in_a_search_request_are_poison(raw):
    with pytest.raises(PoisonMessage, match="finite number"):
        Route(SEARCH_REQUESTS, SearchRequest, lambda r: []).parse(raw)


def test_ingest_dead_letters_an_oversized_event_with_the_reason(tmp_path):
    # GIVEN ingest running on a (fake) broker
    log = Log()
    ingest = Ingest(make_settings(tmp_path), Indexes.fixed(None, "c"))
    runner = Runner(ingest, "fake:0", poll_timeout_ms=5, consumer_factory=lambda: FakeConsumer(log, [CATALOG_EVENTS]),
                    producer_factory=lambda: FakeProducer(log))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        # WHEN a product with a 2 MB title arrives
        log.append(CATALOG_EVENTS, b"p1", upsert_json(title="t" * 2_000_000))
        deadline = time.monotonic() + 10
        while not log.read(dlq_topic(CATALOG_EVENTS)):
            assert time.monotonic() < deadline, "not dead-lettered"
            time.sleep(0.01)
    finally:
        runner.stop()
        thread.join(5)
    # THEN it is in the DLQ with a reason that names the field, and nothing else was produced
    (dead,) = log.read(dlq_topic(CATALOG_EVENTS))
    reason = dict(dead.headers)["dlq.reason"].decode()
    assert "title" in reason and "at most 500 characters" in reason
    assert [r.topic for r in log.appended] == [CATALOG_EVENTS, dlq_topic(CATALOG_EVENTS)]


def test_the_largest_valid_messages_fit_one_message():
    # GIVEN a product with every text field at its cap (ASCII)
    offers = [Offer(shop="s" * limits.MAX_NAME_CHARS, price=1e12, url="u" * limits.MAX_URL_CHARS)] * limits.MAX_OFFERS
    text = dict(product_id="p" * limits.MAX_PRODUCT_ID_CHARS, title="t" * limits.MAX_TITLE_CHARS,
                category="c" * limits.MAX_NAME_CHARS, brand="b" * limits.MAX_NAME_CHARS, offers=offers)
    # WHEN it comes with the maximum number of inline images, each at the inline budget
    image = ImageRef.from_bytes(b"\xff" * limits.INLINE_IMAGE_BYTES)
    event = CatalogUpsert(event_id="e" * limits.MAX_ID_CHARS, images=[image] * limits.MAX_IMAGES_PER_EVENT, **text)
    value = event.to_bytes()
    # THEN the event fits one message, its text within the text budget
    assert fits_message(event.key().encode(), value), len(value)
    assert len(value) - limits.MAX_IMAGES_PER_EVENT * len(image.data) <= limits.EVENT_TEXT_BYTES
    # AND so does a normalised image of pure noise carrying that product (what ingest emits)
    photo, w, h, _ = normalize(jpeg(noise((2000, 2000)), quality=98), limits.IMAGE_MAX_SIDE, limits.MAX_IMAGE_PIXELS)
    normalized = NormalizedImage(
        intent="index", image_id="i" * 32, jpeg=base64.b64encode(photo).decode(), width=w, height=h,
        index=IndexContext(event_id=event.event_id, product=ProductInfo(**text), image_index=0,
                           image_url="u" * limits.MAX_URL_CHARS))
    assert fits_message(normalized.key().encode(), normalized.to_bytes())
    # AND a search with that photo and full filters
    filters = SearchFilters(categories=["c" * limits.MAX_NAME_CHARS] * limits.MAX_LIST_ITEMS,
                            shops=["s" * limits.MAX_NAME_CHARS] * limits.MAX_LIST_ITEMS)
    search = SearchRequest(image=ImageRef.from_bytes(photo), filters=filters)
    assert fits_message(search.key().encode(), search.to_bytes())


# ----------------------------------------------------------------------------- decoding


# Peak RSS of this process's memory (VmHWM): unlike ru_maxrss it does not start from the parent's.
PEAK = """
import json, sys
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.images import normalize

def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

raw = open(sys.argv[1], "rb").read()
before = peak()
try:
    normalize(raw, 640, 50_000_000)
    outcome = "decoded"
except PoisonMessage as e:
    outcome = str(e)
print(json.dumps({"outcome": outcome, "peak_growth": peak() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak memory from /proc")
@pytest.mark.parametrize("side, outcome", [(4200, "takes 134 MiB to decode, more than 128 MiB"), (2800, "decoded")])
def test_a_16_bit_png_bomb_is_refused_or_decoded_within_the_cap(tmp_path, side, outcome):
    # GIVEN a 16-bit RGBA PNG of a few hundred KB (4200 px: 134 MiB decoded, over the cap; 2800 px: under it)
    raw = png16(side, side)
    assert len(raw) < 1_000_000
    path = tmp_path / "bomb.png"
    path.write_bytes(raw)
    # WHEN a fresh process normalises it (its peak memory is measured around the call)
    run = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    # THEN it is poison with a clear reason before any pixel is allocated, or it decodes within the cap
    assert outcome in result["outcome"]
    if outcome == "decoded":
        assert 4 * side * side < result["peak_growth"] < MAX_DECODE_BYTES  # measured, and bounded
    else:
        assert result["peak_growth"] < 16 << 20


def test_decode_bytes_counts_the_real_bytes_per_pixel():
    assert decode_bytes("RGB", (10, 10)) == 400  # Pillow keeps RGB in 4 bytes
    assert decode_bytes("L", (10, 10)) == 100 + 400  # plus its RGB copy
    assert decode_bytes("I;16", (10, 10)) == 200 + 400
    assert decode_bytes("RGBA", (10, 10)) == 400 + 400
    assert decode_bytes("F", (10, 10)) == 400 + 400


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_large_jpeg_decodes_at_reduced_scale_and_its_scale_maps_boxes(monkeypatch, orientation):
    # GIVEN a 4000x3000 JPEG with a white square at a known place, rotated by its EXIF orientation
    img = Image.new("RGB", (4000, 3000), (40, 60, 80))
    img.paste((255, 255, 255), (2400, 600, 3200, 1400))
    raw = jpeg(img, orientation=orientation)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))  # fully decoded, upright
    square = _white_box(reference)
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    # WHEN it is normalised to 640 px
    out, width, height, scale = normalize(raw, 640, limits.MAX_IMAGE_PIXELS)
    # THEN it was decoded at 1/4 scale (1000x750 pixels instead of 12 M)
    assert drafted[0] == (1000, 750)
    assert max(width, height) == 640 and scale == pytest.approx(640 / 4000)
    # AND the square mapped through scale lands on the square in the result
    got = _white_box(Image.open(io.BytesIO(out)))
    assert got == pytest.approx([v * scale for v in square], abs=2)


def _white_box(img: Image.Image) -> list[int]:
    return list(img.convert("L").point(lambda v: 255 if v > 200 else 0).getbbox())


def test_concurrent_decodes_are_bounded(monkeypatch):
    # GIVEN decodes that take a while
    active, peak, lock = [0], [0], threading.Lock()
    real_load = ImageFile.ImageFile.load

    def slow_load(self):
        if not self.tile:  # already decoded: nothing to count
            return real_load(self)
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real_load(self)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)
    out = io.BytesIO()
    Image.new("RGB", (800, 600), "red").save(out, "PNG")
    # WHEN eight arrive at once
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: normalize(out.getvalue(), 640, limits.MAX_IMAGE_PIXELS), range(8)))
    # THEN at most MAX_CONCURRENT_DECODES ran at the same time
    assert 1 <= peak[0] <= limits.MAX_CONCURRENT_DECODES


def test_pixels_over_the_limit_are_too_large_not_undecodable():
    with pytest.raises(ImageTooLarge, match="100x100 pixels, more than 5000"):
        normalize(jpeg(Image.new("RGB", (100, 100))), 640, 5000)


# ----------------------------------------------------------------------------- gateway


class FakePipeline:
    """Stands in for ``Gateway.request``: the published message goes through ingest and detect in-process.

    A user box comes back as the only object (as detect does), so boxes can be checked end to
    end. Clear ``go`` to make the pipeline slow; ``entered`` counts requests inside it.
    """

    def __init__(self, settings):
        self.ingest = Ingest(settings, Indexes.fixed(None, "c"))
        self.detect = Detect(WholeImageDetector())
        self.published: list[bytes] = []
        self.go = threading.Event()
        self.go.set()
        self.entered = threading.Semaphore(0)

    def __call__(self, topic, message) -> tuple[SearchResult, str]:
        """The gateway's ``request``: (the answer, its trace id)."""
        return self._answer(topic, message), "0" * 32

    def _answer(self, topic, message) -> SearchResult:
        value = message.to_bytes()
        self.published.append(value)
        self.entered.release()
        assert self.go.wait(30)
        if topic == RECOMMEND_REQUESTS:
            return SearchResult(request_id=message.request_id, kind="recommend")
        request = Route(topic, SearchRequest, lambda r: []).parse(value)  # as ingest reads it
        (normalized,) = self.ingest.on_search_request(request)
        (detected,) = self.detect.on_image(normalized.message)
        objects = [ObjectResults(box=o.box, label=o.label, score=o.score, products=[])
                   for o in detected.message.objects]
        return SearchResult(request_id=request.request_id, objects=objects)


@pytest.fixture
def gateway(tmp_path):
    """make(**setting overrides) -> (test client, fake pipeline) of a gateway with no broker behind it."""
    from fastapi.testclient import TestClient

    from lookalike.gateway.app import create_app

    def make(function_health=None, **overrides):
        settings = make_settings(tmp_path, **overrides)
        app = create_app("127.0.0.1:1", store=None, indexes=Indexes.fixed(None, "c"), settings=settings,
                         function_health=function_health)
        pipeline = FakePipeline(settings)
        app.state.gateway.request = pipeline
        return TestClient(app), pipeline

    return make


def _search(http, photo: bytes, **form):
    return http.post("/api/search", files={"photo": ("IMG_0001.jpg", photo, "image/jpeg")}, data=form)


def test_a_phone_photo_is_published_downscaled_and_its_box_maps_back(gateway, phone_photo):
    http, pipeline = gateway()
    box = [1000.0, 750.0, 3000.0, 2250.0]
    # WHEN a shopper searches a region of a 3.6 MB 4000x3000 photo (base64 alone would be 4.8 MB)
    response = _search(http, phone_photo, box=",".join(map(str, box)))
    # THEN it is answered, with the photo's own size and the scale the pipeline worked at
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": 4000, "height": 3000, "scale": pytest.approx(0.16)}
    # AND what was published is a 640 px JPEG, well within one message
    (value,) = pipeline.published
    assert fits_message(b"k" * 32, value) and len(value) < MAX_MESSAGE_BYTES // 4
    published = SearchRequest.model_validate_json(value)
    assert Image.open(io.BytesIO(base64.b64decode(published.image.data))).size == (640, 480)
    # AND the region searched comes back in pixels of the uploaded photo
    (obj,) = body["objects"]
    assert obj["label"] == "selection"
    assert [obj["box"][k] for k in ("x1", "y1", "x2", "y2")] == pytest.approx(box, abs=1)


@pytest.mark.parametrize("form", [
    {"box": "0,0,inf,inf"},
    {"box": "nan,0,10,10"},
    {"box": "[0, 0, Infinity, 10]"},
    {"box": "0,0,1e999,10"},
    {"filters": '{"price_max": 1e999}'},
    {"filters": '{"price_min": NaN}'},
    {"top_k": "inf"},
])
def test_non_finite_numbers_over_http_are_400_at_once(gateway, form):
    http, pipeline = gateway()
    start = time.monotonic()
    # WHEN a search comes with an infinite or NaN number (it used to wait 30 s for a 504)
    response = _search(http, jpeg(Image.new("RGB", (100, 80), "red")), **form)
    # THEN it is refused at once with a reason, and nothing is published
    assert response.status_code == 400, response.text
    assert time.monotonic() - start < 5 and pipeline.published == []


def test_non_finite_numbers_in_a_recommendation_are_400(gateway):
    http, pipeline = gateway()
    body = b'{"positive": ["p1"], "filters": {"price_max": Infinity}}'
    response = http.post("/api/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "finite" in response.json()["detail"]
    assert pipeline.published == []


def test_a_flood_beyond_max_inflight_gets_429_at_once(gateway):
    # GIVEN a gateway allowing 2 requests in flight, and a slow pipeline
    http, pipeline = gateway(gateway_max_inflight=2)
    pipeline.go.clear()
    photo = jpeg(Image.new("RGB", (100, 80), "red"))
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(_search, http, photo) for _ in range(2)]
        for _ in slow:
            assert pipeline.entered.acquire(timeout=30)
        # WHEN more requests arrive while both are waiting for answers
        start = time.monotonic()
        busy = [_search(http, photo), http.post("/api/recommend", json={"positive": ["p1"]})]
        # THEN they get 429 at once, with a Retry-After and a reason, and are never queued
        assert time.monotonic() - start < 5
        for response in busy:
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "1" and "busy" in response.json()["detail"]
        pipeline.go.set()
        assert [f.result().status_code for f in slow] == [200, 200]
    # AND once they are answered there is room again
    assert _search(http, photo).status_code == 200
    assert len(pipeline.published) == 3


def test_a_chunked_body_past_the_limit_is_refused_after_reading_about_the_limit(gateway):
    # GIVEN a gateway taking photos of at most 1 MB, and an upload without Content-Length that would go on for 400 MB
    http, _ = gateway(max_image_bytes=1_000_000)
    chunk = b"\xff" * 65536
    head = (b'--xyz\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    read = [0]

    async def receive():
        body = head if read[0] == 0 else chunk
        read[0] += len(body)
        return {"type": "http.request", "body": body, "more_body": read[0] < 400_000_000}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/search", "raw_path": b"/api/search", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080)}
    # WHEN it is sent to the app
    asyncio.run(http.app(scope, receive, send))
    # THEN the app answered 413 with a reason after reading about the limit, not 400 MB
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert start["status"] == 413 and "at most 1000000 bytes" in body["detail"]
    assert 1_000_000 < read[0] <= 1_000_000 + limits.FORM_OVERHEAD_BYTES + len(chunk)
    assert (b"connection", b"close") in start["headers"]  # the server must not read the rest to reuse it


def test_a_real_server_stops_reading_a_chunked_upload_past_the_limit(gateway):
    import httpx
    import uvicorn

    # GIVEN the gateway behind uvicorn on loopback, counting the body bytes it is handed
    http, _ = gateway(max_image_bytes=1_000_000)
    received = [0]

    async def counting(scope, receive, send):
        async def counted():
            message = await receive()
            received[0] += len(message.get("body", b""))
            return message

        await http.app(scope, counted, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(counting, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    sent = [0]

    def upload():  # 400 MB, chunked (no Content-Length)
        yield b'--xyz\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n\r\n'
        while sent[0] < 400_000_000:
            sent[0] += 65536
            yield b"\xff" * 65536

    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # WHEN a client streams a 400 MB upload
        response = httpx.post(f"http://127.0.0.1:{sock.getsockname()[1]}/api/search", content=upload(), timeout=30,
                              headers={"content-type": "multipart/form-data; boundary=xyz"})
    finally:
        server.should_exit = True
        thread.join(10)
    # THEN it gets a 413 after the app was handed about the limit and the server stopped reading
    assert response.status_code == 413 and "at most 1000000 bytes" in response.json()["detail"]
    assert received[0] < 1_500_000 and sent[0] < 50_000_000


def test_a_declared_oversized_body_is_refused_unread(gateway):
    http, pipeline = gateway(max_image_bytes=50_000)
    response = _search(http, b"\xff" * 200_000)
    assert response.status_code == 413 and "at most 50000 bytes" in response.json()["detail"]
    assert pipeline.published == []


def test_healthz_is_503_when_a_function_is_down(gateway, monkeypatch):
    import lookalike.gateway.app as gateway_app

    class Offsets:  # the broker answers, every lag is 0
        def __init__(self, bootstrap_servers):
            pass

        def group_lags(self, groups):
            return {group: 0 for group in groups}

        def close(self):
            pass

    class Store:
        backend = "fake"

        def count(self, collection):
            return 3

    monkeypatch.setattr(gateway_app, "OffsetReader", Offsets)
    functions = {"ingest": {"ok": True}, "embed": {"ok": False, "error": "crashed: out of memory"}}
    http, _ = gateway(function_health=lambda: functions)
    http.app.state.gateway.store = Store()
    # WHEN one function is down (broker and store fine)
    response = http.get("/healthz")
    # THEN health is 503 and says which
    assert response.status_code == 503
    assert response.json()["functions"] == functions and response.json()["status"] == "unavailable"
    # AND it is 200 again once every function is ok
    functions["embed"] = {"ok": True}
    assert http.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------- lookalike index


def test_index_downscales_a_big_local_photo_and_refuses_an_event_that_cannot_fit(tmp_path, phone_photo):
    from lookalike.client import read_catalog

    (tmp_path / "big.jpg").write_bytes(phone_photo)
    noise((1200, 1200)).save(tmp_path / "noise.png")  # normalises to ~370 KB: incompressible
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"type": "upsert", "product_id": "p1", "images": [{"path": "big.jpg"}]}) + "\n")
    # WHEN a catalogue names a local photo larger than the inline budget
    (event,) = read_catalog(ok)
    # THEN it is inlined normalised (640 px), and the event fits one message
    inlined = base64.b64decode(event.images[0].data)
    assert len(inlined) < len(phone_photo) // 10 and Image.open(io.BytesIO(inlined)).size == (640, 480)
    assert fits_message(event.key().encode(), event.to_bytes())
    # AND an event whose images still can't fit one message is refused, naming its line and sizes
    too_big = tmp_path / "too_big.jsonl"
    line = {"type": "upsert", "product_id": "p2", "images": [{"path": "noise.png"}] * 20}
    too_big.write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=r"too_big.jsonl:1: product p2 would be a \d+-byte message with its "
                                         r"20 images inlined .* over the 2097152-byte message limit"):
        read_catalog(too_big)
