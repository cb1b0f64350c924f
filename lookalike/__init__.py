"""lookalike: event-driven visual product search.

This package is the operator side (the ``lookalike`` command, the client, the embedded
stack, the sample catalogue, evaluation and fine-tuning). The library the functions and
the gateway import installs as ``lookalike.shared``, the functions as
``lookalike.functions``, the HTTP gateway as ``lookalike.gateway`` (see docs/architecture.md).
"""
