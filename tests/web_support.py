"""What the web console tests share: the console served by uvicorn on loopback (mounted under
a prefix, as a shop would), users, logging in with ``requests``, and headless Chromium.

The browser is Debian's Chromium driven by Selenium through Debian's chromedriver; nothing is
downloaded. Without them a browser test skips, and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

CHROMIUM = os.environ.get("RATEPAY_OMS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RATEPAY_OMS_CHROMEDRIVER", "/usr/bin/chromedriver")
PREFIX = "/oms"
PASSWORD = "correct horse battery"
SCREENSHOTS_ENV = "RATEPAY_OMS_WEB_SCREENSHOTS"
"""A folder: the browser tests save screenshots of the main pages there (docs/web/)."""


class RunningConsole:
    def __init__(self, server: Any, thread: threading.Thread, base: str) -> None:
        self.server = server
        self.thread = thread
        self.base = base
        """``http://127.0.0.1:PORT/oms``"""

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def serve_console(engine: Any, **options: Any) -> Iterator[RunningConsole]:
    """``create_app(engine)`` mounted at ``/oms`` in a host app, served by uvicorn in a
    thread on a free loopback port."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from ratepay_oms.web import create_app

    host_app = Starlette(routes=[Mount(PREFIX, app=create_app(engine, **options))])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(host_app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the web console did not start")
        time.sleep(0.02)
    running = RunningConsole(server, thread, f"http://127.0.0.1:{port}{PREFIX}")
    try:
        yield running
    finally:
        running.stop()
        sock.close()


def add_user(engine: Any, role: str, name: str | None = None) -> str:
    from ratepay_oms.web.users import UserStore

    name = name or f"{role}-{uuid.uuid4().hex[:6]}"
    UserStore(engine.session).add(name, role, PASSWORD)
    return name


CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no csrf_token in the page"
    return match.group(1)


def http_login(console: RunningConsole, name: str) -> requests.Session:
    """A ``requests`` session logged in as ``name`` (through the real login form)."""
    http = requests.Session()
    page = http.get(console.url("/login"), timeout=10)
    answer = http.post(
        console.url("/login"),
        data={"username": name, "password": PASSWORD, "csrf_token": csrf_of(page.text)},
        timeout=10,
    )
    assert answer.status_code == 200 and answer.url.endswith("/oms/orders"), answer.text[:500]
    return http


IN_CI = os.environ.get("CI", "").lower() == "true"


def browser_missing() -> str | None:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        return f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium from Debian, a fresh profile, no network beyond what the page asks."""
    missing = browser_missing()
    if missing:
        if IN_CI:
            pytest.fail(f"browser test cannot run under CI: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str, *, full_page: bool = True) -> None:
    """Save ``name``.png in ``$RATEPAY_OMS_WEB_SCREENSHOTS`` (when set): the README's pictures."""
    folder = os.environ.get(SCREENSHOTS_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(int(height) + 40, 700), 4000))
    driver.save_screenshot(str(Path(folder) / f"{name}.png"))
    driver.set_window_size(1400, 1000)
