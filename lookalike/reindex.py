"""``lookalike reindex``: move searches to another embedding model without stopping them.

    lookalike reindex --model NEW --catalog catalog.jsonl   build NEW's collection, then switch
    lookalike reindex --rollback                            back to the previous model
    lookalike reindex --finish                              drop the previous model's collection
    lookalike reindex --switch | --abort                    finish or drop a build by hand

The steps are index commands sent through the running pipeline (embed applies them; the
states are in ``lookalike.shared.indexes``). While NEW is built, searches are answered from
the active collection and every catalogue change reaches both collections, so nothing is
lost or stale at the switch. The store keeps no image bytes, so the images come from the
catalogue file: it is indexed like ``lookalike index`` would (it should be the current
catalogue), and images NEW's collection already has are not embedded again, so a rerun
after a failure goes on where it stopped. Searches have lanes of their own through every
function, so they do not queue behind the catalogue's images. The switch happens only when NEW's collection
holds as many points as the active one; after it, the previous collection keeps receiving
changes until ``--finish``, so ``--rollback`` is instant and loses nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from lookalike.client import Client, IndexReport, read_catalog
from lookalike.shared.config import Settings
from lookalike.shared.messages import IndexCommand

# A command refused for now (a model loading, a collection catching up) is sent again at this pace.
RETRY_S = 0.5


class ReindexFailed(RuntimeError):
    """A step was refused or did not finish; the message says what to do."""


def send(client: Client, action: str, model: str | None = None, timeout_s: float = 600.0, **fields) -> float:
    """One index command, sent again while embed says to retry ("loading" its model, "not caught
    up" with the active collection); returns the seconds it took, or raises ``ReindexFailed``."""
    from lookalike.functions.embed.handler import LOADING, NOT_CAUGHT_UP

    start = time.monotonic()
    while True:
        if action == "switch":
            client.wait_indexed(max(1.0, timeout_s - (time.monotonic() - start)))  # what is on its way
        report = client.command(IndexCommand(action=action, model=model, **fields), timeout_s)
        if report.outcome == "indexed":
            return time.monotonic() - start
        detail = report.detail or ""
        if not detail.startswith((LOADING, NOT_CAUGHT_UP)) or time.monotonic() - start > timeout_s:
            raise ReindexFailed(f"{action} refused: {detail}")
        time.sleep(RETRY_S)


def reindex(client: Client, settings: Settings, model_spec: str, catalog: Path, switch_after: bool = True,
            timeout_s: float = 3600.0, progress: Callable[[IndexReport], None] | None = None) -> dict:
    """Build ``model_spec``'s collection from ``catalog`` while searches go on, then switch to it."""
    from lookalike.shared.embedders import resolve_model_id

    spec = str(Path(model_spec).resolve()) if Path(model_spec).is_dir() else model_spec
    model = resolve_model_id(spec, models_dir=settings.models_dir())  # a typo fails here, not in embed
    events = read_catalog(Path(catalog))
    start = time.monotonic()
    send(client, "build", model, timeout_s, model_spec=spec)
    built = time.monotonic()
    report = client.index(events, progress=progress, timeout_s=timeout_s)
    if report.failed:
        raise ReindexFailed(f"{report.summary()}\n{model} is still being built and receives every change: "
                            "fix what the reasons say and run the same command again (it goes on where it "
                            "stopped), or `lookalike reindex --abort`")
    result = {"model": model, "collection": settings.collection_name(model), "events": len(events),
              "outcomes": dict(report.outcomes), "build_s": round(built - start, 1),
              "index_s": round(time.monotonic() - built, 1), "switched": False}
    if switch_after:
        result["switch_wait_s"] = round(send(client, "switch", model, timeout_s), 1)
        result["switched"] = True
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def add_command(sub) -> None:
    p = sub.add_parser("reindex", help="move searches to another embedding model without downtime "
                                       "(build its collection, switch, roll back)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="embedder id or fine-tuned model directory to build and switch to "
                                      "(with --catalog)")
    what.add_argument("--switch", action="store_true", help="switch to the model being built (after --no-switch)")
    what.add_argument("--rollback", action="store_true", help="searches go back to the previous model")
    what.add_argument("--finish", action="store_true", help="drop the previous model's collection (no rollback)")
    what.add_argument("--abort", action="store_true", help="drop the collection being built")
    p.add_argument("--catalog", help="catalogue JSONL (as for `lookalike index`): the images to build from")
    p.add_argument("--no-switch", action="store_true", help="build only; switch later with --switch")
    p.add_argument("--force", action="store_true",
                   help="switch even when the new collection holds fewer points (products missing from the file)")
    p.add_argument("--timeout", type=float, default=3600)


def cmd_reindex(args, settings: Settings) -> None:
    from lookalike.stack import running_pipeline

    if args.model and not args.catalog:
        raise ValueError("--model needs --catalog: the store keeps no image bytes, the catalogue file has them")
    with running_pipeline(settings) as client:
        if args.model:
            r = reindex(client, settings, args.model, Path(args.catalog), not args.no_switch, args.timeout)
            print(f"built {r['collection']} from {r['events']} catalogue events in {r['build_s'] + r['index_s']} s "
                  f"({', '.join(f'{n} {k}' for k, n in r['outcomes'].items())})")
            print(f"searches now use {r['model']}; the previous model still receives every change: "
                  "`lookalike reindex --rollback` to go back, `--finish` to drop it" if r["switched"] else
                  f"{r['model']} is built and kept up to date; `lookalike reindex --switch` moves searches to it")
        elif args.switch:
            waited = send(client, "switch", None, args.timeout, force=args.force)
            print(f"switched (waited {waited:.1f} s for the new collection to catch up)")
        else:
            action = "rollback" if args.rollback else "finish" if args.finish else "abort"
            send(client, action, None, args.timeout)
            print({"rollback": "searches use the previous model again (the other one stays up to date)",
                   "finish": "the previous model's collection is dropped",
                   "abort": "the build is dropped"}[action])
