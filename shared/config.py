"""Settings, from environment variables (one place, so every function reads the same names)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from lookalike.shared import limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    # Services: unset means "embedded" (Tansu subprocess, Qdrant Edge in-process).
    kafka_bootstrap_servers: str | None = None
    qdrant_url: str | None = None  # https://... for TLS (Qdrant Cloud, a secured cluster)
    qdrant_api_key: SecretStr | None = None
    # Collections lookalike creates on a Qdrant server or cluster (the embedded store ignores them).
    qdrant_shards: int = 1  # a cluster: at least its node count, so every node serves a part
    qdrant_replication_factor: int = 1  # 2 or more on a cluster: a node can go down without losing searches
    qdrant_quantization: str = "none"  # none, int8 (4x less RAM, float vectors on disk rescore) or binary
    data_dir: Path = Field(default=Path("data"), validation_alias=AliasChoices("LOOKALIKE_DATA_DIR"))

    # Models.
    embed_model: str = "auto"  # registry id, or auto (resnet50 when its weights load, else efficientnet_lite2_rmac)
    embed_device: str = "auto"  # auto, cpu, cuda
    # auto (int8 on a CPU with VNNI where the model's int8 ranges ship, else bf16 where the device runs it
    # natively and faster: CUDA, a ResNet on a CPU; else fp32), fp32, bf16 or int8
    embed_precision: str = "auto"
    embed_batch_size: int = 0  # crops per network batch; 0: the device's default (8 on the CPU, 256 on CUDA)
    # auto (ONNX Runtime for fp32 and int8 on the CPU, PyTorch on CUDA or for bf16), torch or onnx
    embed_runtime: str = "auto"
    # auto (on for a network in bf16 on a CPU, where it pays: ResNet-50 2.5x), on or off: torch.compile it at
    # start-up (10-20 s a batch size on 2 cores; less once TORCHINDUCTOR_CACHE_DIR holds the code)
    embed_compile: str = "auto"
    embed_weights: str | None = None  # local weights file for the chosen model
    allow_download: bool = Field(default=True, validation_alias=AliasChoices("LOOKALIKE_ALLOW_DOWNLOAD",
                                                                             "allow_download"))
    # Fine-tuned models found by id (EMBED_MODEL=<id>); default <data dir>/models.
    models_dir_setting: Path | None = Field(default=None, validation_alias=AliasChoices("LOOKALIKE_MODELS_DIR",
                                                                                        "models_dir"))
    detect_weights: str = "auto"  # auto, none, an Ultralytics name or a local .pt/.onnx/.tflite
    detect_conf: float = 0.25
    detect_max_objects: int = 4  # searched per photo, most confident first, plus the whole image
    # Which detector labels count as products: an allow-list (empty: every label not excluded)
    # and a deny-list (empty: the default, people, vehicles, animals and street furniture).
    detect_labels: str = ""
    detect_exclude: str = ""
    distance: str = "cosine"  # cosine or euclid (a collection option)

    # Secured Kafka (MSK, Confluent Cloud, Aiven): every Kafka client of every component
    # (functions, gateway, CLI, Lambda adapter) takes these through shared.bus.kafka_options().
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    kafka_sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, AWS_MSK_IAM
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # OAUTHBEARER: tokens from this OAuth 2 token endpoint (client-credentials grant).
    kafka_sasl_oauth_token_url: str | None = None
    kafka_sasl_oauth_client_id: str | None = None
    kafka_sasl_oauth_client_secret: SecretStr | None = None
    kafka_sasl_oauth_scope: str | None = None
    kafka_ssl_cafile: str | None = None  # the cluster's CA when it is not in the system store
    kafka_ssl_certfile: str | None = None  # mutual TLS: this client's certificate and key
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_password: SecretStr | None = None

    log_level: str = "INFO"  # LOG_LEVEL, for the function and gateway processes
    log_format: str = "text"  # text, or json (one object per line, for log shippers)
    # Function processes serve Prometheus metrics on this port (0: off); the gateway serves /metrics.
    metrics_port: int = 9100

    # Kafka runtime.
    topic_partitions: int = 4
    topic_replication_factor: int = 1  # 3 on a production cluster (each partition on three brokers)
    # Records per poll. 128, not 32: embed's decode worker then has more network batches to run
    # ahead of, and a poll's fixed costs (fetch, store write, commit) are shared by more photos:
    # medians of 75.2 against 70.2 photos/s over 9 and 8 runs here (docs/benchmarks.md). Memory stays
    # bounded by the fetch sizes (MAX_MESSAGE_BYTES a partition, 16 times that a fetch), not by this.
    poll_max_records: int = 128
    poll_timeout_ms: int = 200
    # How long the broker may hold a function lane's empty fetch. The embedded Tansu broker does not
    # answer a held fetch when a record arrives: it looks again after half the wait left, so a record waits
    # about a sixth of this at every hop, and every idle consumer fetches this often (CPU).
    # A Kafka broker answers at once, so there a longer wait (kafka-python's 500) costs nothing
    # and saves the idle fetches (docs/benchmarks.md, "The embedded broker's fetch wait").
    # At most 10 s: kafka-python refuses a wait that reaches its request timeout (30 s).
    fetch_max_wait_ms: int = Field(default=50, ge=1, le=10000)
    # The function lanes' Kafka consumer: librdkafka (confluent-kafka, its network work in C threads
    # outside the GIL: indexing 7-26 % faster here, pair by pair, docs/benchmarks.md) or kafka-python (pure Python,
    # the client of every other component). auto: librdkafka, except for SASL AWS_MSK_IAM, which
    # only kafka-python signs here (shared/lane_consumer.py).
    kafka_consumer: Literal["auto", "librdkafka", "kafka-python"] = "auto"
    # A batch function (embed) may wait up to this long after its first record for a fuller
    # batch (up to POLL_MAX_RECORDS); the others handle what one poll returns. Off by default:
    # 50 ms bought no indexing throughput here and added ~45 ms to every search (benchmarks.md).
    batch_max_wait_ms: int = 0
    # Longer than the worst stall of the process (Qdrant Edge holds the GIL per call; its index
    # builds run in a child process, docs/architecture.md),
    # short enough that Tansu's first group join stays quick (see docs/architecture.md).
    session_timeout_ms: int = 10000
    # A record whose handler fails unexpectedly, or whose own source (an image URL) keeps failing,
    # this many times is dead-lettered with the reason. Store and broker outages are retried
    # without a cap (they are nobody's record's fault) and show in /healthz meanwhile.
    max_attempts: int = 3
    backoff_max_s: float = 30.0
    # A function's runner that crashes is restarted with backoff up to this long; one that has not
    # finished a poll loop for stuck_after_s (a hung handler) turns /healthz to 503.
    restart_backoff_max_s: float = 30.0
    stuck_after_s: float = 120.0

    # Input limits (poison beyond them; 413/429 at the gateway). Why these values: shared/limits.py.
    image_max_side: int = limits.IMAGE_MAX_SIDE
    max_image_bytes: int = limits.MAX_IMAGE_BYTES
    max_image_pixels: int = limits.MAX_IMAGE_PIXELS
    url_timeout_s: float = 10.0
    allow_private_urls: bool = False  # ingest refuses loopback/private/link-local hosts unless set
    gateway_max_inflight: int = limits.GATEWAY_MAX_INFLIGHT  # searches + recommendations at once

    # Query.
    search_oversample: int = 5  # fetch top_k * this many points, then collapse to one per product
    search_max_points: int = 1000  # widen the fetch up to this many points when products have many images
    # Listings of the same item under different product ids (different shops) whose vectors
    # are at least this similar (cosine) merge into one price-comparison entry; 1.0 turns it off.
    merge_threshold: float = 0.95

    # Gateway (web page and HTTP API; `lookalike up` starts it).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080  # 0: any free port
    gateway_timeout_s: float = 30.0  # a search without an answer by then gets 504
    # For a gateway that faces the internet. API keys: comma-separated; when set, /api/* needs
    # one in the X-API-Key header (the page, /healthz and /metrics stay open).
    gateway_api_keys: SecretStr | None = None
    gateway_cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser ("*": any)
    gateway_rate_limit_per_min: int = 0  # searches + recommendations per client (API key, else address); 0: off

    def lane_consumer_client(self) -> str:
        """``librdkafka`` or ``kafka-python``: what ``KAFKA_CONSUMER`` picks for the function lanes."""
        if self.kafka_consumer != "auto":
            return self.kafka_consumer
        return "kafka-python" if (self.kafka_sasl_mechanism or "").upper() == "AWS_MSK_IAM" else "librdkafka"

    def detector_labels(self) -> dict:
        """``load_detector`` keyword arguments for the label settings."""
        from lookalike.shared.detector import NOT_PRODUCTS

        def split(value: str) -> frozenset[str]:
            return frozenset(x.strip() for x in value.split(",") if x.strip())

        return {
            "product_labels": split(self.detect_labels) or None,
            "exclude_labels": split(self.detect_exclude) or NOT_PRODUCTS,
        }

    def qdrant_options(self) -> dict:
        """``open_store`` keyword arguments for a Qdrant server."""
        return {"api_key": self.qdrant_api_key, "shards": self.qdrant_shards,
                "replication_factor": self.qdrant_replication_factor, "quantization": self.qdrant_quantization}

    def models_dir(self) -> Path:
        return self.models_dir_setting or self.data_dir / "models"

    def onnx_cache_dir(self) -> Path:
        """Where exported ONNX graphs of the embedders are kept between starts."""
        return self.data_dir / "cache" / "onnx"

    def embedder_options(self) -> dict:
        """``resolve_model_id``/``load_embedder`` keyword arguments for the embedder settings."""
        return {"weights_path": self.embed_weights, "models_dir": self.models_dir()}

    def collection_name(self, model_id: str) -> str:
        # One collection per embedding model (and distance): vectors of two models never mix.
        suffix = "" if self.distance == "cosine" else f"__{self.distance}"
        return f"lookalike__{model_id}{suffix}"
