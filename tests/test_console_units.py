"""Console pieces that need no database: secret masking, state map files, age buckets."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from ratepay_oms.console.apilog import is_failure, mask_text
from ratepay_oms.console.matrix import bucket_bounds
from ratepay_oms.console.migrate import MigrationError, load_state_map

SECRET = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "text",
    [
        f"<securitycode>{SECRET}</securitycode>",
        f"<rp:securitycode>{SECRET}</rp:securitycode>",
        f"<head><securitycode>{SECRET}",  # truncated document
        f'{{"security_code": "{SECRET}"}}',
        f"SECURITY_CODE={SECRET} timeout",
        f"echoed back: {SECRET}",
    ],
)
def test_mask_text_hides_the_security_code_in_every_spelling(text: str) -> None:
    masked = mask_text(text, secret=SECRET)
    assert masked is not None and SECRET not in masked and "********" in masked


def test_failed_calls_are_declines_transport_errors_and_unknown_outcomes() -> None:
    assert [
        is_failure(s, e) for s, e in [(True, None), (False, None), (None, None), (True, "timeout")]
    ] == [False, True, True, True]


def test_state_map_reads_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("shipped: dispatched\n'payment pending': new\n")
    (tmp_path / "m.json").write_text('{"shipped": "dispatched"}')
    assert load_state_map(tmp_path / "m.yaml") == {
        "shipped": "dispatched",
        "payment pending": "new",
    }
    assert load_state_map(tmp_path / "m.json") == {"shipped": "dispatched"}


@pytest.mark.parametrize("content", ["[a, b]", "{}", "shipped: [x]", "shipped: {", "a: ''"])
def test_a_bad_state_map_is_refused_with_the_reason(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(MigrationError, match=r"bad\.yaml"):
        load_state_map(path)


def test_age_buckets_start_at_midnight_and_seven_days_back() -> None:
    today, week = bucket_bounds(datetime(2024, 8, 1, 12, 30))
    assert (today, week) == (datetime(2024, 8, 1), datetime(2024, 7, 25, 12, 30))
