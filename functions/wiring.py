"""Function wiring: build the four functions from settings, and run one alone.

``python -m lookalike.functions <name>`` runs one function (scaled out: one process per
function, each a member of its consumer group(s), each lane supervised). Models and
stores are loaded once here and handed to the handlers.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field

from lookalike.shared import metrics
from lookalike.shared.bus import OffsetReader, ensure_topics
from lookalike.shared.config import Settings
from lookalike.shared.indexes import STATE_DOC, Indexes, ModelRef, default_model
from lookalike.shared.logs import setup_logging
from lookalike.shared.runtime import Function, Runner, Supervisor
from lookalike.shared.stores import CollectionSpec, VectorStore, open_store

log = logging.getLogger("lookalike")

FUNCTIONS = ("ingest", "detect", "embed", "query")


@dataclass
class Resources:
    """What functions are built from: loaded once at start-up, handed to handlers."""

    settings: Settings
    store: VectorStore | None = None
    indexes: Indexes | None = None  # which model's collection is active (lookalike.shared.indexes)
    embedder: object | None = None
    detector: object | None = None
    thresholds: object | None = None  # query: Thresholds from `lookalike calibrate`, None: uncalibrated
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, settings: Settings, names: tuple[str, ...]) -> "Resources":
        res = cls(settings)
        if not {"ingest", "embed", "query"} & set(names):
            return res.load_detector() if "detect" in names else res  # detect alone needs no model id (no torch)
        from lookalike.shared.embedders import REGISTRY

        default = default_model(settings)
        default_id = default.id
        if settings.embed_model == "auto":
            why = ("its weights were found" if default_id == "resnet50" else
                   "resnet50 weights are not available offline; set EMBED_WEIGHTS or put them in torch's cache")
            res.notes.append(f"EMBED_MODEL=auto chose {default_id} ({why})")
        if "query" in names:  # before the store opens: a broken file fails the start, nothing to undo
            res.thresholds = res.load_thresholds(default_id)
        res.store = open_store(settings.qdrant_url, settings.data_dir, **settings.qdrant_options())
        res.indexes = Indexes(res.store, default, settings.collection_name)
        state = res.indexes.state()
        if state.active != default:
            res.notes.append(f"EMBED_MODEL={settings.embed_model} is not what searches use: the store's index "
                             f"state says {state.describe()} (lookalike reindex)")
        if state.building or state.previous:
            res.notes.append(f"model upgrade under way: {state.describe()}")
        if state.active == default:
            collection = res.indexes.collection(default_id)
            existing = res.store.collections()
            if collection not in existing:
                others = [c for c in existing if c.startswith("lookalike__") and res.store.count(c)]
                if others and res.store.read_doc(STATE_DOC) is None:
                    res.notes.append(f"{collection} is new and empty while {', '.join(others)} holds the catalogue: "
                                     f"to change models, start with the old EMBED_MODEL and use lookalike reindex")
            res.store.ensure_collection(CollectionSpec(collection, REGISTRY[default_id].dim, settings.distance))
        if "embed" in names:
            res.embedder = res.load_embedder(state.active)
            compiled = res.embedder.compile_s
            res.notes.append(f"embedder {state.active.id} on {res.embedder.device} "
                             f"({res.embedder.precision}, {res.embedder.runtime}"
                             + (f", compiled in {compiled:.0f} s)" if compiled is not None else ")"))
            metrics.MODEL.info({"model": state.active.id, "device": res.embedder.device,
                                "precision": res.embedder.precision, "runtime": res.embedder.runtime})
        return res.load_detector() if "detect" in names else res

    @property
    def model_id(self) -> str:
        """The active model (it changes when a reindex switches); "" for detect alone."""
        return self.indexes.state().active.id if self.indexes else ""

    @property
    def collection(self) -> str:
        return self.indexes.active_collection() if self.indexes else ""

    def load_embedder(self, ref: ModelRef):
        """The embedder of ``ref`` (EMBED_MODEL's, or one a reindex made live), as settings say to run it."""
        from lookalike.shared.embedders import load_embedder

        s = self.settings
        options = s.embedder_options()
        if ref.spec != s.embed_model:
            options.pop("weights_path", None)  # EMBED_WEIGHTS belongs to EMBED_MODEL
        return load_embedder(ref.spec, s.embed_device, s.embed_precision, batch_size=s.embed_batch_size,
                             allow_download=s.allow_download, runtime=s.embed_runtime, cache_dir=s.onnx_cache_dir(),
                             compile=s.embed_compile, **options)

    def live_collections(self) -> list[str]:
        """The collections catalogue changes go to: one, or two during a model upgrade."""
        return [self.indexes.collection(m.id) for m in self.indexes.state().live()] if self.indexes else []

    def load_thresholds(self, model_id: str):
        """``lookalike calibrate``'s thresholds for ``model_id``, None when there are none."""
        from lookalike.functions.query.handler import Thresholds, calibration_path

        path = calibration_path(self.settings.data_dir, model_id)
        thresholds = Thresholds.load(path, model_id, self.settings.distance)
        if thresholds is not None:
            self.notes.append(f"calibrated answers for {model_id} ({path}): {thresholds.describe()}")
        return thresholds

    def load_detector(self) -> "Resources":
        from lookalike.shared.detector import load_detector

        s = self.settings
        self.detector = load_detector(s.detect_weights, conf=s.detect_conf, max_objects=s.detect_max_objects,
                                      **s.detector_labels())
        self.notes.append(f"detector {type(self.detector).__name__} ({s.detect_weights})")
        return self

    def build(self, name: str) -> Function:
        from lookalike.functions.detect.handler import Detect
        from lookalike.functions.embed.handler import Embed
        from lookalike.functions.ingest.handler import Ingest
        from lookalike.functions.query.handler import Query

        if name == "ingest":
            return Ingest(self.settings, self.indexes)
        if name == "detect":
            return Detect(self.detector)
        if name == "embed":
            return Embed(self.embedder, self.indexes, self.load_embedder, self.settings.distance)
        if name == "query":
            return Query(self.indexes, self.settings.search_oversample, self.settings.merge_threshold,
                         self.settings.search_max_points, thresholds=self.thresholds,
                         load_thresholds=self.load_thresholds)
        raise ValueError(f"unknown function {name!r}; known: {', '.join(FUNCTIONS)}")


def run_function(name: str) -> None:
    """Entry point of ``python -m lookalike.functions <name>``: one function, configured by env vars."""
    settings = Settings()
    setup_logging(settings.log_level, settings.log_format)
    if not settings.kafka_bootstrap_servers:
        raise SystemExit("KAFKA_BOOTSTRAP_SERVERS is not set: a function run alone joins an existing broker "
                         "(or use `lookalike up` for the embedded stack)")
    ensure_topics(settings.kafka_bootstrap_servers, settings.topic_partitions,
                  replication_factor=settings.topic_replication_factor)
    resources = Resources.load(settings, (name,))
    # Processes run alone share their group with others: on the embedded broker, leaving it on
    # close could leave the group without a leader (bus.close_consumer).
    supervisors = supervise(resources.build(name), settings, settings.kafka_bootstrap_servers,
                            leave_group_on_close=False)
    server = serve_metrics(supervisors, resources, settings) if settings.metrics_port else None
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
        if server is not None:
            server.shutdown()
        if resources.store:
            resources.store.close()


def supervise(fn: Function, settings: Settings, bootstrap_servers: str,
              leave_group_on_close: bool = True) -> list[Supervisor]:
    """Start one supervised runner per lane of ``fn`` (each its own consumer group)."""
    return [
        Supervisor(Runner.from_settings(fn, settings, bootstrap_servers, lane=lane,
                                        leave_group_on_close=leave_group_on_close),
                   backoff_max_s=settings.restart_backoff_max_s, stuck_after_s=settings.stuck_after_s).start()
        for lane in fn.lanes()
    ]




def serve_metrics(supervisors: list[Supervisor], resources: Resources, settings: Settings):
    """``/metrics`` and ``/healthz`` of this function process on ``METRICS_PORT`` (probes and Prometheus)."""
    offsets = OffsetReader(settings.kafka_bootstrap_servers)

    def health() -> tuple[bool, dict]:
        lanes = {s.runner.name: s.health() for s in supervisors}
        return all(h["ok"] for h in lanes.values()), lanes

    refresh = metrics.GaugeRefresher(supervisors, offsets, resources.store, resources.live_collections)
    try:
        return metrics.serve(settings.metrics_port, health, refresh)
    except OSError as e:
        raise SystemExit(f"cannot serve metrics on METRICS_PORT={settings.metrics_port} ({e}): "
                         "set a free port, or 0 to turn metrics off") from None
