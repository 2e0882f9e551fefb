"""pacer bench: a load generator for OpenAI-compatible servers, and the metrics it reports."""
