"""ImageNet EfficientNet-Lite0 at several input sizes, scored on the series hold-out of grocery-dev train.

    python bench/input_size.py

No training and no val: the photos of bench/grocery/train.csv are embedded at each size, the
series hold-out that `lookalike finetune` would make (seed 0, 15 %, cosine 0.25, series found
with the 224 px features) queries the rest. Prints one line per size (docs/quality.md).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from lookalike.evaluation import read_labelled_csv, retrieval_metrics  # noqa: E402
from lookalike.finetune import FinetuneConfig, _series_holdout  # noqa: E402
from lookalike.shared.embedders import REGISTRY  # noqa: E402

SIZES = [(256, 224), (320, 288), (320, 320)]  # (resize, crop)


def main() -> None:
    rows = read_labelled_csv(ROOT / "bench" / "grocery" / "train.csv")
    labels = [lab for _, lab in rows]
    images = [Image.open(p).convert("RGB") for p, _ in rows]
    spec = REGISTRY["efficientnet_lite0"]
    net = spec.build(spec.find_weights()).eval()
    cfg = FinetuneConfig()
    held = None
    for resize, crop in SIZES:
        transform = replace(spec.preprocessing, resize=resize, crop=crop).transform()
        t0 = time.monotonic()
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            for s in range(0, len(images), 64):
                x = torch.stack([transform(im) for im in images[s : s + 64]])
                out.append(torch.nn.functional.normalize(net(x).float(), dim=1))
        emb = torch.cat(out).numpy()
        if held is None:  # the split comes from the first (224 px) features, as in finetune
            held = _series_holdout(emb, labels, cfg.holdout, cfg.series_distance, cfg.seed)
        fit = ~held
        m = retrieval_metrics(emb[fit], [labels[i] for i in np.flatnonzero(fit)],
                              emb[held], [labels[i] for i in np.flatnonzero(held)])
        print(f"resize {resize} crop {crop}: hold-out ({int(held.sum())} photos) R@1 {m['recall@1']:.3f} "
              f"R@5 {m['recall@5']:.3f} ({time.monotonic() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
