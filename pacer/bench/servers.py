"""Start and stop a `pacer serve` subprocess for `pacer bench compare`: free port, wait for /health, SIGTERM."""

from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerProcess:
    url: str  # base URL, without /v1
    process: subprocess.Popen
    log_path: Path


@contextlib.contextmanager
def pacer_server(flags: list[str], log_path: Path, ready_timeout_s: float = 300.0) -> Iterator[ServerProcess]:
    """Run `pacer serve FLAGS` on a free local port until it is healthy; always stops it (SIGTERM, then kill)."""
    port = free_port()
    command = [sys.executable, "-m", "pacer.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, ready_timeout_s, log_path)
        yield ServerProcess(url, process, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pacer serve exited with {process.returncode}; see {log_path}:\n"
                               + log_path.read_text()[-2000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"pacer serve not healthy after {timeout_s:.0f} s; see {log_path}")
