"""The ``lookalike`` command: up, index, search, status, topics, demo, reindex, eval, finetune, calibrate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from tqdm import tqdm

from lookalike.shared.config import Settings
from lookalike.shared.messages import Box, SearchFilters

DEMO_PRODUCTS = 24


def _bootstrap(settings: Settings) -> str:
    from lookalike.stack import read_stack_file

    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    info = read_stack_file(settings.data_dir)
    if not info:
        raise SystemExit(f"no running stack found in {settings.data_dir} (start one with `lookalike up`) "
                         "and KAFKA_BOOTSTRAP_SERVERS is not set")
    return info["bootstrap_servers"]


def _filters(args) -> SearchFilters:
    return SearchFilters(
        categories=args.category or None, shops=args.shop or None,
        price_min=args.price_min, price_max=args.price_max, in_stock=True if args.in_stock else None,
    )


def cmd_up(args, settings: Settings) -> None:
    from lookalike.functions.wiring import FUNCTIONS
    from lookalike.stack import Stack

    names = tuple(n.strip() for n in args.functions.split(",") if n.strip()) if args.functions else FUNCTIONS
    unknown = set(names) - set(FUNCTIONS)
    if unknown:
        raise ValueError(f"unknown function(s) {', '.join(sorted(unknown))}; known: {', '.join(FUNCTIONS)}")
    stack = Stack(settings, names=names, gateway=not args.no_gateway).start()
    print(f"lookalike is up: broker {stack.bootstrap_servers}, store {stack.resources.store.backend}, "
          f"model {stack.resources.model_id}, collection {stack.resources.collection}", flush=True)
    if stack.gateway:
        print(f"web page: {stack.gateway.url}  (API docs: {stack.gateway.url}docs)", flush=True)
    try:
        stack.serve_forever()
    finally:
        stack.stop()


def cmd_index(args, settings: Settings) -> None:
    from lookalike.client import Client, read_catalog
    from lookalike.shared.messages import CATALOG_EVENTS

    client = Client(_bootstrap(settings), settings.topic_partitions, settings.topic_replication_factor)
    try:
        events = read_catalog(Path(args.file))
        if args.no_wait:
            client.publish(CATALOG_EVENTS, events)
            print(f"published {len(events)} catalogue events")
            return
        print(f"publishing {len(events)} catalogue events", flush=True)
        with tqdm(total=len(events), unit="event", file=sys.stderr, disable=args.quiet) as bar:
            def progress(report):
                bar.update(report.finished - bar.n)
                bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in report.outcomes.items())
                                    + f", dead-lettered {len(report.dead_lettered)}", refresh=False)

            report = client.index(events, progress=progress, timeout_s=args.timeout)
        print(report.summary())
        if report.failed:
            raise SystemExit(2)
    finally:
        client.close()


def cmd_search(args, settings: Settings) -> None:
    from lookalike.client import Client, format_result

    client = Client(_bootstrap(settings), settings.topic_partitions, settings.topic_replication_factor)
    try:
        box = Box(x1=args.box[0], y1=args.box[1], x2=args.box[2], y2=args.box[3]) if args.box else None
        start = time.monotonic()
        result = client.search(Path(args.photo).read_bytes(), timeout_s=args.timeout, top_k=args.top_k,
                               box=box, filters=_filters(args))
        took = time.monotonic() - start
    finally:
        client.close()
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(format_result(result))
        print(f"({took * 1000:.0f} ms)")


def cmd_status(args, settings: Settings) -> None:
    from lookalike.client import Client
    from lookalike.stack import read_stack_file

    client = Client(_bootstrap(settings), settings.topic_partitions, settings.topic_replication_factor)
    status = client.status()
    info = read_stack_file(settings.data_dir) or {}
    status["store"] = {k: info.get(k) for k in ("store", "model", "collection", "index", "points", "notes")}
    status["counters"] = info.get("counters")
    status["functions"] = info.get("functions")
    if args.json:
        print(json.dumps(status, indent=2))
        return
    s = status["store"]
    print(f"model      {s['model']}  collection {s['collection']}  ({s['store']})")
    if s.get("index") and s["index"] != f"active {s['model']}":
        print(f"index      {s['index']}")
    print(f"points     {s['points']}")
    for note in s.get("notes") or []:
        print(f"           {note}")
    print("topics     " + ", ".join(f"{t}={n}" for t, n in status["topics"].items()))
    print("lag        " + ", ".join(f"{group.removeprefix('lookalike-')}={n}" for group, n in status["lag"].items()))
    functions = status["functions"] or {}
    print("functions  " + (", ".join(f"{name}={h['state']}" + (f" ({h['restarts']} restarts)" if h["restarts"] else "")
                                     for name, h in functions.items()) or "unknown (no stack file)"))
    for name, h in functions.items():
        if not h["ok"] and h.get("last_error"):
            print(f"           {name}: {h['last_error']}")
    print("dlq        " + (", ".join(f"{t}={n}" for t, n in status["dlq"].items() if n) or "none"))


def cmd_dlq(args, settings: Settings) -> None:
    from lookalike.client import Client
    from lookalike.shared.messages import ALL_TOPICS

    topic = args.topic.removesuffix(".dlq")
    if topic not in ALL_TOPICS:
        raise ValueError(f"unknown topic {args.topic!r}; topics with a DLQ: {', '.join(ALL_TOPICS)}")
    client = Client(_bootstrap(settings), settings.topic_partitions, settings.topic_replication_factor)
    try:
        if args.action == "show":
            records = client.dlq_records(topic)
            for r in records[-args.limit:] if args.limit else records:
                print(f"{r['headers'].get('dlq.source', '?')}  key={(r['key'] or b'').decode(errors='replace')}  "
                      f"{r['reason']}")
            print(f"{len(records)} records in {topic}.dlq")
            return
        replayed = client.replay_dlq(topic, limit=args.limit, dry_run=args.dry_run)
        for r in replayed:
            print(f"{r['source']}  key={(r['key'] or b'').decode(errors='replace')}  was: {r['reason']}")
        verb = "would replay" if args.dry_run else "replayed"
        print(f"{verb} {len(replayed)} records from {topic}.dlq to {topic}")
    finally:
        client.close()


def cmd_topics(args, settings: Settings) -> None:
    """Create the pipeline topics and their DLQs ahead of the functions (a deployment step), then list them.

    The functions create missing topics at start too; doing it once first (a compose one-shot
    service, a Kubernetes Job) gives a cluster its replication factor before any process races.
    """
    from kafka import KafkaAdminClient

    from lookalike.shared.bus import ensure_topics, kafka_options, pipeline_topics

    partitions = settings.topic_partitions if args.partitions is None else args.partitions
    replication_factor = (settings.topic_replication_factor if args.replication_factor is None
                          else args.replication_factor)
    if partitions < 1 or replication_factor < 1:
        raise ValueError("--partitions and --replication-factor must be at least 1")
    bootstrap = _bootstrap(settings)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="lookalike-cli", **kafka_options(settings))
    try:
        existed = set(admin.list_topics())
        ensure_topics(bootstrap, partitions, replication_factor=replication_factor)
        # A topic just created may have no partition leaders yet for a moment: ask until it has.
        deadline = time.monotonic() + 30
        while True:
            described = {t["name"]: t["partitions"] for t in admin.describe_topics(pipeline_topics())}
            if all(described.get(name) for name in pipeline_topics()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        admin.close()
    for name in pipeline_topics():
        topic_partitions = described.get(name) or []
        replicas = len(topic_partitions[0]["replica_nodes"]) if topic_partitions else 0
        print(f"{name:<24} partitions {len(topic_partitions):>3}  replicas {replicas}  "
              f"{'existed' if name in existed else 'created'}")
    created = [name for name in pipeline_topics() if name not in existed]
    print(f"{len(pipeline_topics())} topics on {bootstrap}: {len(created)} created, "
          f"{len(pipeline_topics()) - len(created)} existed (an existing topic is never changed)")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def cmd_demo(args, settings: Settings) -> None:
    """Start the embedded stack and web page, index the sample catalogue, run a photo search.

    Interactive runs keep serving the web page until Ctrl-C; scripted runs (no terminal
    on stdin, or --no-serve) stop after the search.
    """
    from lookalike.client import Client, format_result, read_catalog
    from lookalike.sample_catalog import generate
    from lookalike.stack import Stack

    sample_dir = settings.data_dir / "sample"
    print(f"generating the sample catalogue in {sample_dir} ...", flush=True)
    sample = generate(sample_dir, n_products=args.products)
    if not _port_free(settings.gateway_host, settings.gateway_port):
        settings.gateway_port = 0  # someone uses the default port: take any free one
    print("starting the embedded stack (Tansu broker, Qdrant Edge, ingest/detect/embed/query, gateway) ...",
          flush=True)
    t0 = time.monotonic()
    with Stack(settings, gateway=True) as stack:
        print(f"  up in {time.monotonic() - t0:.1f} s: model {stack.resources.model_id}, "
              f"store {stack.resources.store.backend} at {settings.data_dir}", flush=True)
        for note in stack.resources.notes:
            print(f"  {note}")
        client = Client(stack.bootstrap_servers)
        try:
            events = read_catalog(sample.catalog_path)
            report = client.index(events)
            points = stack.resources.store.count(stack.resources.collection)
            print(f"catalogue: {report.summary()}; {points} points in the store", flush=True)
            photo, product_id = sample.queries[args.query % len(sample.queries)]
            print(f"\nsearching with {photo} (a new photo of {product_id}, not in the catalogue):")
            t0 = time.monotonic()
            result = client.search(photo.read_bytes(), top_k=5)
            print(format_result(result))
            print(f"search took {(time.monotonic() - t0) * 1000:.0f} ms")
            top = result.objects[-1].products[0].product_id if result.objects and result.objects[-1].products else None
            print(f"\n{'correct' if top == product_id else 'WRONG'}: top match {top}, expected {product_id}")
        finally:
            client.close()
        serve = sys.stdin.isatty() if args.serve is None else args.serve
        if serve:
            print(f"\nweb page: {stack.gateway.url}  (try the photos in {sample_dir / 'queries'}); Ctrl-C stops",
                  flush=True)
            stack.serve_forever()
        else:
            print(f"\nweb page: `lookalike up` serves it at http://{settings.gateway_host}:8080/ with this catalogue "
                  f"(the store persists in {settings.data_dir}); then `lookalike search PHOTO`, `lookalike status`.")


def main(argv: list[str] | None = None) -> None:
    from lookalike.shared.logs import setup_logging

    parser = argparse.ArgumentParser(prog="lookalike", description=__doc__)
    parser.add_argument("--data-dir", help="data directory (default $LOOKALIKE_DATA_DIR or ./data)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the embedded stack (broker, four functions, store, web page) until Ctrl-C")
    p.add_argument("--no-gateway", action="store_true", help="don't serve the web page and HTTP API")
    p.add_argument("--functions", help="comma-separated functions to run here (default: all four); "
                                       "run the others as `python -m lookalike.functions <name>`")

    p = sub.add_parser("index", help="publish catalogue events from a JSONL file and wait until indexed")
    p.add_argument("file")
    p.add_argument("--no-wait", action="store_true", help="publish and return without following the events")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=1800)

    p = sub.add_parser("search", help="search by photo and print ranked products with prices")
    p.add_argument("photo")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
                   help="search only this region (pixels of the photo); skips detection")
    p.add_argument("--category", action="append")
    p.add_argument("--shop", action="append")
    p.add_argument("--price-min", type=float)
    p.add_argument("--price-max", type=float)
    p.add_argument("--in-stock", action="store_true")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="topics, consumer lag, DLQ counts, points in the store")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("dlq", help="show a topic's dead letters, or replay them into the topic")
    p.add_argument("action", choices=["show", "replay"])
    p.add_argument("topic", help="the source topic (e.g. catalog.events) or its .dlq")
    p.add_argument("--limit", type=int, help="at most this many (show: the last N)")
    p.add_argument("--dry-run", action="store_true", help="replay: list what would be replayed, publish nothing")

    p = sub.add_parser("topics", help="create the pipeline topics and their DLQs on KAFKA_BOOTSTRAP_SERVERS, "
                                      "then list them (a deployment step)")
    p.add_argument("action", choices=["create"])
    p.add_argument("--partitions", type=int, help="partitions per topic, DLQs have 1 (default $TOPIC_PARTITIONS)")
    p.add_argument("--replication-factor", type=int,
                   help="copies of each partition, 3 on a production cluster (default $TOPIC_REPLICATION_FACTOR)")

    p = sub.add_parser("demo", help="index a generated sample catalogue and run a photo search")
    p.add_argument("--products", type=int, default=DEMO_PRODUCTS)
    p.add_argument("--query", type=int, default=0, help="which sample query photo to search with")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=None,
                   help="keep serving the web page after the search (default: when run from a terminal)")

    from lookalike.quality import add_commands as add_quality_commands  # eval, finetune, calibrate
    from lookalike.reindex import ReindexFailed, cmd_reindex
    from lookalike.reindex import add_command as add_reindex_command

    add_reindex_command(sub)
    quality_handlers = add_quality_commands(sub)

    args = parser.parse_args(argv)
    setup_logging("INFO" if args.verbose else os.environ.get("LOG_LEVEL", "WARNING"),
                  os.environ.get("LOG_FORMAT", "text"))
    if not args.verbose and args.command != "up":
        # Short-lived clients close connections mid-metadata-refresh; kafka-python reports that as an error.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    settings = Settings(LOOKALIKE_DATA_DIR=args.data_dir) if args.data_dir else Settings()
    handlers = {"up": cmd_up, "index": cmd_index, "search": cmd_search, "status": cmd_status, "demo": cmd_demo,
                "dlq": cmd_dlq, "topics": cmd_topics, "reindex": cmd_reindex}
    handlers.update(quality_handlers)
    try:
        handlers[args.command](args, settings)
    except (TimeoutError, ValueError, OSError, ReindexFailed) as e:  # OSError: a missing file, a busy port
        print(f"lookalike {args.command}: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
