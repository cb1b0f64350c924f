"""Run the ingest function alone: ``python -m functions.ingest`` (configured by env vars)."""

from shared.service import run_function

if __name__ == "__main__":
    run_function("ingest")
