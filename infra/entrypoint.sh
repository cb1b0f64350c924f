#!/bin/sh
# Entry point of the lookalike images: the first argument picks the process.
#   gateway                        -> python -m lookalike.gateway
#   ingest | detect | embed | query -> python -m lookalike.functions NAME
# It lives outside functions/ and gateway/ because neither may import the other (the layer
# rule in pyproject.toml). `exec` makes Python PID 1, so SIGTERM from Docker or Kubernetes
# reaches it: a function finishes the batch in hand, commits and exits.
# Operator commands use the `lookalike` CLI instead: `docker run --entrypoint lookalike IMAGE status`.
set -eu

usage="usage: entrypoint.sh {gateway|ingest|detect|embed|query}"

if [ "$#" -ne 1 ]; then
    echo "$usage" >&2
    exit 2
fi

case "$1" in
    gateway)
        exec python -m lookalike.gateway
        ;;
    ingest|detect|embed|query)
        exec python -m lookalike.functions "$1"
        ;;
    *)
        echo "unknown process '$1'; $usage" >&2
        exit 2
        ;;
esac
