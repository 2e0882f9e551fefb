"""The engine and how it is served: Engine (add, adopt, abort, step) and the Executor protocol; the engine loop and
its hosts (a thread, a process); the typed protocol between them and the front end; the Frontend that routes and
admits over one replica or many; building a real engine from an EngineConfig, with its latency profile."""
