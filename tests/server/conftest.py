"""Real `pacer serve` subprocesses for the HTTP tests, on a tiny random model or on SmolLM2."""

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
import torch

from pacer.model.config import LlamaConfig
from pacer.model.weights import Checkpoint, expected_shapes, export_safetensors, load_tokenizer

API_KEY = "sk-pacer-test"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's real tokenizer, as an HF-style directory.

    Fast to load and to run (~1 ms a step), and it exercises the real tokenizer, chat template
    and loader; its text is gibberish, so tests assert on shapes and counts, not on words.
    """
    tokenizer = load_tokenizer(smollm2_path)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=generator) * 0.2 if len(shape) > 1 else torch.ones(shape)
               for name, shape in expected_shapes(config).items()}
    return export_safetensors(Checkpoint(config, weights, tokenizer), tmp_path_factory.mktemp("tiny-model"))


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


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    with run_server(tiny_model_dir, "--api-key", API_KEY, "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                    "--num-blocks", "64", "--threads", "1", log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server
