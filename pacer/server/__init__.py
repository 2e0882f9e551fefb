"""The OpenAI-compatible HTTP server: routes (app), request/response shapes (protocol), Prometheus metrics."""
