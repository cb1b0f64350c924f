"""Wiring: build functions from settings, run them alone or all together in one process.

``python -m functions.<name>`` runs one function (scaled out: one process per
function, each its own consumer-group member). ``Stack`` runs all four as threads
in one process with one shared store, which is how ``lookalike up`` works: Qdrant
Edge allows one process per shard, so the functions that touch the store share it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.bus import TansuBroker, ensure_topics
from shared.config import Settings
from shared.runtime import Function, Runner, Supervisor
from shared.stores import CollectionSpec, VectorStore, open_store

log = logging.getLogger("lookalike")

FUNCTIONS = ("ingest", "detect", "embed", "query")
STACK_FILE = "stack.json"


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s",
    )
    # kafka-python logs routine reconnects and GIL-induced slow ticks as warnings; its errors still show.
    logging.getLogger("kafka").setLevel(logging.ERROR)


@dataclass
class Resources:
    """What functions are built from: loaded once at start-up, handed to handlers."""

    settings: Settings
    store: VectorStore | None = None
    model_id: str = ""
    collection: str = ""
    embedder: object | None = None
    detector: object | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, settings: Settings, names: tuple[str, ...]) -> "Resources":
        from shared.embedders import REGISTRY, resolve_model_id

        res = cls(settings)
        res.model_id = resolve_model_id(settings.embed_model)
        res.collection = settings.collection_name(res.model_id)
        if settings.embed_model == "auto":
            why = ("its weights were found" if res.model_id == "resnet50" else
                   "resnet50 weights are not available offline; set EMBED_WEIGHTS or put them in torch's cache")
            res.notes.append(f"EMBED_MODEL=auto chose {res.model_id} ({why})")
        if {"ingest", "embed", "query"} & set(names):
            res.store = open_store(settings.qdrant_url, settings.data_dir, api_key=settings.qdrant_api_key)
            res.store.ensure_collection(CollectionSpec(res.collection, REGISTRY[res.model_id].dim, settings.distance))
        if "embed" in names:
            from shared.embedders import load_embedder

            res.embedder = load_embedder(res.model_id, settings.embed_device, settings.embed_precision,
                                         settings.embed_weights, settings.embed_batch_size)
            res.notes.append(f"embedder {res.model_id} on {res.embedder.device} ({res.embedder.precision})")
        if "detect" in names:
            from shared.detector import load_detector

            res.detector = load_detector(settings.detect_weights, conf=settings.detect_conf,
                                         max_objects=settings.detect_max_objects, **settings.detector_labels())
            res.notes.append(f"detector {type(res.detector).__name__} ({settings.detect_weights})")
        return res

    def build(self, name: str) -> Function:
        from functions.detect.handler import Detect
        from functions.embed.handler import Embed
        from functions.ingest.handler import Ingest
        from functions.query.handler import Query

        if name == "ingest":
            return Ingest(self.settings, self.store, self.collection)
        if name == "detect":
            return Detect(self.detector)
        if name == "embed":
            return Embed(self.embedder, self.store, self.collection)
        if name == "query":
            return Query(self.store, self.collection, self.model_id, self.settings.search_oversample,
                         self.settings.merge_threshold, self.settings.search_max_points)
        raise ValueError(f"unknown function {name!r}; known: {', '.join(FUNCTIONS)}")


class Stack:
    """Broker (unless KAFKA_BOOTSTRAP_SERVERS is set), store and functions in one process."""

    def __init__(self, settings: Settings | None = None, names: tuple[str, ...] = FUNCTIONS, gateway: bool = False):
        self.settings = settings or Settings()
        self.names = names
        self.with_gateway = gateway  # also serve the web page and HTTP API (gateway/) on GATEWAY_HOST:GATEWAY_PORT
        self.gateway = None
        self.broker: TansuBroker | None = None
        self.resources: Resources | None = None
        self.functions: dict[str, Function] = {}
        self.supervisors: dict[str, Supervisor] = {}  # one per function lane, keyed by runner name
        self.bootstrap_servers = ""
        self.started_at = 0.0

    def start(self, wait_ready_s: float = 60.0) -> "Stack":
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if s.kafka_bootstrap_servers:
            self.bootstrap_servers = s.kafka_bootstrap_servers
        else:
            self.broker = TansuBroker(log_path=s.data_dir / "tansu.log")
            self.bootstrap_servers = self.broker.bootstrap_servers
        ensure_topics(self.bootstrap_servers, s.topic_partitions)
        self.resources = Resources.load(s, self.names)
        for note in self.resources.notes:
            log.info("%s", note)
        for name in self.names:
            fn = self.functions[name] = self.resources.build(name)
            for supervisor in supervise(fn, s, self.bootstrap_servers):
                self.supervisors[supervisor.runner.name] = supervisor
        deadline = time.monotonic() + wait_ready_s
        for name, supervisor in self.supervisors.items():
            if not supervisor.runner.ready.wait(max(0.0, deadline - time.monotonic())):
                log.warning("%s has no partitions after %.0f s (group still joining); it will catch up",
                            name, wait_ready_s)
        if self.with_gateway:
            from gateway.app import create_app
            from gateway.server import GatewayServer

            try:
                app = create_app(self.bootstrap_servers, self.resources.store, self.resources.collection, s,
                                 function_health=self.health)
                self.gateway = GatewayServer(app, s.gateway_host, s.gateway_port).start()
            except Exception:
                self.stop()  # don't leave the broker and the functions running behind a failed start
                raise
        self.started_at = time.time()
        self.write_stack_file()
        return self

    def write_stack_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "bootstrap_servers": self.bootstrap_servers,
            "model": self.resources.model_id,
            "collection": self.resources.collection,
            "store": self.resources.store.backend if self.resources.store else None,
            "gateway": self.gateway.url if self.gateway else None,
            "points": self.resources.store.count(self.resources.collection) if self.resources.store else None,
            "notes": self.resources.notes,
            "counters": {name: dict(fn.counters) for name, fn in self.functions.items()},
            "functions": self.health(),
            "updated": time.time(),
        }
        path = self.settings.data_dir / STACK_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(path)

    def health(self) -> dict[str, dict]:
        """Each function lane (and the embedded broker): alive and making progress?

        Shown by ``/healthz`` (503 when any is not ok) and ``lookalike status``.
        """
        health = {name: supervisor.health() for name, supervisor in self.supervisors.items()}
        if self.broker is not None:
            code = self.broker.process.poll()
            health["broker"] = {"ok": code is None, "state": "running" if code is None else f"exited ({code})",
                                "restarts": 0, "last_error": ""}
        return health

    def stop(self) -> None:
        if self.gateway:
            self.gateway.stop()
        for supervisor in self.supervisors.values():
            supervisor.runner.stop()
        for supervisor in self.supervisors.values():
            supervisor.stop()
        if self.resources and self.resources.store:
            self.resources.store.close()
        if self.broker:
            self.broker.stop()
        (self.settings.data_dir / STACK_FILE).unlink(missing_ok=True)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block until SIGINT/SIGTERM, refreshing the stack file for ``lookalike status``."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(2.0):
            self.write_stack_file()
            if self.broker is not None and self.broker.process.poll() is not None:
                # The embedded broker keeps everything in memory: its topics and offsets are gone.
                # Exit so whatever supervises this process starts a fresh stack; `lookalike index`
                # of the catalogue then converges (only images without points are embedded).
                raise SystemExit(f"the embedded broker exited (code {self.broker.process.returncode}); "
                                 "restart `lookalike up` and run `lookalike index` again")


def run_function(name: str) -> None:
    """Entry point of ``python -m functions.<name>``: one function, configured by env vars."""
    setup_logging()
    settings = Settings()
    if not settings.kafka_bootstrap_servers:
        raise SystemExit("KAFKA_BOOTSTRAP_SERVERS is not set: a function run alone joins an existing broker "
                         "(or use `lookalike up` for the embedded stack)")
    ensure_topics(settings.kafka_bootstrap_servers, settings.topic_partitions)
    resources = Resources.load(settings, (name,))
    supervisors = supervise(resources.build(name), settings, settings.kafka_bootstrap_servers)
    # SIGTERM: finish the batch in hand, commit, exit.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        for supervisor in supervisors:
            supervisor.runner.stop()
        for supervisor in supervisors:
            supervisor.stop()
        if resources.store:
            resources.store.close()


def supervise(fn: Function, settings: Settings, bootstrap_servers: str) -> list[Supervisor]:
    """Start one supervised runner per lane of ``fn`` (each its own consumer group)."""
    return [
        Supervisor(Runner.from_settings(fn, settings, bootstrap_servers, lane=lane),
                   backoff_max_s=settings.restart_backoff_max_s, stuck_after_s=settings.stuck_after_s).start()
        for lane in fn.lanes()
    ]


def read_stack_file(data_dir: Path) -> dict | None:
    path = data_dir / STACK_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
