"""Real `pacer serve` subprocesses for HTTP tests (server and bench): start, wait until healthy, stop."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-pacer-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `pacer serve`; `url` is its base, `log` what it printed."""

    process: subprocess.Popen
    url: str
    log: Path
    model: str

    def metrics(self) -> dict[str, float]:
        """Prometheus samples without labels' model_name: {'pacer:x_total{finished_reason="stop"}': 1.0}."""
        text = httpx.get(self.url + "/metrics").text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                name = re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "").replace(",}", "}")
                samples[name] = float(value)
        return samples

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@contextlib.contextmanager
def run_server(model: str | Path, *flags: str, log_dir: Path, ready_timeout: float = 180) -> Iterator[Server]:
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    command = [sys.executable, "-m", "pacer.cli", "serve", "--model", str(model), "--port", str(port), *flags]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log, str(model))
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"pacer serve exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"pacer serve not ready after {ready_timeout} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        server.terminate()
