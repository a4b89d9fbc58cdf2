"""HTTP transport behind the facade: a tiny protocol and a ``requests``/``urllib3`` implementation.

The facade only needs "POST these bytes, give me status and body", "POST this JSON" (the OAuth
token of the Transaction Status API) and "GET this URL with these headers". Keeping
that behind ``Transport`` lets a shop plug in its own HTTP stack (proxy, mTLS) without touching
the protocol code.

Retry policy (the XML API has no idempotency key): a request is re-sent only when the
connection was refused before a single byte went out, and only for operations that book nothing
(PAYMENT_INIT, PROFILE_REQUEST, CONFIGURATION_REQUEST, CALCULATION_REQUEST). A lost answer to a
PAYMENT_REQUEST, PAYMENT_CONFIRM, CONFIRMATION_DELIVER or PAYMENT_CHANGE is never re-sent here:
it surfaces as ``RatepayTransportError(sent=True)`` and must be reconciled.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import parse_url

from ratepay_oms.ratepay.codes import IDEMPOTENT, Operation
from ratepay_oms.ratepay.errors import RatepayTransportError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/xml; charset=UTF-8"
JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes


class Transport(Protocol):
    """What the facade needs from HTTP. Implementations raise ``RatepayTransportError``
    (with ``sent`` set honestly) for anything that is not an HTTP response."""

    def post_xml(
        self, url: str, body: bytes, *, operation: Operation, timeout: tuple[float, float]
    ) -> HttpResponse: ...

    def post_json(
        self, url: str, body: bytes, *, operation: str, timeout: tuple[float, float]
    ) -> HttpResponse: ...

    def get(
        self,
        url: str,
        *,
        timeout: tuple[float, float],
        headers: dict[str, str] | None = None,
        operation: str = "TRANSACTION_STATUS",
    ) -> HttpResponse: ...


def _refused_before_sending(exc: requests.ConnectionError) -> bool:
    """True when the TCP connection could not even be opened (nothing reached the gateway)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)


POOL_MAXSIZE = 4
"""Kept-alive connections per host and session (one session per calling thread)."""

URL_CACHE_MAX = 512
"""URLs whose environment settings and route are kept: the XML API is one URL, but every
status lookup has a URL of its own (the transaction id), so the caches start over when full
rather than grow for as long as the worker runs."""

_DEFAULT_HEADERS = dict(requests.utils.default_headers())
"""The headers a ``requests.Session`` sends (User-Agent, Accept-Encoding, Connection), so a
call sent through urllib3 directly looks the same to the gateway."""

_ACCEPT = {"Accept": "text/xml, application/json"}
_XML_POST_HEADERS = {**_ACCEPT, "Content-Type": CONTENT_TYPE}
_DIRECT_XML_POST_HEADERS = {**_DEFAULT_HEADERS, **_XML_POST_HEADERS}
"""What a call of the XML API sends through urllib3 directly, merged once per process (the
same dict ``_send`` and ``_send_direct`` would build for it on every call)."""

_NO_RETRIES = urllib3.Retry(False, redirect=False)
"""What urllib3 makes of ``retries=False, redirect=False`` on every call (``Retry.from_int``),
made once: a ``Retry`` is never changed (``increment`` returns a new one)."""

POOLS_PER_THREAD = 10
"""Connection pools a thread keeps at hand (its ``PoolManager`` keeps as many)."""


@dataclass(frozen=True)
class _Direct:
    """How a URL is sent through urllib3 directly: the path and query the request line
    carries and the TLS settings of its connection pool (as ``requests`` would set them).
    ``pool_key`` names the pool (host and settings), the same for every URL of a host."""

    scheme: str
    host: str
    port: int | None
    request_uri: str
    pool_kwargs: dict[str, Any]
    pool_key: tuple[Any, ...]


def _tls_kwargs(verify: bool | str) -> dict[str, Any]:
    """The pool settings ``requests`` gives a connection for ``verify`` (``HTTPAdapter``
    ``cert_verify``): its CA bundle (``certifi``) when ``True``, the given file or folder,
    or no verification at all when ``False``."""
    if verify is False:
        return {"cert_reqs": "CERT_NONE"}
    location = requests.utils.DEFAULT_CA_BUNDLE_PATH if verify is True else verify
    key = "ca_cert_dir" if os.path.isdir(location) else "ca_certs"
    return {"cert_reqs": "CERT_REQUIRED", key: location}


def _urllib3_failure(
    exc: urllib3.exceptions.HTTPError, operation: str, timeout: tuple[float, float]
) -> RatepayTransportError:
    """The ``RatepayTransportError`` the ``requests`` path raises for the same failure, with
    the same text (the name is that of the ``requests`` exception it would have been) and the
    same ``sent``: only a connection that was never opened sent nothing."""
    if isinstance(exc, NewConnectionError):  # refused, unreachable, unknown host
        kind, name, sent = "connection failed", "ConnectionError", False
    elif isinstance(exc, ConnectTimeoutError):
        kind, name, sent = "connect timeout", "ConnectTimeout", False
    elif isinstance(exc, ReadTimeoutError):
        kind, name, sent = f"read timeout after {timeout[1]}s", "ReadTimeout", True
    elif isinstance(exc, (SSLError, ProxyError)):
        kind, name, sent = "connection failed", type(exc).__name__, True
    elif isinstance(exc, ProtocolError):  # the connection broke while the request went out
        kind, name, sent = "connection failed", "ConnectionError", True
    else:
        kind, name, sent = "HTTP failure", type(exc).__name__, True
    return RatepayTransportError(f"{operation}: {kind} ({name})", sent=sent, operation=operation)


class RequestsTransport:
    """HTTP transport with explicit connect/read timeouts and a body cap.

    ``retries``/``retry_delay_s`` apply to refused connections of idempotent operations only.
    urllib3's own retries are switched off so that nothing is re-sent behind our back.

    Without a given ``session`` a call goes through urllib3 directly (one ``PoolManager`` per
    calling thread, TLS verified as ``requests`` does it): a ``requests.Session`` spends more
    CPU preparing, merging and wrapping one call than urllib3 needs to send it, and the engine
    makes three calls per invoice order. A URL the environment routes through a proxy or
    gives ``.netrc`` credentials still goes through a ``requests.Session`` (its proxy and auth
    handling), as does every call of a given ``session`` (a shop's own adapters, mTLS).
    Failures raise the same ``RatepayTransportError`` (text and ``sent``) on both paths.
    """

    def __init__(
        self,
        session: requests.Session | None = None,
        *,
        retries: int = 2,
        retry_delay_s: float = 0.2,
        max_response_bytes: int = 1_000_000,
        verify: bool | str = True,
    ) -> None:
        self._given = session
        if session is not None:
            self._mount(session)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._environment: dict[str, dict[str, Any]] = {}
        self._direct: dict[str, _Direct | None] = {}
        self._managers: list[urllib3.PoolManager] = []
        self._timeouts: dict[tuple[float, float], urllib3.Timeout] = {}
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.max_response_bytes = max_response_bytes
        self.verify = verify

    @property
    def session(self) -> requests.Session:
        """The given session, else one per thread: a tick makes calls from several threads
        (``tick --concurrency``) and a ``requests.Session`` is not made to be shared."""
        if self._given is not None:
            return self._given
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            # The environment is read once per URL instead (see ``_settings``).
            session.trust_env = False
            self._mount(session)
            with self._lock:
                self._sessions.append(session)
        return session

    @property
    def _manager(self) -> urllib3.PoolManager:
        """This thread's urllib3 pools (not shared, like the sessions: the same number of
        kept-alive connections per thread, none dropped for a full pool)."""
        manager: urllib3.PoolManager | None = getattr(self._local, "manager", None)
        if manager is None:
            manager = self._local.manager = urllib3.PoolManager(
                num_pools=10, maxsize=POOL_MAXSIZE, block=False
            )
            with self._lock:
                self._managers.append(manager)
        return manager

    def _pool(self, direct: _Direct) -> urllib3.HTTPConnectionPool:
        """This thread's connection pool for ``direct``'s host, from its ``PoolManager``
        (which normalises its key on every lookup) once, then kept at hand; a pool the
        manager closed since (``close``, or evicted for an eleventh host) is looked up
        again."""
        pools: dict[tuple[Any, ...], urllib3.HTTPConnectionPool] | None = getattr(
            self._local, "pools", None
        )
        if pools is None:
            pools = self._local.pools = {}
        pool = pools.get(direct.pool_key)
        if pool is None or pool.pool is None:  # never looked up, or closed
            pool = self._manager.connection_from_host(
                direct.host, direct.port, direct.scheme, pool_kwargs=direct.pool_kwargs
            )
            if len(pools) >= POOLS_PER_THREAD:
                pools.clear()
            pools[direct.pool_key] = pool
        return pool

    def _timeout_of(self, timeout: tuple[float, float]) -> urllib3.Timeout:
        """The ``urllib3.Timeout`` of ``timeout`` (connect, read), made once per pair: urllib3
        clones it for each call and never changes the one it is given."""
        found = self._timeouts.get(timeout)
        if found is None:
            if len(self._timeouts) >= 16:
                self._timeouts.clear()
            found = self._timeouts[timeout] = urllib3.Timeout(
                connect=timeout[0], read=timeout[1]
            )
        return found

    def _route(self, url: str) -> _Direct | None:
        """How ``url`` goes through urllib3 directly, or ``None`` when it needs a
        ``requests.Session``: a given session, a proxy or ``.netrc`` credentials from the
        environment, credentials or other than ASCII in the URL itself (``requests`` turns
        those into a header, an IDNA name), or not plain ``http``/``https``. Decided once
        per URL."""
        try:
            return self._direct[url]
        except KeyError:  # not decided yet (or forgotten by another thread's clear)
            pass
        direct: _Direct | None = None
        if self._given is None and url.isascii():
            settings = self._settings(url)
            parsed = parse_url(url)
            proxy = requests.utils.select_proxy(url, settings["proxies"])
            if (
                parsed.scheme in ("http", "https")
                and parsed.host
                and not parsed.auth
                and not proxy
                and "auth" not in settings
            ):
                tls = _tls_kwargs(settings["verify"])
                direct = _Direct(
                    parsed.scheme,
                    parsed.host,
                    parsed.port,
                    parsed.request_uri,
                    tls,
                    (parsed.scheme, parsed.host, parsed.port, *sorted(tls.items())),
                )
        if len(self._direct) >= URL_CACHE_MAX:
            self._direct.clear()
        self._direct[url] = direct
        return direct

    @staticmethod
    def _mount(session: requests.Session) -> None:
        adapter = HTTPAdapter(max_retries=0, pool_maxsize=POOL_MAXSIZE)
        session.mount("http://", adapter)
        session.mount("https://", adapter)

    def _settings(self, url: str) -> dict[str, Any]:
        """``verify``, and for our own sessions what ``requests`` would take from the
        environment for ``url`` (proxies and ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``, ``.netrc``
        credentials), read once per URL: ``requests`` walks the whole environment on every
        call otherwise, a noticeable part of the CPU an order costs."""
        if self._given is not None:
            return {"verify": self.verify}
        settings = self._environment.get(url)
        if settings is None:
            with requests.Session() as probe:
                merged = probe.merge_environment_settings(url, {}, None, self.verify, None)
            settings = {"proxies": merged["proxies"], "verify": merged["verify"]}
            auth = requests.utils.get_netrc_auth(url)
            if auth:
                settings["auth"] = auth
            if len(self._environment) >= URL_CACHE_MAX:
                self._environment.clear()
            self._environment[url] = settings
        return settings

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        with self._lock:
            managers, self._managers = self._managers, []
        for manager in managers:
            manager.clear()
        if self._given is not None:
            self._given.close()

    def post_xml(
        self, url: str, body: bytes, *, operation: Operation, timeout: tuple[float, float]
    ) -> HttpResponse:
        attempts = 1 + (self.retries if operation in IDEMPOTENT else 0)
        for attempt in range(1, attempts + 1):
            try:
                return self._send("POST", url, body, operation.value, timeout)
            except RatepayTransportError as exc:
                if exc.sent or attempt == attempts:
                    raise
                log.info(
                    "%s: connection refused (attempt %d of %d), retrying",
                    operation.value,
                    attempt,
                    attempts,
                )
                time.sleep(self.retry_delay_s * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def post_json(
        self, url: str, body: bytes, *, operation: str, timeout: tuple[float, float]
    ) -> HttpResponse:
        """POST a JSON body (books nothing: a refused connection is retried like INIT)."""
        headers = {"Content-Type": JSON_CONTENT_TYPE, "Accept": JSON_CONTENT_TYPE}
        for attempt in range(1, self.retries + 2):
            try:
                return self._send("POST", url, body, operation, timeout, headers)
            except RatepayTransportError as exc:
                if exc.sent or attempt == self.retries + 1:
                    raise
                time.sleep(self.retry_delay_s * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def get(
        self,
        url: str,
        *,
        timeout: tuple[float, float],
        headers: dict[str, str] | None = None,
        operation: str = "TRANSACTION_STATUS",
    ) -> HttpResponse:
        return self._send("GET", url, None, operation, timeout, headers)

    def _send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        operation: str,
        timeout: tuple[float, float],
        extra_headers: dict[str, str] | None = None,
    ) -> HttpResponse:
        direct = self._route(url)
        if direct is not None and body is not None and not extra_headers:  # the XML API
            return self._send_direct(
                direct, method, url, body, operation, timeout, _DIRECT_XML_POST_HEADERS
            )
        headers = {**(_ACCEPT if body is None else _XML_POST_HEADERS)}
        if extra_headers:
            headers.update(extra_headers)
        if direct is not None:
            return self._send_direct(
                direct, method, url, body, operation, timeout, {**_DEFAULT_HEADERS, **headers}
            )
        try:
            response = self.session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                stream=True,
                allow_redirects=False,
                **self._settings(url),
            )
        except requests.ConnectionError as exc:
            sent = not _refused_before_sending(exc)
            kind = "read timeout" if isinstance(exc, requests.ReadTimeout) else "connection failed"
            if isinstance(exc, requests.ConnectTimeout):
                kind = "connect timeout"
            raise RatepayTransportError(
                f"{operation}: {kind} ({type(exc).__name__})", sent=sent, operation=operation
            ) from None
        except requests.Timeout as exc:  # ReadTimeout is not a ConnectionError
            raise RatepayTransportError(
                f"{operation}: read timeout after {timeout[1]}s ({type(exc).__name__})",
                sent=True,
                operation=operation,
            ) from None
        except requests.RequestException as exc:
            raise RatepayTransportError(
                f"{operation}: HTTP failure ({type(exc).__name__})", sent=True, operation=operation
            ) from None
        with response:
            try:
                data = self._read_capped(response, operation)
            except requests.RequestException as exc:
                kind = "read timeout" if isinstance(exc, requests.Timeout) else "broken answer"
                raise RatepayTransportError(
                    f"{operation}: {kind} while reading the answer ({type(exc).__name__})",
                    sent=True,
                    operation=operation,
                    http_status=response.status_code,
                ) from None
        return HttpResponse(response.status_code, data)

    def _send_direct(
        self,
        direct: _Direct,
        method: str,
        url: str,
        body: bytes | None,
        operation: str,
        timeout: tuple[float, float],
        headers: dict[str, str],
    ) -> HttpResponse:
        """One call through this thread's urllib3 pool for ``url``: no retries, no
        redirects followed, the answer read under the cap and the connection kept alive.
        ``headers`` are all the request's headers (``requests``' defaults included)."""
        try:
            response = self._pool(direct).urlopen(
                method,
                direct.request_uri,
                body=body,
                headers=headers,
                timeout=self._timeout_of(timeout),
                retries=_NO_RETRIES,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise _urllib3_failure(exc, operation, timeout) from None
        done = False
        try:
            data = self._read_capped_direct(response, operation)
            done = True
        except (ProtocolError, DecodeError, ReadTimeoutError, SSLError) as exc:
            # What ``requests`` raises while streaming (ChunkedEncodingError,
            # ContentDecodingError, ConnectionError, SSLError): all "broken answer".
            name = {
                ProtocolError: "ChunkedEncodingError",
                DecodeError: "ContentDecodingError",
                ReadTimeoutError: "ConnectionError",
            }.get(type(exc), type(exc).__name__)
            raise RatepayTransportError(
                f"{operation}: broken answer while reading the answer ({name})",
                sent=True,
                operation=operation,
                http_status=response.status,
            ) from None
        finally:
            if not done:
                response.close()  # not read to its end: the connection cannot be reused
            response.release_conn()
        return HttpResponse(response.status, data)

    def _read_capped_direct(self, response: urllib3.BaseHTTPResponse, operation: str) -> bytes:
        """``_read_capped`` for a urllib3 answer. One that declares its length within the cap
        and no content coding (the gateway's answers) is read in one go: exactly that many
        bytes (fewer is a broken answer, as on the streaming way)."""
        headers = response.headers
        declared = headers.get("Content-Length", "")
        if (
            declared.isdigit()
            and int(declared) <= self.max_response_bytes
            and "Content-Encoding" not in headers
        ):
            return response.read()
        return self._capped(
            declared,
            lambda: response.stream(65536, decode_content=True),
            response.status,
            operation,
        )

    def _read_capped(self, response: requests.Response, operation: str) -> bytes:
        """Read at most ``max_response_bytes``; a bigger answer is refused, not truncated."""
        return self._capped(
            response.headers.get("Content-Length", ""),
            lambda: response.iter_content(chunk_size=65536),
            response.status_code,
            operation,
        )

    def _capped(
        self, declared: str, chunks_of: Callable[[], Iterable[bytes]], status: int,
        operation: str,
    ) -> bytes:
        """The answer's body from ``chunks_of()`` (read only when the declared length fits),
        refused with ``RatepayTransportError`` once it exceeds the cap: the one rule for both
        ways of sending."""
        cap = self.max_response_bytes
        chunks: list[bytes] = []
        size = int(declared) if declared.isdigit() else 0
        if size <= cap:
            size = 0
            for chunk in chunks_of():
                chunks.append(chunk)
                size += len(chunk)
                if size > cap:
                    break
        if size > cap:
            raise RatepayTransportError(
                f"{operation}: gateway answer exceeds the cap of {cap} bytes",
                sent=True,
                operation=operation,
                http_status=status,
            )
        return b"".join(chunks)
