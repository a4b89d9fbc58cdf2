"""The web console over real HTTP (uvicorn on loopback, mounted under /oms, the sandbox gateway
behind the engine): logins and sessions, CSRF, roles, hostile order data, secrets, the orders
list, big orders, the operator log, the matrix, and the ``web`` CLI commands."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from ratepay_oms.cli import _mount
from ratepay_oms.demo import demo_engine, example_order
from ratepay_oms.persistence.models import TransitionLog
from ratepay_oms.persistence.web import WebAction
from ratepay_oms.sandbox.testing import start_sandbox
from ratepay_oms.web.queries import OrderSearch, search_orders
from tests.web_support import PASSWORD, add_user, csrf_of, http_login, serve_console

pytest.importorskip("starlette", reason="needs the web extra: pip install -e '.[web]'")
_mount()


@pytest.fixture(scope="module")
def sandbox():
    """One gateway for the module (tests count their own calls, never all of them)."""
    running = start_sandbox()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def engine(server_db_url, sandbox):
    eng = demo_engine(server_db_url, sandbox.settings)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def console(engine):
    with serve_console(engine) as running:
        yield running


@pytest.fixture(scope="module")
def operator(engine):
    return add_user(engine, "operator")


@pytest.fixture(scope="module")
def viewer(engine):
    return add_user(engine, "viewer")


def _ready_order(engine, **changes):
    ref = f"W-{uuid.uuid4().hex[:8]}"
    order = example_order(ref)
    for key, value in changes.items():
        order[key] = value
    engine.place_order(order)
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    return ref


def _delivers(sandbox):
    return sum(1 for e in sandbox.gateway.received if e.operation == "CONFIRMATION_DELIVER")


def _states(engine, ref):
    return [i.state for i in engine.order(ref).items]


def test_every_page_needs_a_login(console, engine):
    import requests

    ref = _ready_order(engine)
    for path in ("/orders", f"/orders/{ref}", "/matrix", "/", "/processes/RatepayInvoice01"):
        answer = requests.get(console.url(path), allow_redirects=False, timeout=10)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/oms/login?next=")
    assert f"/oms/orders/{ref}" in requests.utils.unquote(
        requests.get(console.url(f"/orders/{ref}"), allow_redirects=False, timeout=10)
        .headers["location"]
    )


def test_login_refuses_a_wrong_password_and_a_form_without_token(console, engine):
    import requests

    name = add_user(engine, "viewer")
    http = requests.Session()
    token = csrf_of(http.get(console.url("/login"), timeout=10).text)
    wrong = http.post(console.url("/login"), timeout=10, data={
        "username": name, "password": "not the password", "csrf_token": token})
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    unknown = http.post(console.url("/login"), timeout=10, data={
        "username": "nobody", "password": PASSWORD, "csrf_token": token})
    assert unknown.status_code == 401 and "wrong user name or password" in unknown.text
    no_token = http.post(console.url("/login"), timeout=10, data={
        "username": name, "password": PASSWORD})
    assert no_token.status_code == 403 and "CSRF" in no_token.text
    assert "ratepay_oms_session" not in http.cookies


def test_session_cookie_is_httponly_lax_and_scoped_to_the_mount(engine):
    import requests

    name = add_user(engine, "viewer")
    for secure, flag in ((None, False), (True, True)):
        with serve_console(engine, secure_cookies=secure) as console:
            http = requests.Session()
            token = csrf_of(http.get(console.url("/login"), timeout=10).text)
            # A Secure cookie is not sent back over http: hand the login token over by hand.
            answer = http.post(console.url("/login"), allow_redirects=False, timeout=10, data={
                "username": name, "password": PASSWORD, "csrf_token": token},
                cookies={"ratepay_oms_login_csrf": token})
            assert answer.status_code == 303
            cookie = next(c for c in answer.headers["set-cookie"].split(", ratepay")
                          if "ratepay_oms_session=" in c)
            assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/oms/" in cookie
            assert ("Secure" in cookie) is flag


def test_logout_ends_the_session_on_the_server(console, engine, operator):
    import requests

    http = http_login(console, operator)
    cookie = http.cookies["ratepay_oms_session"]
    page = http.get(console.url("/orders"), timeout=10)
    assert http.post(console.url("/logout"), data={"csrf_token": csrf_of(page.text)},
                     timeout=10).url.endswith("/oms/login")
    replay = requests.get(console.url("/orders"), cookies={"ratepay_oms_session": cookie},
                          allow_redirects=False, timeout=10)
    assert replay.status_code == 303 and "/oms/login" in replay.headers["location"]


def test_a_post_without_or_with_a_wrong_csrf_token_is_refused_and_nothing_moves(
    console, engine, operator
):
    ref = _ready_order(engine)
    ids = [i.id for i in engine.order(ref).items]
    http = http_login(console, operator)
    url = console.url(f"/orders/{ref}/events")
    for extra in ({}, {"csrf_token": "forged"}):
        answer = http.post(url, data={"event": "ship", "item_id": ids[:2], **extra}, timeout=10)
        assert answer.status_code == 403 and "no valid CSRF token" in answer.text
    resolve = http.post(console.url(f"/orders/{ref}/intents/1/resolve"),
                        data={"decision": "booked", "note": "x"}, timeout=10)
    assert resolve.status_code == 403
    assert _states(engine, ref) == ["ready for shipment"] * 4


def test_a_viewer_sees_the_order_but_cannot_fire_events(console, engine, viewer):
    ref = _ready_order(engine)
    ids = [i.id for i in engine.order(ref).items]
    http = http_login(console, viewer)
    page = http.get(console.url(f"/orders/{ref}"), timeout=10)
    assert page.status_code == 200 and "ready for shipment" in page.text
    assert 'name="event"' not in page.text and "fired by operators" in page.text
    answer = http.post(console.url(f"/orders/{ref}/events"), timeout=10,
                       data={"event": "ship", "item_id": ids[:1], "csrf_token": csrf_of(page.text)})
    assert answer.status_code == 403 and "is a viewer" in answer.text
    assert _states(engine, ref) == ["ready for shipment"] * 4


def test_shipping_two_items_is_recorded_with_the_operators_name(
    console, engine, sandbox, operator
):
    ref = _ready_order(engine)
    ids = [i.id for i in engine.order(ref).items]
    name = operator
    http = http_login(console, name)
    sent = _delivers(sandbox)
    page = http.get(console.url(f"/orders/{ref}"), timeout=10)
    assert 'value="ship"' in page.text and "ship <small>(4 items)" in page.text
    done = http.post(console.url(f"/orders/{ref}/events"), timeout=10, data={
        "event": "ship", "item_id": [str(i) for i in ids[:2]], "csrf_token": csrf_of(page.text)})
    assert done.status_code == 200 and done.url.endswith(f"/oms/orders/{ref}")
    assert "&#39;ship&#39; done: 2 items moved" in done.text
    assert _states(engine, ref) == ["ready for refund"] * 2 + ["ready for shipment"] * 2
    with engine.session() as session:
        action = session.scalars(select(WebAction).order_by(WebAction.id.desc())).first()
        argv = set(session.scalars(
            select(TransitionLog.argv).where(TransitionLog.item_id.in_(ids[:2]))
            .where(TransitionLog.event == "ship")))
    assert (action.user_name, action.event, action.outcome) == (name, "ship", "done")
    assert json.loads(action.item_ids) == ids[:2]
    assert argv == {f"ratepay-oms web: user {name} (operator)"}
    assert name in done.text.split("<h2>History</h2>")[1]
    # The same items again: refused, said so, recorded, nothing sent twice.
    again = http.post(console.url(f"/orders/{ref}/events"), timeout=10, data={
        "event": "ship", "item_id": [str(i) for i in ids[:2]], "csrf_token": csrf_of(page.text)})
    assert "&#39;ship&#39; REFUSED: cannot fire &#39;ship&#39;" in again.text
    assert _delivers(sandbox) == sent + 1


def test_no_items_chosen_fires_nothing(console, engine, operator):
    ref = _ready_order(engine)
    http = http_login(console, operator)
    page = http.get(console.url(f"/orders/{ref}"), timeout=10)
    answer = http.post(console.url(f"/orders/{ref}/events"), timeout=10,
                       data={"event": "ship", "csrf_token": csrf_of(page.text)})
    assert "REFUSED: choose at least one item" in answer.text
    assert _states(engine, ref) == ["ready for shipment"] * 4


def test_hostile_order_data_is_shown_as_text(console, engine, viewer):
    order_items = example_order("x")["items"]
    order_items[0] = {**order_items[0], "name": "<script>alert(1)</script>",
                      "sku": '"><img src=x onerror=alert(2)>'}
    ref = _ready_order(engine, items=order_items)
    http = http_login(console, viewer)
    page = http.get(console.url(f"/orders/{ref}"), timeout=10)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script>alert(1)" not in page.text and "<img src=x" not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"


def test_no_secret_is_rendered(console, engine, sandbox, viewer):
    ref = _ready_order(engine)
    secret = sandbox.settings["SECURITY_CODE"]
    http = http_login(console, viewer)
    page = http.get(console.url(f"/orders/{ref}"), timeout=10)
    calls = [line for line in page.text.splitlines() if "/calls/" in line]
    assert calls, "the order page links its gateway calls"
    call_path = calls[0].split('href="')[1].split('"')[0]
    xml = http.get(console.url(call_path.removeprefix("/oms")), timeout=10)
    assert xml.status_code == 200 and "PAYMENT_" in xml.text
    assert "securitycode&gt;********&lt;" in xml.text
    for text in (page.text, xml.text):
        assert secret not in text


def test_orders_list_filters_and_pages_by_key(console, engine, viewer):
    tag = uuid.uuid4().hex[:6]
    base = datetime(2026, 3, 1, 12, 0)
    refs = []
    for day in range(5):
        ref = f"L{tag}-{day}"
        engine.place_order(example_order(ref), now=base + timedelta(days=day), fire=False)
        refs.append(ref)
    with engine.session() as session:
        first = search_orders(session, OrderSearch(ref=f"L{tag}"), limit=2)
        assert [r.order_ref for r in first.rows] == refs[4:2:-1] and first.newer is None
        second = search_orders(session, OrderSearch(ref=f"L{tag}"), before=first.older, limit=2)
        assert [r.order_ref for r in second.rows] == refs[2:0:-1]
        back = search_orders(session, OrderSearch(ref=f"L{tag}"), after=second.newer, limit=2)
        assert [r.order_ref for r in back.rows] == refs[4:2:-1]
        last = search_orders(session, OrderSearch(ref=f"L{tag}"), before=second.older, limit=2)
        assert [r.order_ref for r in last.rows] == refs[:1] and last.older is None
        assert last.rows[0].states == {"new": 4} and last.rows[0].goods_total == Decimal("82.50")
    http = http_login(console, viewer)
    page = http.get(console.url("/orders"), timeout=10,
                    params={"ref": f"L{tag}", "from": "2026-03-02", "to": "2026-03-03"})
    shown = [r for r in refs if f">{r}</a>" in page.text]
    assert shown == refs[1:3]
    assert f">{refs[0]}</a>" not in http.get(console.url("/orders"), timeout=10, params={
        "ref": f"L{tag}", "state": "new", "process": "RatepayElv01"}).text
    wildcard = http.get(console.url("/orders"), params={"ref": "%"}, timeout=10)
    assert "No order matches." in wildcard.text
    bad = http.get(console.url("/orders"), params={"from": "yesterday"}, timeout=10)
    assert "is not a date" in bad.text


def test_a_state_filter_pages_by_key_among_other_orders(engine):
    tag = uuid.uuid4().hex[:6]
    refs = [f"S{tag}-{n}" for n in range(5)]
    for n, ref in enumerate(refs):
        engine.place_order(example_order(ref), fire=n % 2 == 0)  # even: ready for shipment
    shipping = OrderSearch(ref=f"S{tag}", state="ready for shipment")
    with engine.session() as session:
        pages, cursor = [], None
        while True:
            page = search_orders(session, shipping, before=cursor, limit=1)
            pages.append([r.order_ref for r in page.rows])
            if page.older is None:
                break
            cursor = page.older
        assert pages == [[refs[4]], [refs[2]], [refs[0]]]
        back = search_orders(session, shipping, after=page.newer, limit=1)
        assert [r.order_ref for r in back.rows] == [refs[2]] and back.newer is not None
        assert back.older is not None
        new = search_orders(session, OrderSearch(ref=f"S{tag}", state="new"), limit=5)
        assert [r.order_ref for r in new.rows] == [refs[3], refs[1]]
        assert new.rows[0].states == {"new": 4}


def test_a_big_order_shows_a_summary_and_ships_a_count_of_one_line(console, engine, operator):
    lines = example_order("x")["items"]
    lines[0] = {**lines[0], "quantity": 70}
    ref = _ready_order(engine, items=lines)
    http = http_login(console, operator)
    page = http.get(console.url(f"/orders/{ref}"), timeout=10)
    assert 'data-testid="item-groups"' in page.text and "71 items: summary" in page.text
    group = "SKU-100\x1fready for shipment"
    done = http.post(console.url(f"/orders/{ref}/events"), timeout=10, data={
        "event": "ship", "group": [group, "SKU-200\x1fready for shipment"], "take": ["3", "0"],
        "csrf_token": csrf_of(page.text)})
    assert "3 items moved" in done.text
    states = engine.order(ref).items
    moved = [i for i in states if i.state == "ready for refund"]
    assert len(moved) == 3 and {i.sku for i in moved} == {"SKU-100"}


def test_matrix_drills_down_to_the_orders_in_a_cell(console, engine, viewer):
    ref = _ready_order(engine)
    http = http_login(console, viewer)
    matrix = http.get(console.url("/matrix"), timeout=10)
    link = "/oms/orders?process=RatepayInvoice01&amp;state=ready+for+shipment"
    assert link in matrix.text
    cell = http.get(console.url("/orders"), timeout=10,
                    params={"process": "RatepayInvoice01", "state": "ready for shipment"})
    assert f">{ref}</a>" in cell.text
    drawing = http.get(console.url("/processes/RatepayInvoice01"), timeout=10)
    assert drawing.status_code == 200 and ("<svg" in drawing.text or "flowchart" in drawing.text)


def test_order_page_explains_and_draws(console, engine, viewer):
    ref = _ready_order(engine)
    http = http_login(console, viewer)
    page = http.get(console.url(f"/orders/{ref}"), timeout=10)
    assert "waits for a person: &#39;ship&#39; or &#39;cancel&#39;" in page.text
    assert "<svg" in page.text or "flowchart TD" in page.text
    assert http.get(console.url("/orders/nope"), timeout=10).status_code == 404


def _cli(monkeypatch, capsys, args, stdin=""):
    """Run the console as a user does (``main``: errors as one line, exit status)."""
    import io
    import sys

    from ratepay_oms.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(args)
    out = capsys.readouterr()
    return status, out.out + out.err


def test_cli_adds_lists_and_removes_users(server_db_url, engine, monkeypatch, capsys):
    name = f"cli-{uuid.uuid4().hex[:6]}"
    db = ["--db", server_db_url]
    adduser = ["web", "adduser", *db, "--role"]
    status, out = _cli(monkeypatch, capsys, [*adduser, "operator", name], PASSWORD + "\n")
    assert status == 0 and f"user {name} added (operator)" in out
    status, out = _cli(monkeypatch, capsys, [*adduser, "viewer", name], PASSWORD + "\n")
    assert status == 1 and "exists already" in out and "Traceback" not in out
    status, out = _cli(monkeypatch, capsys, [*adduser, "viewer", name + "x"], "short\n")
    assert status == 1 and "password too short" in out
    status, out = _cli(monkeypatch, capsys, [*adduser, "admin", name + "y"], PASSWORD + "\n")
    assert status == 2 and "'admin' is not one of 'viewer', 'operator'" in out
    status, out = _cli(monkeypatch, capsys, ["web", "users", *db])
    assert status == 0 and name in out and "operator" in out
    with engine.session() as session:
        from ratepay_oms.persistence.web import WebUser

        stored = session.scalar(select(WebUser.password_hash).where(WebUser.name == name))
    assert stored.startswith("scrypt$") and PASSWORD not in stored
    assert _cli(monkeypatch, capsys, ["web", "deluser", *db, name])[0] == 0
    status, out = _cli(monkeypatch, capsys, ["web", "deluser", *db, name])
    assert status == 1 and f"no user {name!r}" in out


def test_cli_serve_names_the_extra_when_it_is_missing(monkeypatch, tmp_sqlite_url, capsys):
    import sys

    from ratepay_oms.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["web", "serve", "--db", tmp_sqlite_url]) == 1
    err = capsys.readouterr().err
    assert "pip install 'ratepay-oms[web]'" in err and "uvicorn" in err


def test_event_data_fields_reach_an_engine_that_takes_them(server_db_url, sandbox, operator):
    """``Engine.trigger(..., data=...)`` (issue 12) is not in every engine: the page offers the
    fields and passes them only to one whose ``trigger`` takes ``data``."""
    from ratepay_oms.engine.engine import Engine
    from ratepay_oms.process.loader import default_process_dir

    class DataEngine(Engine):
        received: list[dict] = []  # noqa: RUF012

        def trigger(self, event, order_ref, item_ids=None, *, now=None, data=None):
            self.received.append(dict(data or {}))
            return super().trigger(event, order_ref, item_ids, now=now, data=data)

    engine = DataEngine(server_db_url, process_dir=default_process_dir())
    from ratepay_oms.demo import attach_ratepay

    attach_ratepay(engine, sandbox.settings)
    try:
        ref = _ready_order(engine)
        ids = [i.id for i in engine.order(ref).items]
        with serve_console(engine) as console:
            http = http_login(console, operator)
            page = http.get(console.url(f"/orders/{ref}"), timeout=10)
            assert 'name="data.invoice_id"' in page.text and 'name="data.tracking_ids"' in page.text
            done = http.post(console.url(f"/orders/{ref}/events"), timeout=10, data={
                "event": "ship", "item_id": [str(ids[0])], "data.invoice_id": "INV-1",
                "data.tracking_ids": " 00340434, 00340435 ", "data.carrier": "",
                "csrf_token": csrf_of(page.text)})
        assert "1 item moved" in done.text
        assert DataEngine.received == [
            {"invoice_id": "INV-1", "tracking_ids": ["00340434", "00340435"]}
        ]
        assert "invoice_id: INV-1" in done.text  # the operator log shows what was sent
    finally:
        engine.close()


def test_web_serve_runs_the_console_under_a_prefix(server_db_url, engine, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RATEPAY_OMS_DATABASE_URL": server_db_url}
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ratepay_oms.cli import main; sys.exit(main())",
         "web", "serve", "--port", str(port),
         "--prefix", "oms/"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                login = requests.get(base + "/oms/login", timeout=5)
                break
            except requests.ConnectionError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "web serve did not answer"
                time.sleep(0.2)
        assert login.status_code == 200 and 'action="/oms/login"' in login.text
        root = requests.get(base + "/", allow_redirects=False, timeout=5)
        assert root.status_code == 307 and root.headers["location"] == "/oms/"
        orders = requests.get(base + "/oms/orders", allow_redirects=False, timeout=5)
        assert orders.headers["location"].startswith("/oms/login")
    finally:
        server.terminate()
        server.wait(10)
    assert f"web console on http://127.0.0.1:{port}/oms/" in server.stderr.read().decode()


def test_two_clicks_at_once_book_once(console, engine, sandbox, operator):
    """Every request of one console runs as the same engine worker, which may take a lease it
    holds already: the console itself lets one action per order run at a time."""
    from concurrent.futures import ThreadPoolExecutor

    ref = _ready_order(engine)
    ids = [i.id for i in engine.order(ref).items]
    http = http_login(console, operator)
    token = csrf_of(http.get(console.url(f"/orders/{ref}"), timeout=10).text)
    sent = _delivers(sandbox)

    def click(_n):
        return http.post(console.url(f"/orders/{ref}/events"), allow_redirects=False,
                         timeout=30, data={"event": "ship", "item_id": [str(ids[0])],
                                           "csrf_token": token}).status_code

    for _round in range(3):
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(click, range(4))) == [303] * 4
    assert _delivers(sandbox) == sent + 1
    assert _states(engine, ref) == ["ready for refund"] + ["ready for shipment"] * 3
    page = http.get(console.url(f"/orders/{ref}"), timeout=10).text
    assert page.count("&#39;ship&#39; done") == 1
    assert page.count("&#39;ship&#39; REFUSED") == 11


def test_explain_groups_items_that_differ_only_in_their_times(engine):
    from ratepay_oms.web.explain import explain_order

    definitions = engine.definitions()
    item = {"process": "RatepayInvoice01", "state": "ready for refund", "retry_at": None}
    detail = {
        "items": [{**item, "id": n} for n in (1, 2, 3)]
        + [{**item, "id": 4, "state": "shipped"}],
        "timeouts": [
            {"item_id": n, "event": "waiting for return", "overdue": False,
             "due_at": f"2027-03-0{n}T10:00:00.123456"}
            for n in (1, 2, 3)
        ],
        "intents": [{"id": 9, "status": "unknown", "item_ids": [4]}],
        "lease": None,
    }
    waiting, held = explain_order(detail, definitions)
    assert waiting.item_ids == (1, 2, 3)
    assert waiting.lines == (
        "timeout event 'waiting for return' due at 2027-03-01 10:00:00 … 2027-03-03 10:00:00 UTC",
        "waits for a person: 'refund payment'",
    )
    assert held.item_ids == (4,)
    assert held.lines[0] == (
        "held by gateway-call intent 9 (unknown): no event fires until it is settled"
    )
