"""The embed function on one GPU: Kafka record values in, vectors and point payloads out (issue 11).

    python -m bench.gpu_embed [--model resnet50] [--records 4096] [--batch 256] [--workers 1 2 3]
                              [--compile] [--json]

Sized to finish in one run of a few minutes on an H100. Every stage runs on the same records
(photo-like 640x480 JPEGs inside ``images.detected`` JSON, as detect publishes them with
detection off: one whole-image box per photo, index intent, so each point gets a thumbnail):

- ``parse``: record values -> ``DetectedImage`` (pydantic, the runner's own parse);
- ``model``: the network alone on uint8 batches already on the GPU (bf16, channels-last);
- ``decode``: the embedder's worker alone: nvJPEG decode, crop + resize, thumbnails (GPU);
- ``jobs``: ``embed_jobs`` from JPEG bytes to normalised vectors and thumbnails (decode
  overlapped with the model), with the default decode workers and with each of ``--workers``;
- ``threads``: the CPU each thread group used in one pass of the function, in cores (1.0: a
  thread busy all the time), read from /proc: which one bounds it;
- ``function``: parse + ``Embed.on_batch`` (thumbnails, payloads, points) into a store that
  only counts: the whole embed function but for the broker and the store write;
- ``seed``: the landed path before this change (PIL decode in the caller, ``embed(images)``);
- ``naive``: the seed document's per-image fp32 loop;
- agreement: cosine between the GPU path (bf16, nvJPEG) and the CPU path (PIL, fp32) for
  EfficientNet-Lite0 with its pretrained weights and for the benchmarked model.

Random weights time the same as pretrained ones (ResNet-50's are not installable offline).
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import os
import re
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageFilter

from bench.embed import flops_per_image, matmul_peak_flops, model_for
from lookalike.functions.embed.handler import Embed
from lookalike.shared.embedders import REGISTRY, TorchEmbedder
from lookalike.shared.embedding import ImageJob
from lookalike.shared.images import crop, open_jpeg
from lookalike.shared.indexes import Indexes
from lookalike.shared.messages import (
    THUMBNAIL_SIDE,
    Box,
    DetectedImage,
    DetectedMessage,
    DetectedObject,
    IndexContext,
    ProductInfo,
)
from lookalike.shared.runtime import Route


def photo(seed: int) -> bytes:
    """A 640x480 JPEG (quality 90) about the size of a normalised product photo (~40 KB)."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), np.ones((40, 40, 1), dtype=np.uint8))
    smooth = np.asarray(Image.fromarray(blocks).filter(ImageFilter.GaussianBlur(6))).astype(np.int16)
    pixels = np.clip(smooth + rng.integers(-3, 4, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def record(k: int, jpeg: bytes) -> bytes:
    """One images.detected record value, as detect writes it."""
    product = ProductInfo(product_id=f"p{k}", title=f"product {k}", brand="b", category="c", offers=[])
    msg = DetectedImage(intent="index", image_id=f"{k:064x}", jpeg=base64.b64encode(jpeg).decode(),
                        width=640, height=480,
                        index=IndexContext(event_id=f"e{k}", product=product, image_index=0,
                                           image_url=f"https://shop.example/{k}.jpg"),
                        objects=[DetectedObject(box=Box(x1=0, y1=0, x2=640, y2=480), label="image", score=1.0)])
    return msg.to_bytes()


class CountingStore:
    """The vector store's upsert, counting points: the store write is not what is measured here."""

    def __init__(self) -> None:
        self.points = 0

    def upsert(self, collection: str, points: list) -> None:
        self.points += len(points)

    def read_doc(self, name: str) -> None:
        return None  # no index state: the one model is active


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(n: int, fn, repeats: int = 3) -> float:
    """Images per second of ``fn`` (which handles ``n`` images): best of ``repeats`` after one warm-up."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return n / best


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads, by group (Python's thread names without their
    numbers; threads Python did not start by their kernel name)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    groups: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(tid), f"native:{re.sub(r'[0-9]+$', '', comm)}")
        group = re.sub(r"_[0-9]+$", "", name)
        groups[group] = groups.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return groups


def cores_busy(fn) -> dict[str, float]:
    """Cores each thread group kept busy while ``fn`` ran (its CPU seconds over the wall time)."""
    before, t0 = thread_cpu(), time.perf_counter()
    fn()
    sync()
    wall, after = time.perf_counter() - t0, thread_cpu()
    busy = {g: (after[g] - before.get(g, 0.0)) / wall for g in after}
    return {g: round(v, 2) for g, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v >= 0.02}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def agreement(model_id: str, jpegs: list[bytes], device: str) -> dict:
    """Cosine between the GPU path (nvJPEG, bf16) and the CPU path (PIL, fp32) on the same photos."""
    spec = REGISTRY[model_id]
    model = model_for(model_id)
    gpu = TorchEmbedder(spec, copy.deepcopy(model), device, "bf16", 64)
    cpu = TorchEmbedder(spec, model, "cpu", "fp32", 64, decode="pil")
    whole = [Box(x1=0, y1=0, x2=640, y2=480)]
    part = [Box(x1=100, y1=60, x2=420, y2=400)]  # a detected object's box: crop then resize
    rows = {}
    for name, boxes in (("whole", whole), ("box", part)):
        jobs = [ImageJob(j, boxes) for j in jpegs]
        a = np.concatenate([r.vectors for r in gpu.embed_jobs(jobs)])
        b = np.concatenate([r.vectors for r in cpu.embed_jobs(jobs)])
        c = cosines(a, b)
        rows[f"{name}_mean"], rows[f"{name}_min"] = round(float(c.mean()), 5), round(float(c.min()), 5)
    return rows


def replica(rank: int, records: int, batch: int, model_id: str, device: str, barrier, results) -> None:
    """One embed function process (a consumer-group member) on the shared GPU: its own records,
    polls of 4 batches; reports when its timed passes started and ended."""
    unique = [photo(10_000 * (rank + 1) + k) for k in range(128)]
    values = [record(k, unique[k % len(unique)]) for k in range(records)]
    embedder = TorchEmbedder(REGISTRY[model_id], model_for(model_id), device, "bf16", batch)
    embed = Embed(embedder, Indexes.fixed(CountingStore(), "b", model_id))
    route = Route("images.detected", DetectedMessage, lambda m: [], batch=True)

    def run() -> None:
        for s in range(0, records, 4 * batch):
            embed.on_batch([route.parse(v) for v in values[s : s + 4 * batch]])

    run()  # warm-up: cuDNN tuning, allocator
    barrier.wait()
    t0 = time.time()
    run()
    run()
    results.put((t0, time.time(), 2 * records))


def replicas(count: int, records: int, batch: int, model_id: str, device: str = "cuda") -> float:
    """Images per second of ``count`` embed processes sharing the GPU, from the first start to the last end."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=replica, args=(r, records, batch, model_id, device, barrier, results))
             for r in range(count)]
    for p in procs:
        p.start()
    spans = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sum(n for _, _, n in spans) / (max(e for _, e, _ in spans) - min(s for s, _, _ in spans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--unique", type=int, default=1024, help="distinct photos among the records")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 3],
                        help="also time embed_jobs with this many decode workers")
    parser.add_argument("--compile", action="store_true", help="also time the network under torch.compile")
    parser.add_argument("--replicas", type=int, nargs="*", default=[2, 3],
                        help="also time this many embed processes sharing the GPU (CUDA only)")
    parser.add_argument("--json", action="store_true", help="the JSON line only")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()
    with ProcessPoolExecutor() as pool:
        unique = list(pool.map(photo, range(args.unique), chunksize=16))
    jpegs = [unique[k % len(unique)] for k in range(args.records)]
    values = [record(k, j) for k, j in enumerate(jpegs)]
    n, batch = len(values), args.batch
    chunks = [values[s : s + batch] for s in range(0, n, batch)]
    route = Route("images.detected", DetectedMessage, lambda m: [], batch=True)
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": args.model,
                 "precision": "bf16", "batch": batch, "records": n, "torch": torch.__version__,
                 "jpeg_kb_mean": round(np.mean([len(j) for j in unique]) / 1024, 1),
                 "record_kb_mean": round(np.mean([len(v) for v in values[:64]]) / 1024, 1)}

    spec = REGISTRY[args.model]
    model = model_for(args.model)
    embedder = TorchEmbedder(spec, copy.deepcopy(model), device, "bf16", batch)
    out["prep_workers"] = embedder.prep_workers
    store = CountingStore()
    embed = Embed(embedder, Indexes.fixed(store, "bench", embedder.spec.id))
    parsed = [[route.parse(v) for v in chunk] for chunk in chunks]
    jobs = [ImageJob(base64.b64decode(m.jpeg), [o.box for o in m.objects], THUMBNAIL_SIDE) for c in parsed for m in c]
    ready = torch.randint(0, 256, (batch, spec.preprocessing.crop, spec.preprocessing.crop, 3),
                          dtype=torch.uint8, device=device)

    out["parse_img_per_s"] = round(rate(n, lambda: [route.parse(v) for v in values]), 1)
    out["b64decode_img_per_s"] = round(rate(n, lambda: [m.jpeg_bytes() for c in parsed for m in c]), 1)
    out["model_img_per_s"] = round(rate(batch * 16, lambda: [embedder.features(ready) for _ in range(16)]), 1)
    job_chunks = embedder._job_chunks(jobs)
    out["decode_img_per_s"] = round(rate(n, lambda: [embedder._prepare_jobs(c).finish_thumbnails()
                                                     for c in job_chunks]), 1)
    out["jobs_img_per_s"] = round(rate(n, lambda: embedder.embed_jobs(jobs)), 1)
    for workers in args.workers:
        other = TorchEmbedder(spec, embedder.model.net, device, "bf16", batch, prep_workers=workers)
        out[f"jobs_{workers}_workers_img_per_s"] = round(rate(n, lambda other=other: other.embed_jobs(jobs)), 1)
    out["threads.jobs"] = cores_busy(lambda: embedder.embed_jobs(jobs))
    # One more pass with clocks on the workers (summed) and the network: does decoding hide behind the network?
    spent = {"worker": 0.0, "network": 0.0}

    def clocked(name, fn):
        def run(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent[name] += time.perf_counter() - t0
        return run

    plain_prepare, plain_features = embedder._prepare_jobs, embedder.features
    embedder._prepare_jobs, embedder.features = clocked("worker", plain_prepare), clocked("network", plain_features)
    t0 = time.perf_counter()
    embedder.embed_jobs(jobs)
    out["jobs_pass_s"] = round(time.perf_counter() - t0, 3)
    out["jobs_worker_busy_s"], out["jobs_network_busy_s"] = round(spent["worker"], 3), round(spent["network"], 3)
    embedder._prepare_jobs, embedder.features = plain_prepare, plain_features

    def function(poll: int):
        def run() -> None:
            for s in range(0, n, poll):
                embed.on_batch([route.parse(v) for v in values[s : s + poll]])
        return run

    # The runner hands embed what one poll returns (POLL_MAX_RECORDS): at the embed batch size
    # each call is one batch, decoded then run; at 4x it the worker decodes the next batch
    # while the network runs this one.
    out["function_poll_batch_img_per_s"] = round(rate(n, function(batch)), 1)
    out["embed.batched_img_per_s"] = round(rate(n, function(4 * batch)), 1)
    assert store.points == n * 8, store.points  # every record became a point, in each of the 8 passes
    out["threads.function"] = cores_busy(function(4 * batch))

    # The embed function scales out as consumer-group members: several processes on one GPU.
    if device == "cuda":
        for count in args.replicas:
            out[f"function_{count}_processes_img_per_s"] = round(replicas(count, 2048, batch, args.model), 1)

    # Where the worker's time goes, on one batch.
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    from lookalike.shared.embedders import THUMBNAIL_LANES, _fit, _resized
    from lookalike.shared.images import jpeg_frame, jpeg_header

    one = jobs[:batch]
    tensors = [torch.frombuffer(bytearray(j.jpeg), dtype=torch.uint8) for j in one]
    decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    squares = [im[:, 30:450, 110:530] for im in decoded]
    small = _resized(decoded, lambda k: _fit(decoded[k].shape[1:], THUMBNAIL_SIDE), "bilinear")
    host, lanes = list(small.cpu()), THUMBNAIL_LANES
    arrays = [t.permute(1, 2, 0).numpy() for t in host]
    from lookalike.shared.images import to_jpeg

    out["thumbnail_lanes"] = lanes
    steps = {
        "headers_pil": lambda: [jpeg_header(j.jpeg) for j in one],
        "frame_headers": lambda: [jpeg_frame(j.jpeg) for j in one],
        "to_tensors": lambda: [torch.frombuffer(bytearray(j.jpeg), dtype=torch.uint8) for j in one],
        "nvjpeg_decode": lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device),
        "crop_resize": lambda: _resized(squares, lambda _: (224, 224), spec.preprocessing.interpolation),
        "thumb_resize": lambda: _resized(decoded, lambda k: _fit(decoded[k].shape[1:], THUMBNAIL_SIDE), "bilinear"),
        "thumb_encode_nvjpeg": lambda: [e.cpu() for e in encode_jpeg(list(small), quality=75)],
        "thumb_encode_lanes": lambda: list(embedder._thumbnail_pool.map(
            lambda k: encode_jpeg(host[k::lanes], quality=75), range(lanes))),
        "thumb_encode_pil_lanes": lambda: list(embedder._thumbnail_pool.map(
            lambda a: to_jpeg(Image.fromarray(a), 75), arrays)),
    }
    for name, fn in steps.items():
        out[f"worker.{name}_img_per_s"] = round(rate(len(one) * 4, lambda fn=fn: [fn() for _ in range(4)]), 1)

    few = jpegs[: min(512, n)]

    def seed() -> None:  # the landed path: PIL decode, thumbnail and crop in the caller, then embed(images)
        from lookalike.shared.images import thumbnail

        images = [open_jpeg(j) for j in few]
        [thumbnail(im, THUMBNAIL_SIDE) for im in images]
        embedder.embed([crop(im, Box(x1=0, y1=0, x2=640, y2=480)) for im in images])

    out["seed_img_per_s"] = round(rate(len(few), seed, repeats=1), 1)
    naive_model = copy.deepcopy(model).eval().to(device)
    transform = spec.preprocessing.transform()
    naive_set = jpegs[:256]

    def naive() -> None:
        with torch.inference_mode():
            for raw in naive_set:
                x = transform(open_jpeg(raw)).unsqueeze(0).to(device)
                torch.nn.functional.normalize(naive_model(x), dim=1).cpu()

    out["embed.naive_img_per_s"] = round(rate(len(naive_set), naive, repeats=1), 1)
    out["embed.speedup"] = round(out["embed.batched_img_per_s"] / out["embed.naive_img_per_s"], 1)
    out["speedup_vs_seed"] = round(out["embed.batched_img_per_s"] / out["seed_img_per_s"], 1)
    flops = flops_per_image(copy.deepcopy(model).eval(), spec.preprocessing.crop)
    peak = matmul_peak_flops(torch.bfloat16, device)
    out["embed.gflop_per_image"] = round(flops / 1e9, 2)
    out["embed.matmul_peak_tflops"] = round(peak / 1e12, 1)
    out["embed.peak_fraction"] = round(out["embed.batched_img_per_s"] * flops / peak, 3)
    out["model_peak_fraction"] = round(out["model_img_per_s"] * flops / peak, 3)
    out["gpu_mem_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None

    if args.compile:
        t0 = time.perf_counter()
        compiled = torch.compile(embedder.model)
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
            compiled(ready)
        sync()
        out["compile_s"] = round(time.perf_counter() - t0, 1)

        def compiled_model() -> None:
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
                for _ in range(16):
                    compiled(ready)

        out["compiled_model_img_per_s"] = round(rate(batch * 16, compiled_model), 1)

    # The GPU path's edges: thumbnails are JPEGs of the right size; a corrupt JPEG fails alone
    # (the batched decode fails, each is retried alone); a CMYK JPEG falls back to PIL.
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(unique[1])).convert("CMYK").save(cmyk, format="JPEG")
    edge_jobs = [ImageJob(unique[0], [Box(x1=0, y1=0, x2=640, y2=480)], THUMBNAIL_SIDE),
                 ImageJob(unique[0][:800] + b"\0" * 800, [Box(x1=0, y1=0, x2=640, y2=480)]),
                 ImageJob(cmyk.getvalue(), [Box(x1=0, y1=0, x2=640, y2=480)])]
    good, bad, fallback = embedder.embed_jobs(edge_jobs)
    out["check.thumbnail_size"] = list(Image.open(io.BytesIO(good.thumbnail)).size)
    out["check.corrupt_is_error"] = isinstance(bad, Exception)
    out["check.cmyk_embedded"] = not isinstance(fallback, Exception)

    sample = unique[:64]
    for model_id in dict.fromkeys(["efficientnet_lite0", args.model]):
        for k, v in agreement(model_id, sample, device).items():
            out[f"cosine_gpu_vs_cpu.{model_id}.{k}"] = v
    out["script_s"] = round(time.perf_counter() - t_start, 1)

    if not args.json:
        for k, v in out.items():
            print(f"{k:48s} {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
