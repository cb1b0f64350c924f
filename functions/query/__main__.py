"""Run the query function alone: ``python -m functions.query`` (configured by env vars)."""

from shared.service import run_function

if __name__ == "__main__":
    run_function("query")
