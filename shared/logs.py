"""Logging set-up shared by every process (functions, gateway, CLI)."""

from __future__ import annotations

import logging


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s",
    )
    # kafka-python logs routine reconnects and GIL-induced slow ticks as warnings; its errors still show.
    logging.getLogger("kafka").setLevel(logging.ERROR)
