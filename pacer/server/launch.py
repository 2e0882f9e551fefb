"""`pacer serve`: build the engine, wrap it in the app, run uvicorn with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from types import FrameType

import uvicorn

from pacer.config import ClusterConfig, EngineConfig, ServerConfig, parse_bytes
from pacer.engine.builder import build_engine
from pacer.engine.engine import Engine
from pacer.engine.frontend import Frontend
from pacer.engine.hosts import ProcessHost, ThreadHost
from pacer.heap import freeze_startup_heap
from pacer.model.weights import DEFAULT_MODEL, load_tokenizer, model_family, resolve_model_path
from pacer.request import SLO
from pacer.server.app import ServerState, create_app
from pacer.server.metrics import Metrics, ReplicaCollector

logger = logging.getLogger(__name__)

# Unsent bytes a connection's socket may hold before a write would block (TCP_NOTSENT_LOWAT). Without it Linux lets
# them grow to tcp_wmem's maximum (4 MiB by default), minutes of tokens, before uvicorn's `send` waits and a client
# that reads nothing shows; with it, ~64 KiB here and asyncio's 64 KiB write buffer. Bytes in flight are not
# counted, so a fast client on a long link is not slowed.
_MAX_UNSENT_BYTES = 64 * 1024


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM or Ctrl-C drains before exiting, and that a connection's unsent
    output is bounded (`_MAX_UNSENT_BYTES`).

    While draining, /v1 routes answer 503 and /health 503 (so a load balancer moves away),
    in-flight requests run to completion for up to `drain_timeout_s`, then whatever is left is
    aborted (streams end with finish_reason "abort") and the process exits 0. A second signal
    exits at once.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if hasattr(socket, "TCP_NOTSENT_LOWAT"):  # Linux and macOS; a connection inherits it from its listener
            for server in getattr(self, "servers", []):
                for listener in server.sockets:
                    if listener.family in (socket.AF_INET, socket.AF_INET6):
                        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _MAX_UNSENT_BYTES)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        logger.info("%s: draining %d in-flight request(s) for up to %.0f s", signal.Signals(sig).name,
                    self.state.engine.num_in_flight, self.drain_timeout_s)
        self.state.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        engine = self.state.engine
        deadline = time.monotonic() + self.drain_timeout_s
        while engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_in_flight:
            logger.warning("drain timeout: aborting %d request(s)", engine.num_in_flight)
            engine.abort_all()
            for _ in range(100):  # let the aborted streams send their last chunk
                if not engine.num_in_flight:
                    break
                await asyncio.sleep(0.02)
        self.should_exit = True


def serve(engine_config: EngineConfig, server_config: ServerConfig, cluster_config: ClusterConfig | None = None) -> int:
    """Load the model (in this process, or in replicas on Ray) and serve until SIGTERM; returns the exit code."""
    model = engine_config.model.model or DEFAULT_MODEL
    name = server_config.served_model_name or model
    api_key = server_config.api_key or os.environ.get("PACER_API_KEY") or None
    if server_config.api_key_all_routes and api_key is None:
        raise ValueError("--api-key-all-routes needs an API key (--api-key or $PACER_API_KEY)")
    frontend = make_frontend(engine_config, server_config, cluster_config or ClusterConfig())
    frontend.start()  # loads the model (in the engine thread, the engine process, or each replica) and waits
    model_path = resolve_model_path(engine_config.model.model)
    tokenizer = load_tokenizer(model_path)
    metrics = Metrics(name, lambda: frontend.load)
    if frontend.health() is not None:  # replicas that come and go: a series each
        metrics.registry.register(ReplicaCollector(frontend, name))
    default_slo = SLO(**{f"{kind}_s": None if ms is None else ms / 1e3 for kind, ms in (
        ("ttft", server_config.slo_ttft_ms), ("tbt", server_config.slo_tbt_ms), ("tpot", server_config.slo_tpot_ms))})
    app = create_app(frontend, tokenizer, name, str(model_path), model_family(model_path), api_key=api_key,
                     metrics=metrics, default_slo=default_slo, api_key_all_routes=server_config.api_key_all_routes,
                     stream_timeout_s=server_config.stream_timeout_s, max_tokens_default=server_config.max_tokens_default,
                     max_request_bytes=parse_bytes(server_config.max_request_bytes))
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, access_log=server_config.access_log,
                            log_level=logging.getLevelName(logging.getLogger().level).lower(),
                            timeout_graceful_shutdown=5, timeout_keep_alive=30)
    server = DrainingServer(config, app.state.pacer, server_config.drain_timeout_s)
    freeze_startup_heap()
    server.run()
    return 0


def make_frontend(engine_config: EngineConfig, server_config: ServerConfig, cluster: ClusterConfig) -> Frontend:
    """The front end of the engine `pacer serve` was asked for: one replica on a thread or in a process of its own
    (`--engine-process`, the default on a GPU), or replicas on Ray."""
    build = functools.partial(build_served_engine, engine_config)
    if cluster.on_ray:
        if server_config.max_queued_requests is not None:
            raise ValueError("--max-queued-requests applies to one local engine; replicas on Ray admit by SLO")
        if server_config.engine_process:
            raise ValueError("--engine-process applies to one local engine; replicas on Ray run in processes of their "
                             "own")
        from pacer.cluster.host import ray_frontend

        return ray_frontend(engine_config, cluster, admission=server_config.admission)
    use_process = server_config.engine_process
    if use_process is None:
        use_process = engine_config.model.device.startswith("cuda")
    host = ProcessHost(build, logging.getLogger().level, cluster.max_restarts) if use_process else ThreadHost(build)
    return Frontend([host], admission=server_config.admission, max_queued_requests=server_config.max_queued_requests)


def build_served_engine(config: EngineConfig) -> Engine:
    """The engine alone (a module-level function, so an engine process can be handed it pickled)."""
    return build_engine(config)[0]
