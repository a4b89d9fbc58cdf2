"""Loading process files: the good cases (merging, prefixes, locations, directories)."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

import ratepay_oms
from ratepay_oms.process import (
    ProcessDefinitionError,
    UnknownProcessError,
    check_files,
    default_process_dir,
    load_named_process,
    load_process,
    load_processes,
    parse_timeout,
)
from ratepay_oms.process.loader import format_timeout

FIXTURES = Path(__file__).parent / "processes"
VALID = FIXTURES / "valid"
INCLUDES = FIXTURES / "includes"


def test_valid_process_merges_its_subprocesses_and_applies_the_prefix() -> None:
    d = load_process(VALID / "Invoice01.yaml")
    assert d.name == "Invoice01"
    assert d.initial == "new"
    assert d.files == (
        str(VALID / "Invoice01.yaml"),
        str(VALID / "subprocesses" / "Cancel.yaml"),
        str(VALID / "subprocesses" / "Refund.yaml"),
    )
    # the prefixed sub-process: its own states and events renamed, transitions follow
    assert "Return - ready for refund" in d.states
    assert "ready for refund" not in d.states
    assert "Return - refund payment" in d.events
    refund = d.transitions_from("Return - ready for refund", "Return - refund payment")
    assert [t.target for t in refund] == ["Return - refund succeeded", "Return - ready for refund"]
    # the un-prefixed sub-process refers to a state of the main file
    assert d.transitions_from("ready for shipment", "cancel")[0].target == "ready for cancel"


def test_state_and_event_attributes_are_read() -> None:
    d = load_process(VALID / "Invoice01.yaml")
    assert d.states["new"].reserved is True
    assert d.states["payment request initialized"].display == (
        "oms.state.payment-request-initialized"
    )
    assert d.states["payment request initialized"].flags == frozenset({"cancellable"})
    assert d.states["shipped"].reserved is False
    assert d.events["ship"].manual is True
    assert d.events["do payment request"].on_enter is True
    assert d.events["do payment request"].command == "Ratepay/PaymentRequest"
    assert d.events["waiting for return"].timeout == timedelta(days=90)
    eventless = [t for t in d.transitions if t.event is None]
    assert [t.condition for t in eventless] == ["Shop/IsArchived", None]
    assert 'ready "quoted" state' in d.states


def test_locations_point_at_the_declaring_file_and_line() -> None:
    d = load_process(VALID / "Invoice01.yaml")
    assert str(d.states["shipped"].location) == f"{VALID / 'Invoice01.yaml'}:15"
    assert str(d.events["Return - refund payment"].location) == (
        f"{VALID / 'subprocesses' / 'Refund.yaml'}:9"
    )
    assert d.transitions[0].location is not None
    assert d.transitions[0].location.line == 19


def test_relative_path_stays_relative_in_locations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(VALID)
    d = load_process("Invoice01.yaml")
    assert d.files[0] == "Invoice01.yaml"
    assert d.files[1] == str(Path("subprocesses") / "Cancel.yaml")
    assert d.states["new"].location is not None
    assert d.states["new"].location.file == "Invoice01.yaml"


def test_one_subprocess_included_twice_under_two_prefixes() -> None:
    d = load_process(INCLUDES / "TwoReturns.yaml")
    assert {"First - returned", "Second - returned"} <= set(d.states)
    assert {"First - return", "Second - return"} <= set(d.events)
    assert d.events["close"].timeout == timedelta(days=1, hours=2)
    assert d.files.count(str(INCLUDES / "sub" / "Return.yaml")) == 1


def test_default_initial_is_new_and_null_sections_are_allowed(tmp_path: Path) -> None:
    f = tmp_path / "Tiny01.yaml"
    f.write_text("process: Tiny01\nstates:\n  new:\ntransitions:\nevents:\n")
    d = load_process(f)
    assert d.initial == "new"
    assert list(d.states) == ["new"]
    assert d.transitions == ()
    assert d.is_final("new")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90 days", timedelta(days=90)),
        ("90days", timedelta(days=90)),
        ("1 second", timedelta(seconds=1)),
        ("15 minutes", timedelta(minutes=15)),
        ("1 day 2 hours", timedelta(days=1, hours=2)),
        ("2 Weeks", timedelta(weeks=2)),
    ],
)
def test_parse_timeout_accepts_spryker_style_durations(text: str, expected: timedelta) -> None:
    assert parse_timeout(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "90", "1 fortnight", "0 days", "1 day and more"])
def test_parse_timeout_rejects_the_rest(text: str) -> None:
    with pytest.raises(ValueError, match="timeout"):
        parse_timeout(text)


def test_format_timeout_is_readable() -> None:
    assert format_timeout(timedelta(days=90)) == "90 days"
    assert format_timeout(timedelta(days=1, hours=2)) == "1 day 2 hours"
    assert format_timeout(timedelta(seconds=1)) == "1 second"


def test_load_processes_finds_main_files_only() -> None:
    loaded = load_processes(VALID)
    assert list(loaded) == ["Invoice01"]


def test_load_processes_reports_every_broken_file(tmp_path: Path) -> None:
    (tmp_path / "A01.yaml").write_text("process: A01\nstates: {new: {}}\n")
    (tmp_path / "B01.yaml").write_text("process: A01\nstates: {new: {}}\n")
    (tmp_path / "notes.yaml").write_text("hello: world\n")
    (tmp_path / "C01.yaml").write_text("process: C01\nstates: [\n")
    with pytest.raises(ProcessDefinitionError) as err:
        load_processes(tmp_path)
    text = str(err.value)
    assert f"{tmp_path / 'B01.yaml'}:1: process 'A01' is also defined in" in text
    assert f"{tmp_path / 'notes.yaml'}:1: not a process file" in text
    assert f"{tmp_path / 'C01.yaml'}:3: YAML syntax error" in text


def test_load_processes_on_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ProcessDefinitionError, match="process directory does not exist"):
        load_processes(tmp_path / "nope")


def test_load_named_process_ignores_broken_siblings(tmp_path: Path) -> None:
    (tmp_path / "Good01.yaml").write_text("process: Good01\nstates: {new: {}}\n")
    (tmp_path / "Bad01.yaml").write_text("process: Bad01\nstates: {new: {}}\ninitial: gone\n")
    assert load_named_process(tmp_path, "Good01").name == "Good01"
    with pytest.raises(UnknownProcessError, match=r"processes there: Bad01, Good01"):
        load_named_process(tmp_path, "Other01")


def test_warnings_are_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "Warn01.yaml"
    f.write_text("process: Warn01\nstates: {new: {}}\nevents:\n  forgotten: {manual: true}\n")
    with caplog.at_level(logging.WARNING, logger="ratepay_oms.process.loader"):
        d = load_process(f)
    assert "forgotten" in d.events
    assert f"{f}:4: warning: event 'forgotten' is declared but no transition uses it" in (
        caplog.text
    )


def test_check_files_on_the_fixtures_directory_finds_nothing() -> None:
    assert check_files([VALID]) == []


def test_check_files_checks_a_lone_subprocess_without_false_alarms() -> None:
    # Cancel.yaml names 'ready for shipment', declared by the file including it
    assert check_files([VALID / "subprocesses" / "Cancel.yaml"]) == []


def test_default_process_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RATEPAY_OMS_PROCESS_DIR", raising=False)
    shipped = Path(ratepay_oms.__file__).resolve().parent.parent / "processes"
    assert default_process_dir() == shipped
    (tmp_path / "processes").mkdir()
    assert default_process_dir() == Path("processes")
    monkeypatch.setenv("RATEPAY_OMS_PROCESS_DIR", str(tmp_path / "env"))
    assert default_process_dir() == tmp_path / "env"
    assert default_process_dir("given") == Path("given")
