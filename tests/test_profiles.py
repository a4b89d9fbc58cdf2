"""Several RatePAY profiles: settings, ``profile refresh`` / ``profile show`` against the
sandbox over real HTTP (answers kept in the database, on every dialect), the choice of profile
per order and the check of an order against its profile. No secret in any output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from ratepay_oms.cli import main
from ratepay_oms.orders import parse_order
from ratepay_oms.plugins.ratepay.profiles import check_order
from ratepay_oms.ratepay import RatepaySettingsError
from ratepay_oms.ratepay.profiles import ProfileData, ProfileSet, UnknownProfileError
from ratepay_oms.sandbox import SandboxConfig
from ratepay_oms.sandbox.testing import RunningSandbox, start_sandbox
from tests.test_cli_engine import EXAMPLE_ORDER

DE_SECRET = "d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0"
CH_SECRET = "c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1"
SANDBOX = SandboxConfig(
    seed=1,
    profile_id="SHOP_DE",
    security_code=DE_SECRET,
    billing_countries=("DE", "AT"),
    currencies=("EUR",),
    profiles=(
        SandboxConfig(
            profile_id="SHOP_CH",
            security_code=CH_SECRET,
            billing_countries=("CH",),
            delivery_countries=("CH",),
            currencies=("CHF",),
            methods=("INVOICE",),
            tx_limit_max=Decimal("2500.00"),
            b2b_methods=(),
            delivery_address_methods=(),
        ),
    ),
)


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningSandbox]:
    running = start_sandbox(SANDBOX)
    try:
        yield running
    finally:
        running.stop()


def settings_file(tmp_path: Path, sandbox: RunningSandbox) -> Path:
    """Two profiles sharing [ratepay]; the secrets come from the environment."""
    path = tmp_path / "ratepay-oms.toml"
    path.write_text(
        f"""
[ratepay]
MODE = "test"
API_TEST_URL = "{sandbox.url}"
TIME_ZONE = "Europe/Berlin"

[ratepay.profiles.DE]
PROFILE_ID = "SHOP_DE"

[ratepay.profiles.CH]
PROFILE_ID = "SHOP_CH"
TIME_ZONE = "Europe/Zurich"
PAYMENT_TERM_DAYS = 30
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def configured(tmp_path, gateway, monkeypatch) -> Path:
    path = settings_file(tmp_path, gateway)
    for var in ("RATEPAY_PROFILE_ID", "RATEPAY_SECURITY_CODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RATEPAY_OMS_CONFIG", str(path))
    monkeypatch.setenv("RATEPAY_PROFILE_DE_SECURITY_CODE", DE_SECRET)
    monkeypatch.setenv("RATEPAY_PROFILE_CH_SECURITY_CODE", CH_SECRET)
    monkeypatch.setenv("COLUMNS", "200")
    return path


@pytest.fixture(scope="module")
def db(server_db_url: str) -> str:
    assert main(["db", "upgrade", "--db", server_db_url]) == 0
    return server_db_url


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- settings


def test_profiles_inherit_ratepay_but_never_its_credentials(tmp_path, gateway) -> None:
    path = settings_file(tmp_path, gateway)
    env = {
        "RATEPAY_PROFILE_ID": "BASE",
        "RATEPAY_SECURITY_CODE": "b" * 32,
        "RATEPAY_PROFILE_DE_SECURITY_CODE": DE_SECRET,
        "RATEPAY_PROFILE_CH_SECURITY_CODE": CH_SECRET,
    }
    profiles = ProfileSet.load(env, path)
    assert profiles.names == ("default", "DE", "CH")
    assert profiles["DE"].api_url == gateway.url == profiles["CH"].api_url
    assert (profiles["DE"].profile_id, profiles["DE"].security_code) == ("SHOP_DE", DE_SECRET)
    assert (profiles["CH"].time_zone, profiles["CH"].payment_term_days) == ("Europe/Zurich", 30)
    assert profiles["DE"].time_zone == "Europe/Berlin"
    assert DE_SECRET not in repr(profiles) and CH_SECRET not in repr(profiles)


def test_a_profile_without_its_own_secret_is_refused_by_name(tmp_path, gateway) -> None:
    path = settings_file(tmp_path, gateway)
    env = {"RATEPAY_SECURITY_CODE": "b" * 32, "RATEPAY_PROFILE_DE_SECURITY_CODE": DE_SECRET}
    with pytest.raises(RatepaySettingsError, match=r"RatePAY profile CH: .*SECURITY_CODE"):
        ProfileSet.load(env, path)


def _order(**changes):
    data = json.loads(json.dumps(EXAMPLE_ORDER))
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return parse_order(data)


def _profile(**fields) -> ProfileData:
    md = {
        "profile-id": "P", "merchant-status": "2", "country-code-billing": "DE,AT",
        "country-code-delivery": "DE,AT", "currency": "EUR",
        "activation-status-invoice": "2", "eligibility-ratepay-invoice": "yes",
        "tx-limit-invoice-min": "10.00", "tx-limit-invoice-max": "1000.00",
        "tx-limit-invoice-max-b2b": "500.00", "b2b-invoice": "no",
        "delivery-address-invoice": "no",
    }
    md.update({k.replace("_", "-"): v for k, v in fields.items()})
    return ProfileData.from_master_data(md)


def test_the_profile_is_chosen_by_name_else_by_country_and_currency(tmp_path, gateway) -> None:
    path = settings_file(tmp_path, gateway)
    env = {"RATEPAY_PROFILE_DE_SECURITY_CODE": DE_SECRET,
           "RATEPAY_PROFILE_CH_SECURITY_CODE": CH_SECRET}
    profiles = ProfileSet.load(env, path)
    stored = {"DE": _profile(currency="EUR"),
              "CH": _profile(country_code_billing="CH", currency="CHF")}
    assert profiles.choose(explicit=None, country="AT", currency="EUR", stored=stored) == "DE"
    assert profiles.choose(explicit=None, country="CH", currency="CHF", stored=stored) == "CH"
    assert profiles.choose(explicit="CH", country="DE", currency="EUR", stored=stored) == "CH"
    with pytest.raises(UnknownProfileError, match=r"no RatePAY profile serves .* FR in EUR"):
        profiles.choose(explicit=None, country="FR", currency="EUR", stored=stored)
    with pytest.raises(UnknownProfileError, match="unknown RatePAY profile 'US'"):
        profiles.choose(explicit="US", country="DE", currency="EUR", stored=stored)
    with pytest.raises(UnknownProfileError, match="never refreshed"):
        profiles.choose(explicit=None, country="CH", currency="CHF", stored={})


@pytest.mark.parametrize(
    ("profile", "changes", "reason"),
    [
        ({"merchant_status": "1"}, {}, 120),
        ({"activation_status_invoice": "3"}, {}, 120),
        ({}, {"customer.billing_address.country_code": "CH"}, 2100),
        ({}, {"currency": "CHF"}, 200),
        ({"tx_limit_invoice_min": "500.00"}, {}, 2005),
        ({"tx_limit_invoice_max": "50.00"}, {}, 2006),
        ({"tx_limit_invoice_max_b2b": "50.00", "b2b_invoice": "yes"},
         {"customer.company_name": "Beispiel GmbH"}, 2006),
        ({}, {"customer.company_name": "Beispiel GmbH"}, 2002),
    ],
)
def test_an_order_outside_its_profile_is_named_with_the_gateways_reason(
    profile, changes, reason
) -> None:
    order = _order(**changes)
    assert check_order(_profile(), _order(), _order().basket_amount) is None
    violation = check_order(_profile(**profile), order, order.basket_amount)
    assert violation is not None and violation.reason_code == reason, violation


def test_a_delivery_elsewhere_needs_the_profiles_permission() -> None:
    elsewhere = {"street": "Hafenstraße 3", "zip_code": "20457", "city": "Hamburg",
                 "country_code": "DE", "first_name": "Erika", "last_name": "M"}
    order = _order(**{"customer.delivery_address": elsewhere})
    assert check_order(_profile(), order, order.basket_amount).reason_code == 2001
    assert check_order(_profile(delivery_address_invoice="yes"), order,
                       order.basket_amount) is None
    abroad = _order(**{"customer.delivery_address": {**elsewhere, "country_code": "FR"}})
    assert check_order(_profile(delivery_address_invoice="yes"), abroad,
                       abroad.basket_amount).reason_code == 2101


# --------------------------------------------------------------------------- the console


def test_profile_refresh_keeps_each_profiles_answer(db, configured, gateway, capsys) -> None:
    code, out, err = run(capsys, "profile", "refresh", "--db", db)
    assert code == 0, err
    assert "profile DE (SHOP_DE) refreshed" in out and "profile CH (SHOP_CH) refreshed" in out
    code, out, err = run(capsys, "profile", "show", "--db", db, "--json")
    assert code == 0, err
    shown = {p["name"]: p for p in json.loads(out)}
    assert shown["DE"]["billing_countries"] == ["DE", "AT"]
    assert shown["CH"]["profile_currencies"] == ["CHF"]
    assert shown["CH"]["methods"]["INVOICE"]["tx_limit_max"] == "2500.00"
    assert shown["CH"]["methods"]["ELV"]["accepts_new_orders"] is False
    assert shown["CH"]["methods"]["INVOICE"]["b2b"] is False
    code, out, err = run(capsys, "profile", "show", "CH", "--db", db)
    assert code == 0 and "SHOP_CH" in out and "2500.00" in out and "SHOP_DE" not in out
    for text in (out, err):
        assert DE_SECRET not in text and CH_SECRET not in text


def test_a_refused_refresh_stores_nothing_and_says_why(db, configured, capsys, monkeypatch):
    assert run(capsys, "profile", "refresh", "DE", "--db", db)[0] == 0
    before = run(capsys, "profile", "show", "DE", "--db", db, "--json")[1]
    monkeypatch.setenv("RATEPAY_PROFILE_CH_SECURITY_CODE", "f" * 32)  # wrong secret
    code, out, err = run(capsys, "profile", "refresh", "--db", db)
    assert code != 0 and out == ""
    assert "PROFILE_REQUEST of profile CH failed: 120" in err and "nothing stored" in err
    assert "f" * 32 not in err
    assert run(capsys, "profile", "show", "DE", "--db", db, "--json")[1] == before


def test_refresh_of_an_unknown_profile_names_the_known_ones(db, configured, capsys) -> None:
    code, _out, err = run(capsys, "profile", "refresh", "US", "--db", db)
    assert code != 0 and "unknown RatePAY profile 'US'; configured: DE, CH" in err
    assert "Traceback" not in err


def test_a_profile_order_field_is_checked_at_intake() -> None:
    from ratepay_oms.orders import OrderInputError

    with pytest.raises(OrderInputError, match=r"payment\.profile: a profile name"):
        _order(**{"payment.profile": "de_1"})
    assert _order(**{"payment.profile": "CH"}).payment.profile == "CH"
    assert replace(_order(), currency="EUR").payment.profile is None


# --------------------------------------------------------------------------- kept answers


def test_a_worker_keeps_the_answers_a_while_and_sees_every_refresh(
    db, configured, capsys, monkeypatch, tmp_path
) -> None:
    """A tick worker plans with the stored answers it read for ``PROFILES_TTL_S`` seconds: a
    refresh by another process (the console, a real child process here) reaches it when they
    run out, one by this process at once."""
    import subprocess
    import sys
    import time

    from ratepay_oms.engine.engine import Engine
    from ratepay_oms.plugins.ratepay import profiles as plugin_profiles
    from ratepay_oms.process.loader import default_process_dir

    assert run(capsys, "profile", "refresh", "--db", db)[0] == 0
    worker = Engine(db, process_dir=default_process_dir())
    try:

        def kept() -> plugin_profiles.KeptProfiles:
            with worker.session() as session:
                return plugin_profiles.kept_profiles(session)

        monkeypatch.setattr(plugin_profiles, "PROFILES_TTL_S", 3600.0)
        first = kept()
        assert kept() is first  # kept: not read again
        assert set(first.stored) == {"DE", "CH"}
        before = first.stored["CH"].refreshed_at
        time.sleep(1.1)  # a later refreshed_at on every dialect
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from ratepay_oms.cli import main; sys.exit(main())",
             "profile", "refresh", "CH", "--db", db],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
        )
        assert child.returncode == 0, child.stderr
        assert kept() is first  # another process's change waits for the time-to-live
        monkeypatch.setattr(plugin_profiles, "PROFILES_TTL_S", 0.2)
        time.sleep(0.25)
        second = kept()
        assert second is not first and second.stored["CH"].refreshed_at > before
        assert second.stored["DE"].refreshed_at == first.stored["DE"].refreshed_at
        monkeypatch.setattr(plugin_profiles, "PROFILES_TTL_S", 3600.0)
        assert kept() is second
        assert run(capsys, "profile", "refresh", "DE", "--db", db)[0] == 0  # this process
        third = kept()
        assert third is not second  # at once, though written through another engine object
        assert third.stored["DE"].refreshed_at > second.stored["DE"].refreshed_at
    finally:
        worker.close()
