"""The four functions as a Knative service fed by a KafkaSource (CloudEvents over HTTP).

Run with ``uvicorn lookalike.functions.cloudevents_app:app`` and ``LOOKALIKE_FUNCTION``
(docs/serverless.md). Knative's KafkaSource POSTs each Kafka record as a CloudEvent in
binary mode; this app runs it through the same ``Runner.process_batch`` as the Lambda
handler and the long-running runner (functions/serverless.py), as a batch of one, and
answers:

- 204 when the record is done: produced, or dead-lettered to ``<topic>.dlq`` (poison,
  or a record that failed ``MAX_ATTEMPTS`` times);
- 503 (with ``Retry-After``) when the store or broker failed, or the record failed in a way
  that may pass: Knative retries 5xx per the source's ``delivery`` (retry, backoff);
- 400 when the request is no KafkaSource event this function handles (not a CloudEvent,
  no topic or offset in it, or a topic without a route here).

Assumed KafkaSource attributes (Knative eventing-kafka-broker, as its docs show them):
``source`` = ``/apis/v1/namespaces/<ns>/kafkasources/<name>#<topic>``, ``subject`` =
``partition:<p>#<offset>`` (older sources: only ``id`` = ``partition:<p>/offset:<offset>``),
the record key as the ``key`` extension (``ce-key``; text, its default key type), the record
value as the body. Kafka headers arrive as ``kafkaheader<name>`` extensions whose names are
lower-cased and stripped, so they cannot be restored and are not carried into the DLQ.
Attempts are counted per pod, like the Lambda's per container (functions/serverless.py).
"""

from __future__ import annotations

import json
import math
import re
from contextlib import asynccontextmanager

from cloudevents.exceptions import GenericException
from cloudevents.http import from_http
from fastapi import FastAPI, Request, Response
from kafka.errors import KafkaError
from starlette.concurrency import run_in_threadpool

from lookalike.functions.serverless import KafkaRecord, RetryLater, UnknownTopic, warm_function
from lookalike.shared.config import Settings
from lookalike.shared.errors import TransientError
from lookalike.shared.logs import setup_logging

TOPIC_IN_SOURCE = re.compile(r"/kafkasources/[^#/]+#(?P<topic>.+)$")
PARTITION_OFFSET = re.compile(r"^partition:(?P<partition>\d+)(?:#|/offset:)(?P<offset>\d+)$")


class NotAKafkaRecord(ValueError):
    """The request is not a KafkaSource event (or not one for this function)."""


def kafka_record(headers, body: bytes) -> KafkaRecord:
    """The Kafka record a KafkaSource CloudEvent carries; ``NotAKafkaRecord`` if it carries none."""
    try:
        event = from_http(dict(headers), body, data_unmarshaller=lambda data: data)
    except GenericException as e:
        raise NotAKafkaRecord(f"not a CloudEvent: {e}") from None
    topic = TOPIC_IN_SOURCE.search(event["source"])
    where = next((m for m in (PARTITION_OFFSET.match(event.get(a) or "") for a in ("subject", "id")) if m), None)
    if topic is None or where is None:
        raise NotAKafkaRecord(f"no Kafka topic in source {event['source']!r} or partition and offset "
                              f"in subject {event.get('subject')!r} / id {event['id']!r}")
    key = event.get("key")
    return KafkaRecord(topic=topic["topic"], partition=int(where["partition"]), offset=int(where["offset"]),
                       key=key.encode() if key else None, value=_as_bytes(event.data))


def _as_bytes(data) -> bytes | None:
    """The body as bytes (binary mode); a structured-mode event's JSON ``data`` re-serialised."""
    if data is None or data in (b"", ""):
        return None
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode()
    return json.dumps(data).encode()


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings = Settings()
    setup_logging(settings.log_level, settings.log_format)
    yield


app = FastAPI(title="lookalike function (Knative KafkaSource sink)", lifespan=_lifespan)


@app.post("/")
async def receive(request: Request) -> Response:
    try:
        record = kafka_record(request.headers, await request.body())
        summary = await run_in_threadpool(lambda: warm_function().process([record]))
    except (NotAKafkaRecord, UnknownTopic) as e:
        # Not retried by Knative: no retry can make it ours. A misrouted record stays in Kafka
        # for the consumer group that does handle its topic.
        return Response(str(e), status_code=400, media_type="text/plain")
    except RetryLater as e:
        return Response(str(e), status_code=503, media_type="text/plain",
                        headers={"Retry-After": str(max(1, math.ceil(e.delay_s)))})
    except (TransientError, KafkaError) as e:
        return Response(f"{type(e).__name__}: {e}", status_code=503, media_type="text/plain")
    # No body: a reply would be taken for an event to send on.
    return Response(status_code=204, headers={"X-Lookalike-Summary": json.dumps(summary)})
