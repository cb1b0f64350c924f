"""Image I/O shared by the functions: fetch a source, normalise it, crop objects.

Every failure that is the input's fault raises ``PoisonMessage`` with a reason a
catalogue team can act on; network trouble fetching a URL is ``TransientError``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import socket
import warnings
from urllib.parse import urlsplit

import httpx
from pi_heif import register_heif_opener
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import PoisonMessage, TransientError
from shared.messages import Box, ImageRef

# Phones upload HEIC. Registering here also matters because ultralytics patches
# PIL's Image.open to pip-install pi-heif on the first unidentified image.
register_heif_opener()


def image_id(raw: bytes) -> str:
    """Stable id of a source image: the hash of its bytes."""
    return hashlib.sha256(raw).hexdigest()[:32]


def check_url(url: str, allow_private: bool = False) -> None:
    """Refuse URLs that are not http(s) or that resolve to a non-public address (SSRF)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PoisonMessage(f"refused URL {url[:200]!r}: only http and https URLs with a host are fetched")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as e:
        raise PoisonMessage(f"refused URL {url[:200]!r}: host does not resolve ({e})") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global:
            raise PoisonMessage(f"refused URL {url[:200]!r}: {parts.hostname} resolves to non-public address {addr}")


def fetch_url(url: str, max_bytes: int, timeout_s: float, allow_private: bool = False) -> bytes:
    check_url(url, allow_private)
    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=False) as resp:
            if resp.status_code >= 500 or resp.status_code == 429:
                raise TransientError(f"GET {url[:200]} answered {resp.status_code}")
            if resp.status_code != 200:
                raise PoisonMessage(f"GET {url[:200]} answered {resp.status_code}")
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise PoisonMessage(f"image at {url[:200]} is larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TransportError as e:
        raise TransientError(f"GET {url[:200]} failed: {e}") from e


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


def decode(raw: bytes, max_pixels: int) -> Image.Image:
    """Decode, apply EXIF rotation, convert to RGB. Poison if undecodable or too large."""
    if not raw:
        raise PoisonMessage("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            if img.width * img.height > max_pixels:
                raise PoisonMessage(f"image has {img.width}x{img.height} pixels, more than {max_pixels}")
            img.load()
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except PoisonMessage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise PoisonMessage(f"image cannot be decoded: {e}") from None


def normalize(raw: bytes, max_side: int, max_pixels: int, quality: int = 90) -> tuple[bytes, int, int, float]:
    """RGB JPEG with the longest side capped at ``max_side``: (bytes, width, height, scale).

    ``scale`` maps pixel coordinates of the (EXIF-rotated) source onto the result.
    """
    img = decode(raw, max_pixels)
    source_width = img.width
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue(), img.width, img.height, img.width / source_width


def thumbnail(jpeg: bytes, side: int, quality: int = 75) -> bytes:
    """A small JPEG of a normalised image, for result cards."""
    img = open_jpeg(jpeg)
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def open_jpeg(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def crop(img: Image.Image, box: Box) -> Image.Image:
    """The box's region, clamped to the image (a box at least 1 px wide and high)."""
    x1 = min(max(0, int(box.x1)), img.width - 1)
    y1 = min(max(0, int(box.y1)), img.height - 1)
    x2 = max(x1 + 1, min(img.width, int(round(box.x2))))
    y2 = max(y1 + 1, min(img.height, int(round(box.y2))))
    return img.crop((x1, y1, x2, y2))
