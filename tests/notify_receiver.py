"""A real HTTP receiver for state-change notifications, on loopback, for the outbox tests.

It checks every request's signature with the shared secret and keeps what it got. Knobs:
``fail(n, status)`` answers the next ``n`` requests with ``status``; ``hold()`` makes requests
wait (after they were recorded) until ``release()``, so a test can kill the sender while a
request is in flight.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ratepay_oms.engine.outbox import KEY_HEADER, verify_signature


@dataclass(frozen=True)
class Received:
    key: str
    body: dict[str, Any]
    raw: bytes
    headers: dict[str, str]
    signature_ok: bool
    answered: int


class Receiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._failures: list[int] = []
        self._go = threading.Event()
        self._go.set()
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    status = receiver._failures.pop(0) if receiver._failures else 200
                    ok = verify_signature(receiver.secret, raw, self.headers)
                    receiver.received.append(
                        Received(
                            key=self.headers.get(KEY_HEADER, ""),
                            body=json.loads(raw),
                            raw=raw,
                            headers=dict(self.headers.items()),
                            signature_ok=ok,
                            answered=status,
                        )
                    )
                receiver.arrived.set()
                receiver._go.wait(60)
                self.send_response(status if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/oms"

    def fail(self, count: int, status: int = 500) -> None:
        with self._lock:
            self._failures.extend([status] * count)

    def hold(self) -> None:
        self.arrived.clear()
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def keys(self) -> set[str]:
        with self._lock:
            return {r.key for r in self.received}

    def close(self) -> None:
        self._go.set()
        self.server.shutdown()
        self.server.server_close()
