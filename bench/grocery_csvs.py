"""Write eval/finetune CSVs (``path,label``) for the grocery-dev data set.

    python bench/grocery_csvs.py [--data ../shared/data/grocery-dev] [--out bench/grocery]

Writes ``train.csv``, ``val.csv`` (in-store photos) and ``iconic.csv`` (one catalogue
image per product) with absolute paths. The label is the fine class name (81 products).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "grocery-dev"


def class_names(data: Path) -> dict[int, tuple[str, str]]:
    """fine class id -> (label, iconic image path)."""
    out = {}
    with open(data / "classes.csv", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            name, cid, iconic = row[0].strip(), int(row[1]), row[4].strip().lstrip("/")
            out[cid] = (name, str((data / iconic).resolve()))
    labels = [v[0] for v in out.values()]
    assert len(set(labels)) == len(labels), "class names are not unique"
    return out


def write_csvs(data: Path, out: Path) -> dict[str, Path]:
    classes = class_names(data)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in ("train", "val"):
        rows = []
        for line in (data / f"{split}.txt").read_text().splitlines():
            if not line.strip():
                continue
            path, fine, _coarse = (p.strip() for p in line.split(","))
            rows.append((str((data / path).resolve()), classes[int(fine)][0]))
        written[split] = _write(out / f"{split}.csv", rows)
    written["iconic"] = _write(out / "iconic.csv", [(p, name) for name, p in classes.values()])
    return written


def _write(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(ROOT / "bench" / "grocery"))
    a = ap.parse_args()
    for name, p in write_csvs(Path(a.data), Path(a.out)).items():
        print(f"{name}: {p} ({sum(1 for _ in open(p)) - 1} rows)")
