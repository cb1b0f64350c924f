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
