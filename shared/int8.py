"""Static int8 graphs for ONNX Runtime on the CPU (``EMBED_PRECISION=int8``; ``auto`` on a CPU with VNNI).

A static int8 graph needs the range of every activation it quantizes. They were measured once
per model and weights (``bench/int8_lite0.py --write-ranges``: Percentile calibration over 200
grocery-dev train photos) and ship in ``int8_ranges/<model>-<weights digest>.json``, in ONNX
Runtime's calibration-cache format. So int8 exists only for the weights they were measured
with: a fine-tuned model, or other weights, has none and runs fp32.

The recipe (docs/benchmarks.md, "int8 on VNNI": cosine to fp32 0.9957, Recall@1 unchanged,
about 2x the fp32 network here): QDQ, per-channel int8 weights, uint8 activations; kept in
fp32 are the pooling (so ``features`` is not rounded to 8 bits) and the two convolutions that
cost the most cosine. The input normalisation is folded away: Lite0 normalises every channel
as (p - 127) / 128, so with the stem's input quantized at scale 1/128 and zero point 127 the
quantized input *is* the uint8 pixel, which then feeds the stem directly.

The graph is built from the fp32 graph at load time (about 4 s) and cached beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("lookalike.int8")

RANGES_DIR = Path(__file__).parent / "int8_ranges"

# ONNX Runtime re-quantizes (per tensor) the weights of a conv that nodes_to_exclude left in
# fp32 when its input comes from a DequantizeLinear, which wrecks a depthwise conv: a session
# over an int8 graph turns this optimizer off.
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


@dataclass(frozen=True)
class Recipe:
    keep_fp32: tuple[str, ...]  # nodes left in fp32 (names in the exported graph)
    input_tensor: str  # the normalised image: quantized to exactly the uint8 pixels, then folded away
    input_mean: float  # the normalisation the fold relies on: (p - mean * 255) / (std * 255)
    input_std: float


RECIPES = {
    "efficientnet_lite0": Recipe(
        keep_fp32=("/Mul", "/Sub", "/net/_avg_pooling/GlobalAveragePool", "/net/Flatten",
                   # a one-at-a-time sweep over all 49 convs found these two cost the most cosine
                   "/net/_blocks.1/_project_conv/Conv",
                   "/net/_blocks.8/_depthwise_conv/Conv", "/net/_blocks.8/_swish_1/Clip"),
        input_tensor="/Sub_output_0",
        input_mean=127 / 255,
        input_std=128 / 255,
    ),
}


def ranges_file(model_id: str, digest: str) -> Path:
    return RANGES_DIR / f"{model_id}-{digest}.json"


def available(model_id: str, digest: str) -> bool:
    """Whether an int8 graph can be built for these weights (a recipe and measured ranges ship for them)."""
    return model_id in RECIPES and ranges_file(model_id, digest).is_file()


def vnni_supported() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI), which make int8 about 2x fp32 here."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: don't guess
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_graph(fp32_graph: str | bytes, model_id: str, digest: str, mean: tuple[float, ...],
               std: tuple[float, ...], cache_dir: Path | None) -> str | bytes:
    """The int8 graph of an fp32 graph (``embedders.onnx_graph``'s: uint8 NHWC ``pixels`` in, ``features`` out).

    Cached as ``<cache_dir>/<digest>-int8-<ranges hash>-ort<version>.onnx``, written under a temporary name and
    renamed, so a crash never leaves half a graph under the real name. Raises ValueError when no
    ranges ship for these weights, or when they do not fit the graph (another exporter's names).
    """
    import onnxruntime as ort

    if not available(model_id, digest):
        raise ValueError(f"no int8 ranges for {model_id} with these weights (digest {digest}): int8 ships for "
                         f"{', '.join(sorted(RECIPES))} with their packaged weights only; use fp32")
    recipe = RECIPES[model_id]
    if not (np.allclose(mean, recipe.input_mean) and np.allclose(std, recipe.input_std)):
        raise ValueError(f"{model_id}'s normalisation {mean}/{std} is not the one its int8 recipe folds")
    ranges = ranges_file(model_id, digest)
    ranges_hash = hashlib.sha256(ranges.read_bytes()).hexdigest()[:12]
    name = f"{digest}-int8-{ranges_hash}-ort{ort.__version__}.onnx"
    target = Path(cache_dir) / name if cache_dir is not None else None
    if target is not None and target.is_file():
        return str(target)
    t0 = time.monotonic()
    quiet = _QuantizerChatter()
    logging.getLogger().addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="lookalike-int8-") as tmp:
            data = _quantize(fp32_graph, recipe, ranges, Path(tmp))
    finally:
        logging.getLogger().removeFilter(quiet)
    log.info("built the int8 graph of %s in %.1f s", model_id, time.monotonic() - t0)
    if target is None:
        return data
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    part.write_bytes(data)
    os.replace(part, target)
    return str(target)


class _QuantizerChatter(logging.Filter):
    """Drops the quantizer's INFO lines on the root logger (one per adjusted channel scale, ~80 a build)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "onnxruntime" not in record.pathname


def _quantize(fp32_graph: str | bytes, recipe: Recipe, ranges: Path, tmp: Path) -> bytes:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = tmp / "fp32.onnx"
    if isinstance(fp32_graph, bytes):
        src.write_bytes(fp32_graph)
    else:
        src = Path(fp32_graph)
    pre, out = tmp / "pre.onnx", tmp / "int8.onnx"
    quant_pre_process(str(src), str(pre))  # shape inference and ORT's graph optimizations, as ORT advises
    names = {v for n in onnx.load(str(pre)).graph.node for v in (*n.input, *n.output)}
    missing = set(load_tensors_data(ranges).data) - names
    if missing:
        raise ValueError(f"the int8 ranges {ranges.name} do not fit this graph: {len(missing)} of their tensors "
                         f"are not in it (e.g. {sorted(missing)[0]}); the graph was exported differently")
    quantize_static(
        str(pre), str(out), None,  # no calibration data: the shipped ranges are the calibration cache
        calibration_cache_path=str(ranges), calibrate_method=CalibrationMethod.Percentile,
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, nodes_to_exclude=list(recipe.keep_fp32),
        extra_options={"TensorQuantOverrides": {recipe.input_tensor: [
            {"scale": np.array(1 / round(recipe.input_std * 255), np.float32),
             "zero_point": np.array(round(recipe.input_mean * 255), np.uint8)}]}},
    )
    model = onnx.load(str(out))
    fold_input(model, recipe)
    return model.SerializeToString()


def fold_input(model, recipe: Recipe) -> None:
    """Feed the uint8 pixels straight into the stem's DequantizeLinear, dropping Cast/Mul/Sub/QuantizeLinear.

    Right only because the input's quantization makes the quantized value equal the pixel (checked
    here): it saves the fp32 normalisation, which ONNX Runtime ran in NHWC with a 3-wide broadcast
    (about 30 % of the int8 graph's time).
    """
    import onnx

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    (q,) = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == recipe.input_tensor]
    init = {i.name: i for i in g.initializer}
    scale = onnx.numpy_helper.to_array(init[q.input[1]])
    zero_point = onnx.numpy_helper.to_array(init[q.input[2]])
    if not (zero_point.dtype == np.uint8 and float(scale) * round(recipe.input_std * 255) == 1
            and int(zero_point) == round(recipe.input_mean * 255)):
        raise ValueError(f"the input is quantized at {scale}/{zero_point}, not to the pixels themselves")
    sub = producer[recipe.input_tensor]
    mul = producer[sub.input[0]]
    cast = producer[mul.input[0]]
    if (sub.op_type, mul.op_type, cast.op_type) != ("Sub", "Mul", "Cast"):
        raise ValueError(f"unexpected normalisation {cast.op_type}/{mul.op_type}/{sub.op_type} before the stem")
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == q.output[0]:
                n.input[i] = cast.input[0]  # the uint8 pixels, NCHW
    for n in (q, sub, mul, cast):
        g.node.remove(n)
    onnx.checker.check_model(model)
