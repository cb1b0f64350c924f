"""A synthetic sample catalogue: product-like objects photographed in varied conditions.

Real product photos cannot be committed, so each product is drawn with PIL: a
silhouette (bottle, carton, can, mug, sneaker, jar, ball, bag), a main and a
secondary colour and a print (stripes, dots, checks, a label band with a logo...).
Every photo of a product re-renders it on another background, at another angle,
scale, position and lighting, then saves it as a JPEG of varying quality, so a
query photo is never a copy of a catalogue photo.

    cat = generate(Path("data/sample"))
    # data/sample/catalog.jsonl, data/sample/images/*.jpg, data/sample/queries/*.jpg
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from lookalike.shared.messages import CatalogUpsert, ImageRef, Offer

CANVAS = 400  # object drawing canvas (square, RGBA)

# Named colours far enough apart that an ImageNet CNN tells them apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35),
    "orange": (245, 130, 20),
    "yellow": (245, 210, 30),
    "green": (40, 150, 60),
    "teal": (20, 150, 150),
    "blue": (35, 85, 200),
    "navy": (25, 35, 95),
    "purple": (120, 50, 160),
    "pink": (240, 120, 180),
    "brown": (120, 70, 35),
    "black": (30, 30, 32),
    "white": (240, 240, 236),
}
LIGHT = {"yellow", "white", "pink", "orange"}
# Colours a CNN confuses most easily; products of one shape take mains from different families.
FAMILIES = (
    ("red", "pink", "brown"),
    ("orange", "yellow"),
    ("green", "teal"),
    ("blue", "navy", "purple"),
    ("black", "white"),
)
FAMILY = {c: i for i, fam in enumerate(FAMILIES) for c in fam}

# shape -> (category, base price in EUR)
SHAPES: dict[str, tuple[str, float]] = {
    "bottle": ("drinks", 2.5),
    "carton": ("pantry", 3.5),
    "can": ("drinks", 1.2),
    "mug": ("kitchen", 9.0),
    "sneaker": ("shoes", 69.0),
    "jar": ("pantry", 4.5),
    "ball": ("toys", 14.0),
    "bag": ("bags", 35.0),
}
PATTERNS = ("striped", "dotted", "checked", "labelled", "zigzag", "two-tone", "diagonal")
LOGOS = ("circle", "star", "triangle", "diamond")
BRANDS = ("Acme", "Nordkap", "Bellavia", "Hartmann", "Kiko", "Solenne", "Urbanic", "Vesta")
SHOPS = ("Marktplatz", "BrightBuy", "CornerShop", "MegaMart", "ValueHub")


@dataclass
class SampleCatalog:
    catalog_path: Path
    queries: list[tuple[Path, str]] = field(default_factory=list)  # (query photo, product_id)
    products: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- drawing the objects


def _mask() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    m = Image.new("L", (CANVAS, CANVAS), 0)
    return m, ImageDraw.Draw(m)


def _shape_masks(shape: str) -> tuple[Image.Image, list[tuple[Image.Image, str]], str]:
    """(print area, [(part mask, colour role)], shading) of one silhouette.

    Colour roles: "accent" (secondary colour), "dark", "light", "metal", "main-dark", "main-light".
    """
    body, d = _mask()
    parts: list[tuple[Image.Image, str]] = []

    def part(role: str):
        m, pd = _mask()
        parts.append((m, role))
        return pd

    shading = "cylinder"
    if shape == "bottle":
        d.rounded_rectangle([135, 160, 265, 385], radius=28, fill=255)
        d.polygon([(135, 185), (175, 110), (225, 110), (265, 185)], fill=255)
        d.rectangle([178, 62, 222, 120], fill=255)
        part("accent").rectangle([170, 30, 230, 72], fill=255)
    elif shape == "carton":
        shading = "flat"
        d.rectangle([95, 130, 265, 375], fill=255)
        part("main-light").polygon([(95, 130), (155, 80), (325, 80), (265, 130)], fill=255)
        part("main-dark").polygon([(265, 130), (325, 80), (325, 325), (265, 375)], fill=255)
        part("light").polygon([(150, 80), (175, 45), (280, 45), (305, 80)], fill=255)  # gable top
    elif shape == "can":
        d.rectangle([130, 85, 270, 340], fill=255)
        d.ellipse([130, 318, 270, 362], fill=255)
        part("metal").ellipse([130, 62, 270, 108], fill=255)
        part("dark").ellipse([185, 75, 215, 90], fill=255)  # opener tab
    elif shape == "mug":
        d.rectangle([105, 130, 265, 345], fill=255)
        d.ellipse([105, 325, 265, 365], fill=255)
        part("main-dark").ellipse([232, 175, 345, 305], outline=255, width=24)
        part("main-dark").ellipse([105, 110, 265, 150], fill=255)
        part("dark").ellipse([115, 115, 255, 145], fill=255)  # inside, seen from above
    elif shape == "sneaker":
        shading = "flat"
        # Side view, toe to the left: low toe box, laced vamp, collar, heel.
        toe = [(30, 300), (34, 268), (80, 248), (150, 228), (205, 190), (230, 150)]
        heel = [(262, 168), (300, 160), (340, 170), (365, 215), (370, 300)]
        d.polygon(toe + heel, fill=255)
        part("light").polygon([(22, 292), (378, 292), (382, 322), (370, 340), (40, 340), (20, 322)], fill=255)
        laces = part("accent")
        for i in range(4):
            x = 158 + i * 20
            laces.line([(x, 222 - i * 14), (x + 28, 244 - i * 14)], fill=255, width=8)
        part("dark").ellipse([248, 158, 318, 182], fill=255)  # collar opening
        part("main-dark").polygon([(30, 300), (34, 268), (80, 248), (95, 296)], fill=255)  # toe cap
    elif shape == "jar":
        d.rounded_rectangle([95, 140, 305, 375], radius=36, fill=255)
        lid = part("accent")
        lid.rounded_rectangle([108, 92, 292, 148], radius=10, fill=255)
        ridges = part("main-dark")
        for x in range(118, 290, 16):
            ridges.line([(x, 98), (x, 142)], fill=255, width=4)
    elif shape == "ball":
        shading = "sphere"
        d.ellipse([85, 85, 315, 315], fill=255)
    elif shape == "bag":
        shading = "flat"
        d.polygon([(95, 175), (305, 175), (340, 380), (60, 380)], fill=255)
        part("main-dark").arc([130, 60, 270, 260], start=180, end=360, fill=255, width=18)
        part("accent").rectangle([95, 175, 305, 198], fill=255)  # hem
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    return body, parts, shading


def _pattern_mask(pattern: str, rng: random.Random) -> Image.Image:
    """Where the secondary colour goes (full canvas; clipped to the print area later)."""
    m, d = _mask()
    step = rng.choice((28, 36, 44))
    if pattern == "striped":
        for y in range(0, CANVAS, step):
            d.rectangle([0, y, CANVAS, y + step // 2], fill=255)
    elif pattern == "diagonal":
        for x in range(-CANVAS, CANVAS, step):
            d.polygon([(x, CANVAS), (x + step // 2, CANVAS), (x + step // 2 + CANVAS, 0), (x + CANVAS, 0)], fill=255)
    elif pattern == "dotted":
        r = step // 4
        for y in range(step // 2, CANVAS, step):
            off = step // 2 if (y // step) % 2 else 0
            for x in range(off, CANVAS + step, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif pattern == "checked":
        for y in range(0, CANVAS, step):
            for x in range(0, CANVAS, step):
                if (x // step + y // step) % 2 == 0:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=255)
    elif pattern == "zigzag":
        for y0 in range(0, CANVAS, step * 2):
            pts = [(x, y0 + (step if (x // step) % 2 else 0)) for x in range(0, CANVAS + step, step)]
            d.line(pts, fill=255, width=step // 2)
    elif pattern == "two-tone":
        d.rectangle([0, 0, CANVAS, 230], fill=255)
    elif pattern == "labelled":
        d.rectangle([0, 195, CANVAS, 300], fill=255)
    return m


def _logo(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:  # star
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=255)


def _shade(mask: np.ndarray, shading: str) -> np.ndarray:
    """Per-pixel light factor over the object: a cylinder or sphere look, or flat."""
    ys, xs = np.nonzero(mask)
    if shading == "flat" or len(xs) == 0:
        return np.ones(mask.shape, np.float32)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    grid_x = (np.arange(CANVAS, dtype=np.float32) - x0) / max(1, x1 - x0)
    if shading == "cylinder":
        # Highlight a little left of centre, darker rims.
        f = 0.62 + 0.5 * np.clip(np.sin(np.pi * np.clip(grid_x * 1.1, 0, 1)), 0, 1) ** 0.7
        return np.broadcast_to(f[None, :], mask.shape).astype(np.float32)
    grid_y = (np.arange(CANVAS, dtype=np.float32) - y0) / max(1, y1 - y0)
    dist = np.hypot(grid_x[None, :] - 0.38, grid_y[:, None] - 0.35)
    return np.clip(1.18 - 0.75 * dist, 0.5, 1.2).astype(np.float32)


def render_product(product: dict) -> Image.Image:
    """The product on a transparent canvas, in its canonical pose."""
    rng = random.Random(product["render_seed"])
    main = np.array(PALETTE[product["main_colour"]], np.float32)
    second = np.array(PALETTE[product["secondary_colour"]], np.float32)
    body, parts, shading = _shape_masks(product["shape"])

    roles = {
        "accent": second,
        "dark": np.array((35, 35, 38), np.float32),
        "light": np.array((235, 235, 230), np.float32),
        "metal": np.array((185, 188, 195), np.float32),
        "main-dark": main * 0.68,
        "main-light": np.clip(main * 1.2 + 25, 0, 255),
    }
    rgb = np.zeros((CANVAS, CANVAS, 3), np.float32)
    alpha = np.zeros((CANVAS, CANVAS), np.float32)

    b = np.asarray(body, np.float32) / 255
    pat = np.asarray(_pattern_mask(product["pattern"], rng), np.float32) / 255 * b
    rgb += b[..., None] * main
    rgb = rgb * (1 - pat[..., None]) + pat[..., None] * second
    if product["pattern"] == "labelled":
        logo_mask, ld = _mask()
        ys, xs = np.nonzero(b)
        _logo(ld, product["logo"], (xs.min() + xs.max()) / 2, 247, 38)
        lm = np.asarray(logo_mask, np.float32) / 255 * b
        rgb = rgb * (1 - lm[..., None]) + lm[..., None] * main
    alpha = np.maximum(alpha, b)
    for mask, role in parts:
        m = np.asarray(mask, np.float32) / 255
        rgb = rgb * (1 - m[..., None]) + m[..., None] * roles[role]
        alpha = np.maximum(alpha, m)

    rgb *= _shade(alpha > 0.5, shading)[..., None]
    out = np.dstack([np.clip(rgb, 0, 255), alpha * 255]).astype(np.uint8)
    return Image.fromarray(out, "RGBA")


# --------------------------------------------------------------------------- photographing them


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A background colour: random hue, mixed with grey so products stand out."""
    c = rng.uniform(0, 255, 3)
    grey = rng.uniform(70, 230)
    return 0.35 * c + 0.65 * grey


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    kind = rng.choice(["plain", "gradient", "noise", "table"])
    a, b = _muted(rng), _muted(rng)
    if kind == "plain":
        arr = np.broadcast_to(a, (h, w, 3)).copy()
    elif kind == "gradient":
        t = np.linspace(0, 1, h)[:, None, None] if rng.random() < 0.6 else np.linspace(0, 1, w)[None, :, None]
        arr = np.broadcast_to(a + (b - a) * t, (h, w, 3)).copy()
    elif kind == "noise":
        # Mottled surface: smooth random field plus fine grain.
        cells = rng.uniform(-1, 1, (h // 24 + 2, w // 24 + 2)).astype(np.float32)
        mottle = np.asarray(Image.fromarray(cells, "F").resize((w, h), Image.BICUBIC))
        arr = a + mottle[..., None] * rng.uniform(8, 20) + rng.normal(0, 4, (h, w, 1))
    else:  # wall above a table / shelf board with wood-like grain
        horizon = int(h * rng.uniform(0.55, 0.8))
        arr = np.broadcast_to(a, (h, w, 3)).copy()
        wood = np.array([rng.uniform(110, 190), rng.uniform(75, 130), rng.uniform(40, 85)])
        rows = np.arange(h - horizon)[:, None]
        grain = 7 * np.sin(rows * rng.uniform(0.15, 0.4) + np.arange(w)[None, :] * rng.uniform(0.0, 0.02))
        arr[horizon:] = wood + grain[..., None]
        arr[horizon : horizon + 4] = wood * 0.6  # shelf edge
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def photograph(obj: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One photo of a rendered object: background, pose, scale, light, blur."""
    w, h = [(384, 384), (416, 352), (352, 416)][rng.integers(3)]
    img = _background(rng, w, h)

    if rng.random() < 0.5:
        obj = obj.transpose(Image.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-20, 20))
    obj = obj.crop(obj.getbbox())
    # Size by area, so long objects (sneakers) fill as much of the frame as tall ones,
    # but never wider than the frame. Scaling before rotating keeps the rotation cheap.
    scale = min(
        rng.uniform(0.6, 0.8) * min(w, h) / math.sqrt(obj.width * obj.height),
        0.94 * min(w, h) / max(obj.size),
    )
    obj = obj.resize((max(1, int(obj.width * scale)), max(1, int(obj.height * scale))), Image.LANCZOS)
    obj = obj.rotate(angle, resample=Image.BICUBIC, expand=True)
    obj = obj.crop(obj.getbbox())
    if max(obj.size) > 0.96 * min(w, h):  # a rotated long object can outgrow the frame
        obj.thumbnail((int(0.96 * min(w, h)),) * 2, Image.LANCZOS)
    x = int((w - obj.width) / 2 + rng.uniform(-0.08, 0.08) * w)
    y = int((h - obj.height) / 2 + rng.uniform(-0.08, 0.08) * h)

    # Soft contact shadow under the object.
    shadow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(shadow).ellipse(
        [x + obj.width * 0.1, y + obj.height * 0.9, x + obj.width * 0.95, y + obj.height * 1.05], fill=110
    )
    shadow = shadow.filter(ImageFilter.GaussianBlur(10))
    img = Image.composite(Image.new("RGB", (w, h), (20, 20, 20)), img, shadow)
    img.paste(obj, (x, y), obj)

    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.78, 1.22))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
    cast = 1 + rng.uniform(-0.07, 0.07, 3)
    arr = np.asarray(img, np.float32) * cast + rng.normal(0, rng.uniform(1, 5), (h, w, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.3)))
    return img


# --------------------------------------------------------------------------- the catalogue


def _design_products(n: int, rng: random.Random) -> list[dict]:
    """Distinct designs: shapes cycle, and products sharing a shape differ in colour and print."""
    shapes = list(SHAPES)
    rng.shuffle(shapes)
    used: dict[str, list[tuple[str, str]]] = {s: [] for s in shapes}
    products = []
    for i in range(n):
        shape = shapes[i % len(shapes)]
        taken = used[shape]
        mains = [c for c in PALETTE if FAMILY[c] not in {FAMILY[m] for m, _ in taken}]
        mains = mains or [c for c in PALETTE if c not in {m for m, _ in taken}] or list(PALETTE)
        patterns = [p for p in PATTERNS if p not in {p for _, p in taken}] or list(PATTERNS)
        main = rng.choice(mains)
        pattern = rng.choice(patterns)
        taken.append((main, pattern))
        # Secondary colour: contrasting lightness so the print is visible.
        pool = [c for c in PALETTE if c != main and ((c in LIGHT) != (main in LIGHT) or c in ("white", "black"))]
        second = rng.choice(pool)
        products.append(
            {
                "shape": shape,
                "main_colour": main,
                "secondary_colour": second,
                "pattern": pattern,
                "logo": rng.choice(LOGOS),
                "render_seed": rng.getrandbits(32),
            }
        )
    return products


def _offers(rng: random.Random, product_id: str, base: float) -> list[Offer]:
    shops = rng.sample(SHOPS, rng.randint(3, len(SHOPS)))
    offers = []
    for shop in shops:
        price = base * rng.uniform(0.8, 1.25)
        price = round(price) - 0.01 if price > 5 else round(price, 2)  # shop-style prices: 9.99
        offers.append(
            Offer(
                shop=shop,
                price=price,
                url=f"https://{shop.lower()}.example/p/{product_id}",
                in_stock=rng.random() > 0.2,
            )
        )
    return offers


_ADJECTIVE = {
    "striped": "striped",
    "dotted": "dotted",
    "checked": "checked",
    "labelled": "labelled",
    "zigzag": "zigzag",
    "two-tone": "two-tone",
    "diagonal": "diagonal-striped",
}


def generate(
    out_dir: Path,
    n_products: int = 24,
    photos_per_product: int = 4,
    query_photos_per_product: int = 1,
    seed: int = 0,
) -> SampleCatalog:
    """Write images/, queries/ and catalog.jsonl under ``out_dir``; same seed, same bytes."""
    if not 1 <= photos_per_product <= 20:  # CatalogUpsert takes 1..20 images
        raise ValueError("photos_per_product must be between 1 and 20")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "queries").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    designs = _design_products(n_products, rng)

    catalog = SampleCatalog(catalog_path=out_dir / "catalog.jsonl")
    lines = []
    for i, design in enumerate(designs):
        product_id = f"sku-{i + 1:04d}"
        category, base_price = SHAPES[design["shape"]]
        title = f"{design['main_colour'].capitalize()} {_ADJECTIVE[design['pattern']]} {design['shape']}"
        brand = rng.choice(BRANDS)
        offers = _offers(rng, product_id, base_price)

        obj = render_product(design)
        images, queries = [], []
        for k in range(photos_per_product + query_photos_per_product):
            is_query = k >= photos_per_product
            # One generator per photo: photos are independent draws, reproducible one by one.
            photo = photograph(obj, np.random.default_rng([seed, i, k]))
            rel = f"queries/{product_id}-q{k - photos_per_product}.jpg" if is_query else f"images/{product_id}-{k}.jpg"
            photo.save(out_dir / rel, "JPEG", quality=int(np.random.default_rng([seed, i, k, 1]).integers(70, 96)))
            (queries if is_query else images).append(rel)
            if is_query:
                catalog.queries.append((out_dir / rel, product_id))

        event = CatalogUpsert(
            event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"lookalike-sample/{seed}/{product_id}").hex,
            product_id=product_id,
            title=title,
            category=category,
            brand=brand,
            images=[ImageRef(path=p) for p in images],
            offers=offers,
        )
        lines.append(event.model_dump_json(exclude_none=True))
        catalog.products.append(
            {
                "product_id": product_id,
                "title": title,
                "category": category,
                "brand": brand,
                **{k: design[k] for k in ("shape", "main_colour", "secondary_colour", "pattern")},
                "images": images,
                "queries": queries,
                "offers": [o.model_dump() for o in offers],
            }
        )
    catalog.catalog_path.write_text("\n".join(lines) + "\n")
    return catalog


__all__ = ["SampleCatalog", "generate", "render_product", "photograph", "PALETTE", "SHAPES", "SHOPS"]
