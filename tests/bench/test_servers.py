"""http_get, the standard-library GET that bench uses for /health and /metrics: any status, no proxy, OSError."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from pacer.bench.servers import free_port, http_get


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/health" else 503
        body = f"{self.path} {self.headers.get('Authorization')}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_any_status_comes_back_with_its_body(url):
    assert http_get(url + "/health", timeout_s=5) == (200, "/health None")
    assert http_get(url + "/metrics", timeout_s=5, headers={"Authorization": "Bearer k"}) == (503, "/metrics Bearer k")


def test_a_proxy_from_the_environment_is_not_used(url, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there (the discard port)
    monkeypatch.setenv("no_proxy", "")
    assert http_get(url + "/health", timeout_s=5)[0] == 200


def test_no_server_is_an_os_error():
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{free_port()}/health", timeout_s=5)
