"""Hostile and broken gateways over real HTTP: our own tiny ``http.server`` on loopback.

The sandbox covers the faults a real gateway has; these servers answer what an attacker or a
broken proxy would (XXE, billion laughs, huge bodies, foreign XML, wrong status), plus the
retry rules for refused connections.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ratepay_oms.ratepay import (
    MemoryApiLogSink,
    PaymentInfo,
    RatepayFacade,
    RatepaySettings,
    RatepayTransportError,
    RequestsTransport,
)
from ratepay_oms.ratepay.examples import example_basket, example_customer
from ratepay_oms.ratepay.xml import RATEPAY_NS

SECRET = "0123456789abcdef0123456789abcdef"

OK_INIT = f"""<?xml version="1.0" encoding="UTF-8"?>
<response version="1.0" xmlns="{RATEPAY_NS}"><head><system-id>x</system-id>
<transaction-id>31-202401151000042</transaction-id>
<transaction-short-id>K7QP.2M9X.T4ZA.8LWC</transaction-short-id>
<operation>PAYMENT_INIT</operation><response-type>STATUS_RESPONSE</response-type>
<processing><timestamp>2024-01-15T10:12:03.000</timestamp>
<status code="OK">Successfully</status><reason code="300">Processing successful</reason>
<result code="350">Transaction initialized</result></processing></head></response>""".encode()

XXE = f"""<?xml version="1.0"?>
<!DOCTYPE response [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<response version="1.0" xmlns="{RATEPAY_NS}"><head><operation>PAYMENT_INIT</operation>
<transaction-id>&xxe;</transaction-id><processing><status code="OK">Successfully</status>
<reason code="300">x</reason><result code="350">x</result></processing></head></response>
""".encode()

LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'.encode()
        for i in range(1, 10)
    )
    + f']><response xmlns="{RATEPAY_NS}"><head>&lol9;</head></response>'.encode()
)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.received.append((self.headers.get("Content-Type"), self.rfile.read(length)))
        self.server.requests.append((self.path, dict(self.headers)))
        status, body = self.server.answer()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer: Callable[[], tuple[int, bytes]], port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.answer = answer
        self.received: list[tuple[str | None, bytes]] = []
        self.requests: list[tuple[str, dict[str, str]]] = []

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up on a huge body is the point of some tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/xml/1_0"


def _serve(answer: Callable[[], tuple[int, bytes]], port: int = 0) -> _Server:
    server = _Server(answer, port)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture
def hostile() -> Iterator[Callable[[int, bytes], _Server]]:
    servers: list[_Server] = []

    def start(status: int, body: bytes) -> _Server:
        server = _serve(lambda: (status, body))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _facade(url: str, log: MemoryApiLogSink, **transport) -> RatepayFacade:
    settings = RatepaySettings(
        profile_id="P", security_code=SECRET, api_test_url=url, read_timeout=2
    )
    return RatepayFacade(settings, transport=RequestsTransport(**transport), api_log=log)


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (200, XXE, "DOCTYPE"),
        (200, LAUGHS, "DOCTYPE"),
        (200, b"<response" + b" " * 1_100_000 + b"/>", "exceeds"),
        (200, b"<response><head>", "malformed"),
        (200, b"", "empty"),
        (200, OK_INIT.replace(RATEPAY_NS.encode(), b"urn:ratepay/payment/1_0"), "not a RatePAY"),
        (
            200,
            OK_INIT.replace(b"<processing>", b"<x>").replace(b"</processing>", b"</x>"),
            "processing",
        ),
        (200, OK_INIT.replace(b'<status code="OK">', b"<status>"), "no status"),
        (200, OK_INIT.replace(b'<result code="350">', b"<result>"), "without a result"),
        (200, OK_INIT.replace(b'code="350"', b'code="35O"'), "non-numeric"),
        (200, OK_INIT.replace(b">PAYMENT_INIT<", b">PAYMENT_CHANGE<"), "operation"),
        (500, OK_INIT, "HTTP status 500"),
        (302, b"", "HTTP status 302"),
        (404, b"<html/>", "HTTP status 404"),
    ],
    ids=[
        "xxe",
        "billion-laughs",
        "oversized",
        "truncated",
        "empty",
        "wrong-namespace",
        "no-processing",
        "no-status",
        "ok-without-result",
        "non-numeric-code",
        "other-operation",
        "http-500",
        "http-302",
        "http-404",
    ],
)
def test_hostile_or_broken_answers_are_transport_errors(hostile, status, body, why) -> None:
    server = hostile(status, body)
    log = MemoryApiLogSink()
    with pytest.raises(RatepayTransportError, match=why) as caught:
        _facade(server.url, log).init_payment()
    assert caught.value.sent is True
    assert len(log.records) == 1 and log.records[0].success is False
    assert log.records[0].error and SECRET not in log.records[0].error
    assert b"root:" not in (log.records[0].response_xml or "").encode()


def test_a_valid_answer_parses_and_the_request_is_text_xml(hostile) -> None:
    server = hostile(200, OK_INIT)
    result = _facade(server.url, MemoryApiLogSink()).init_payment()
    assert result.success and result.transaction_id == "31-202401151000042"
    content_type, body = server.received[0]
    assert content_type == "text/xml; charset=UTF-8"
    assert body.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")


def test_calls_keep_the_headers_of_requests_and_one_connection(hostile) -> None:
    """urllib3 directly (no proxy, no .netrc) sends what a ``requests.Session`` sent, and the
    calls of one thread share one kept-alive connection."""
    import requests

    server = hostile(200, OK_INIT)
    facade = _facade(server.url, MemoryApiLogSink())
    for _ in range(3):
        assert facade.init_payment().success
    paths = [path for path, _ in server.requests]
    assert paths == ["/api/xml/1_0"] * 3
    headers = server.requests[0][1]
    expected = requests.utils.default_headers()
    assert headers["User-Agent"] == expected["User-Agent"]
    assert headers["Accept-Encoding"] == expected["Accept-Encoding"]
    assert headers["Accept"] == "text/xml, application/json"
    assert headers["Content-Length"] == str(len(server.received[0][1]))
    assert len(facade.transport._managers) == 1  # type: ignore[attr-defined]


def test_a_proxy_from_the_environment_is_used(hostile, monkeypatch) -> None:
    """A URL the environment sends through a proxy goes the ``requests`` way (its proxy
    handling): the proxy gets the absolute URL of the gateway, which need not resolve."""
    proxy = hostile(200, OK_INIT)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
    facade = _facade("http://gateway.invalid/api/xml/1_0", MemoryApiLogSink())
    assert facade.init_payment().success
    assert [path for path, _ in proxy.requests] == ["http://gateway.invalid/api/xml/1_0"]


def test_credentials_in_the_url_are_sent_as_basic_auth(hostile) -> None:
    """As ``requests`` does it (such a URL goes its way, not urllib3's directly)."""
    import base64

    server = hostile(200, OK_INIT)
    url = server.url.replace("http://", "http://shop:s3cret@")
    assert _facade(url, MemoryApiLogSink()).init_payment().success
    expected = "Basic " + base64.b64encode(b"shop:s3cret").decode()
    assert server.requests[0][1]["Authorization"] == expected


def test_the_url_caches_start_over_when_full(hostile) -> None:
    """A status lookup has a URL per transaction: the transport keeps a bounded number."""
    from ratepay_oms.ratepay.transport import URL_CACHE_MAX

    server = hostile(200, OK_INIT)
    transport = RequestsTransport()
    for n in range(URL_CACHE_MAX + 5):
        transport._route(f"{server.url}?tx={n}")
        transport._settings(f"{server.url}?tx={n}")
    assert len(transport._direct) <= URL_CACHE_MAX
    assert len(transport._environment) <= URL_CACHE_MAX


def test_an_unknown_host_sent_nothing(hostile) -> None:
    log = MemoryApiLogSink()
    with pytest.raises(RatepayTransportError, match="connection failed") as caught:
        _facade("http://gateway.invalid/api/xml/1_0", log).request_payment(
            "31-202401151000042", example_customer(), example_basket(), PaymentInfo("INVOICE")
        )
    assert caught.value.sent is False


def test_a_slow_gateway_raises_a_read_timeout(sandbox) -> None:
    from ratepay_oms.sandbox import Fault

    sandbox.gateway.faults.add(Fault("delay", operation="PROFILE_REQUEST", delay_s=1.5))
    settings = RatepaySettings.from_mapping({**sandbox.settings, "READ_TIMEOUT": "0.5"})
    log = MemoryApiLogSink()
    started = time.monotonic()
    with pytest.raises(RatepayTransportError, match="timeout") as caught:
        RatepayFacade(settings, api_log=log).request_profile()
    assert caught.value.sent is True
    assert time.monotonic() - started < 1.4  # the read timeout, not the server, ended it
    assert log.records[0].error and log.records[0].duration_ms >= 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_later(port: int, delay_s: float, servers: list[_Server]) -> None:
    def run() -> None:
        time.sleep(delay_s)
        servers.append(_serve(lambda: (200, OK_INIT), port))

    threading.Thread(target=run, daemon=True).start()


def test_refused_connection_is_retried_for_payment_init() -> None:
    port = _free_port()
    servers: list[_Server] = []
    _start_later(port, 0.3, servers)
    log = MemoryApiLogSink()
    try:
        facade = _facade(f"http://127.0.0.1:{port}/api/xml/1_0", log, retries=5, retry_delay_s=0.1)
        result = facade.init_payment()
        assert result.success
        assert len(log.records) == 1  # one logical call, answered after retries
    finally:
        time.sleep(0.35)
        for server in servers:
            server.shutdown()
            server.server_close()


def test_refused_connection_is_not_retried_for_payment_request() -> None:
    port = _free_port()
    servers: list[_Server] = []
    _start_later(port, 0.3, servers)
    log = MemoryApiLogSink()
    try:
        facade = _facade(f"http://127.0.0.1:{port}/api/xml/1_0", log, retries=5, retry_delay_s=0.1)
        with pytest.raises(RatepayTransportError, match="connection failed") as caught:
            facade.request_payment(
                "31-202401151000042", example_customer(), example_basket(), PaymentInfo("INVOICE")
            )
        assert caught.value.sent is False  # nothing reached the gateway: safe to try later
        assert log.records[0].operation == "PAYMENT_REQUEST" and log.records[0].error
        time.sleep(0.5)
        assert servers and servers[0].received == []  # and it was not re-sent behind our back
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("given", [False, True], ids=["urllib3-directly", "requests-session"])
def test_an_answer_over_the_cap_is_refused_whichever_way_it_was_sent(hostile, given) -> None:
    """The cap holds on both ways of sending: urllib3 directly (no session given) and a
    ``requests.Session`` the shop passes in; the answer is refused, never truncated."""
    import requests

    from ratepay_oms.ratepay.codes import Operation

    server = hostile(200, b"<response" + b" " * 5_000 + b"/>")
    transport = RequestsTransport(requests.Session() if given else None, max_response_bytes=1_000)
    try:
        with pytest.raises(RatepayTransportError, match="exceeds the cap of 1000 bytes") as caught:
            transport.post_xml(server.url, b"<request/>", operation=Operation.PAYMENT_INIT,
                               timeout=(2.0, 2.0))
        assert caught.value.sent is True and caught.value.http_status == 200
        roomy = RequestsTransport(requests.Session() if given else None,
                                  max_response_bytes=10_000)
        answer = roomy.post_xml(server.url, b"<request/>", operation=Operation.PAYMENT_INIT,
                                timeout=(2.0, 2.0))
        assert len(answer.body) == len(b"<response" + b" " * 5_000 + b"/>")
        roomy.close()
    finally:
        transport.close()


def _raw_server(answer: bytes, *, stall_s: float = 0.0) -> tuple[str, Callable[[], None]]:
    """A loopback server that reads one request per connection and writes ``answer`` as it
    is (a status line, headers and a body that may break its own promises), then waits
    ``stall_s`` and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        (line.split(b":", 1)[1] for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length:")),
                        b"0",
                    )
                )
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(answer)
                stop.wait(stall_s)

    threading.Thread(target=serve, daemon=True).start()

    def close() -> None:
        stop.set()
        listener.close()

    return f"http://127.0.0.1:{listener.getsockname()[1]}/api/xml/1_0", close


@pytest.mark.parametrize("given", [False, True], ids=["urllib3-directly", "requests-session"])
@pytest.mark.parametrize(
    ("headers", "body", "stall_s", "why"),
    [
        ("Content-Length: 500\r\n", OK_INIT[:100], 0.0, r"broken answer .*ChunkedEncodingError"),
        ("Content-Length: 500\r\n", OK_INIT[:100], 3.0, r"broken answer .*ConnectionError"),
    ],
    ids=["cut-short", "stalls"],
)
def test_an_answer_that_breaks_off_is_a_broken_answer_whichever_way(
    given, headers, body, stall_s, why
) -> None:
    """An answer that stops before the length it declared (the connection closed, or silent
    beyond the read timeout) was sent and is broken, with the same text on both ways."""
    import requests

    from ratepay_oms.ratepay.codes import Operation

    url, close = _raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n" + headers.encode() + b"\r\n" + body,
        stall_s=stall_s,
    )
    transport = RequestsTransport(requests.Session() if given else None)
    try:
        with pytest.raises(RatepayTransportError, match=why) as caught:
            transport.post_xml(url, b"<request/>", operation=Operation.PAYMENT_REQUEST,
                               timeout=(2.0, 1.0))
        assert caught.value.sent is True and caught.value.http_status == 200
    finally:
        transport.close()
        close()


@pytest.mark.parametrize("given", [False, True], ids=["urllib3-directly", "requests-session"])
def test_a_compressed_answer_is_decoded_and_capped_when_decoded(given) -> None:
    """``Content-Encoding: gzip`` is decoded on both ways, and the cap counts the decoded
    bytes: a small compressed answer that unpacks beyond it is refused."""
    import gzip

    import requests

    from ratepay_oms.ratepay.codes import Operation

    packed = gzip.compress(OK_INIT)
    url, close = _raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(packed)}\r\n\r\n".encode() + packed
    )
    try:
        roomy = RequestsTransport(requests.Session() if given else None)
        answer = roomy.post_xml(url, b"<request/>", operation=Operation.PAYMENT_INIT,
                                timeout=(2.0, 2.0))
        assert answer.body == OK_INIT
        roomy.close()
        tight = RequestsTransport(requests.Session() if given else None,
                                  max_response_bytes=len(packed) + 10)
        with pytest.raises(RatepayTransportError, match="exceeds the cap") as caught:
            tight.post_xml(url, b"<request/>", operation=Operation.PAYMENT_INIT,
                           timeout=(2.0, 2.0))
        assert caught.value.sent is True
        tight.close()
    finally:
        close()


def test_calls_after_close_open_a_new_connection(hostile) -> None:
    """``close`` closes the kept connections (and the pools they are in); the transport still
    works afterwards, on new ones."""
    from ratepay_oms.ratepay.codes import Operation

    server = hostile(200, OK_INIT)
    transport = RequestsTransport()
    for _ in range(2):
        answer = transport.post_xml(server.url, b"<request/>", operation=Operation.PAYMENT_INIT,
                                    timeout=(2.0, 2.0))
        assert answer.status == 200 and answer.body == OK_INIT
        transport.close()
    assert len(server.received) == 2


@pytest.mark.parametrize(
    "code",
    [SECRET, "a&b<c>d\"e'f]]>", "Ümlaut-ß-Code-éà-✓", "tab\tand\rcr!", "  spaced  ", "x" * 300],
    ids=["hex", "xml-specials", "non-ascii", "control-whitespace", "spaced", "long"],
)
def test_the_logged_request_is_masked_as_the_pattern_masks_it(hostile, code) -> None:
    """The facade masks its own requests by replacing their one ``securitycode`` element;
    what it logs is exactly what ``mask_security_code`` (the pattern) and the secret
    masking make of the document that was sent, for codes lxml escapes too."""
    from ratepay_oms.ratepay.xml import mask_secret, mask_security_code

    server = hostile(200, OK_INIT)
    log = MemoryApiLogSink()
    settings = RatepaySettings(
        profile_id="P", security_code=code, api_test_url=server.url, read_timeout=2
    )
    facade = RatepayFacade(settings, transport=RequestsTransport(), api_log=log)
    assert facade.init_payment(order_ref="O-1").success
    with pytest.raises(RatepayTransportError, match="operation"):  # it answers INIT again
        facade.request_payment(
            "31-202401151000042", example_customer(), example_basket(), PaymentInfo("INVOICE"),
            order_id="O-1",
        )
    assert len(server.received) == len(log.records) == 2
    for (_, body), record in zip(server.received, log.records, strict=True):
        assert record.request_xml == mask_secret(mask_security_code(body), code)
        assert record.request_xml.count("<securitycode>********</securitycode>") == 1
        assert body.decode().count("<securitycode>") == 1
