"""Where a search's time goes, read from the spans the functions already write (shared/tracing.py).

Each function handles a search's record in a span of its own, and the gap between one span's end
and the next one's start is the Kafka hop between them. ``SpanRecorder`` keeps this process's
spans in memory; ``breakdown`` turns the searches' traces into stages:

    request, hop>ingest-search, ingest-search, hop>detect-search, ..., query, reply

where ``request`` is the client's work before its trace starts (the request's JSON, and the reply
listener's start in the first search) and ``reply`` is from query's end to the client holding the
result (the last hop and the client's parse); the stages add up to the client's time. Create it before the stack starts.
"""

from __future__ import annotations

import statistics

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class SpanRecorder:
    """This process's finished spans from now on, kept in memory (one recorder a process: the tracer
    provider is set once, and each recorder adds a processor to it)."""

    def __init__(self) -> None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):  # none yet: the stack's setup_tracing keeps this one
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        if not isinstance(provider, TracerProvider):
            raise RuntimeError(f"spans cannot be read from a {type(provider).__name__}")
        self.exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def search_traces(self) -> list[list]:
        """The spans of each trace that reached query, each trace's spans in start order, traces in start order."""
        by_trace: dict[int, list] = {}
        for span in self.exporter.get_finished_spans():
            by_trace.setdefault(span.context.trace_id, []).append(span)
        traces = [sorted(spans, key=lambda s: s.start_time) for spans in by_trace.values()]
        return sorted((t for t in traces if any(s.name.startswith("query") for s in t)), key=lambda t: t[0].start_time)


def stages(spans: list, sent_ns: int, received_ns: int) -> dict[str, float]:
    """One search's stages in ms: the request, each function's span and the hop before it, the reply."""
    out = {"request": (spans[0].start_time - sent_ns) / 1e6}
    last_end = spans[0].end_time  # the root: the client's publish
    for span in spans[1:]:
        name = span.name.split()[0]  # "<runner> <topic>"
        while name in out:  # a record handled again (a retry): its own stages
            name += "+"
        out[f"hop>{name}"] = (span.start_time - last_end) / 1e6  # negative: it began before the last one's flush ended
        out[name] = (span.end_time - span.start_time) / 1e6
        last_end = max(last_end, span.end_time)
    out["reply"] = (received_ns - last_end) / 1e6
    return out


def breakdown(recorder: SpanRecorder, searches: list[tuple[int, int]], slowest: int = 3) -> dict:
    """``searches``: each search's (sent, received) wall clock in ns, in order. The median of every stage,
    and the ``slowest`` searches' stages with their client-side time."""
    traces = recorder.search_traces()
    if len(traces) != len(searches):  # the other figures still stand
        return {"stages_error": f"{len(traces)} search traces for {len(searches)} searches"}
    rows = [(round((received - sent) / 1e6, 1), stages(spans, sent, received))
            for (sent, received), spans in zip(searches, traces)]
    names = list(dict.fromkeys(name for _, row in rows for name in row))
    median = {name: round(statistics.median(row[name] for _, row in rows if name in row), 1) for name in names}
    rows.sort(key=lambda r: -r[0])
    return {"stages_ms_median": median,
            "slowest_searches": [{"ms": ms, **{k: round(v, 1) for k, v in row.items()}} for ms, row in rows[:slowest]]}
