"""Real `pacer serve` subprocesses for HTTP tests (server and bench): start, wait until healthy, stop."""

from __future__ import annotations

import contextlib
import itertools
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from pacer.bench.servers import pacer_server

API_KEY = "sk-pacer-test"
_LOG_NUMBERS = itertools.count()


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


@contextlib.contextmanager
def run_server(model: str | Path, *flags: str, log_dir: Path, ready_timeout: float = 180) -> Iterator[Server]:
    """`pacer serve --model MODEL FLAGS` through pacer bench's own launcher (the one `compare` uses)."""
    log = log_dir / f"serve-{next(_LOG_NUMBERS)}.log"
    with pacer_server(["--model", str(model), *flags], log, ready_timeout) as server:
        yield Server(server.process, server.url, server.log_path, str(model))
