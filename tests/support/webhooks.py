"""A webhook receiver for the tests: an HTTP server on 127.0.0.1 recording every POST."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import standardwebhooks


@dataclass(frozen=True)
class Request:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST; ``answer(n)`` is the status of the n-th
    request (from 0)."""

    def __init__(self, answer: Callable[[int], int] = lambda n: 200) -> None:
        self.answer = answer
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    status = receiver.answer(len(receiver.requests))
                    receiver.requests.append(
                        Request({k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                reply = b"not now" if status >= 300 else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/postbote?source=test"

    def accepted(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.status < 300]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def assert_signed(requests: list[Request], secret: str) -> None:
    verifier = standardwebhooks.Webhook(secret)
    for request in requests:
        assert verifier.verify(request.body, request.headers) == request.event
        assert request.headers["webhook-id"] == request.event["event_id"]
        assert request.headers["content-type"] == "application/json"


__all__ = ["Receiver", "Request", "assert_signed"]
