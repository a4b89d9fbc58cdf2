"""The web console in a real browser: headless Chromium (Debian's) driven by Selenium.

A person's path through it: log in, search, open an order, tick two items and ship them (the
page and the database both change), double-click an event button (booked once, the second
click's refusal on the page), resolve an intent nobody could settle, look at an order whose
item is called ``<script>alert(1)</script>``, and send a form without a CSRF token.

With ``RATEPAY_OMS_WEB_SCREENSHOTS=docs/web`` the tests also save the README's screenshots.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ratepay_oms.demo import demo_engine, example_order
from ratepay_oms.sandbox.faults import Fault
from ratepay_oms.sandbox.testing import start_sandbox
from tests.web_support import PASSWORD, add_user, chromium, screenshot, serve_console

pytest.importorskip("starlette", reason="needs the web extra: pip install -e '.[web]'")
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def sandbox():
    running = start_sandbox()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def engine(server_db_url, sandbox):
    """An engine that cannot look up what the gateway booked (no OAuth client for the status
    API), so a lost answer waits for a person: the intent the resolve test settles."""
    settings = {k: v for k, v in sandbox.settings.items() if not k.startswith("OAUTH_")}
    eng = demo_engine(server_db_url, settings)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def console(engine):
    with serve_console(engine) as running:
        yield running


@pytest.fixture(scope="module")
def browser(console, engine, tmp_path_factory):
    """Chromium logged in as an operator (through the login form, after one wrong try)."""
    from selenium.webdriver.common.by import By

    name = add_user(engine, "operator")
    with chromium(tmp_path_factory.mktemp("browser")) as driver:
        driver.get(console.url("/orders"))
        assert "/oms/login" in driver.current_url
        _login(driver, name, "not the password")
        assert "wrong user name or password" in _wait_for(driver, "[data-testid=login-error]").text
        screenshot(driver, "login", full_page=False)
        _login(driver, name, PASSWORD)
        _wait_until(driver, lambda d: d.current_url.endswith("/oms/orders"))
        assert name in driver.find_element(By.CSS_SELECTOR, "[data-testid=who]").text
        yield driver


def _login(driver, name, password):
    from selenium.webdriver.common.by import By

    driver.find_element(By.NAME, "username").clear()
    driver.find_element(By.NAME, "username").send_keys(name)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def _ready_order(engine, **changes):
    ref = f"B-{uuid.uuid4().hex[:8]}"
    order = example_order(ref)
    order.update(changes)
    engine.place_order(order)
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    return ref


def _page_states(driver):
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid=item-state]")]


def _db_states(engine, ref):
    return [i.state for i in engine.order(ref).items]


def _wait_for(driver, css, timeout=20):
    """The element once it is there; on a timeout, say what the page showed instead."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, css))
        )
    except TimeoutException:
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".flash")]
        raise AssertionError(f"no {css} on {driver.current_url}; messages: {shown}") from None


def _wait_until(driver, condition, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _tick(driver, item_ids):
    from selenium.webdriver.common.by import By

    for item_id in item_ids:
        driver.find_element(By.CSS_SELECTOR, f"input[name=item_id][value='{item_id}']").click()


def test_search_open_an_order_and_ship_two_items(browser, console, engine, sandbox):
    from selenium.webdriver.common.by import By

    ref = _ready_order(engine)
    ids = [i.id for i in engine.order(ref).items]
    browser.get(console.url("/orders"))
    browser.find_element(By.NAME, "ref").send_keys(ref)
    browser.find_element(By.CSS_SELECTOR, "form.search button").click()
    _wait_until(browser, lambda d: f"ref={ref}" in d.current_url)
    links = browser.find_elements(By.CSS_SELECTOR, "[data-testid=orders] tbody a")
    assert [a.text for a in links] == [ref]
    screenshot(browser, "orders")
    links[0].click()
    assert _wait_for(browser, "[data-testid=order-ref]").text == ref
    assert _page_states(browser) == ["ready for shipment"] * 4
    buttons = [b.get_attribute("value") for b in
               browser.find_elements(By.CSS_SELECTOR, "button[name=event]")]
    assert buttons == ["ship", "cancel"]
    _tick(browser, ids[1:3])
    browser.find_element(By.CSS_SELECTOR, "[data-testid='event-ship']").click()
    flash = _wait_for(browser, "[data-testid=flash-ok]")
    assert "'ship' done: 2 items moved" in flash.text
    expected = ["ready for shipment", "ready for refund", "ready for refund", "ready for shipment"]
    assert _page_states(browser) == expected
    assert _db_states(engine, ref) == expected
    history = browser.find_element(By.CSS_SELECTOR, "[data-testid=history]").text
    assert "shipped" in history and "event 'ship' on items" in history
    screenshot(browser, "order")


def _delivers(sandbox):
    return sum(1 for e in sandbox.gateway.received if e.operation == "CONFIRMATION_DELIVER")


def test_a_double_clicked_event_books_once_and_shows_the_refusal(browser, console, engine, sandbox):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ref = _ready_order(engine)
    ids = [i.id for i in engine.order(ref).items]
    before = _delivers(sandbox)
    browser.get(console.url(f"/orders/{ref}"))
    _tick(browser, ids[:1])
    ActionChains(browser).double_click(
        browser.find_element(By.CSS_SELECTOR, "[data-testid='event-ship']")
    ).perform()
    # Chromium mostly sends one POST for it; on a loaded machine both clicks can reach the
    # server, and the page the browser ends on may then show only the second one's refusal
    # (the first one's answer was a navigation the second cut short). Either way: one booking.
    _wait_for(browser, ".flash")
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".flash")]
    assert any("'ship' done: 1 item moved" in t or "'ship' REFUSED" in t for t in shown), shown
    until = time.monotonic() + 20  # a refused second click may answer before the first did
    while _delivers(sandbox) == before and time.monotonic() < until:
        time.sleep(0.05)
    assert _delivers(sandbox) == before + 1
    assert _db_states(engine, ref) == ["ready for refund"] + ["ready for shipment"] * 3

    # Chromium sends one POST for a double click on a submit button; over a slow line both
    # clicks reach the server. Do that: the same form, submitted twice at once.
    _tick(browser, ids[1:2])
    statuses = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const form = document.querySelector('[data-testid=events-form]');
        const button = document.querySelector("[data-testid='event-ship']");
        const body = () => new URLSearchParams(new FormData(form, button));
        const send = () => fetch(form.action, {method: 'POST', body: body(), redirect: 'manual'});
        Promise.all([send(), send()]).then(answers => done(answers.map(a => a.type)),
                                           error => done(String(error)));
        """
    )
    assert statuses == ["opaqueredirect", "opaqueredirect"]
    browser.get(console.url(f"/orders/{ref}"))
    flashes = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".flash")]
    assert len(flashes) == 2, flashes
    refusal = _wait_for(browser, "[data-testid=flash-refused]")
    assert "'ship' REFUSED" in refusal.text
    # Refused by the state (the first click moved it) or by the lease (still at it).
    assert f"item {ids[1]} is in" in refusal.text or "being worked on" in refusal.text
    ok = browser.find_element(By.CSS_SELECTOR, "[data-testid=flash-ok]")
    assert "'ship' done: 1 item moved" in ok.text
    assert _delivers(sandbox) == before + 2
    assert _db_states(engine, ref) == ["ready for refund"] * 2 + ["ready for shipment"] * 2
    screenshot(browser, "double-click")


def test_resolve_an_intent_as_booked(browser, console, engine, sandbox):
    from selenium.webdriver.common.by import By

    now = datetime.now(UTC).replace(tzinfo=None)
    ref = _ready_order(engine)
    sandbox.gateway.faults.add(
        Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER", times=1)
    )
    engine.trigger("ship", ref, now=now)
    engine.tick(now=now + timedelta(seconds=1))
    (intent,) = engine.intents(ref)
    assert intent.status == "unknown"
    browser.get(console.url(f"/orders/{ref}"))
    box = browser.find_element(By.CSS_SELECTOR, f"[data-testid=intent-{intent.id}]")
    assert "unknown" in box.text
    explain = browser.find_element(By.CSS_SELECTOR, "[data-testid=explain]").text
    assert f"held by gateway-call intent {intent.id}" in explain
    screenshot(browser, "intent")
    box.find_element(By.CSS_SELECTOR, "[data-testid=intent-note]").send_keys(
        "delivery visible in the merchant portal")
    box.find_element(By.CSS_SELECTOR, "[data-testid=resolve-booked]").click()
    flash = _wait_for(browser, "[data-testid=flash-ok]")
    assert f"resolve intent {intent.id}: intent {intent.id} resolved as booked" in flash.text
    assert _page_states(browser) == ["ready for refund"] * 4
    assert _db_states(engine, ref) == ["ready for refund"] * 4
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=no-intents]")
    (settled,) = [i for i in engine.intents(ref, open_only=False) if i.id == intent.id]
    assert settled.resolution == "resolved_booked"
    assert "merchant portal" in settled.note and "web console" in settled.note


def test_an_item_named_like_a_script_shows_as_text(browser, console, engine):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    lines = example_order("x")["items"]
    lines[0] = {**lines[0], "name": "<script>alert(1)</script>", "quantity": 1}
    ref = _ready_order(engine, items=lines)
    browser.get(console.url(f"/orders/{ref}"))
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "[data-testid=item-name]")]
    assert names[0] == "<script>alert(1)</script>"
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is what raises
    assert browser.execute_script("return document.querySelectorAll('main script').length") == 0


def test_a_post_without_a_token_is_refused(browser, console, engine):

    ref = _ready_order(engine)
    ids = [i.id for i in engine.order(ref).items]
    browser.get(console.url(f"/orders/{ref}"))
    status = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const body = new URLSearchParams({event: 'ship', item_id: arguments[1]});
        fetch(arguments[0], {method: "POST", body})
          .then(r => done(r.status), e => done(String(e)));
        """,
        console.url(f"/orders/{ref}/events"), str(ids[0]),
    )
    assert status == 403
    # The same as a form a page elsewhere could make the browser send.
    browser.execute_script(
        """
        const form = document.createElement('form');
        form.method = 'post'; form.action = arguments[0];
        for (const [k, v] of [['event', 'ship'], ['item_id', arguments[1]]]) {
          const input = document.createElement('input');
          input.name = k; input.value = v; form.appendChild(input);
        }
        document.body.appendChild(form); form.submit();
        """,
        console.url(f"/orders/{ref}/events"), str(ids[0]),
    )
    error = _wait_for(browser, "[data-testid=error]")
    assert "no valid CSRF token" in error.text
    assert _db_states(engine, ref) == ["ready for shipment"] * 4


def test_matrix_drills_down_to_the_orders_of_a_cell(browser, console, engine):
    from selenium.webdriver.common.by import By

    ref = _ready_order(engine)
    browser.get(console.url("/matrix"))
    table = browser.find_element(By.CSS_SELECTOR, "[data-testid='matrix-RatepayInvoice01']")
    row = next(r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")
               if r.text.startswith("ready for shipment"))
    screenshot(browser, "matrix")
    row.find_element(By.CSS_SELECTOR, "[data-testid=cell]").click()
    _wait_for(browser, "[data-testid=orders]")
    refs = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "[data-testid=orders] a")]
    assert ref in refs
    assert "state=ready+for+shipment" in browser.current_url
