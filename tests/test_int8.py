"""int8 embedding on the CPU (lookalike.shared.int8): close to fp32, only for the weights its ranges fit, built once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lookalike import sample_catalog
from lookalike.shared import embedders, int8
from lookalike.shared.embedders import REGISTRY, load_embedder
from tests.conftest import TEAM_SHARED
from tests.test_embedders import _picture

GROCERY_VAL = TEAM_SHARED / "data" / "grocery-dev" / "val"


@pytest.fixture(scope="module")
def fp32():
    return load_embedder("efficientnet_lite0", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def lite0_int8(tmp_path_factory):
    cache = tmp_path_factory.mktemp("onnx")
    return load_embedder("efficientnet_lite0", device="cpu", precision="int8", cache_dir=cache)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def _photos(paths) -> list[Image.Image]:
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(ImageOps.exif_transpose(im).convert("RGB"))
    return images


def test_int8_finds_what_fp32_finds(fp32, lite0_int8, tmp_path):
    # GIVEN the sample catalogue's product photos and shoppers' photos of them
    catalog = sample_catalog.generate(tmp_path, n_products=12, photos_per_product=3)
    gallery_paths = sorted((tmp_path / "images").glob("*.jpg"))
    gallery, queries = _photos(gallery_paths), _photos([p for p, _ in catalog.queries])
    products = [p.name.rsplit("-", 1)[0] for p in gallery_paths]
    # WHEN both precisions embed them
    rows = {e.precision: (e.embed(gallery), e.embed(queries)) for e in (fp32, lite0_int8)}
    # THEN int8 vectors are unit rows close to fp32's (synthetic pictures sit further from the
    # real photos the ranges were measured on: 0.987 here, 0.9957 on grocery-dev)
    assert (lite0_int8.runtime, lite0_int8.precision) == ("onnx", "int8")
    g8, q8 = rows["int8"]
    assert np.allclose(np.linalg.norm(g8, axis=1), 1.0, atol=1e-5)
    assert _cosines(g8, rows["fp32"][0]).mean() > 0.98
    # AND every shopper's photo finds the same product first as with fp32, the right one
    found = {name: [products[k] for k in (q @ g.T).argmax(axis=1)] for name, (g, q) in rows.items()}
    assert found["int8"] == found["fp32"] == [product for _, product in catalog.queries]


@pytest.mark.shared_data
@pytest.mark.skipif(not GROCERY_VAL.is_dir(), reason=f"team data folder absent: {GROCERY_VAL}")
def test_int8_meets_the_quality_bar_on_real_product_photos(fp32, lite0_int8):
    # GIVEN the 296 grocery-dev val photos, decoded as `lookalike eval` does
    paths = sorted(GROCERY_VAL.rglob("*.jpg"))
    images = _photos(paths)
    # WHEN both precisions embed them
    cos = _cosines(lite0_int8.embed(images), fp32.embed(images))
    # THEN int8 holds the bar the issue set for a lower precision: mean cosine to fp32 >= 0.995
    assert len(paths) == 296
    assert cos.mean() >= 0.995, cos.mean()


@pytest.fixture
def other_lite0_weights(tmp_path):
    """Lite0 weights other than the packaged ones (as a fine-tune would make): one conv nudged."""
    spec = REGISTRY["efficientnet_lite0"]
    state = torch.load(spec.find_weights(None, allow_download=False), map_location="cpu", weights_only=True)
    key = next(k for k, v in state.items() if v.dtype == torch.float32 and v.ndim == 4)
    state[key] = state[key] * 1.01
    path = tmp_path / "lite0-other.pth"
    torch.save(state, path)
    return str(path)


def test_int8_is_refused_for_weights_its_ranges_were_not_measured_with(other_lite0_weights, monkeypatch):
    # GIVEN other weights (ranges measured on one network do not hold for another)
    # WHEN int8 is asked for by name, THEN loading fails and says what to use instead
    with pytest.raises(ValueError, match="no int8 ranges for efficientnet_lite0 with these weights.*use fp32"):
        load_embedder("efficientnet_lite0", device="cpu", precision="int8", weights_path=other_lite0_weights)
    # WHEN the default precision picks, on a CPU with VNNI
    monkeypatch.setattr(int8, "vnni_supported", lambda: True)
    monkeypatch.setattr(embedders, "bf16_supported", lambda device: False)
    emb = load_embedder("efficientnet_lite0", device="cpu", precision="auto", weights_path=other_lite0_weights)
    # THEN it runs fp32
    assert emb.precision == "fp32"


@pytest.mark.parametrize(("vnni", "native_bf16", "expected"),
                         [(True, False, "int8"), (True, True, "int8"), (False, True, "fp32"), (False, False, "fp32")])
def test_auto_precision(monkeypatch, vnni, native_bf16, expected):
    # GIVEN a CPU with or without VNNI and native bf16
    monkeypatch.setattr(int8, "vnni_supported", lambda: vnni)
    monkeypatch.setattr(embedders, "bf16_supported", lambda device: native_bf16)
    # WHEN Lite0 (whose int8 ranges ship) loads with the default precision
    emb = load_embedder("efficientnet_lite0", device="cpu", precision="auto")
    # THEN int8 where VNNI runs it (2x fp32, same Recall@1), else fp32 on ONNX Runtime, which runs
    # the EfficientNet-Lites faster than PyTorch's bf16 even where bf16 is native (docs/benchmarks.md)
    assert (emb.precision, emb.runtime) == (expected, "onnx")


@pytest.mark.parametrize(("model_id", "native_bf16", "expected"),
                         [("resnet50", True, "bf16"), ("resnet50", False, "fp32"),
                          ("efficientnet_lite2_rmac", True, "fp32"), ("efficientnet_lite2", True, "fp32")])
def test_auto_precision_takes_bf16_on_a_cpu_for_the_models_it_speeds_up(monkeypatch, model_id, native_bf16, expected):
    # GIVEN a CPU with VNNI, with or without native bf16, and a model without int8 ranges
    monkeypatch.setattr(int8, "vnni_supported", lambda: True)
    monkeypatch.setattr(embedders, "bf16_supported", lambda device: native_bf16)
    spec = embedders.REGISTRY[model_id]
    # THEN bf16 for a ResNet, where it is native (AMX: compiled ResNet-50 2.5x ONNX Runtime's fp32);
    # fp32 for the EfficientNet-Lites, which ONNX Runtime runs faster in fp32
    assert embedders.auto_precision("cpu", "auto", spec, spec.architecture()) == expected
    # AND on CUDA bf16 wherever the GPU runs it
    assert embedders.auto_precision("cuda", "auto", spec, spec.architecture()) == ("bf16" if native_bf16 else "fp32")


def test_auto_precision_picks_what_the_named_runtime_runs(monkeypatch):
    # GIVEN a CPU with VNNI and native bf16
    monkeypatch.setattr(int8, "vnni_supported", lambda: True)
    monkeypatch.setattr(embedders, "bf16_supported", lambda device: True)
    # WHEN a runtime is named, THEN auto picks a precision it runs (never a load that fails)
    torch_emb = load_embedder("efficientnet_lite0", device="cpu", precision="auto", runtime="torch")
    assert (torch_emb.runtime, torch_emb.precision) == ("torch", "bf16")
    monkeypatch.setattr(int8, "vnni_supported", lambda: False)
    onnx_emb = load_embedder("efficientnet_lite0", device="cpu", precision="auto", runtime="onnx")
    assert (onnx_emb.runtime, onnx_emb.precision) == ("onnx", "fp32")


def test_int8_graph_is_built_once_and_cached(tmp_path, monkeypatch):
    # GIVEN a cache directory and an int8 embedder loaded once
    cache = tmp_path / "onnx"
    first = load_embedder("efficientnet_lite0", device="cpu", precision="int8", cache_dir=cache)
    assert len(list(cache.glob("*-int8-*.onnx"))) == 1 and not list(cache.glob(".*.tmp"))
    # WHEN it loads again (a restart)
    monkeypatch.setattr(int8, "_quantize", lambda *a, **k: pytest.fail("the int8 graph was built again"))
    second = load_embedder("efficientnet_lite0", device="cpu", precision="int8", cache_dir=cache)
    # THEN the cached graph is read back and embeds the same
    image = [_picture(5)]
    assert np.allclose(first.embed(image), second.embed(image), atol=1e-6)


def test_ranges_that_do_not_fit_the_graph_are_refused(tmp_path, monkeypatch):
    # GIVEN shipped ranges that name a tensor the exported graph lacks (another exporter's names)
    shipped = next(int8.RANGES_DIR.glob("efficientnet_lite0-*.json"))
    data = json.loads(shipped.read_text())
    first = next(iter(data["data"]))
    data["data"]["/net/renamed/Conv_output_0"] = data["data"].pop(first)
    moved = tmp_path / "ranges"
    moved.mkdir()
    (moved / shipped.name).write_text(json.dumps(data))
    monkeypatch.setattr(int8, "RANGES_DIR", moved)
    # WHEN int8 loads, THEN it fails naming the mismatch (never a graph quantized with wrong ranges)
    with pytest.raises(ValueError, match="do not fit this graph"):
        load_embedder("efficientnet_lite0", device="cpu", precision="int8")

