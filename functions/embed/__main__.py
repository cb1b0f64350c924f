"""Run the embed function alone: ``python -m functions.embed`` (configured by env vars)."""

from shared.service import run_function

if __name__ == "__main__":
    run_function("embed")
