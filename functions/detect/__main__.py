"""Run the detect function alone: ``python -m functions.detect`` (configured by env vars)."""

from shared.service import run_function

if __name__ == "__main__":
    run_function("detect")
