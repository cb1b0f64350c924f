"""Image I/O shared by the functions: fetch a source, normalise it, crop objects.

Every failure that is the input's fault raises ``PoisonMessage`` with a reason a
catalogue team can act on; fetching URLs lives in :mod:`lookalike.shared.fetch`.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import math
import threading
from dataclasses import dataclass

import pybase64 as base64  # SIMD base64: several times the stdlib's speed on image payloads
from pi_heif import register_heif_opener
from PIL import ExifTags, Image, ImageMode

from lookalike.shared.errors import PoisonMessage
from lookalike.shared.fetch import fetch_url
from lookalike.shared.limits import MAX_CONCURRENT_DECODES, MAX_DECODE_BYTES, PASS_THROUGH_MAX_BYTES
from lookalike.shared.messages import Box, ImageRef

# Phones upload HEIC. Registering here also matters because ultralytics patches
# PIL's Image.open to pip-install pi-heif on the first unidentified image.
register_heif_opener()


def image_id(raw: bytes) -> str:
    """Stable id of a source image: the hash of its bytes."""
    return hashlib.sha256(raw).hexdigest()[:32]


def load_source(ref: ImageRef, max_bytes: int, timeout_s: float, allow_private: bool = False) -> bytes:
    """The raw bytes of an image reference (``path`` never reaches a function)."""
    if ref.data is not None:
        if len(ref.data) > max_bytes * 4 // 3 + 4:
            raise PoisonMessage(f"inline image is larger than {max_bytes} bytes")
        try:
            return base64.b64decode(ref.data, validate=True)
        except (binascii.Error, ValueError):
            raise PoisonMessage("inline image data is not valid base64") from None
    if ref.url is not None:
        return fetch_url(ref.url, max_bytes, timeout_s, allow_private)
    raise PoisonMessage("local image paths are not accepted on a topic; send url or data")


class ImageTooLarge(PoisonMessage):
    """An image past a size limit (pixels, decoding memory): 413 at the gateway, poison in a function."""


# Decodes running at once in this process: their pixel buffers are what takes the memory.
_decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
# EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose),
# applied after shrinking so that the full-size image is never copied for it.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # upright RGB, longest side capped
    source_size: tuple[int, int]  # of the upright source
    plain_jpeg: bool = False  # the source is a baseline RGB JPEG, upright, within the cap, carrying no metadata

    @property
    def scale(self) -> float:
        """Maps pixel coordinates of the upright source onto ``image`` (from the longest sides: exact)."""
        return max(self.image.size) / max(self.source_size)


def decode_bytes(mode: str, size: tuple[int, int]) -> int:
    """Bytes of pixel buffers that decoding an image of ``mode`` and ``size`` to RGB allocates."""
    try:
        desc = ImageMode.getmode(mode)
        # Pillow keeps multi-band pixels in 4 bytes, single bands in their type's size (I;16: 2, F: 4).
        per_pixel = 4 if len(desc.bands) > 1 else int(desc.typestr[-1])
    except KeyError:  # a mode Pillow does not describe: assume the widest
        per_pixel = 8
    if mode != "RGB":
        per_pixel += 4  # its RGB copy
    return size[0] * size[1] * per_pixel


def _check_decode_bytes(mode: str, size: tuple[int, int], source_size: tuple[int, int]) -> None:
    """``ImageTooLarge`` when decoding ``size`` pixels of ``mode`` (a ``source_size`` image) passes MAX_DECODE_BYTES."""
    need = decode_bytes(mode, size)
    if need > MAX_DECODE_BYTES:
        w, h = source_size
        raise ImageTooLarge(f"a {w}x{h} {mode} image takes {need >> 20} MiB to decode, more than "
                            f"{MAX_DECODE_BYTES >> 20} MiB")


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled so that its longest side is at most ``max_side`` (rounded up)."""
    factor = min(1.0, max_side / max(size))
    return max(1, math.ceil(size[0] * factor)), max(1, math.ceil(size[1] * factor))


def decode(raw: bytes, max_side: int, max_pixels: int) -> Decoded:
    """Decode to an upright RGB image with its longest side at most ``max_side``.

    ``PoisonMessage`` if undecodable, ``ImageTooLarge`` past ``max_pixels`` or MAX_DECODE_BYTES,
    both before any pixel is allocated. JPEGs decode at the smallest DCT scale (1/2..1/8) that
    still gives ``max_side``; at most MAX_CONCURRENT_DECODES decodes run at once.
    """
    if not raw:
        raise PoisonMessage("image is empty")
    try:
        img = Image.open(io.BytesIO(raw))
        width, height = img.size
        # Read before decoding: drafting and loading change the mode, size and info.
        plain = (img.format == "JPEG" and img.mode == "RGB" and max(width, height) <= max_side
                 and not _METADATA.intersection(img.info))
        if width * height > max_pixels:
            raise ImageTooLarge(f"image has {width}x{height} pixels, more than {max_pixels}")
        img.draft("RGB", _fit(img.size, max_side))  # only JPEG implements it; changes img.size
        _check_decode_bytes(img.mode, img.size, (width, height))
        with _decode_slots:
            img.load()
            method = _UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation, 1))
            if img.mode != "RGB":
                img = img.convert("RGB")
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        if method is not None:
            img = img.transpose(method)
    except PoisonMessage:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image has too many pixels: {e}") from None
    except Exception as e:  # Pillow raises many types on malformed input (OSError, SyntaxError, EOFError...)
        raise PoisonMessage(f"image cannot be decoded: {e}") from None
    upright = (height, width) if method in _SWAPS_SIDES else (width, height)
    return Decoded(img, upright, plain and method is None)  # within the cap: drafting and thumbnail left it whole


def to_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# What a JPEG can carry that must not travel on: EXIF (a phone's GPS position), XMP, comments; and
# progressive coding (slower to decode for every later reader; nvJPEG's GPU path wants baseline).
_METADATA = {"exif", "xmp", "XML:com.adobe.xmp", "comment", "progressive", "progression"}


def normalize(raw: bytes, max_side: int, max_pixels: int, quality: int = 90) -> tuple[bytes, int, int, float]:
    """RGB JPEG with the longest side capped at ``max_side``: (bytes, width, height, scale).

    ``scale`` maps pixel coordinates of the (EXIF-rotated) source onto the result. The image is
    always decoded whole (a broken one is refused here); a JPEG that needs no change (baseline
    RGB, upright, within the cap, no metadata, at most PASS_THROUGH_MAX_BYTES) is passed on as
    it came: re-encoding it would cost as much CPU as the decode and add a second JPEG loss.
    """
    decoded = decode(raw, max_side, max_pixels)
    width, height = decoded.image.size
    if decoded.plain_jpeg and len(raw) <= PASS_THROUGH_MAX_BYTES:
        return raw, width, height, 1.0
    return to_jpeg(decoded.image, quality), width, height, decoded.scale


THUMBNAIL_QUALITY = 75


def thumbnail(image: Image.Image, side: int, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """A small JPEG of a decoded image (left as it is), for result cards."""
    img = image.copy()
    # reducing_gap 1: a box-filter reduce by the whole factor first, then Lanczos on the small
    # image. Half the CPU of Lanczos from full size, 44 dB PSNR to it on grocery-dev (the JPEG
    # encoding at quality 75 loses more than that).
    img.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=1.0)
    return to_jpeg(img, quality)


def open_jpeg(data: bytes) -> Image.Image:
    """A normalised image (ingest wrote it) as RGB, held to MAX_DECODE_BYTES like any decode."""
    img = jpeg_header(data)
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def jpeg_header(data: bytes) -> Image.Image:
    """The image opened but not decoded (PIL reads only the header): refuses what MAX_DECODE_BYTES refuses.

    Decoders that do not go through PIL (nvJPEG on a GPU) check their input with it first.
    """
    img = Image.open(io.BytesIO(data))
    _check_decode_bytes(img.mode, img.size, img.size)
    return img


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic):
# FFC0-FFCF except DHT (C4), JPG (C8) and DAC (CC). Their segment holds the frame's size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_COMPONENT_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # as PIL opens them (YCbCr and YCCK included)


def jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """(width, height, components) from a JPEG's frame header, held to MAX_DECODE_BYTES as
    ``jpeg_header`` holds it: a check for decoders that do not go through PIL (nvJPEG on a GPU).

    Walks the marker segments up to the start of frame, a few microseconds where PIL's
    ``Image.open`` took about 40 (most of the GPU decode worker's time, which holds the GIL).
    Raises ``ValueError`` on what is not a JPEG or has no readable frame header, ``ImageTooLarge``
    on a frame past the limit.
    """
    if data[:3] != b"\xff\xd8\xff":
        try:  # only to name what it is instead
            kind = Image.open(io.BytesIO(data)).format
        except Exception:  # noqa: BLE001
            kind = "an image PIL can read"
        raise ValueError(f"a stored image must be a JPEG, not {kind}")
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            raise ValueError(f"the JPEG is corrupt (no marker at byte {at})")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM and RSTn stand alone: no length
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF_MARKERS:
            if length < 8 or at + 2 + length > end:
                break
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            components = data[at + 9]
            if not width or not height or components not in _COMPONENT_MODES:
                raise ValueError(f"the JPEG's frame is unsupported ({width}x{height}, {components} components)")
            _check_decode_bytes(_COMPONENT_MODES[components], (width, height), (width, height))
            return width, height, components
        if marker == 0xDA or marker == 0xD9 or length < 2:  # scan data or the end before any frame
            break
        at += 2 + length
    raise ValueError("the JPEG is corrupt (no frame header)")


def region(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The box as whole pixels (left, top, right, bottom), clamped to the image, at least 1 px wide and high."""
    x1 = min(max(0, int(box.x1)), width - 1)
    y1 = min(max(0, int(box.y1)), height - 1)
    x2 = max(x1 + 1, min(width, int(round(box.x2))))
    y2 = max(y1 + 1, min(height, int(round(box.y2))))
    return x1, y1, x2, y2


def crop(img: Image.Image, box: Box) -> Image.Image:
    """The box's region, clamped to the image (a box at least 1 px wide and high)."""
    return img.crop(region(box, img.width, img.height))
