"""The embedded stack: broker (unless KAFKA_BOOTSTRAP_SERVERS is set), store, the four
functions and the gateway in one process; what ``lookalike up`` and ``lookalike demo`` run.

Qdrant Edge allows one process per shard, so the functions that touch the store share it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lookalike.functions.wiring import FUNCTIONS, Resources, supervise
from lookalike.shared.bus import OffsetReader, TansuBroker, ensure_topics
from lookalike.shared.config import Settings
from lookalike.shared.metrics import GaugeRefresher
from lookalike.shared.runtime import Function, Supervisor

log = logging.getLogger("lookalike")

STACK_FILE = "stack.json"


class Stack:
    """Broker (unless KAFKA_BOOTSTRAP_SERVERS is set), store and functions in one process."""

    def __init__(self, settings: Settings | None = None, names: tuple[str, ...] = FUNCTIONS, gateway: bool = False):
        self.settings = settings or Settings()
        self.names = names
        self.with_gateway = gateway  # also serve the web page and HTTP API (gateway/) on GATEWAY_HOST:GATEWAY_PORT
        self.gateway = None
        self._offsets: OffsetReader | None = None  # the gateway's /metrics reads lag with it
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
            from lookalike.gateway.app import create_app
            from lookalike.gateway.server import GatewayServer

            try:
                self._offsets = OffsetReader(self.bootstrap_servers)
                refresh = GaugeRefresher(list(self.supervisors.values()), self._offsets, self.resources.store,
                                         self.resources.live_collections)
                app = create_app(self.bootstrap_servers, self.resources.store, self.resources.indexes, s,
                                 function_health=self.health, refresh_metrics=refresh)
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
            "index": self.resources.indexes.state().describe() if self.resources.indexes else None,
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
        if self._offsets is not None:
            self._offsets.close()
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


@contextmanager
def running_pipeline(settings: Settings) -> Iterator:
    """A ``Client`` of the running pipeline (KAFKA_BOOTSTRAP_SERVERS, else `lookalike up`'s from its stack
    file); with neither, an embedded stack started for the caller and stopped after it."""
    from lookalike.client import Client

    stack = None
    info = read_stack_file(settings.data_dir)
    if settings.kafka_bootstrap_servers or info:
        bootstrap = settings.kafka_bootstrap_servers or info["bootstrap_servers"]
    else:
        print(f"no running stack in {settings.data_dir}: starting an embedded one for this command", file=sys.stderr)
        stack = Stack(settings).start()
        bootstrap = stack.bootstrap_servers
    client = Client(bootstrap, settings.topic_partitions, settings.topic_replication_factor)
    try:
        yield client
    finally:
        client.close()
        if stack is not None:
            stack.stop()


def read_stack_file(data_dir: Path) -> dict | None:
    path = data_dir / STACK_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
