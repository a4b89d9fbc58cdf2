"""RatePAY settings from env and TOML, the shared XML helpers, and the SQL API log sink."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy.orm import sessionmaker

from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.api_log import ApiLogEntry
from ratepay_oms.persistence.base import Base
from ratepay_oms.ratepay import (
    PaymentInfo,
    RatepayFacade,
    RatepaySettings,
    RatepaySettingsError,
    RatepayTransportError,
    SqlApiLogSink,
)
from ratepay_oms.ratepay.examples import example_basket, example_customer
from ratepay_oms.ratepay.xml import (
    MalformedXmlError,
    XmlSecurityError,
    format_amount,
    mask_security_code,
    parse_amount,
    parse_xml,
)
from ratepay_oms.sandbox import Fault

SECRET = "fedcba9876543210fedcba9876543210"


# --- settings -----------------------------------------------------------------------------


def test_settings_from_env_win_over_toml(tmp_path: Path) -> None:
    toml = tmp_path / "ratepay.toml"
    toml.write_text(
        '[ratepay]\nPROFILE_ID = "FROM_FILE"\nSECURITY_CODE = "file-secret-1234"\n'
        'MODE = "live"\nAPI_LIVE_URL = "https://gateway.example/api/xml/1_0"\nREAD_TIMEOUT = 12\n'
    )
    settings = RatepaySettings.from_env(
        {"RATEPAY_PROFILE_ID": "FROM_ENV", "RATEPAY_SECURITY_CODE": SECRET}, toml_path=toml
    )
    assert settings.profile_id == "FROM_ENV"
    assert settings.security_code == SECRET
    assert settings.mode == "live"
    assert settings.api_url == "https://gateway.example/api/xml/1_0"
    assert settings.read_timeout == 12.0


def test_settings_from_toml_alone_and_test_mode_url(tmp_path: Path) -> None:
    toml = tmp_path / "ratepay.toml"
    toml.write_text('[ratepay]\nPROFILE_ID = "P"\nSECURITY_CODE = "s3cr3t-code"\n')
    settings = RatepaySettings.from_env({}, toml_path=toml)
    assert settings.mode == "test"
    assert settings.api_url == "https://gateway-int.ratepay.com/api/xml/1_0"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"SECURITY_CODE": SECRET}, "PROFILE_ID is missing"),
        ({"PROFILE_ID": "P"}, "SECURITY_CODE is missing"),
        ({"PROFILE_ID": "P", "SECURITY_CODE": SECRET, "MODE": "prod"}, "MODE"),
        ({"PROFILE_ID": "P", "SECURITY_CODE": SECRET, "READ_TIMEOUT": "soon"}, "READ_TIMEOUT"),
        ({"PROFILE_ID": "P", "SECURITY_CODE": SECRET, "API_TEST_URL": "ftp://x"}, "API_TEST_URL"),
        ({"PROFILE_ID": "P", "SECURITY_CODE": SECRET, "PROFILEID": "typo"}, "PROFILEID"),
        ({"PROFILE_ID": "P", "SECURITY_CODE": SECRET, "OAUTH_CLIENT_SECRET": SECRET},
         "OAUTH_CLIENT_ID is missing"),
        ({"PROFILE_ID": "P", "SECURITY_CODE": SECRET, "OAUTH_CLIENT_ID": "c"},
         "OAUTH_CLIENT_SECRET is missing"),
        ({"PROFILE_ID": "P", "SECURITY_CODE": SECRET, "OAUTH_TOKEN_URL": SECRET},
         "OAUTH_TOKEN_URL"),
        ({"PROFILE_ID": "P", "SECURITY_CODE": SECRET, "STATUS_PROCESSING_OFFSET_HOURS": "-1"},
         "STATUS_PROCESSING_OFFSET_HOURS"),
    ],
)
def test_bad_settings_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(RatepaySettingsError, match=message) as caught:
        RatepaySettings.from_mapping(values)
    assert isinstance(caught.value, OmsError)
    assert SECRET not in str(caught.value)


def test_settings_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RatepaySettingsError, match="not found"):
        RatepaySettings.from_env({}, toml_path=tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text(f'[ratepay\nSECURITY_CODE = "{SECRET}"\n')
    with pytest.raises(RatepaySettingsError, match="not valid TOML") as caught:
        RatepaySettings.from_env({}, toml_path=broken)
    assert SECRET not in str(caught.value)
    other = tmp_path / "other.toml"
    other.write_text("[database]\nurl = 'x'\n")
    with pytest.raises(RatepaySettingsError, match=r"no \[ratepay\] table"):
        RatepaySettings.from_env({}, toml_path=other)


def test_status_api_settings_from_env_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "ratepay.toml"
    toml.write_text(
        '[ratepay]\nPROFILE_ID = "P"\nSECURITY_CODE = "s3cr3t-code"\nMODE = "live"\n'
        'OAUTH_CLIENT_ID = "client-7"\nSTATUS_PROCESSING_OFFSET_HOURS = 6\n'
    )
    settings = RatepaySettings.from_env(
        {"RATEPAY_OAUTH_CLIENT_SECRET": "oauth-" + SECRET}, toml_path=toml
    )
    assert settings.status_lookup_configured and settings.oauth_client_id == "client-7"
    assert settings.status_url == "https://api.ratepay.com/order/status/v2/transactions"
    assert settings.audience == settings.status_url
    assert settings.status_processing_offset_hours == 6.0
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert settings.secrets() == ("s3cr3t-code", "oauth-" + SECRET)


def test_repr_never_shows_the_security_code() -> None:
    settings = RatepaySettings(profile_id="P", security_code=SECRET)
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert "security_code='********'" in repr(settings)


# --- XML helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        b'<!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/hostname">]><r>&e;</r>',
        b'<!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd"><r/>',
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r [<!ENTITY e "x">]><r>&e;</r>'.encode(
            "utf-16"
        ),
    ],
    ids=["xxe", "external-dtd", "utf16-doctype"],
)
def test_parse_xml_refuses_doctypes(document: bytes) -> None:
    with pytest.raises(XmlSecurityError):
        parse_xml(document)


def test_parse_xml_size_cap_and_malformed() -> None:
    with pytest.raises(XmlSecurityError, match="exceeds"):
        parse_xml(b"<r>" + b"x" * 2000 + b"</r>", max_bytes=1000)
    for bad in (b"", b"<r>", b"<r></s>", b"not xml"):
        with pytest.raises(MalformedXmlError):
            parse_xml(bad)
    assert parse_xml(b"<r a='1'>&amp;</r>").text == "&"


def test_mask_security_code_masks_every_form() -> None:
    doc = f"<r><credential><securitycode>{SECRET}</securitycode></credential></r>"
    assert SECRET not in mask_security_code(doc)
    assert "<securitycode>********</securitycode>" in mask_security_code(doc.encode())
    assert SECRET not in mask_security_code(f"<p:securitycode x='1'>{SECRET}</p:securitycode>")
    assert SECRET not in mask_security_code(f"<securitycode><![CDATA[{SECRET}]]></securitycode>")
    truncated = f"<r><securitycode>{SECRET[:20]}"
    assert SECRET[:20] not in mask_security_code(truncated)


def _masked_by_the_patterns(text: str) -> str:
    """``mask_security_code`` without its shortcut for documents that cannot match."""
    from ratepay_oms.ratepay.xml import _SECURITYCODE, _SECURITYCODE_OPEN, MASK

    masked = _SECURITYCODE.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
    for opening in _SECURITYCODE_OPEN.finditer(masked):
        if not masked.startswith(MASK + "</", opening.end()):
            return masked[: opening.end()] + MASK
    return masked


@given(
    st.lists(
        st.sampled_from(
            ["<", "</", ">", "/>", "p:", " a='1'", "securitycode", "SECURITYCODE", "SecurityCode",
             "\u017fecuritycode", "secur\u0131tycode", "secur\u0130tycode", "code", "CODE",
             "ycode", "yCoDe",
             "\u212a", "x", " ", "\n", SECRET[:8], "<![CDATA[", "]]>", "ümlaut"]
        ),
        max_size=30,
    ).map("".join)
)
@example("<\u017fecuritycode>x</securitycode>")
@example("<secur\u0131tycode>x")
def test_mask_security_code_masks_what_the_patterns_mask(text: str) -> None:
    """The shortcut (no "ycode" in any case: nothing to mask) never changes the answer, also
    for the characters the patterns match case-insensitively beyond ASCII (ſ, ı, İ, K)."""
    assert mask_security_code(text) == _masked_by_the_patterns(text)
    assert mask_security_code(text.encode()) == _masked_by_the_patterns(text)


def test_format_amount_rounds_half_up_and_refuses_floats() -> None:
    assert format_amount(Decimal("12.345")) == "12.35"
    assert format_amount(Decimal("-7.5")) == "-7.50"
    assert format_amount(Decimal("-0.004")) == "0.00"
    assert format_amount(19) == "19.00"
    with pytest.raises(TypeError):
        format_amount(12.5)  # type: ignore[arg-type]
    for bad in ("", "1,5", "NaN", "1e3", None):
        with pytest.raises(MalformedXmlError):
            parse_amount(bad)


@given(st.decimals(min_value=-(10**9), max_value=10**9, places=2, allow_nan=False))
def test_amounts_round_trip(value: Decimal) -> None:
    assert parse_amount(format_amount(value)) == value


# --- SQL API log sink on every dialect ----------------------------------------------------


@pytest.fixture
def log_engine(server_db_url: str):
    engine = sa.create_engine(server_db_url)
    Base.metadata.create_all(engine, tables=[ApiLogEntry.__table__])
    with engine.begin() as conn:
        conn.execute(sa.delete(ApiLogEntry))
    yield engine
    engine.dispose()


def test_sql_api_log_records_every_call_with_the_code_masked(
    log_engine, sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = sandbox.settings["SECURITY_CODE"]
    settings = RatepaySettings.from_mapping({**sandbox.settings, "READ_TIMEOUT": "0.5"})
    facade = RatepayFacade(settings, api_log=SqlApiLogSink(sessionmaker(log_engine)))
    tx = facade.init_payment().transaction_id
    declined = facade.request_payment(
        tx, example_customer("Ablehnung"), example_basket(), PaymentInfo("INVOICE"), order_id="O-1"
    )
    assert declined.declined
    sandbox.gateway.faults.add(Fault("delay", operation="PROFILE_REQUEST", delay_s=1.0))
    with pytest.raises(RatepayTransportError):
        facade.request_profile()

    with log_engine.connect() as conn:
        rows = conn.execute(sa.select(ApiLogEntry.__table__).order_by(ApiLogEntry.id)).all()
    assert [(r.operation, r.success, r.result_code) for r in rows] == [
        ("PAYMENT_INIT", True, "350"),
        ("PAYMENT_REQUEST", False, "401"),
        ("PROFILE_REQUEST", False, None),
    ]
    assert rows[1].transaction_id == tx and rows[1].order_ref == "O-1"
    assert rows[1].reason_code == "703" and rows[1].duration_ms is not None
    assert "timeout" in rows[2].error and rows[2].response_xml is None
    for row in rows:
        assert secret not in " ".join(str(v) for v in row)
        assert "<securitycode>********</securitycode>" in row.request_xml
    assert secret not in caplog.text
