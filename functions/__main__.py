"""Run one function alone: ``python -m lookalike.functions NAME`` (ingest, detect, embed or query).

Configured by env vars (KAFKA_BOOTSTRAP_SERVERS, QDRANT_URL, ...); SIGTERM finishes the
batch in hand, commits and exits.
"""

import sys

from lookalike.functions.wiring import FUNCTIONS, run_function

if len(sys.argv) != 2 or sys.argv[1] not in FUNCTIONS:
    raise SystemExit(f"usage: python -m lookalike.functions {{{','.join(FUNCTIONS)}}}")
run_function(sys.argv[1])
