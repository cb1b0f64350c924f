"""CPU/GPU embedding throughput from JPEG bytes to normalised vectors, with its bounds.

    python bench/embed.py --model efficientnet_lite0 --images 256 [--precision bf16] [--json]

Measured in one run, so the ratios hold on a noisy machine:

- ``naive_img_per_s``: the seed document's way, one image at a time, fp32, PIL preprocessing
  in the calling thread (decode included);
- ``batched_img_per_s``: ``embed_jobs()`` of the embedder ``load_embedder`` picks (``--runtime``:
  ONNX Runtime for fp32 on the CPU, PyTorch otherwise), as the embed function calls it: JPEG
  bytes in, batches of ``--batch``, decoding and preprocessing in the worker thread
  overlapped with the model;
- ``model_img_per_s``: that embedder's network alone on ready uint8 batches (the ceiling of the above);
- ``peak_fraction``: achieved FLOP/s of the batched path over this machine's measured matmul
  peak in the same precision (a 2048^3 GEMM, best of 5; int8: ``torch._int_mm``, int8 in and
  int32 out, as VNNI computes); FLOPs per image are counted by
  torch's FlopCounterMode on one forward pass (multiply-adds count 2).

Random weights time the same as pretrained ones, so a model whose weights are not on this
machine (resnet50 offline) is timed with its architecture.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from lookalike.shared.embedders import REGISTRY, BatchEmbedder, TorchEmbedder, build_embedder, default_batch_size
from lookalike.shared.embedding import ImageJob
from lookalike.shared.images import jpeg_header, open_jpeg
from lookalike.shared.messages import Box


def photos(n: int, seed: int = 0) -> list[bytes]:
    """``n`` 640x480 JPEGs like the pipeline's normalised images (smooth shapes, some texture)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = np.kron(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), np.ones((40, 40, 1), dtype=np.uint8))
        noisy = np.clip(base.astype(np.int16) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def photo_files(folder: str, n: int) -> list[bytes]:
    """Up to ``n`` real photos (e.g. ../shared/data/grocery-dev/val), normalised as ingest does."""
    from pathlib import Path

    from lookalike.shared.images import normalize
    from lookalike.shared.limits import IMAGE_MAX_SIDE, MAX_IMAGE_PIXELS

    files = sorted(Path(folder).rglob("*.jpg"))[:n]
    return [normalize(f.read_bytes(), IMAGE_MAX_SIDE, MAX_IMAGE_PIXELS)[0] for f in files]


def model_for(model_id: str) -> torch.nn.Module:
    import tempfile

    spec = REGISTRY[model_id]
    try:
        return spec.build(spec.find_weights(allow_download=False))
    except Exception:  # weights not here: random weights in the same architecture time the same
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/random.pth"
            torch.save(spec.architecture().state_dict(), path)
            return spec.build(path)


def matmul_peak_flops(dtype: torch.dtype, device: str, n: int = 0, repeats: int = 5) -> float:
    """Operations per second of an n^3 GEMM in ``dtype`` (int8: int8 x int8 -> int32, ``torch._int_mm``).

    ``n`` 0: 2048 on the CPU; on CUDA 8192, ten GEMMs to a timing: one 2048^3 GEMM lasts about
    50 us on an H100, so launch and synchronisation took half of each timing (333-352 TFLOP/s in
    the runs of 2026-11-26/27, 98 in one right after a compile, against about 800 for 8192^3).
    """
    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 2048)
    batch = 10 if cuda else 1
    if dtype == torch.int8:
        a = torch.randint(-128, 128, (n, n), dtype=dtype, device=device)
        b = torch.randint(-128, 128, (n, n), dtype=dtype, device=device)
        gemm = torch._int_mm
    else:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        gemm = torch.matmul
    best = float("inf")
    with torch.inference_mode():
        gemm(a, b)
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(batch):
                gemm(a, b)
            if cuda:
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / batch)
    return 2 * n**3 / best


def flops_per_image(model: torch.nn.Module, crop: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(1, 3, crop, crop, device=next(model.parameters()).device))
    return float(counter.get_total_flops())


def timed(fn, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def product_embedder(model_id: str, model: torch.nn.Module, precision: str, batch: int, device: str,
                     runtime: str = "auto", compile: str = "auto") -> BatchEmbedder:
    """The embedder the embed function would run for this model, precision and device
    (``compile``: as EMBED_COMPILE says; compiled at construction)."""
    return build_embedder(REGISTRY[model_id], model, device, precision, batch, runtime, compile)


def whole_image_jobs(jpegs: list[bytes]) -> list[ImageJob]:
    """The embed function's input without detection: JPEG bytes, each photo's whole-image box."""
    return [ImageJob(raw, [Box(x1=0, y1=0, x2=im.width, y2=im.height)]) for raw, im in
            zip(jpegs, (jpeg_header(raw) for raw in jpegs))]


def batched_img_per_s(model_id: str, jpegs: list[bytes], precision: str, device: str = "cpu",
                      compile: str = "auto") -> float:
    """Standalone ``embed_jobs`` from JPEG bytes (decoding in the worker thread while the network
    runs the batch before), with the product's batch size: the denominator of ``e2e.index_vs_embed``.
    The median of three runs: on this shared machine single runs of the same work spread by 1.5x."""
    embedder = product_embedder(model_id, model_for(model_id), precision, default_batch_size(device), device,
                                compile=compile)
    jobs = whole_image_jobs(jpegs)
    return len(jobs) / statistics.median(timed(lambda: embedder.embed_jobs(jobs), warmup=int(k == 0)) for k in range(3))


def run(model_id: str, n: int, precision: str, batch: int, device: str, folder: str | None = None,
        runtime: str = "auto", compile: str = "auto") -> dict:
    import copy

    spec = REGISTRY[model_id]
    batch = batch or default_batch_size(device)  # 0: what the product uses on this device
    jpegs = photo_files(folder, n) if folder else photos(n)
    n = len(jpegs)
    model = model_for(model_id)
    naive_model = copy.deepcopy(model).eval().to(device)  # the same weights, left as they are
    embedder = product_embedder(model_id, copy.deepcopy(model), precision, batch, device, runtime, compile)
    runtime = embedder.runtime

    # The seed document's way: one image at a time, fp32, contiguous layout, preprocessing inline.
    transform = spec.preprocessing.transform()

    def naive() -> None:
        with torch.inference_mode():
            for raw in jpegs:
                x = transform(open_jpeg(raw)).unsqueeze(0).to(device)
                torch.nn.functional.normalize(naive_model(x), dim=1)

    jobs = whole_image_jobs(jpegs)

    def batched() -> None:
        embedder.embed_jobs(jobs)

    ready = np.stack([spec.preprocessing.pixels(open_jpeg(raw)) for raw in jpegs[:batch]])

    def model_only() -> None:
        for _ in range(max(1, n // batch)):
            embedder.features(ready)

    # How far bf16 moves the vectors (the default precision is chosen on this and on Recall@1).
    images = [open_jpeg(raw) for raw in jpegs]
    fp32_rows = TorchEmbedder(spec, model, device, "fp32", batch).embed(images)
    bf16_rows = TorchEmbedder(spec, model, device, "bf16", batch).embed(images)
    cosines = np.sum(fp32_rows * bf16_rows, axis=1)
    runtime_cosines = np.sum(fp32_rows * embedder.embed(images), axis=1)  # the chosen runtime against PyTorch

    naive_s = timed(naive)
    batched_s = timed(batched)
    model_s = timed(model_only)
    flops = flops_per_image(naive_model, spec.preprocessing.crop)
    peak = matmul_peak_flops({"bf16": torch.bfloat16, "int8": torch.int8}.get(precision, torch.float32), device)
    batched_rate = n / batched_s
    return {
        "device": device, "model": model_id, "precision": precision, "runtime": runtime, "batch": batch, "images": n,
        "threads": torch.get_num_threads(), "compile_s": embedder.compile_s,
        "warm_up_s": embedder.warm_up_s and round(embedder.warm_up_s, 1),
        "embed.naive_img_per_s": round(n / naive_s, 1),
        "embed.batched_img_per_s": round(batched_rate, 1),
        "embed.speedup": round(naive_s / batched_s, 2),
        "embed.model_img_per_s": round(max(1, n // batch) * len(ready) / model_s, 1),
        "embed.gflop_per_image": round(flops / 1e9, 2),
        "embed.matmul_peak_gflops": round(peak / 1e9, 1),
        "embed.peak_fraction": round(batched_rate * flops / peak, 3),
        "embed.bf16_cosine_to_fp32_mean": round(float(cosines.mean()), 5),
        "embed.bf16_cosine_to_fp32_min": round(float(cosines.min()), 5),
        "embed.cosine_to_torch_fp32_min": round(float(runtime_cosines.min()), 5),
        "photos": folder or "synthetic",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--batch", type=int, default=0, help="images per network batch (0: the product's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx"))
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help="torch.compile the PyTorch network, as EMBED_COMPILE (auto: bf16 on a CPU)")
    parser.add_argument("--photos", help="a folder of real photos (default: synthetic 640x480 JPEGs)")
    parser.add_argument("--json", action="store_true", help="one JSON line only")
    args = parser.parse_args()
    result = run(args.model, args.images, args.precision, args.batch, args.device, args.photos, args.runtime,
                 args.compile)
    if not args.json:
        for k, v in result.items():
            print(f"{k:28s} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
