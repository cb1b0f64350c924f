"""Property tests: whatever arrives on a topic or as a photo, the outcome is a value or a PoisonMessage.

Hypothesis generates the inputs (bytes, JSON, near-valid messages, images of every size,
mode, format and EXIF orientation); anything else raised is a bug that would block a
partition or answer a shopper with a 500.
"""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lookalike.shared import limits
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.images import normalize
from lookalike.shared.messages import (
    CATALOG_EVENTS,
    IMAGES_DETECTED,
    IMAGES_NORMALIZED,
    QUERY_VECTORS,
    RECOMMEND_REQUESTS,
    SEARCH_REQUESTS,
    Box,
    CatalogDelete,
    CatalogEvent,
    CatalogUpsert,
    DetectedMessage,
    ImageRef,
    NormalizedMessage,
    Offer,
    Part,
    QueryVectors,
    RecommendRequest,
    SearchFilters,
    SearchRequest,
)
from lookalike.shared.runtime import Route

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ROUTES = [Route(topic, schema, lambda m: []) for topic, schema in [
    (CATALOG_EVENTS, CatalogEvent),
    (SEARCH_REQUESTS, SearchRequest),
    (RECOMMEND_REQUESTS, RecommendRequest),
    (IMAGES_NORMALIZED, NormalizedMessage),
    (IMAGES_DETECTED, DetectedMessage),
    (QUERY_VECTORS, QueryVectors),
]]


def _models(cls=Part):
    for sub in cls.__subclasses__():
        yield sub
        yield from _models(sub)


# Every field name of every wire model, and the discriminator values: dicts of these get past
# the first layer of validation, so nested models and validators are exercised too.
FIELD_NAMES = sorted({name for model in _models() for name in model.model_fields})
TAGS = ["upsert", "delete", "index", "query", "sync"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(TAGS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8),
                                                                  inner, max_size=6),
    max_leaves=30,
)
near_messages = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=10)
raw_inputs = (st.binary(max_size=300)
              | json_values.map(lambda v: json.dumps(v).encode())  # Infinity and NaN literals included
              | near_messages.map(lambda v: json.dumps(v).encode()))


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.topic)
@FAST
@given(raw=raw_inputs)
def test_parsing_anything_gives_a_message_or_poison(route, raw):
    try:
        route.parse(raw)
    except PoisonMessage:
        pass


# ----------------------------------------------------------------------------- valid messages round-trip


def text(cap: int, min_size: int = 0):
    """Any text up to ``cap`` characters, often short, sometimes exactly at the cap."""
    return st.text(min_size=min_size, max_size=min(cap, 30)) | st.just("x" * cap)


prices = st.floats(min_value=0, max_value=1e15, allow_nan=False, allow_infinity=False)
urls = text(limits.MAX_URL_CHARS, 1)
offers = st.builds(Offer, shop=text(limits.MAX_NAME_CHARS, 1), price=prices,
                   currency=st.text(min_size=3, max_size=3), url=st.none() | urls, in_stock=st.booleans())
images = st.builds(ImageRef, url=urls) | st.builds(ImageRef, data=st.text("ABCDEFabcdef0123456789+/", min_size=4,
                                                                          max_size=64))
filters = st.builds(SearchFilters,
                    categories=st.none() | st.lists(text(limits.MAX_NAME_CHARS), max_size=limits.MAX_LIST_ITEMS),
                    shops=st.none() | st.lists(text(limits.MAX_NAME_CHARS), max_size=3),
                    price_min=st.none() | prices, price_max=st.none() | prices, in_stock=st.none() | st.booleans())
boxes = st.builds(lambda x, y, w, h: Box(x1=x, y1=y, x2=x + w, y2=y + h),
                  st.floats(0, 1e4), st.floats(0, 1e4), st.floats(1, 1e4), st.floats(1, 1e4))
ids = text(limits.MAX_ID_CHARS, 1)
product_ids = text(limits.MAX_PRODUCT_ID_CHARS, 1)
valid_messages = st.one_of(
    st.builds(CatalogUpsert, event_id=ids, product_id=product_ids, title=text(limits.MAX_TITLE_CHARS),
              category=text(limits.MAX_NAME_CHARS), brand=text(limits.MAX_NAME_CHARS),
              images=st.lists(images, min_size=1, max_size=limits.MAX_IMAGES_PER_EVENT),
              offers=st.lists(offers, max_size=5)),
    st.builds(CatalogDelete, event_id=ids, product_id=product_ids),
    st.builds(SearchRequest, request_id=ids, image=images, box=st.none() | boxes,
              top_k=st.integers(1, limits.MAX_TOP_K), filters=filters),
    st.builds(RecommendRequest, request_id=ids, positive=st.lists(product_ids, min_size=1, max_size=5),
              negative=st.lists(product_ids, max_size=5), top_k=st.integers(1, limits.MAX_TOP_K), filters=filters),
)
ROUTE_OF = {CatalogUpsert: ROUTES[0], CatalogDelete: ROUTES[0], SearchRequest: ROUTES[1], RecommendRequest: ROUTES[2]}


@FAST
@given(message=valid_messages)
def test_a_valid_message_round_trips(message):
    assert ROUTE_OF[type(message)].parse(message.to_bytes()) == message


# ----------------------------------------------------------------------------- images

# (mode, format) pairs each format can store
COMBOS = [("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"),
          ("I;16", "PNG"), ("RGB", "WEBP"), ("RGBA", "WEBP")]


@st.composite
def photos(draw):
    """(encoded image, its upright size) of any size 1..2000 px, mode, format and EXIF orientation."""
    width, height = draw(st.integers(1, 2000)), draw(st.integers(1, 2000))
    mode, fmt = draw(st.sampled_from(COMBOS))
    orientation = draw(st.integers(1, 8))
    img = Image.new(mode, (width, height), draw(st.integers(0, 255)) if mode in ("L", "P", "I;16") else
                    tuple(draw(st.lists(st.integers(0, 255), min_size=len(mode), max_size=len(mode)))))
    img.paste(200 if len(mode) == 1 or mode == "I;16" else (200,) * len(mode), (0, 0, width // 3 + 1, height // 2 + 1))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    img.save(out, format=fmt, exif=exif)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return out.getvalue(), upright


@FAST
@given(photo=photos(), max_side=st.sampled_from([32, limits.IMAGE_MAX_SIDE]))
def test_any_photo_normalises_to_a_capped_jpeg_whose_scale_maps_the_source(photo, max_side):
    raw, (source_w, source_h) = photo
    jpeg, width, height, scale = normalize(raw, max_side, limits.MAX_IMAGE_PIXELS)
    out = Image.open(io.BytesIO(jpeg))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (width, height)
    assert max(width, height) <= max_side
    if max(source_w, source_h) <= max_side:
        assert (width, height) == (source_w, source_h) and scale == 1.0
    assert max(source_w, source_h) * scale == pytest.approx(max(width, height))
    # The short side is rounded twice for a JPEG (DCT-scaled decode, then the resize): within 1.5 px.
    assert abs(source_w * scale - width) <= 1.5 and abs(source_h * scale - height) <= 1.5


def _mutations(draw, raw: bytes) -> bytes:
    """``raw`` with a few bytes changed and maybe truncated: reaches the decoders' error paths."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(1, len(data)))])


@st.composite
def broken_photos(draw):
    raw, _ = draw(photos())
    return _mutations(draw, raw)


@FAST
@given(raw=st.binary(max_size=2000) | broken_photos())
def test_normalising_any_bytes_gives_a_jpeg_or_poison(raw):
    try:
        normalize(raw, limits.IMAGE_MAX_SIDE, limits.MAX_IMAGE_PIXELS)
    except PoisonMessage:
        pass


@st.composite
def jpegs(draw) -> bytes:
    """JPEGs as cameras and editors write them: any size, grey, colour or CMYK, baseline or
    progressive, with or without EXIF, restart markers, and their header segments."""
    width, height = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    mode = draw(st.sampled_from(["L", "RGB", "CMYK"]))
    options = {"quality": draw(st.integers(30, 95)), "progressive": draw(st.booleans())}
    if draw(st.booleans()):
        options["restart_marker_rows"] = draw(st.integers(1, 4))
    if mode == "RGB" and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))  # orientation
        exif[0x010E] = draw(st.text(max_size=200))  # a description: a longer APP1 segment
        options["exif"] = exif.tobytes()
    buf = io.BytesIO()
    Image.new(mode, (width, height), draw(st.integers(0, 255))).save(buf, "JPEG", **options)
    return buf.getvalue()


@FAST
@given(data=jpegs())
def test_the_gpu_paths_frame_reader_agrees_with_pil(data):
    # The GPU path checks each JPEG's size with jpeg_frame before nvJPEG allocates: it must read
    # what PIL reads, or the decode limit would not hold there.
    from lookalike.shared.images import jpeg_frame, jpeg_header

    header = jpeg_header(data)
    assert jpeg_frame(data) == (*header.size, len(header.getbands()))


@FAST
@given(data=jpegs(), cut=st.integers(0, 400), junk=st.binary(max_size=40))
def test_a_cut_or_garbled_jpeg_gives_a_bounded_frame_or_a_clear_error(data, cut, junk):
    # A header cut short or overwritten raises nothing but ValueError or, for a frame past the
    # decode limit, ImageTooLarge (the job's error, dead-lettered with its reason); what it does
    # read stays within the decode limit; cut after its frame header, a JPEG still reads its own
    # frame (nvJPEG then refuses the rest).
    from lookalike.shared.images import ImageTooLarge, jpeg_frame

    whole = jpeg_frame(data)
    for raw, intact in ((data[:cut], True), (data[:cut] + junk + data[cut + len(junk):], not junk)):
        try:
            frame = jpeg_frame(raw)
        except (ValueError, ImageTooLarge):
            continue
        width, height, components = frame
        assert width >= 1 and height >= 1 and components in (1, 3, 4)
        assert width * height * 4 <= limits.MAX_DECODE_BYTES
        if intact:
            assert frame == whole
