"""Shared fixtures.

Services are taken in this order: env vars pointing at running ones
(KAFKA_BOOTSTRAP_SERVERS), testcontainers when a Docker engine answers, else local
processes the tests start themselves (the Tansu broker; Qdrant Edge in-process).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEAM_SHARED = REPO_ROOT.parent / "shared"  # the team folder, not the project's shared/ package
OUTPUT_DIR = REPO_ROOT / "test-output"


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """A Kafka-protocol broker for the whole test session."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from lookalike.shared.bus import TansuBroker

    OUTPUT_DIR.mkdir(exist_ok=True)
    with TansuBroker(log_path=OUTPUT_DIR / "tansu.log") as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory):
    from lookalike.sample_catalog import generate

    return generate(tmp_path_factory.mktemp("sample"), n_products=24, photos_per_product=4, seed=0)


def make_settings(data_dir: Path, **overrides):
    from lookalike.shared.config import Settings

    values = dict(data_dir=data_dir, embed_model="efficientnet_lite0", detect_weights="none",
                  poll_timeout_ms=100, backoff_max_s=2.0)
    values.update(overrides)
    return Settings(**{k: v for k, v in values.items() if k != "data_dir"},
                    LOOKALIKE_DATA_DIR=str(values["data_dir"]))


@pytest.fixture(scope="module")
def stack(kafka_bootstrap, tmp_path_factory):
    """The four functions as threads in one process, on the test broker, with an Edge store."""
    from lookalike.stack import Stack

    settings = make_settings(tmp_path_factory.mktemp("stack"), kafka_bootstrap_servers=kafka_bootstrap)
    with Stack(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    from lookalike.client import Client

    c = Client(stack.bootstrap_servers)
    yield c
    c.close()
