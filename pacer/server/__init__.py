"""The OpenAI-compatible HTTP server: routes (app), request/response shapes (protocol), one call in flight (call,
serving), Prometheus metrics, and `pacer serve` (launch: picks the engine's host, drains on SIGTERM)."""
