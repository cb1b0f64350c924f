"""Talking to a running pipeline from outside: publish catalogue events, search, wait, report."""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pybase64 as base64  # SIMD base64: several times the stdlib's speed on image payloads
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata
from pydantic import TypeAdapter

from lookalike.shared.bus import (
    OffsetReader,
    ensure_topics,
    kafka_options,
    make_producer,
    tail_consumer,
    topic_partitions,
)
from lookalike.shared.config import Settings
from lookalike.shared.errors import PoisonMessage
from lookalike.shared.images import normalize
from lookalike.shared.limits import INLINE_IMAGE_BYTES, MAX_MESSAGE_BYTES, fits_message
from lookalike.shared.messages import (
    ALL_TOPICS,
    CATALOG_EVENTS,
    CATALOG_INDEXED,
    IMAGES_DETECTED,
    IMAGES_NORMALIZED,
    RECOMMEND_REQUESTS,
    SEARCH_REQUESTS,
    CatalogEvent,
    CatalogIndexed,
    CatalogUpsert,
    ImageRef,
    IndexCommand,
    Message,
    RecommendRequest,
    SearchRequest,
    SearchResult,
    dlq_topic,
)
from lookalike.shared.replies import ReplyListener
from lookalike.shared.runtime import CONSUMER_GROUPS
from lookalike.shared.tracing import origin_headers

# The index path, stage by stage: (consumer group, its input topic).
INDEX_STAGES = tuple((group, CONSUMER_GROUPS[group][0])
                     for group in ("lookalike-ingest", "lookalike-detect", "lookalike-embed"))
DLQ_REPLAY_GROUP = "lookalike-dlq-replay"  # remembers how far `lookalike dlq replay` got
_catalog_adapter = TypeAdapter(CatalogEvent)


def catalog_events(path: Path) -> Iterator[tuple[str, Message]]:
    """The events of a JSONL catalogue file in order, each with where it stands (``file:line``).

    A line that is not a valid event raises ValueError naming that place. Shared by ``lookalike
    index`` (:func:`read_catalog`) and ``lookalike finetune --catalog``, so both read the same file alike.
    """
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield where, _catalog_adapter.validate_json(line)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def read_catalog(path: Path, settings: Settings | None = None) -> list[Message]:
    """Parse a JSONL catalogue file; local image paths are inlined as base64 data.

    A local file larger than the inline budget is normalised first (as ingest would); an
    event that still does not fit one message raises ValueError naming its line and sizes.
    """
    settings = settings or Settings()
    events = []
    for where, event in catalog_events(path):
        if isinstance(event, CatalogUpsert):
            event.images = [_inline(path.parent / ref.path, settings, where) if ref.path else ref
                            for ref in event.images]
        value = event.to_bytes()
        if not fits_message(event.key().encode(), value):
            images = [len(ref.data) * 3 // 4 for ref in getattr(event, "images", []) if ref.data]
            raise ValueError(f"{where}: product {event.product_id} would be a {len(value)}-byte message with its "
                             f"{len(images)} images inlined ({', '.join(map(str, images))} bytes), over the "
                             f"{MAX_MESSAGE_BYTES}-byte message limit; give some images as URLs")
        events.append(event)
    return events


def _inline(file: Path, settings: Settings, where: str) -> ImageRef:
    """A local image as inline data, normalised as ingest would when it is over the inline budget."""
    raw = file.read_bytes()
    if len(raw) > INLINE_IMAGE_BYTES:
        try:
            raw = normalize(raw, settings.image_max_side, settings.max_image_pixels)[0]
        except PoisonMessage as e:
            raise ValueError(f"{where}: image {file}: {e}") from None
    return ImageRef.from_bytes(raw)


@dataclass
class IndexReport:
    """What the pipeline did with a batch of catalogue events (counted from its own reports)."""

    published: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {"indexed": 0, "unchanged": 0, "deleted": 0,
                                                              "incomplete": 0})
    dead_lettered: list[tuple[str, str]] = field(default_factory=list)  # (product id, reason)
    incomplete: list[tuple[str, int]] = field(default_factory=list)  # (product id, images without points)
    seconds: float = 0.0

    @property
    def finished(self) -> int:
        return sum(self.outcomes.values()) + len(self.dead_lettered)

    @property
    def failed(self) -> int:
        """Events that did not reach the store whole: re-send them (after fixing what the reasons say)."""
        return self.outcomes["incomplete"] + len(self.dead_lettered)

    def summary(self) -> str:
        parts = [f"{n} {name}" for name, n in self.outcomes.items()] + [f"{len(self.dead_lettered)} dead-lettered"]
        lines = [f"{', '.join(parts)} in {self.seconds:.1f} s"]
        lines += [f"  dead-lettered {pid}: {reason}" for pid, reason in self.dead_lettered]
        lines += [f"  incomplete {pid}: {n} image(s) have no points (dead-lettered on the way; see "
                  f"`lookalike status`), send the event again" for pid, n in self.incomplete]
        return "\n".join(lines)


def _headers(record) -> dict[str, str]:
    """A record's headers as text (the DLQ's reason, function, source and time travel there)."""
    return {k: v.decode(errors="replace") for k, v in record.headers or []}


def _event_id(value: bytes) -> str | None:
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    return doc.get("event_id") if isinstance(doc, dict) else None


class Client:
    def __init__(self, bootstrap_servers: str, topic_partitions: int = 4, replication_factor: int = 1):
        self.bootstrap_servers = bootstrap_servers
        self.topic_partitions = topic_partitions  # for topics it has to create (a broker that lost them)
        self.replication_factor = replication_factor
        self._producer = None
        self.offsets = OffsetReader(bootstrap_servers)
        self._replies: ReplyListener | None = None

    @property
    def producer(self):
        if self._producer is None:
            self._producer = make_producer(self.bootstrap_servers, client_id="lookalike-cli")
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
        self.offsets.close()
        if self._replies is not None:
            self._replies.stop()

    def publish(self, topic: str, messages: Iterable[Message]) -> int:
        futures = [self.producer.send(topic, key=m.key().encode(), value=m.to_bytes(),
                                      headers=origin_headers(f"publish {topic}")) for m in messages]
        self.producer.flush(timeout=60)
        for f in futures:
            f.get(timeout=30)
        return len(futures)

    def index(self, events: list[Message], progress: Callable[[IndexReport], None] | None = None,
              timeout_s: float = 1800.0) -> IndexReport:
        """Publish catalogue events and follow each to its end: applied (catalog.indexed) or dead-lettered.

        Progress comes from what the pipeline finished, not from what was published:
        embed reports every event it applied, and a poison event is matched in
        catalog.events.dlq by its source partition and offset.
        """
        report = IndexReport()
        start = time.monotonic()
        # A memory-only broker that restarted has lost its topics: recreate them before watching.
        ensure_topics(self.bootstrap_servers, self.topic_partitions, replication_factor=self.replication_factor)
        # Opened before publishing: every report we need comes after its position.
        watched = [CATALOG_INDEXED, dlq_topic(CATALOG_EVENTS)]
        watcher = tail_consumer(self.bootstrap_servers, watched, "lookalike-cli")
        try:
            send = self.producer.send
            futures = [(e, send(CATALOG_EVENTS, key=e.key().encode(), value=e.to_bytes(),
                                headers=origin_headers("lookalike index", product_id=e.product_id))) for e in events]
            self.producer.flush(timeout=60)
            by_event: dict[str, int] = collections.Counter()
            by_source: dict[str, Message] = {}
            for event, future in futures:
                meta = future.get(timeout=30)
                by_event[event.event_id] += 1
                by_source[f"{CATALOG_EVENTS}[{meta.partition}]@{meta.offset}"] = event
            report.published = len(futures)
            incomplete: dict[str, tuple[str, int]] = {}  # event id -> (product id, images without points)
            # Follow until every event is finished; an "incomplete" report is final only once
            # nothing of the index path is in flight any more: a batch retried after a failed
            # send can deliver an event's sync before its images, and then a later report of
            # the same event says "indexed".
            last_reports: dict = {}  # report offsets once nothing is in flight: no report comes after them

            def settled() -> bool:
                if report.finished < report.published:
                    return False
                if not incomplete:
                    return True
                if not last_reports:
                    if self.index_lag():
                        return False
                    last_reports.update(self.offsets.end_offsets(watched))
                return all(watcher.position(tp) >= end for tp, end in last_reports.items())

            while not settled():
                if time.monotonic() - start > timeout_s:
                    missing = report.published - report.finished
                    raise TimeoutError(f"{missing} events not finished after {timeout_s:.0f} s")
                for tp, records in watcher.poll(timeout_ms=200).items():
                    for r in records:
                        self._account(report, r, tp.topic == CATALOG_INDEXED, by_event, by_source, incomplete)
                report.seconds = time.monotonic() - start
                if progress:
                    progress(report)
            report.incomplete = sorted(incomplete.values())
        finally:
            watcher.close(autocommit=False)
        return report

    @staticmethod
    def _account(report: IndexReport, record, applied: bool, by_event, by_source, incomplete) -> None:
        if applied:
            done = CatalogIndexed.model_validate_json(record.value)
            if done.event_id in incomplete and done.outcome != "incomplete":
                del incomplete[done.event_id]  # a retried batch delivered the rest: it is complete now
                report.outcomes["incomplete"] -= 1
                report.outcomes[done.outcome] += 1
            elif by_event.get(done.event_id, 0) > 0:
                by_event[done.event_id] -= 1
                report.outcomes[done.outcome] += 1
                if done.outcome == "incomplete":
                    incomplete[done.event_id] = (done.product_id, done.missing_images)
            return
        headers = _headers(record)
        event = by_source.pop(headers.get("dlq.source", ""), None)
        if event is not None:
            report.dead_lettered.append((event.product_id, headers.get("dlq.reason", "")))

    def index_lag(self) -> int:
        """Catalogue work not yet finished: stage by stage, so a zero means all done."""
        total = 0
        for group, topic in INDEX_STAGES:
            total += sum(self.offsets.lag(group, [topic]).values())
            if total:
                return total
        return 0

    def wait_indexed(self, timeout_s: float = 600.0, poll_s: float = 0.25) -> float:
        start = time.monotonic()
        while self.index_lag():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"catalogue not indexed after {timeout_s:.0f} s (lag {self.index_lag()})")
            time.sleep(poll_s)
        return time.monotonic() - start

    def command(self, command: IndexCommand, timeout_s: float = 600.0) -> CatalogIndexed:
        """Send an index command (``lookalike reindex``) and wait for embed's report of it.

        The report's ``outcome`` is "indexed" when it was applied, else "incomplete" with the
        reason in ``detail``. A command dead-lettered on its way (a bug, or a function of an
        older release that cannot read it) raises ``RuntimeError`` with the DLQ's reason.
        """
        ensure_topics(self.bootstrap_servers, self.topic_partitions, replication_factor=self.replication_factor)
        path = [CATALOG_EVENTS, IMAGES_NORMALIZED, IMAGES_DETECTED]
        watcher = tail_consumer(self.bootstrap_servers, [CATALOG_INDEXED] + [dlq_topic(t) for t in path],
                                "lookalike-cli")
        start = time.monotonic()
        try:
            self.publish(CATALOG_EVENTS, [command])
            while time.monotonic() - start < timeout_s:
                for tp, records in watcher.poll(timeout_ms=200).items():
                    for r in records:
                        if tp.topic == CATALOG_INDEXED:
                            report = CatalogIndexed.model_validate_json(r.value)
                            if report.event_id == command.event_id:
                                return report
                        elif _event_id(r.value) == command.event_id:
                            raise RuntimeError(f"index {command.action} was dead-lettered on {tp.topic}: "
                                               f"{_headers(r).get('dlq.reason', '')}")
        finally:
            watcher.close(autocommit=False)
        raise TimeoutError(f"index {command.action}: no report from embed after {timeout_s:.0f} s "
                           "(is the embed function running? `lookalike status`)")

    def request(self, topic: str, message: SearchRequest | RecommendRequest, timeout_s: float = 60.0) -> SearchResult:
        """Publish a request and wait for its result on search.results (matched by request_id)."""
        if self._replies is None:
            self._replies = ReplyListener(self.bootstrap_servers, client_id="lookalike-cli")
        answer = self._replies.request(message.request_id, lambda: self.publish(topic, [message]), timeout_s)
        return SearchResult.model_validate_json(answer)

    def search(self, photo: bytes, timeout_s: float = 60.0, **fields) -> SearchResult:
        request = SearchRequest(image=ImageRef(data=base64.b64encode(photo).decode()), **fields)
        return self.request(SEARCH_REQUESTS, request, timeout_s)

    def recommend(self, positive: list[str], timeout_s: float = 60.0, **fields) -> SearchResult:
        return self.request(RECOMMEND_REQUESTS, RecommendRequest(positive=positive, **fields), timeout_s)

    def dlq_records(self, topic: str, timeout_s: float = 2.0) -> list[dict]:
        """Everything in ``topic``'s DLQ, with reasons (for tests and operators)."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False,
                                 auto_offset_reset="earliest", consumer_timeout_ms=int(timeout_s * 1000),
                                 **kafka_options())
        tps = topic_partitions(consumer, dlq_topic(topic))
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out = []
        try:
            for r in consumer:
                headers = _headers(r)
                out.append({"key": r.key, "value": r.value, "reason": headers.get("dlq.reason"), "headers": headers})
        finally:
            consumer.close()
        return out

    def replay_dlq(self, topic: str, limit: int | None = None, dry_run: bool = False,
                   timeout_s: float = 60.0) -> list[dict]:
        """Publish ``topic``'s dead letters back to ``topic`` (after fixing what their reasons say).

        Reads ``<topic>.dlq`` from where the last replay stopped (consumer group
        ``lookalike-dlq-replay``) up to its end as of now, re-publishes each record with
        its key and value, then commits. A crash between publishing and committing
        replays those records again: the pipeline takes events at least once and
        idempotently, so that is safe. Returns what was (or, dry run, would be) replayed.
        """
        source = dlq_topic(topic)
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=DLQ_REPLAY_GROUP,
                                 enable_auto_commit=False, auto_offset_reset="earliest", client_id="lookalike-cli",
                                 **kafka_options())
        replayed: list[dict] = []
        try:
            tps = topic_partitions(consumer, source)
            consumer.assign(tps)
            ends = self.offsets.end_offsets([source])
            deadline = time.monotonic() + timeout_s
            futures, last = [], {}
            while any(consumer.position(tp) < ends[tp] for tp in tps) and (limit is None or len(replayed) < limit):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {source} took more than {timeout_s:.0f} s")
                for tp, records in consumer.poll(timeout_ms=200).items():
                    for r in records:
                        if r.offset >= ends[tp] or (limit is not None and len(replayed) >= limit):
                            break
                        headers = [(k, v) for k, v in r.headers or [] if not k.startswith("dlq.")]
                        reason = dict(r.headers or []).get("dlq.reason", b"").decode(errors="replace")
                        replayed.append({"source": f"{source}[{r.partition}]@{r.offset}", "key": r.key,
                                         "reason": reason})
                        last[tp] = r.offset
                        if not dry_run:
                            futures.append(self.producer.send(topic, key=r.key, value=r.value, headers=headers + [
                                ("dlq.replayed_from", f"{source}[{r.partition}]@{r.offset}".encode())]))
            if not dry_run and replayed:
                self.producer.flush(timeout=60)
                for f in futures:
                    f.get(timeout=30)
                consumer.commit({tp: OffsetAndMetadata(off + 1, "", -1) for tp, off in last.items()})
        finally:
            consumer.close(autocommit=False)
        return replayed

    def status(self) -> dict:
        return {
            "topics": self.offsets.sizes(list(ALL_TOPICS)),
            "lag": self.offsets.group_lags(CONSUMER_GROUPS),
            "dlq": self.offsets.sizes([dlq_topic(t) for t in ALL_TOPICS]),
        }


# How a calibrated search answers (`lookalike calibrate`): the line above the list, the mark beside an entry.
ANSWER_LINES = {"same product": "same product",
                "similar": "no confident match \u2014 similar items:",
                "no confident match": "no confident match \u2014 nothing similar; the closest items:"}
MATCH_MARKS = {"same": "SAME PRODUCT", "similar": "similar", "other": ""}


def format_result(result: SearchResult, max_offers: int = 4) -> str:
    """A search result as text; when the query function is calibrated, each object's answer and each entry's mark."""
    if result.status != "ok":
        return f"error: {result.error}"
    calibrated = any(obj.answer is not None for obj in result.objects)
    lines = []
    for obj in result.objects:
        box = f" box {[round(v) for v in obj.box.as_list()]}" if obj.box else ""
        answer = f" {ANSWER_LINES[obj.answer]}" if obj.answer else ""
        lines.append(f"{obj.label}{box} (score {obj.score:.2f}):{answer}")
        if not obj.products:
            lines.append("  no matching products")
        for rank, p in enumerate(obj.products, 1):
            best = p.best_offer
            price = f"{best.price:8.2f} {best.currency} at {best.shop}" if best else "no offers"
            mark = f"{MATCH_MARKS.get(p.match or 'other', ''):<12} " if calibrated else ""
            lines.append(f"  {rank:2d}. {p.score:.3f}  {mark}{p.product_id:<10} {p.title[:34]:<34} best {price}")
            others = ", ".join(f"{o.shop} {o.price:.2f}{'' if o.in_stock else ' (out of stock)'}"
                               for o in p.offers[:max_offers])
            lines.append(f"      offers: {others}")
    return "\n".join(lines)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
