"""HTTP on loopback for the sandbox gateway (``ThreadingHTTPServer`` in a background thread).

Routes:

* ``POST /api/xml/1_0`` — the RatePAY XML endpoint (bodies over the cap: HTTP 413 unread);
* ``POST /oauth/token`` — OAuth2 client credentials for the status API;
* ``GET /order/status/v2/transactions/{id}`` — RatePAY's Transaction Status API (bearer token,
  JSON; see ``status_api.py``);
* ``GET|POST|DELETE /sandbox/faults`` — list, add (one JSON object or a list), clear faults;
* ``GET /sandbox/transactions/{id}`` — the sandbox's own ledger of a transaction (states,
  positions, bookings; no credentials), for audits from outside the process. Not a RatePAY API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

from ratepay_oms.errors import OmsError
from ratepay_oms.sandbox.faults import Fault
from ratepay_oms.sandbox.gateway import SandboxGateway
from ratepay_oms.sandbox.status_api import STATUS_PATH, TOKEN_PATH, HttpAnswer

logger = logging.getLogger(__name__)

XML_PATH = "/api/xml/1_0"
FAULTS_PATH = "/sandbox/faults"
LEDGER_PATH = "/sandbox/transactions/"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    gateway: SandboxGateway


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "RatepaySandbox/1.0"
    # Headers and body go out in separate writes; with Nagle on, a kept-alive connection waits
    # for the client's delayed ACK (~40 ms per answer).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        # The request line never carries the security code (it lives in the body).
        logger.debug("%s %s", self.address_string(), format % args)

    # -- helpers ---------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, default=str, indent=2).encode(), "application/json")

    def _read_body(self) -> bytes | None:
        """The body, or None after answering 411/413 (an oversized body is never read)."""
        length_raw = self.headers.get("Content-Length")
        if length_raw is None:
            self.close_connection = True
            self._send(411, b"Content-Length required", "text/plain")
            return None
        try:
            length = int(length_raw)
        except ValueError:
            self.close_connection = True
            self._send(400, b"bad Content-Length", "text/plain")
            return None
        if length > self.server.gateway.config.max_body_bytes:
            self.close_connection = True
            self._send(413, b"request body too large", "text/plain")
            return None
        return self.rfile.read(length)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- routes ----------------------------------------------------------------------------

    def _answer(self, answer: HttpAnswer) -> None:
        self._send(answer.status, answer.body(), "application/json")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == FAULTS_PATH:
            return self._post_faults()
        if path == TOKEN_PATH:
            token_body = self._read_body()
            if token_body is None:
                return None
            return self._answer(
                self.server.gateway.token_request(self.headers.get("Content-Type"), token_body)
            )
        if path != XML_PATH:
            self.close_connection = True
            return self._send(404, b"not found", "text/plain")
        body = self._read_body()
        if body is None:
            return None
        gw = self.server.gateway
        reply = gw.handle(body)
        if reply.close_without_answer:
            gw.wait(reply.wait_s)
            return self._drop()
        assert reply.http_status is not None and reply.body is not None
        return self._send(reply.http_status, reply.body, reply.content_type)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        gw = self.server.gateway
        if path.startswith(STATUS_PATH + "/"):
            include = parse_qs(query).get("include", [None])[0]
            return self._answer(
                gw.status_request(
                    unquote(path[len(STATUS_PATH) + 1 :]),
                    authorization=self.headers.get("Authorization"),
                    content_type=self.headers.get("Content-Type"),
                    accept=self.headers.get("Accept"),
                    include=include,
                )
            )
        if path == FAULTS_PATH:
            return self._json(200, [f.as_dict() for f in gw.faults.list()])
        if path.startswith(LEDGER_PATH):
            snapshot = gw.snapshot(unquote(path[len(LEDGER_PATH) :]))
            if snapshot is None:
                return self._json(404, {"error": "unknown transaction"})
            return self._json(200, snapshot)
        return self._send(404, b"not found", "text/plain")

    def do_DELETE(self) -> None:
        if self.path.split("?", 1)[0] != FAULTS_PATH:
            return self._send(404, b"not found", "text/plain")
        self.server.gateway.faults.clear()
        return self._json(200, [])

    def _post_faults(self) -> None:
        body = self._read_body()
        if body is None:
            return None
        try:
            data = json.loads(body or b"null", parse_float=Decimal)
            items = data if isinstance(data, list) else [data]
            faults = [
                Fault.from_dict(
                    {k: (float(v) if isinstance(v, Decimal) else v) for k, v in item.items()}
                    if isinstance(item, dict)
                    else item
                )
                for item in items
            ]
        except (ValueError, OmsError) as exc:
            return self._json(400, {"error": str(exc)})
        for fault in faults:
            self.server.gateway.faults.add(fault)
        return self._json(201, [f.as_dict() for f in self.server.gateway.faults.list()])


class SandboxServer:
    """A running sandbox: its URLs, its gateway, and ``stop()``."""

    def __init__(self, gateway: SandboxGateway, host: str = "127.0.0.1", port: int = 0) -> None:
        self.gateway = gateway
        self._httpd = _Server((host, port), _Handler)
        self._httpd.gateway = gateway
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}{XML_PATH}"

    @property
    def status_url(self) -> str:
        """The status API base, without the transaction id (``RATEPAY_STATUS_API_URL``)."""
        return f"{self.base_url}{STATUS_PATH}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}{TOKEN_PATH}"

    @property
    def ledger_url(self) -> str:
        """``GET {ledger_url}{id}``: the sandbox's own view of a transaction (not RatePAY's)."""
        return f"{self.base_url}{LEDGER_PATH}"

    @property
    def faults_url(self) -> str:
        return f"{self.base_url}{FAULTS_PATH}"

    def start(self) -> SandboxServer:
        self.gateway.stopping.clear()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ratepay-sandbox-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("RatePAY sandbox listening on %s", self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop`` (or KeyboardInterrupt)."""
        self.gateway.stopping.clear()
        try:
            self._httpd.serve_forever(poll_interval=0.1)
        finally:
            self.gateway.stopping.set()
            self._httpd.server_close()

    def stop(self) -> None:
        self.gateway.stopping.set()  # wakes requests sleeping in a fault
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SandboxServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
