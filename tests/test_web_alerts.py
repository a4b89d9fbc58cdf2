"""The web console's SLA alerts page: the same report as ``ratepay-oms alerts``, over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from ratepay_oms import Engine
from tests.operator_helpers import PROCESS, operator_engine
from tests.test_operator_sla import T0, populate
from tests.web_support import add_user, http_login, serve_console

pytest.importorskip("starlette", reason="needs the web extra: pip install -e '.[web]'")


@pytest.fixture
def engine(server_db_url: str) -> Iterator[Engine]:
    with operator_engine(server_db_url) as eng:
        yield eng


def test_alerts_page_lists_breaches_with_the_oldest_order(engine: Engine) -> None:
    refs = populate(engine)
    with serve_console(engine) as console:
        http = http_login(console, add_user(engine, "viewer"))
        page = http.get(console.url("/alerts"), params={"now": T0.isoformat()}, timeout=10)
        assert page.status_code == 200
        assert page.text.count('data-testid="alert"') == 2  # review and ready
        assert refs["old"] in page.text and refs["ready"] in page.text
        assert f"/oms/orders?process={PROCESS}&amp;state=review" in page.text
        earlier = http.get(
            console.url("/alerts"), params={"now": (T0 - timedelta(days=20)).isoformat()},
            timeout=10,
        )
        assert "Nothing is past its SLA." in earlier.text
        bad = http.get(console.url("/alerts"), params={"now": "soon"}, timeout=10)
        assert bad.status_code == 400 and "write an ISO time" in bad.text
        assert http.get(console.url("/orders"), timeout=10).text.count("/oms/alerts") == 1
