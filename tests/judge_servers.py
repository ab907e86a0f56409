"""Servers for the judge tests: the real llama.cpp OpenAI-compatible server, and a scriptable fake one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from geoguard.models import embedded_gguf_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_cpp_server(timeout: float = 120.0):
    """llama-cpp-python's OpenAI-compatible server on loopback, serving the embedded model's GGUF; yields base_url."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"]
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill up and block the server
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"llama_cpp.server exited ({process.returncode}); install it with "
                    f'`pip install "llama-cpp-python[server]"`. Its log:\n{_tail(log)}'
                )
            try:
                urllib.request.urlopen(f"{base_url}/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"llama_cpp.server did not come up on port {port} in {timeout} s. Its log:\n{_tail(log)}"
                    ) from None
                time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-2000:]


def completion(content: str) -> dict:
    """A minimal chat completion body with `content` and no logprobs."""
    message = {"role": "assistant", "content": content}
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
    }


class FakeServer:
    """An HTTP server answering each POST with `behave(n)` -> `(status, body or bytes, delay seconds)`.

    Records the number of requests and the largest number in flight at once.
    """

    def __init__(self, behave):
        self.behave, self.requests, self.in_flight, self.max_in_flight = behave, 0, 0, 0
        self.headers: list[dict] = []
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    server.requests += 1
                    n = server.requests
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.headers.append(dict(self.headers))
                try:
                    status, body, delay = server.behave(n)
                    time.sleep(delay)
                    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass
                finally:
                    with lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
