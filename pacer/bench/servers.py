"""Start and stop server subprocesses for `pacer bench compare` and the tests: free port, wait for /health, SIGTERM."""

from __future__ import annotations

import contextlib
import http.client
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The servers are local: never reach them through a proxy from the environment (http_proxy and friends).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET `url` without a proxy: (status, body), whatever the status. OSError if no response came (refused,
    timed out, cut off)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _DIRECT.open(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:  # a response all the same: 4xx or 5xx
        with error:
            return error.code, error.read().decode(errors="replace")
    except http.client.HTTPException as error:  # a malformed or truncated response
        raise ConnectionError(f"GET {url}: {error!r}") from error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerProcess:
    url: str  # base URL, without /v1
    process: subprocess.Popen
    log_path: Path


def pacer_command(flags: list[str]) -> list[str]:
    """`pacer serve FLAGS` on the port `server_process` picks."""
    return [sys.executable, "-m", "pacer.cli", "serve", "--host", "127.0.0.1", "--port", "{port}", *flags]


@contextlib.contextmanager
def server_process(command: list[str], log_path: Path, ready_timeout_s: float = 600.0,
                   env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Run any OpenAI-compatible server on a free local port (`{port}` in `command` is replaced by it) until
    its /health answers 200; always stop it: SIGTERM to its process group, then SIGKILL after 60 s. `env` is
    added to this process's environment (a variable set here wins over it)."""
    port = free_port()
    command = [arg.replace("{port}", str(port)) for arg in command]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        # Its own session: servers that fork workers (vLLM) are stopped whole.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=(env or {}) | dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, ready_timeout_s, log_path)
        yield ServerProcess(url, process, log_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def pacer_server(flags: list[str], log_path: Path, ready_timeout_s: float = 300.0) -> contextlib.AbstractContextManager[ServerProcess]:
    """`pacer serve FLAGS` as a `server_process`."""
    return server_process(pacer_command(flags), log_path, ready_timeout_s)


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log_path}:\n"
                               + log_path.read_text()[-2000:])
        with contextlib.suppress(OSError):
            if http_get(url + "/health", timeout_s=2)[0] in (200, 401):  # 401: up, /health behind its API key
                return
        time.sleep(0.25)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; see {log_path}")
