"""Logging set-up shared by every process (functions, gateway, CLI): text or JSON lines, with trace ids."""

from __future__ import annotations

import json
import logging
import time

from lookalike.shared.tracing import current_trace_id, setup_tracing

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"


def add_trace_ids() -> None:
    """Every log record gets ``trace_id``: the trace of the Kafka record being handled when it was
    written ('' otherwise). Done in the record factory, so every handler sees it (once per process)."""
    make = logging.getLogRecordFactory()
    if getattr(make, "adds_trace_id", False):
        return

    def with_trace_id(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.trace_id = current_trace_id()
        return record

    with_trace_id.adds_trace_id = True
    logging.setLogRecordFactory(with_trace_id)


class TextFormatter(logging.Formatter):
    """The classic line, with `` trace=<id>`` when a record's trace was being handled."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"{line} trace={record.trace_id}" if getattr(record, "trace_id", "") else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (UTC times), for log shippers (Loki, CloudWatch, Elasticsearch)."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if getattr(record, "trace_id", ""):
            line["trace_id"] = record.trace_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    if log_format not in ("text", "json"):
        raise ValueError(f"LOG_FORMAT must be text or json, not {log_format!r}")
    setup_tracing()
    add_trace_ids()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # kafka-python logs routine reconnects and GIL-induced slow ticks as warnings; its errors still show.
    logging.getLogger("kafka").setLevel(logging.ERROR)
