"""The engine: its loop (add, abort, step), the threads and process that host it, the detokenizer, the Executor
protocol, and building a real one from an EngineConfig, with the latency profile it measures or loads."""
