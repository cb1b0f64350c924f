"""Run the gateway alone: ``python -m lookalike.gateway`` (distributed mode, configured by env vars).

Needs KAFKA_BOOTSTRAP_SERVERS and QDRANT_URL (a Qdrant server: Qdrant Edge allows one
process per shard, and in the embedded mode `lookalike up` serves the gateway itself).
"""

import uvicorn

from lookalike.gateway.app import create_app
from lookalike.shared.config import Settings
from lookalike.shared.indexes import Indexes, default_model
from lookalike.shared.logs import setup_logging
from lookalike.shared.stores import open_store


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level, settings.log_format)
    if not settings.kafka_bootstrap_servers or not settings.qdrant_url:
        raise SystemExit("the gateway alone needs KAFKA_BOOTSTRAP_SERVERS and QDRANT_URL "
                         "(or use `lookalike up`, which serves it in the embedded stack)")
    store = open_store(settings.qdrant_url, settings.data_dir, **settings.qdrant_options())
    indexes = Indexes(store, default_model(settings), settings.collection_name)
    app = create_app(settings.kafka_bootstrap_servers, store, indexes, settings)
    uvicorn.run(app, host=settings.gateway_host, port=settings.gateway_port, log_level="warning")


if __name__ == "__main__":
    main()
