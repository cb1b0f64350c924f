"""Confident answers: fit when a search result is "same product", "similar" or "no confident match".

    lookalike calibrate --gallery G.csv --queries Q.csv [--precision 0.95] [--model ID]
                        [--holdout 0.2] [--detect WEIGHTS|none] [--out FILE] [--dry-run] [--json]

The scores of these models are not calibrated: a cosine of 0.8 is no probability, and every
search shows a ranked list even when the catalogue holds nothing like the photo. From a
labelled set (the gallery as it is indexed, and labelled shopper photos searched against it;
CSVs ``path,label`` as for ``lookalike eval``) this fits, per model and catalogue:

* ``same_margin``: the first product is the **same product** when its score beats the second
  product's by at least this margin. Fitted as the lowest margin at which top-1 precision over
  the labelled searches reaching it is at least the target. The margin and not the top score:
  on grocery-dev the top score hardly separates right from wrong top-1 products (precision
  0.5–0.67 at every threshold), the margin does (docs/quality.md, "Confident answers").
* ``similar_score``: products scoring at least this are **similar**. Fitted as the lowest top
  score at which the right product is among the first five in at least the target share of
  the labelled searches reaching it. A search whose first product is below it answers
  **no confident match** (it still lists the closest products).

A query whose label has no gallery image counts as wrong: put photos of products that are not
in the catalogue into the queries in the proportion shoppers take them, and the fit accounts
for them.

Scores come from the direct mode of ``lookalike eval`` (in-process embedding, exact cosine, per
product its best gallery image; ``--detect``: the most confident product crop of every image).

Figures printed (and written into the file):

* fitted: precision and coverage of "same product" on the labelled queries the thresholds were
  fitted on (optimistic: the threshold was chosen on them);
* cross-validated: the labels are split into ``k = round(1 / holdout)`` folds; each fold's
  queries are answered with thresholds fitted on the other folds' queries. This is the figure
  to trust;
* open set: each fold's labels are also removed from the gallery, the thresholds refitted on
  the other folds' queries, and the removed products' photos searched: how often they are
  (wrongly) answered "same product", "similar", "no confident match".

The thresholds go to ``<data dir>/calibration/<model id>.json``, where the query function
reads them at start (restart it after calibrating). Without the file results carry no marks.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the handler pulls in the broker client, slow for the CLI's start
    from lookalike.functions.query.handler import Thresholds

log = logging.getLogger("lookalike.calibration")

SIMILAR_K = 5  # "similar": the right product among the first this many
ANSWERS = ("same product", "similar", "no confident match")


# --------------------------------------------------------------------------- fitting


def fit_threshold(values: Sequence[float], correct: Sequence[bool], target: float) -> float | None:
    """The lowest ``t`` such that, of the items with ``value >= t``, at least ``target`` are correct.

    NaN values never pass. Ties are kept together (a threshold cannot split them). None when
    no threshold reaches the target.
    """
    v = np.asarray(values, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    keep = ~np.isnan(v)
    v, ok = v[keep], ok[keep]
    if not v.size:
        return None
    order = np.argsort(-v, kind="stable")
    v, ok = v[order], ok[order]
    precision = np.cumsum(ok) / np.arange(1, v.size + 1)
    group_end = np.r_[v[1:] < v[:-1], True]  # last item of each run of equal values
    good = np.flatnonzero(group_end & (precision >= target))
    return float(v[good[-1]]) if good.size else None


def product_scores(gallery: np.ndarray, gallery_labels: Sequence[str], queries: np.ndarray,
                   chunk: int = 256) -> tuple[np.ndarray, list[str]]:
    """(queries x products) cosine of each query to each product's best gallery image, and the products."""
    products = sorted(set(gallery_labels))
    col = {p: i for i, p in enumerate(products)}
    g_idx = np.array([col[lab] for lab in gallery_labels])
    order = np.argsort(g_idx, kind="stable")
    starts = np.flatnonzero(np.r_[True, g_idx[order][1:] != g_idx[order][:-1]])
    g = gallery[order].astype(np.float32)
    out = np.empty((len(queries), len(products)), dtype=np.float32)
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk].astype(np.float32) @ g.T
        out[s : s + chunk] = np.maximum.reduceat(sims, starts, axis=1)
    return out, products


def search_features(scores: np.ndarray, products: Sequence[str], query_labels: Sequence[str],
                    allowed: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per query: top score, margin to the second product, top-1 right, right product in the top 5.

    ``allowed``: the products in the gallery (a boolean mask over ``products``; default all).
    """
    if allowed is not None:
        scores = scores[:, allowed]
        products = [p for p, a in zip(products, allowed, strict=True) if a]
    n, m = scores.shape
    if m == 0:
        nan = np.full(n, np.nan)
        return {"top": nan, "margin": nan, "top1": np.zeros(n, bool), "topk": np.zeros(n, bool)}
    keep = min(max(SIMILAR_K, 2), m)  # the first products, best first
    first = np.argpartition(-scores, kth=keep - 1, axis=1)[:, :keep] if m > keep else np.tile(np.arange(m), (n, 1))
    rows = np.arange(n)[:, None]
    ranked = first[rows, np.argsort(-scores[rows, first], axis=1, kind="stable")]
    top = scores[rows[:, 0], ranked[:, 0]].astype(np.float64)
    margin = top - scores[rows[:, 0], ranked[:, 1]] if m > 1 else np.full(n, np.nan)
    k = min(SIMILAR_K, m)
    index = {p: i for i, p in enumerate(products)}
    truth = np.array([index.get(lab, -1) for lab in query_labels])
    return {"top": top, "margin": margin, "top1": ranked[:, 0] == truth,
            "topk": (ranked[:, :k] == truth[:, None]).any(axis=1)}


def fit(features: dict[str, np.ndarray], same_level: float, similar_level: float | None = None) -> Thresholds:
    """Thresholds at which, on ``features``, precision of "same product" is ``same_level`` and the
    right product is in the top 5 for ``similar_level`` (default the same) of "similar" answers."""
    from lookalike.functions.query.handler import Thresholds

    similar_level = same_level if similar_level is None else similar_level
    return Thresholds(same_margin=fit_threshold(features["margin"], features["top1"], same_level),
                      similar_score=fit_threshold(features["top"], features["topk"], similar_level))


def answers(t: Thresholds, features: dict[str, np.ndarray]) -> np.ndarray:
    """The answer of each query, as :meth:`Thresholds.mark` gives it (index into ANSWERS)."""
    n = len(features["top"])
    same = (np.nan_to_num(features["margin"], nan=-np.inf) >= t.same_margin) if t.same_margin is not None else \
        np.zeros(n, bool)
    similar = (features["top"] >= t.similar_score) if t.similar_score is not None else np.zeros(n, bool)
    return np.where(same, 0, np.where(similar, 1, 2))


def _apply(t: Thresholds, f: dict, mask: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(answers, top-1 right, right in top 5, top >= similar) of the queries in ``mask``."""
    sub = f if mask is None else {k: v[mask] for k, v in f.items()}
    sim = sub["top"] >= t.similar_score if t.similar_score is not None else np.zeros(len(sub["top"]), bool)
    return answers(t, sub), sub["top1"], sub["topk"], sim


def _pooled(parts: list[tuple[np.ndarray, ...]], repeats: int = 1) -> dict:
    """Precision and coverage of "same product" and "similar", and the share of each answer, from
    :func:`_apply` results pooled over folds (counts per repeat: each query is tested once a repeat)."""
    a = np.concatenate([p[0] for p in parts])
    top1 = np.concatenate([p[1] for p in parts])
    topk = np.concatenate([p[2] for p in parts])
    sim = np.concatenate([p[3] for p in parts])
    same = a == 0
    return {
        "queries": int(a.size) // repeats,
        "same_precision": float(top1[same].mean()) if same.any() else None,
        "same_coverage": float(same.mean()) if a.size else 0.0,
        "same_count": round(int(same.sum()) / repeats, 1),
        "similar_top5_rate": float(topk[sim].mean()) if sim.any() else None,
        "similar_coverage": float(sim.mean()) if a.size else 0.0,
        "answers": {name: float((a == i).mean()) if a.size else 0.0 for i, name in enumerate(ANSWERS)},
    }


def summarise(t: Thresholds, features: dict[str, np.ndarray]) -> dict:
    return _pooled([_apply(t, features)])


def label_folds(labels: Sequence[str], k: int, seed: int = 0) -> list[set[str]]:
    """The distinct labels shuffled (seeded) and dealt into ``k`` folds."""
    distinct = sorted(set(labels))
    rng = np.random.default_rng(seed)
    rng.shuffle(distinct)
    return [set(distinct[i::k]) for i in range(k)]


def cross_validate(scores: np.ndarray, products: Sequence[str], query_labels: Sequence[str],
                   same_level: float, similar_level: float, k: int = 5, seed: int = 0, repeats: int = 5) -> dict:
    """Repeated k-fold over the labels, pooled. Each fold's queries are answered with thresholds
    fitted (at these levels) on the other folds' queries:

    * ``closed``: against the whole gallery;
    * ``open_set``: against the gallery less the fold's products (thresholds refitted on the rest),
      so that every photo is of a product that is not in the catalogue.
    """
    labels = np.array(query_labels, dtype=object)
    full = search_features(scores, products, query_labels)
    closed, open_set, spread = [], [], []
    for r in range(repeats):
        closed_r, open_r = [], []
        for fold in label_folds(query_labels, k, seed + r):
            test = np.isin(labels, list(fold))
            if not test.any() or test.all():
                continue
            t = fit({key: v[~test] for key, v in full.items()}, same_level, similar_level)
            closed_r.append(_apply(t, full, test))
            reduced = search_features(scores, products, query_labels, np.array([p not in fold for p in products]))
            t_open = fit({key: v[~test] for key, v in reduced.items()}, same_level, similar_level)
            open_r.append(_apply(t_open, reduced, test))
        if closed_r:
            closed += closed_r
            open_set += open_r
            spread.append((_pooled(closed_r)["same_precision"], _pooled(open_r)["answers"]["same product"]))
    if not closed:
        return {}
    precisions = [p for p, _ in spread if p is not None]
    return {
        "closed": {"folds": k, "repeats": len(spread), "seed": seed, **_pooled(closed, len(spread)),
                   "same_precision_range": [min(precisions), max(precisions)] if precisions else None},
        "open_set": {"folds": k, "repeats": len(spread), "seed": seed, **_pooled(open_set, len(spread)),
                     "same_share_range": [min(o for _, o in spread), max(o for _, o in spread)]},
    }


def _levels(target: float) -> list[float]:
    """Fit levels to try, from the target up to 1 in steps of 0.01."""
    return sorted({round(min(1.0, target + i / 100), 4) for i in range(101)} | {1.0})


def calibrate_scores(scores: np.ndarray, products: Sequence[str], query_labels: Sequence[str],
                     target: float = 0.95, holdout: float = 0.2, seed: int = 0, repeats: int = 5,
                     select: str = "cv") -> dict:
    """Fit the thresholds, cross-validated over label folds (``round(1 / holdout)`` of them, ``repeats``
    shuffles).

    ``select="cv"`` (the default): fit at the lowest level (target, target + 0.01, ... 1) whose
    cross-validated precision reaches the target, separately for "same product" and "similar";
    when none does, at the level that came closest. ``select="fit"``: fit at the target itself
    (largest coverage; the cross-validated figures say how optimistic that is).
    """
    if not 0.5 <= target <= 1.0:
        raise ValueError(f"precision target must be in [0.5, 1], not {target}")
    if not 0.0 <= holdout <= 0.5:
        raise ValueError(f"holdout must be in [0, 0.5], not {holdout}")
    if select not in ("cv", "fit"):
        raise ValueError(f"select must be cv or fit, not {select!r}")
    query_labels = list(query_labels)
    full = search_features(scores, products, query_labels)
    k = int(round(1 / holdout)) if holdout > 0 else 0
    can_cv = k >= 2 and len(set(query_labels)) >= k and repeats >= 1
    same_level = similar_level = target
    selection = {"select": select if can_cv else "fit", "same_reached": None, "similar_reached": None}
    if can_cv and select == "cv":
        tried = [(lvl, cross_validate(scores, products, query_labels, lvl, lvl, k, seed, repeats)["closed"])
                 for lvl in _levels(target)]

        def choose(metric: str) -> tuple[float, bool]:
            for lvl, cv in tried:
                if cv[metric] is not None and cv[metric] >= target:
                    return lvl, True
            best = max(tried, key=lambda t: (t[1][metric] if t[1][metric] is not None else -1.0, -t[0]))
            return best[0], False

        (same_level, selection["same_reached"]), (similar_level, selection["similar_reached"]) = (
            choose("same_precision"), choose("similar_top5_rate"))
    thresholds = fit(full, same_level, similar_level)
    report = {"precision_target": target, "thresholds": thresholds.to_dict(),
              "levels": {"same": same_level, "similar": similar_level, **selection},
              "fitted": summarise(thresholds, full)}
    if can_cv:
        # Reported on other shuffles than the ones that chose the levels (seed + 1000...): less optimistic.
        report_seed = seed + 1000 if selection["select"] == "cv" else seed
        report.update(cross_validate(scores, products, query_labels, same_level, similar_level, k, report_seed,
                                     repeats))
        if selection["same_reached"] is None:
            selection["same_reached"] = (report["closed"]["same_precision"] or 0.0) >= target
            selection["similar_reached"] = (report["closed"]["similar_top5_rate"] or 0.0) >= target
    # The diagnostic that chose the margin: the same fit on the top score alone.
    by_score = fit_threshold(full["top"], full["top1"], target)
    report["top_score_only"] = {
        "threshold": by_score,
        "coverage": float((full["top"] >= by_score).mean()) if by_score is not None else 0.0,
    }
    return report


# --------------------------------------------------------------------------- the command


def catalogue_fingerprint(gallery: Sequence[tuple[Path, str]]) -> dict:
    """What identifies the labelled catalogue: its labels and image count (sha256 of the sorted labels)."""
    labels = sorted({lab for _, lab in gallery})
    digest = hashlib.sha256("\n".join(labels).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "products": len(labels), "images": len(gallery)}


def calibrate(gallery: Sequence[tuple[Path, str]], queries: Sequence[tuple[Path, str]],
              model_id: str = "efficientnet_lite0", precision: str = "fp32", detect_weights: str = "none",
              target: float = 0.95, holdout: float = 0.2, seed: int = 0, repeats: int = 5,
              select: str = "cv", embedder=None, detector=None) -> dict:
    """Embed the gallery and queries as ``lookalike eval --mode direct`` does, then :func:`calibrate_scores`."""
    from lookalike.evaluation import embed_labelled
    from lookalike.functions.query.handler import CALIBRATION_FORMAT

    t0 = time.monotonic()
    embedder, g, q = embed_labelled(gallery, queries, model_id, precision, detect_weights, embedder, detector)
    scores, products = product_scores(g, [lab for _, lab in gallery], q)
    report = calibrate_scores(scores, products, [lab for _, lab in queries], target, holdout, seed, repeats, select)
    report.update(format=CALIBRATION_FORMAT, model=embedder.spec.id, distance="cosine",
                  embed_precision=embedder.precision, detect=detect_weights,
                  catalogue=catalogue_fingerprint(gallery), queries=len(queries),
                  created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  seconds=round(time.monotonic() - t0, 1))
    return report


def write_calibration(path: str | Path, report: dict) -> Path:
    """Write the report (thresholds and figures) where the query function reads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_report(r: dict) -> str:
    t, c, lv = r["thresholds"], r["catalogue"], r["levels"]
    target = r["precision_target"]
    lines = [
        f"model {r['model']} ({r['embed_precision']}), detect {r['detect']}: {r['queries']} queries vs "
        f"{c['images']} gallery images ({c['products']} products, catalogue {c['fingerprint']}), "
        f"precision target {target}",
        "thresholds: same product = top-1 margin " + ("never" if t["same_margin"] is None
                                                      else f">= {t['same_margin']:.4f}")
        + ", similar = score " + ("never" if t["similar_score"] is None else f">= {t['similar_score']:.4f}")
        + f"  (fitted at levels {lv['same']:g} / {lv['similar']:g}, chosen by {lv['select']})",
    ]

    def row(name: str, s: dict) -> str:
        a = s["answers"]
        return (f"  {name:<30} same product: precision {_num(s['same_precision'])} coverage "
                f"{_pct(s['same_coverage'])} ({s['same_count']:g}/{s['queries']})  |  similar: right product in "
                f"top {SIMILAR_K} {_num(s['similar_top5_rate'])}  |  answers: same {_pct(a['same product'])}, "
                f"similar {_pct(a['similar'])}, none {_pct(a['no confident match'])}")

    lines.append(row("fitted on these queries", r["fitted"]))
    if "closed" in r:
        cv, o = r["closed"], r["open_set"]
        lines.append(row(f"cross-validated ({cv['folds']} folds x{cv['repeats']})", cv))
        if cv["same_precision_range"]:
            lo, hi = cv["same_precision_range"]
            lines.append(f"  {'':<30} (same product precision per shuffle of the folds: {lo:.3f} to {hi:.3f})")
        lo, hi = o["same_share_range"]
        a = o["answers"]
        lines.append(f"  open set: {o['queries']} photos searched with their product removed from the gallery: "
                     f"same product {_pct(a['same product'])} (wrong; {_pct(lo)} to {_pct(hi)} per shuffle), "
                     f"similar {_pct(a['similar'])}, no confident match {_pct(a['no confident match'])}")
        for name, key in (("same product", "same_reached"), ("similar", "similar_reached")):
            if lv[key] is False:
                lines.append(f"  WARNING: {name} does not reach the {target} target on held-out products "
                             "even at the strictest fit: label more photos, or use a better model")
    else:
        lines.append("  not cross-validated (--holdout 0 or too few labels): the figures above are optimistic")
    s = r["top_score_only"]
    lines.append("  (on the top score alone, " + ("no threshold reaches the target" if s["threshold"] is None else
                 f"the target needs >= {s['threshold']:.4f}, covering {_pct(s['coverage'])} of the queries")
                 + f"; {r['seconds']} s)")
    return "\n".join(lines)


def cmd_calibrate(args, settings) -> None:
    from lookalike.evaluation import read_labelled_csv
    from lookalike.functions.query.handler import calibration_path

    model = args.model or settings.embed_model
    if model == "auto":
        from lookalike.shared.embedders import resolve_model_id

        model = resolve_model_id("auto", **settings.embedder_options())
    report = calibrate(read_labelled_csv(args.gallery), read_labelled_csv(args.queries), model,
                       args.embed_precision or settings.embed_precision, args.detect, args.precision, args.holdout,
                       args.seed, args.repeats, args.select)
    print(format_report(report), flush=True)
    if not args.dry_run:
        path = Path(args.out) if args.out else calibration_path(settings.data_dir, report["model"])
        write_calibration(path, report)
        print(f"wrote {path} (the query function reads it at start: restart `lookalike up` or the query "
              f"function; EMBED_MODEL must be {report['model']})", flush=True)
    if args.json:
        print(json.dumps(report, sort_keys=True), flush=True)


def add_command(sub) -> None:
    p = sub.add_parser("calibrate", help="fit when a result is 'same product', 'similar' or 'no confident match' "
                                         "from a labelled gallery and queries (CSV path,label); stores the "
                                         "thresholds for the query function")
    p.add_argument("--gallery", required=True, help="CSV path,label: the catalogue's images, one product per label")
    p.add_argument("--queries", required=True,
                   help="CSV path,label: labelled shopper photos (labels not in the gallery count as wrong)")
    p.add_argument("--precision", type=float, default=0.95,
                   help="target precision of 'same product' (and of 'right product in the top 5' for 'similar')")
    p.add_argument("--model", help="embedder id or fine-tuned model directory (default $EMBED_MODEL)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of the labels per fold for cross-validation and the open-set test "
                        "(folds = round(1/holdout)); 0: neither")
    p.add_argument("--embed-precision", choices=("auto", "fp32", "bf16", "int8"),
                   help="default $EMBED_PRECISION (auto): the vectors the embed function serves, which the "
                        "thresholds must fit")
    p.add_argument("--detect", default="none", help="as for `lookalike eval`: none = whole images")
    p.add_argument("--seed", type=int, default=0, help="shuffles the labels into folds")
    p.add_argument("--repeats", type=int, default=5, help="shuffles of the labels into folds, pooled")
    p.add_argument("--select", choices=("cv", "fit"), default="cv",
                   help="cv: the strictest fit needed for the target to hold on held-out products (default); "
                        "fit: fit at the target on all queries (more coverage, optimistic)")
    p.add_argument("--out", help="write here instead of <data dir>/calibration/<model id>.json")
    p.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the report")
