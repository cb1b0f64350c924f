"""One trace per catalogue event or search, followed through every topic (OpenTelemetry).

The W3C ``traceparent`` header travels on every Kafka record: whoever first publishes an event
(the gateway, ``lookalike index``) starts a trace, and each function continues it in a span
per record and passes it on in its outputs' headers. Log lines written while a record is
handled carry its trace id (``shared.logs``), so one search can be followed stage by stage.

Spans are exported only where the operator asks for it: with ``OTEL_EXPORTER_OTLP_ENDPOINT``
set and ``opentelemetry-exporter-otlp`` installed, to that collector (Jaeger, Tempo, ...).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
_propagator = TraceContextTextMapPropagator()
_setup_lock = threading.Lock()
log = logging.getLogger("lookalike.tracing")


def setup_tracing() -> None:
    """Give this process a tracer provider (once), so new traces get ids; export if configured."""
    with _setup_lock:
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return  # ours, or one the embedding application set: keep it
        provider = TracerProvider()
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.trace.export import BatchSpanProcessor

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            except ImportError:
                log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not installed: "
                            "trace ids still travel and show in logs, spans are not exported")
        trace.set_tracer_provider(provider)


_ready = threading.Event()


def _tracer() -> trace.Tracer:
    if not _ready.is_set():  # a library user who never called setup_logging still gets trace ids
        setup_tracing()
        _ready.set()
    return trace.get_tracer("lookalike")


def start_span(name: str, headers: Iterable[tuple[str, bytes]] | None = None, **attributes) -> Span:
    """A span continuing the trace in ``headers`` (a Kafka record's), or a new trace without one."""
    carrier = {k: v.decode("latin-1") for k, v in headers or () if k == TRACEPARENT}
    parent = _propagator.extract(carrier) if carrier else None
    kind = SpanKind.CONSUMER if carrier else SpanKind.PRODUCER
    return _tracer().start_span(name, context=parent, kind=kind, attributes=attributes)


def trace_headers(span: Span) -> list[tuple[str, bytes]]:
    """The ``traceparent`` header that continues ``span``'s trace in a record sent from it."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return [(k, v.encode()) for k, v in carrier.items()]


def trace_id(span: Span) -> str:
    """32 hex digits ('' when the span has no valid context)."""
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def current_trace_id() -> str:
    return trace_id(trace.get_current_span())


def origin_headers(name: str, **attributes) -> list[tuple[str, bytes]]:
    """Headers that start a new trace, for an event entering the pipeline (a search, a catalogue change)."""
    span = start_span(name, **attributes)
    span.end()
    return trace_headers(span)
