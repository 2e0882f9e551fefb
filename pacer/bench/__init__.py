"""pacer bench: a load generator for OpenAI-compatible servers, the metrics and capacity it reports, and the report
(tables, JSON, plots) that `pacer sim` writes too."""
