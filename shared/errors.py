"""The two kinds of failure the runtime tells apart.

``PoisonMessage``: this record can never succeed (bad JSON, schema violation,
undecodable or oversized image, refused URL). It goes to ``<topic>.dlq`` with the
reason and the partition moves on.

``TransientError``: the infrastructure failed (store or broker unreachable). The
batch is retried with backoff and nothing is committed or dead-lettered.
"""


class PoisonMessage(Exception):
    """The record is bad; retrying cannot help."""


class TransientError(Exception):
    """Something outside the record failed; retry later."""


class StoreUnavailable(TransientError):
    """The vector store did not answer or refused a write."""


class SourceUnavailable(TransientError):
    """A record's own external source (an image URL) failed in a way that may pass (5xx, 429, timeout).

    Unlike infrastructure failures this is the record's problem: the runner retries it a
    bounded number of times, pausing only its partition, then dead-letters it with the reason.
    """


def describe_errors(errors: list[dict], most: int = 3) -> str:
    """pydantic's validation errors as one line a person can act on: ``field.path: message; ...``.

    Used wherever bad input is reported: dead-letter reasons and the gateway's 400s.
    """
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in errors[:most]]
    more = len(errors) - most
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
