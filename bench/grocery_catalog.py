"""Write the grocery-dev train photos as a catalogue file (what ``lookalike index`` and
``lookalike finetune --catalog`` read).

    python bench/grocery_catalog.py [--data ../shared/data/grocery-dev] [--out /tmp/grocery-train.jsonl]
                                    [--relative]

One ``upsert`` per product: product id = the fine class name (the label of
``bench/grocery/train.csv``), title from it, category = the coarse class folder
(Fruit/Vegetables/Packages), a made-up offer, and the photos as local ``path`` images,
in ``train.txt`` order (the order of ``train.csv``). Paths are absolute, or relative to the
catalogue file's folder with ``--relative``.

An event carries at most 20 images (``shared/limits.py``), and 71 of the 81 products have
more train photos (16-70): such a label is written as products ``label``, ``label#2``,
``label#3``... of at most 20 photos each, as ``lookalike eval --mode pipeline`` indexes a
gallery. ``lookalike finetune --catalog FILE --split-mark '#'`` trains them as one label;
without ``--split-mark`` each part is a product of its own (a negative of its siblings).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from bench.grocery_csvs import DEFAULT_DATA, class_names  # noqa: E402
from lookalike.evaluation import SPLIT_MARK  # noqa: E402
from lookalike.shared.limits import MAX_IMAGES_PER_EVENT  # noqa: E402
from lookalike.shared.messages import CatalogUpsert  # noqa: E402

SHOPS = ("GroceryOne", "FreshMart", "CornerShop")


def train_rows(data: Path) -> list[tuple[Path, str, str]]:
    """(absolute photo path, label, coarse folder) per line of ``train.txt``, in file order."""
    classes = class_names(data)
    rows = []
    for line in (data / "train.txt").read_text().splitlines():
        if not line.strip():
            continue
        path, fine, _coarse = (p.strip() for p in line.split(","))
        rel = Path(path.lstrip("/"))
        category = rel.parts[1] if len(rel.parts) > 2 else ""  # train/<Fruit|Vegetables|Packages>/...
        rows.append(((data / rel).resolve(), classes[int(fine)][0], category))
    return rows


def write_catalog(data: Path, out: Path, relative: bool = False, max_images: int = MAX_IMAGES_PER_EVENT) -> dict:
    """Write the catalogue; returns counts (products = events, labels, photos)."""
    by_label: dict[str, list[tuple[Path, str]]] = {}
    for path, label, category in train_rows(data):
        by_label.setdefault(label, []).append((path, category))
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for label, photos in by_label.items():
        price = round(rng.uniform(0.5, 6.0), 2)
        for n, s in enumerate(range(0, len(photos), max_images)):
            pid = label if n == 0 else f"{label}{SPLIT_MARK}{n + 1}"
            chunk = photos[s : s + max_images]
            images = [{"path": os.path.relpath(p, out.parent.resolve()) if relative else str(p)} for p, _ in chunk]
            event = CatalogUpsert.model_validate({
                "event_id": f"grocery-train-{pid}".replace(" ", "_")[:100],
                "product_id": pid,
                "title": label.replace("-", " ").replace("_", " "),
                "category": chunk[0][1],
                "images": images,
                "offers": [{"shop": SHOPS[n % len(SHOPS)], "price": price, "currency": "SEK", "in_stock": True}],
            })  # validated as `lookalike index` will
            lines.append(event.model_dump_json(exclude_none=True))
    out.write_text("\n".join(lines) + "\n")
    return {"products": len(lines), "labels": len(by_label), "photos": sum(map(len, by_label.values()))}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default="/tmp/grocery-train.jsonl")
    ap.add_argument("--relative", action="store_true", help="image paths relative to the catalogue file's folder")
    a = ap.parse_args()
    c = write_catalog(Path(a.data), Path(a.out), relative=a.relative)
    print(f"{a.out}: {c['products']} upserts ({c['labels']} labels, {c['photos']} photos)")
