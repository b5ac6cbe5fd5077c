"""Observability: logs, metrics and traces (see docs/observability.md).

- :mod:`.logs` — a WARNING per failed attempt, an ERROR with the traceback per dead letter, INFO for a relay's
  life; structured fields through ``extra=``; :class:`~.logs.JsonFormatter`.
- :mod:`.metrics` — OpenTelemetry instruments on the meter ``eventbus`` (:class:`~.metrics.Metrics`).
- :mod:`.tracing` — PRODUCER spans at publish, CONSUMER spans per attempt, context in the row headers.
- :mod:`.http` — ``/metrics``, ``/healthz`` and ``/readyz`` for ``EventBus(metrics_port=...)``.

Only ``opentelemetry-api`` is needed; without an SDK every instrument and span is a no-op.
"""
