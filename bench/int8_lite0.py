"""Static int8 quantization of the EfficientNet-Lite0 embedder in ONNX Runtime (CPU): speed and quality.

    .venv/bin/python bench/int8_lite0.py [--work /tmp/int8] [--seconds 10] [--slice 1] [--recall all|best|none]
                                         [--variants NAME,NAME...] [--write-ranges]

Builds the product's fp32 graph (``onnx_graph(Normalized(...))``: uint8 NHWC ``pixels`` in,
``features`` out), runs ``quant_pre_process`` on it and quantizes it with ``quantize_static``
(calibration: 200 grocery-dev train photos, every 13th row of bench/grocery/train.csv) in
several variants. For each it measures, in one process so that the ratios hold on a noisy
machine:

- model-only img/s at batch 1 and batch 32 on ready uint8 pixels, with the product's session
  options (intra_op_num_threads=0, session.intra_op.allow_spinning=0): after a warm-up, the
  variants alternate A/B/C.../A/B/C... in slices of --slice seconds until each has run
  --seconds (the median slice is reported, and the median of the per-pass ratios to fp32:
  this machine's speed drifts by +-20 % within seconds);
- cosine between its vectors and the fp32 graph's on the 296 grocery-dev val photos
  (bench/grocery/val.csv): mean and min;
- Recall@1 on grocery-dev (gallery bench/grocery/train.csv, queries bench/grocery/val.csv),
  computed here: the images are decoded as ``lookalike eval`` does (EXIF transpose, RGB,
  ``Preprocessing.pixels``), embedded by the variant's session, L2-normalised and scored by
  ``lookalike.evaluation.retrieval_metrics`` (the code behind ``lookalike eval --mode direct``).
  The fp32 row checks this against the eval command's 0.554.

``--write-ranges`` copies the Percentile calibration (ONNX Runtime's calibration cache) to
``shared/int8_ranges/efficientnet_lite0-<weights digest>.json``: the ranges the product ships.
Whenever ranges ship for these weights, the row "product" is the graph ``lookalike.shared.int8``
builds from them (what ``EMBED_PRECISION=int8`` runs), measured like the others.

Variant notes (what the script found on a 2-core AVX-512 VNNI machine):

- "fold": the stem's input quantization is pinned (TensorQuantOverrides) to scale 1/128,
  zero point 127. Lite0 normalises every channel as (p - 127) / 128, so the quantized stem
  input is exactly the uint8 pixel: the Cast/Mul/Sub/QuantizeLinear chain is then removed
  and the uint8 pixels feed the stem's DequantizeLinear directly. Same vectors (cosine to fp32
  equal to 5 decimals with and without the fold); it
  saves the fp32 Mul/Sub that ONNX Runtime otherwise runs in NHWC layout with a 3-wide
  broadcast (about 30 % of the int8 graph's time).
- the global average pool (and Flatten) is kept in fp32 so that ``features`` is not
  re-quantized to 8 bits.
- a Conv excluded with nodes_to_exclude whose input comes from a DequantizeLinear is NOT run in
  fp32 by ONNX Runtime: its WeightBiasQuantization graph transformer quantizes its weights
  again (per tensor), which wrecks depthwise convolutions. Variants that keep such convs in
  fp32 pass disabled_optimizers=["WeightBiasQuantization"] to the session (the stem conv does
  not need it: its input is the fp32 normalisation).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CSV = ROOT / "bench/grocery/train.csv"
VAL_CSV = ROOT / "bench/grocery/val.csv"
CROP = 224
CALIB_EVERY = 13
CALIB_N = 200
CALIB_BATCH = 8

MUL, SUB = "/Mul", "/Sub"
STEM_INPUT = "/Sub_output_0"  # the normalised image, the stem conv's input
GAP = ["/net/_avg_pooling/GlobalAveragePool", "/net/Flatten"]
STEM = ["/net/_conv_stem/Conv", "/net/_swish/Clip"]
B1_PROJECT = ["/net/_blocks.1/_project_conv/Conv"]
B8_DEPTHWISE = ["/net/_blocks.8/_depthwise_conv/Conv", "/net/_blocks.8/_swish_1/Clip"]
WBQ = "WeightBiasQuantization"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def load_pixels(csv_path: Path, work: Path, spec) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, 224, 224, 3) pixels of a path,label CSV, decoded as ``lookalike eval`` does; cached in ``work``."""
    from PIL import Image, ImageOps

    from lookalike.evaluation import read_labelled_csv

    rows = read_labelled_csv(csv_path)
    paths, labels = [p for p, _ in rows], [lab for _, lab in rows]
    key = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:12]
    cache = work / f"pixels-{csv_path.stem}-{key}.npy"
    if cache.is_file():
        return np.load(cache), labels

    def pixels(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return spec.preprocessing.pixels(ImageOps.exif_transpose(im).convert("RGB"))

    t0 = time.monotonic()
    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:  # PIL's decode and resampling release the GIL
        arr = np.stack(list(ex.map(pixels, paths)))
    np.save(cache, arr)
    log(f"decoded {len(paths)} images of {csv_path.name} in {time.monotonic() - t0:.1f}s")
    return arr, labels


class Calibration:
    """CalibrationDataReader over fixed batches; ``set_range`` lets quantize_static calibrate in chunks."""

    def __init__(self, pixels: np.ndarray, batch: int = CALIB_BATCH):
        self.batches = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.batches[start_index:end_index])

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {"pixels": x}


# --------------------------------------------------------------------------- graphs


def fp32_graph(work: Path, spec) -> tuple[str, str]:
    """The product's fp32 graph and its weights digest (what the shipped int8 ranges are keyed by)."""
    from lookalike.shared.embedders import Normalized, onnx_graph, weights_digest

    model = spec.build(spec.find_weights(None, allow_download=False))
    net = Normalized(model, spec.preprocessing).eval()
    return onnx_graph(net, CROP, work / "fp32"), weights_digest(net)


def fold_input(path: Path) -> None:
    """Feed the uint8 pixels straight into the stem's DequantizeLinear (the product's ``int8.fold_input``)."""
    import onnx

    from lookalike.shared.int8 import RECIPES, fold_input

    m = onnx.load(str(path))
    fold_input(m, RECIPES["efficientnet_lite0"])
    onnx.save(m, str(path))


def quantize(variant: dict, pre: Path, out: Path, calib: Calibration, work: Path, calib_key: str) -> tuple[float, int]:
    """quantize_static with the variant's arguments; returns (seconds, warnings logged)."""
    from onnxruntime.quantization import quantize_static

    kwargs = dict(variant["args"])
    method = kwargs["calibrate_method"]
    extra = dict(kwargs.pop("extra_options", {}))
    if method.name != "MinMax":
        # The histogram calibrators keep every activation of what they were fed (~73 MB an
        # image here): feed them 5 chunks of 40 images (the option's name says MinMax, but
        # quantize_static uses it for every calibrator; histograms are merged across chunks).
        extra["CalibStridedMinMax"] = 5
    if variant.get("fold"):
        extra["TensorQuantOverrides"] = {
            STEM_INPUT: [{"scale": np.array(1 / 128, np.float32), "zero_point": np.array(127, np.uint8)}]}
    cache = work / f"calib-{calib_key}-{method.name}.json"

    class Count(logging.Handler):
        n = 0
        seen: set = set()

        def emit(self, record):
            Count.n += 1
            msg = record.getMessage()
            if msg not in Count.seen and len(Count.seen) < 3:
                Count.seen.add(msg)
                first = msg.splitlines()[0] if msg else ""
                print(f"  quantize_static {record.levelname}: {first[:200]}", file=sys.__stdout__, flush=True)

    handler = Count(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    t0 = time.monotonic()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram collectors print progress
            quantize_static(str(pre), str(out), calib, extra_options=extra, calibration_cache_path=str(cache), **kwargs)
    finally:
        root.removeHandler(handler)
    if variant.get("fold"):
        fold_input(out)
    return time.monotonic() - t0, Count.n


def session(path: str | Path, disabled: list[str] | None = None, optimized_to: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled or [])


def features(sess, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    out = [sess.run(None, {"pixels": pixels[s : s + batch]})[0] for s in range(0, len(pixels), batch)]
    f = np.concatenate(out).astype(np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def batches(pixels: np.ndarray, batch: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(pixels[s : s + batch]) for s in range(0, len(pixels) - batch + 1, batch)][:8]


def timed_slice(sess, x: list[np.ndarray], seconds: float) -> float:
    """img/s of back-to-back runs for at least ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        sess.run(None, {"pixels": x[n % len(x)]})
        n += 1
    return n * len(x[0]) / elapsed


def speed(rows: dict, pixels: np.ndarray, batch: int, seconds: float, slice_s: float) -> None:
    """Interleaved timing: pass after pass, every variant runs one ``slice_s`` slice (the order rotates
    each pass), until each has run ``seconds``. Stores the slice rates (``b<batch>``) and, per pass, the
    ratio to the fp32 slice of the same pass (``b<batch>_x``): a noisy machine drifts within seconds."""
    x = batches(pixels, batch)
    names = list(rows)
    for name in names:  # warm-up
        for i in range(3 if batch > 1 else 20):
            rows[name]["sess"].run(None, {"pixels": x[i % len(x)]})
    passes = max(1, int(np.ceil(seconds / slice_s)))
    for p in range(passes):
        rates = {}
        for k in range(len(names)):
            name = names[(p + k) % len(names)]
            rates[name] = timed_slice(rows[name]["sess"], x, slice_s)
        for name, ips in rates.items():
            rows[name].setdefault(f"b{batch}", []).append(ips)
            rows[name].setdefault(f"b{batch}_x", []).append(ips / rates["fp32"])


def op_summary(path: Path) -> str:
    import collections

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c = collections.Counter((f"{n.domain}." if n.domain else "") + n.op_type for n in m.graph.node)
    return ", ".join(f"{k} x{v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/int8", help="graphs, calibration caches and pixel caches")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per variant and batch size")
    ap.add_argument("--slice", type=float, default=1.0, help="seconds of one timing slice (variants alternate)")
    ap.add_argument("--recall", choices=["best", "all", "none"], default="all",
                    help="Recall@1 for fp32 and: the best int8 variant, every variant, or none")
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names (fp32 is always run)")
    ap.add_argument("--write-ranges", action="store_true",
                    help="write the Percentile ranges to shared/int8_ranges/ (what the product ships; needs a "
                         "Percentile variant in --variants)")
    args = ap.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from lookalike.evaluation import retrieval_metrics
    from lookalike.shared.embedders import REGISTRY

    t_start = time.monotonic()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = REGISTRY["efficientnet_lite0"]
    assert len(set(spec.preprocessing.mean)) == 1 and len(set(spec.preprocessing.std)) == 1
    assert abs(spec.preprocessing.mean[0] * 255 - 127) < 1e-6 and abs(spec.preprocessing.std[0] * 255 - 128) < 1e-6
    log(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs")

    from lookalike.shared import int8

    src, digest = fp32_graph(work, spec)
    src = Path(src)
    pre = work / "lite0-pre.onnx"
    if not pre.is_file() or pre.stat().st_mtime < src.stat().st_mtime:
        quant_pre_process(str(src), str(pre))
    log(f"fp32 graph {src} ({src.stat().st_size / 1e6:.1f} MB); after quant_pre_process: {op_summary(pre)}")

    train, train_labels = load_pixels(TRAIN_CSV, work, spec)
    val, val_labels = load_pixels(VAL_CSV, work, spec)
    calib_pixels = np.ascontiguousarray(train[::CALIB_EVERY][:CALIB_N])
    calib_key = hashlib.sha256(src.name.encode() + calib_pixels.tobytes()).hexdigest()[:12]

    u8s8 = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    qdq = dict(quant_format=QuantFormat.QDQ, per_channel=True, **u8s8)
    keep = [MUL, SUB] + GAP
    variants = {
        # The plain recipe: only the normalisation excluded, everything else quantized.
        "qdq-minmax-plain": dict(args=dict(qdq, calibrate_method=CalibrationMethod.MinMax,
                                           nodes_to_exclude=[MUL, SUB])),
        "qdq-minmax": dict(args=dict(qdq, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep), fold=True),
        "qdq-minmax-rr": dict(args=dict(qdq, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep,
                                        reduce_range=True), fold=True),
        "qop-minmax": dict(args=dict(qdq, quant_format=QuantFormat.QOperator, calibrate_method=CalibrationMethod.MinMax,
                                     nodes_to_exclude=keep), fold=True),
        "qdq-entropy": dict(args=dict(qdq, calibrate_method=CalibrationMethod.Entropy, nodes_to_exclude=keep),
                            fold=True),
        "qdq-percentile": dict(args=dict(qdq, calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=keep),
                               fold=True),
        # The convs that cost the most cosine kept in fp32 (a one-at-a-time sweep over all 49
        # convs, Percentile, on half the val photos; confirmed on 200 held-out train photos):
        # blocks.1 project conv (+0.0011), blocks.8 depthwise conv (+0.0007), the stem (+0.0004).
        # Their inputs come from DequantizeLinear, so WeightBiasQuantization must be off.
        "qdq-pct-f32b1p": dict(args=dict(qdq, calibrate_method=CalibrationMethod.Percentile,
                                         nodes_to_exclude=keep + B1_PROJECT), fold=True, disabled=[WBQ]),
        "qdq-pct-f32b1p8d": dict(args=dict(qdq, calibrate_method=CalibrationMethod.Percentile,
                                           nodes_to_exclude=keep + B1_PROJECT + B8_DEPTHWISE),
                                 fold=True, disabled=[WBQ]),
        # The same graph in a session with ORT's default optimizers: what nodes_to_exclude gives by itself.
        "  (same, WBQ on)": dict(same_as="qdq-pct-f32b1p8d"),
        # ... and the stem conv too (no fold then: the fp32 normalisation feeds it).
        "qdq-pct-f32stem1p8d": dict(args=dict(qdq, calibrate_method=CalibrationMethod.Percentile,
                                              nodes_to_exclude=keep + STEM + B1_PROJECT + B8_DEPTHWISE),
                                    disabled=[WBQ]),
    }
    if args.variants:
        wanted = args.variants.split(",")
        unknown = set(wanted) - set(variants)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted}

    rows: dict[str, dict] = {"fp32": dict(path=src, disabled=[])}
    for name, v in variants.items():
        if "same_as" in v:
            if v["same_as"] in rows:
                rows[name] = dict(rows[v["same_as"]], disabled=v.get("disabled", []), demo=True)
            continue
        out = work / f"lite0-{name}.onnx"
        secs, warns = quantize(v, pre, out, Calibration(calib_pixels), work, calib_key)
        rows[name] = dict(path=out, disabled=v.get("disabled", []), quant_s=secs, warnings=warns)
        log(f"quantized {name} in {secs:.1f}s ({warns} warnings logged), {out.stat().st_size / 1e6:.2f} MB")
    if args.write_ranges:
        import shutil

        calibrated = work / f"calib-{calib_key}-Percentile.json"
        if not calibrated.is_file():
            ap.error("--write-ranges needs a Percentile variant in --variants")
        shutil.copyfile(calibrated, int8.ranges_file(spec.id, digest))
        log(f"wrote {int8.ranges_file(spec.id, digest)}")
    if int8.available(spec.id, digest):  # what the product builds and runs (EMBED_PRECISION=int8)
        pre = spec.preprocessing
        t0 = time.monotonic()
        graph = int8.int8_graph(str(src), spec.id, digest, pre.mean, pre.std, work / "product")
        rows["product"] = dict(path=Path(graph), disabled=int8.DISABLED_OPTIMIZERS, quant_s=time.monotonic() - t0)
        log(f"the product's int8 graph (shared/int8.py, shipped ranges) built in {rows['product']['quant_s']:.1f}s")

    # Sessions (kept for the whole run), cosine to fp32.
    for name, r in rows.items():
        opt = work / f"opt-{name.strip().replace(' ', '_').replace(',', '')}.onnx"
        r["sess"] = session(r["path"], r["disabled"], optimized_to=opt)
        r["ops"] = op_summary(opt)
    ref = features(rows["fp32"]["sess"], val)
    for name, r in rows.items():
        f = features(r["sess"], val)
        cos = (ref * f).sum(1)
        r["cos_mean"], r["cos_min"] = float(cos.mean()), float(cos.min())
        r["val_features"] = f
        log(f"{name}: cosine to fp32 mean {r['cos_mean']:.5f} min {r['cos_min']:.5f}")

    # Speed: all variants interleaved in short slices.
    for batch in (1, 32):
        speed(rows, val, batch, args.seconds, args.slice)
        done = ", ".join(f"{n.strip()} {np.median(r[f'b{batch}']):.1f}" for n, r in rows.items())
        log(f"batch {batch}, median img/s: {done}")

    # Recall@1.
    passing = [n for n, r in rows.items() if n != "fp32" and r["cos_mean"] >= 0.995 and not r.get("demo")]
    by_speed = lambda n: np.median(rows[n]["b32_x"])  # noqa: E731
    candidates = [n for n in rows if n != "fp32" and not rows[n].get("demo")]
    best = max(passing, key=by_speed) if passing else max(candidates, key=lambda n: rows[n]["cos_mean"])
    recall_for = {"best": ["fp32", best], "all": list(rows), "none": []}[args.recall]
    for name in recall_for:
        r = rows[name]
        t0 = time.monotonic()
        gallery = features(r["sess"], train)
        m = retrieval_metrics(gallery, train_labels, r["val_features"], val_labels)
        r["recall@1"], r["recall@5"] = m["recall@1"], m["recall@5"]
        log(f"{name}: Recall@1 {m['recall@1']:.3f} Recall@5 {m['recall@5']:.3f} "
            f"({len(train)} gallery, {len(val)} queries, {time.monotonic() - t0:.0f}s)")

    # Table.
    f32 = rows["fp32"]
    print()
    print(f"EfficientNet-Lite0, ONNX Runtime {ort.__version__} CPU, {os.cpu_count()} threads, model only "
          f"(uint8 pixels in). img/s: median [quartiles] of {len(f32['b32'])} interleaved slices of "
          f">= {args.slice:g}s per variant; x fp32: median of the per-pass ratios to the fp32 slice")
    head = (f"{'variant':20s} {'b1 img/s':>17s} {'x fp32':>6s} {'b32 img/s':>17s} {'x fp32':>6s} "
            f"{'cos mean':>8s} {'cos min':>8s} {'R@1':>6s} {'R@5':>6s} {'MB':>5s}")
    print(head)
    print("-" * len(head))

    def rate(r: dict, batch: int) -> str:
        v = r[f"b{batch}"]
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        return f"{med:6.1f} [{q1:4.0f}-{q3:4.0f}] {np.median(r[f'b{batch}_x']):6.2f}"

    for name, r in rows.items():
        rec = f"{r['recall@1']:.3f}" if "recall@1" in r else "-"
        rec5 = f"{r['recall@5']:.3f}" if "recall@5" in r else "-"
        print(f"{name:20s} {rate(r, 1)} {rate(r, 32)} {r['cos_mean']:8.5f} {r['cos_min']:8.5f} "
              f"{rec:>6s} {rec5:>6s} {r['path'].stat().st_size / 1e6:5.2f}")
    print()
    print(f"cosine: over {len(val)} val photos, int8 vs fp32 vectors (L2-normalised); "
          f"R@1/R@5: gallery {len(train)} train photos, {len(val)} val queries "
          f"(lookalike.evaluation.retrieval_metrics)")
    print("disabled ORT optimizers: "
          + "; ".join(f"{n.strip()}: {r['disabled']}" for n, r in rows.items() if r["disabled"]))
    print(f"best int8 variant (cos mean >= 0.995 and fastest at batch 32, else highest cos mean): {best}")
    for name in ("fp32", best):
        print(f"  ops run by ORT for {name}: {rows[name]['ops']}")
    summary = {n: {k: (v if not isinstance(v, Path) else str(v)) for k, v in r.items()
                   if k not in ("sess", "val_features", "ops", "demo")} for n, r in rows.items()}
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    log(f"total {time.monotonic() - t_start:.0f}s; results in {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
