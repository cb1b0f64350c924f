"""Every input limit in one place, and how they fit together.

The wire limit comes first: a Kafka record carries a whole message, images inline
as base64, so every producer (gateway, ``lookalike index``, the functions) must
stay under it, and every consumer and topic must accept it. The other limits are
chosen so that the largest valid message still fits:

* a search request carries one photo, re-encoded by the gateway to a JPEG of at
  most ``IMAGE_MAX_SIDE`` px (under 0.5 MB even for pure noise);
* a catalogue event carries at most ``MAX_IMAGES_PER_EVENT`` inline images of at
  most ``INLINE_IMAGE_BYTES`` each plus its capped text (``EVENT_TEXT_BYTES``);
* a normalised image carries one such JPEG and its product's text.

Decoding is bounded separately: ``MAX_DECODE_BYTES`` per decode and
``MAX_CONCURRENT_DECODES`` at once, so a small compressed file can't take the
process's memory. Settings (shared/config.py) default to these values.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- wire

# Largest Kafka record: topics are created with max.message.bytes at this value (a real
# Kafka's default is 1 MB), producers send and consumers fetch up to it.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
# Room around a message's value: its key (an id), headers (a DLQ reason and source) and the
# record batch framing. A value fits when key + value <= MAX_MESSAGE_BYTES - this.
RECORD_OVERHEAD_BYTES = 16 * 1024

# --------------------------------------------------------------------------- text (characters)

MAX_PRODUCT_ID_CHARS = 200  # shop SKUs and slugs; also the Kafka key of catalogue messages
MAX_TITLE_CHARS = 500  # a long marketplace title is ~200
MAX_NAME_CHARS = 200  # category, brand, shop
CURRENCY_CHARS = 3  # ISO 4217
MAX_URL_CHARS = 2048  # what browsers and CDNs reliably handle; also local image paths
MAX_ID_CHARS = 100  # event, request and image ids (ours are 32 hex digits)
MAX_OFFERS = 100  # offers of one product (shops selling it)
MAX_IMAGES_PER_EVENT = 20  # photos of one product
MAX_LIST_ITEMS = 50  # filter values (categories, shops) and recommendation histories
MAX_TOP_K = 100  # results per object

# An event's text as JSON with every cap above filled with ASCII is about 240 KB (offers
# dominate: 100 x (shop + url)); escaped control characters could take up to 6 bytes per
# character, which `lookalike index` catches by measuring the real event.
EVENT_TEXT_BYTES = 256 * 1024

# --------------------------------------------------------------------------- images

# Raw bytes of one inline catalogue image such that an event with MAX_IMAGES_PER_EVENT of
# them and full text still fits a message (base64 takes 4/3): about 66 KB, what a 640 px
# product photo takes. `lookalike index` normalises larger local files before inlining them.
INLINE_IMAGE_BYTES = (MAX_MESSAGE_BYTES - RECORD_OVERHEAD_BYTES - EVENT_TEXT_BYTES) // MAX_IMAGES_PER_EVENT * 3 // 4
# Longest side of the image the pipeline works on (and publishes after the gateway or ingest):
# a 640 px JPEG at quality 90 is under 0.5 MB even for noise, a quarter of a message.
IMAGE_MAX_SIDE = 640
# A source photo as uploaded or fetched; it is decoded with a bounded buffer and only ever
# published re-encoded at IMAGE_MAX_SIDE (or as it came, under PASS_THROUGH_MAX_BYTES), so it
# may be larger than a message.
MAX_IMAGE_BYTES = 10 * 1024 * 1024

# A JPEG ingest may pass on without re-encoding (shared.images.normalize): at most this many bytes.
# A 640 px photo at quality 95 is about 150 KB; a bigger one wastes bytes on every hop.
PASS_THROUGH_MAX_BYTES = 256 * 1024
# Pixels of a source photo: a 48 MP phone photo (8064x6048). JPEGs decode at a reduced DCT
# scale (1/8 for that one), other formats are held to MAX_DECODE_BYTES.
MAX_IMAGE_PIXELS = 50_000_000
# Pixel buffers one decode may allocate (the image in its own mode plus its RGB copy):
# a 32 MP RGB image, a 16 MP RGBA or 16-bit one. More is poison, never an allocation.
MAX_DECODE_BYTES = 128 * 1024 * 1024
# Decodes running at once per process (gateway threads, ingest): bounds their memory to
# MAX_CONCURRENT_DECODES x MAX_DECODE_BYTES; Pillow releases the GIL, so 2 keeps both cores busy.
MAX_CONCURRENT_DECODES = 2

# --------------------------------------------------------------------------- gateway

# Multipart framing and the text fields (box, filters, top_k) around an uploaded photo:
# a request body may have max_image_bytes plus this.
FORM_OVERHEAD_BYTES = 64 * 1024
# Searches and recommendations in flight per gateway; more get 429 at once. Each holds at most
# one upload and waits for one answer, so memory and latency stay bounded under a flood.
GATEWAY_MAX_INFLIGHT = 16


def fits_message(key: bytes, value: bytes) -> bool:
    """Whether a record with this key and value fits the wire limit, headers included."""
    return len(key) + len(value) <= MAX_MESSAGE_BYTES - RECORD_OVERHEAD_BYTES
