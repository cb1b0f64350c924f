"""The quality commands: ``lookalike eval``, ``finetune`` and ``calibrate``.

``python -m lookalike.quality eval|finetune|calibrate ...`` runs them without the rest of the CLI.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from lookalike.evaluation import evaluate, format_result, json_line, read_labelled_csv


def cmd_eval(args, settings) -> None:
    model = args.model or (settings.embed_model if settings.embed_model != "auto" else "efficientnet_lite0")
    if args.model is None and settings.embed_model == "auto":
        from lookalike.shared.embedders import resolve_model_id

        model = resolve_model_id("auto", **settings.embedder_options())
    result = evaluate(args.gallery, args.queries, model, args.mode, args.precision, args.detect)
    print(format_result(result), flush=True)
    if args.json:
        print(json_line(result), flush=True)


def cmd_finetune(args, settings) -> None:
    from lookalike.finetune import FinetuneConfig, finetune

    if args.train and (args.split_mark or args.skip_urls):
        raise ValueError("--split-mark and --skip-urls apply to --catalog only")
    cfg = FinetuneConfig(model_id=args.id, dim=args.dim, train_blocks=args.train_blocks, views=args.views,
                         resize=args.resize, crop=args.crop,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, holdout=args.holdout,
                         series_distance=args.series_distance, refit=not args.no_refit,
                         max_minutes=args.max_minutes, seed=args.seed)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    val = read_labelled_csv(args.val) if args.val else None
    with tempfile.TemporaryDirectory(prefix="lookalike-ft-images-") as tmp:
        if args.catalog:
            from lookalike.finetune import read_catalog_photos

            # url/inline images: fetched into the cache dir (reused next time) or a temporary one
            image_dir = cache_dir / "images" if cache_dir else Path(tmp)
            photos = read_catalog_photos(Path(args.catalog), image_dir=image_dir, settings=settings,
                                         split_mark=args.split_mark,
                                         fetch_remote=not args.skip_urls)
            print(photos.summary(), flush=True)
            train = photos.pairs
        else:
            train = read_labelled_csv(args.train)
        manifest = finetune(train, Path(args.out), cfg, val=val, cache_dir=cache_dir)
    m = manifest["metrics"]
    print(f"wrote {args.out} (model id {manifest['id']}, dim {manifest['dim']}, best epoch {manifest['best_epoch']}, "
          f"stopped: {manifest['stopped']}, refit epochs {manifest['data']['refit_epochs']}, "
          f"{manifest['timing_s']['total']} s)")
    # train and hold-out scores are the selection run's at the best epoch (the refit also trains on the hold-out)
    for name in ("train_leave_one_out", "holdout", "val"):
        if m.get(name):
            print(f"  {name:20s} Recall@1 {m[name]['recall@1']:.3f}  Recall@5 {m[name]['recall@5']:.3f}  "
                  f"mAP@10 {m[name]['map@10']:.3f}")
    print(f"use it: EMBED_MODEL={Path(args.out).resolve()} (or copy it to $LOOKALIKE_DATA_DIR/models/{manifest['id']} "
          f"and set EMBED_MODEL={manifest['id']})")
    if args.json:
        print(json.dumps({k: manifest[k] for k in ("id", "dim", "best_epoch", "stopped", "metrics", "timing_s")}))


def add_commands(sub) -> dict:
    """Add ``eval``, ``finetune`` and ``calibrate`` to the ``lookalike`` parser; returns their handlers."""
    p = sub.add_parser("eval", help="Recall@1/5/10 and mAP@10 of a gallery CSV against a query CSV (path,label)")
    p.add_argument("--gallery", required=True, help="CSV path,label: indexed, one product per label")
    p.add_argument("--queries", required=True, help="CSV path,label: searched")
    p.add_argument("--model", help="embedder id or fine-tuned model directory (default $EMBED_MODEL)")
    p.add_argument("--mode", choices=("direct", "pipeline"), default="direct")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="fp32",
                   help="auto: what the embed function picks on this machine (EMBED_PRECISION=auto)")
    p.add_argument("--detect", default="none",
                   help="detector weights (direct: crop the top detection; pipeline: DETECT_WEIGHTS); "
                        "none = whole images")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")

    p = sub.add_parser("finetune", help="fine-tune an embedder on labelled catalogue photos (CSV path,label) "
                                        "or on the catalogue file itself (product ids are the labels)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", help="CSV path,label")
    src.add_argument("--catalog", help="catalogue JSONL as for `lookalike index`: every product's photos, "
                                       "labelled by product id (deletes and later upserts applied)")
    p.add_argument("--split-mark", metavar="MARK",
                   help="with --catalog: products ID<MARK><n> (sku#2, sku#3...) are more photos of product ID, "
                        "one label (an event carries at most 20 images)")
    p.add_argument("--skip-urls", action="store_true",
                   help="with --catalog: train on local path images only (default: fetch url images as ingest does)")
    p.add_argument("--val", help="scored once at the end for the report; never used for model selection")
    p.add_argument("--out", required=True, help="output model directory (model.pt + model.json)")
    p.add_argument("--id", default="lite0-ft", help="model id (names the store collection)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--train-blocks", type=int, default=2)
    p.add_argument("--resize", type=int, default=256, help="input: shorter side resized to this ...")
    p.add_argument("--crop", type=int, default=224, help="... then this centre crop (crop = resize: whole frame)")
    p.add_argument("--views", type=int, default=7, help="augmented views cached per photo")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--holdout", type=float, default=0.15, help="fraction of train photos held out for selection")
    p.add_argument("--series-distance", type=float, default=0.25,
                   help="cosine distance that groups photos into a series held out together (0: single photos)")
    p.add_argument("--no-refit", action="store_true",
                   help="keep the selected epoch's model instead of retraining on every photo")
    p.add_argument("--max-minutes", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="keep the frozen-trunk features here and reuse them on the next run")
    p.add_argument("--json", action="store_true")

    from lookalike.calibration import add_command as add_calibrate_command
    from lookalike.calibration import cmd_calibrate

    add_calibrate_command(sub)  # calibrate: lookalike/calibration.py
    return {"eval": cmd_eval, "finetune": cmd_finetune, "calibrate": cmd_calibrate}


def main(argv: list[str] | None = None) -> None:
    """``python -m lookalike.quality eval|finetune|calibrate ...``: as ``lookalike eval|finetune|calibrate``."""
    import argparse
    import os

    from lookalike.shared.config import Settings

    parser = argparse.ArgumentParser(prog="python -m lookalike.quality")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO" if args.verbose else os.environ.get("LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers[args.command](args, Settings())


if __name__ == "__main__":
    main()
