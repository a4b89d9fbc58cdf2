"""Every problem a process file can have, each with its file:line and message.

Files are written into a temporary directory and loaded by a relative path, so the messages
read exactly as a user sees them (``P01.yaml:4: ...``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ratepay_oms.engine.plugins import ByOrderCommand, PluginRegistry
from ratepay_oms.errors import OmsError
from ratepay_oms.process import ProcessDefinitionError, check_files, load_process

INCLUDES = Path(__file__).parent / "processes" / "includes"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def write(name: str, text: str) -> str:
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    Path(name).write_text(text)
    return name


def problems_of(text: str, name: str = "P01.yaml") -> list[str]:
    """Every problem of one file, as ``file:line: severity: message``."""
    return [p.format() for p in check_files([write(name, text)])]


def error_text(text: str, name: str = "P01.yaml") -> str:
    with pytest.raises(ProcessDefinitionError) as err:
        load_process(write(name, text))
    return str(err.value)


GOOD_HEAD = """\
process: P01
states:
  new: {}
  done: {}
"""


def test_the_error_is_an_oms_error_carrying_problems() -> None:
    with pytest.raises(OmsError) as err:
        load_process(write("P01.yaml", "process: P01\ninitial: start\nstates: {new: {}}\n"))
    assert isinstance(err.value, ProcessDefinitionError)
    (problem,) = err.value.problems
    assert (problem.file, problem.line, problem.severity) == ("P01.yaml", 2, "error")
    assert problem.message == "initial state 'start' is not a state"


def test_yaml_syntax_error_has_file_and_line() -> None:
    text = "process: P01\nstates:\n  new: {}\n  done: [unclosed\ntransitions: []\n"
    (only,) = problems_of(text)
    assert only.startswith("P01.yaml:5: error: YAML syntax error:")


def test_empty_file() -> None:
    assert problems_of("") == [
        "P01.yaml:1: error: file is empty; expected 'process: <Name>' or 'subprocess:'"
    ]


def test_top_level_must_be_a_process_mapping() -> None:
    assert problems_of("- new\n- done\n") == [
        "P01.yaml:1: error: a process file starts with 'process: <Name>' (main) or "
        "'subprocess: <Name>'"
    ]


def test_unknown_keys_are_caught_with_a_suggestion() -> None:
    text = GOOD_HEAD + "transitions:\n  - {source: new, targte: done}\nevnets: {}\n"
    found = problems_of(text)
    assert (
        "P01.yaml:6: error: unknown key 'targte' in transition (did you mean 'target'?); "
        "allowed: source, target, event, condition, happy" in found
    )
    assert "P01.yaml:6: error: transition needs 'target'" in found
    assert any(
        p.startswith("P01.yaml:7: error: unknown key 'evnets' in the file (did you mean 'events'?)")
        for p in found
    )


def test_wrong_types_are_reported() -> None:
    text = """\
process: P01
states:
  new: {reserved: maybe, flags: cancellable}
transitions: {source: new}
events:
  go: [manual]
"""
    found = problems_of(text)
    assert "P01.yaml:3: error: 'reserved' must be true or false, not a string" in found
    assert "P01.yaml:3: error: 'flags' must be a list, not a string" in found
    assert "P01.yaml:4: error: 'transitions' must be a list, not a mapping" in found
    assert "P01.yaml:6: error: event 'go' must be a mapping, not a list" in found


def test_duplicate_state_in_one_file() -> None:
    text = GOOD_HEAD + "  new: {}\ntransitions:\n  - {source: new, target: done}\n"
    assert error_text(text) == ("P01.yaml:5: duplicate state 'new' (first declared at P01.yaml:3)")


def test_duplicate_state_across_included_files() -> None:
    with pytest.raises(ProcessDefinitionError) as err:
        load_process(INCLUDES / "CrossDuplicate.yaml")
    assert str(err.value) == (
        f"{INCLUDES / 'sub' / 'Shipping.yaml'}:3: duplicate state 'shipped' "
        f"(first declared at {INCLUDES / 'CrossDuplicate.yaml'}:6)"
    )


def test_duplicate_event() -> None:
    text = (
        GOOD_HEAD
        + """\
transitions:
  - {source: new, target: done, event: go}
events:
  go: {manual: true}
  go: {on_enter: true}
"""
    )
    assert error_text(text) == "P01.yaml:9: duplicate event 'go' (first declared at P01.yaml:8)"


def test_duplicate_transition() -> None:
    text = (
        GOOD_HEAD
        + """\
transitions:
  - {source: new, target: done, event: go}
  - {source: new, target: done, event: go}
events:
  go: {}
"""
    )
    assert error_text(text) == (
        "P01.yaml:7: duplicate transition 'new' -> 'done' on 'go' (first declared at P01.yaml:6)"
    )


def test_transition_source_and_target_must_be_states() -> None:
    text = """\
process: P01
states:
  new: {}
  shipped: {}
transitions:
  - {source: new, target: shipped}
  - {source: shipped, target: shiped}
  - {source: nowhere, target: shipped}
"""
    text_ = error_text(text)
    assert "P01.yaml:7: transition target 'shiped' is not a state (did you mean 'shipped'?)" in (
        text_
    )
    assert "P01.yaml:8: transition source 'nowhere' is not a state" in text_


def test_transition_event_must_be_defined() -> None:
    text = GOOD_HEAD + "transitions:\n  - {source: new, target: done, event: ship}\n"
    assert error_text(text) == "P01.yaml:6: transition event 'ship' is not an event"


def test_initial_state_must_be_defined() -> None:
    text = "process: P01\nstates:\n  start: {}\n"
    assert error_text(text) == ("P01.yaml:1: initial state 'new' is not a state")


def test_unknown_plugins_only_with_a_registry() -> None:
    text = (
        GOOD_HEAD
        + """\
transitions:
  - {source: new, target: done, event: go, condition: Shop/IsPaid}
  - {source: new, target: new, event: go}
events:
  go: {command: Shop/Charge}
"""
    )
    path = write("P01.yaml", text)
    assert load_process(path).events["go"].command == "Shop/Charge"
    registry = PluginRegistry()
    with pytest.raises(ProcessDefinitionError) as err:
        load_process(path, registry)
    assert str(err.value).splitlines() == [
        "P01.yaml:9: unknown command plugin 'Shop/Charge' (event 'go')",
        "P01.yaml:6: unknown condition plugin 'Shop/IsPaid' "
        "(transition 'new' -> 'done' on 'go' if 'Shop/IsPaid')",
    ]
    registry.register_condition("Shop/IsPaid", lambda ctx, order, item: True)

    class Charge(ByOrderCommand):
        def run(self, ctx: object, order: object, items: object) -> None: ...

    registry.register_by_order("Shop/Charge", Charge())
    assert load_process(path, registry).name == "P01"


def test_unreachable_state() -> None:
    text = GOOD_HEAD + "  island: {}\ntransitions:\n  - {source: new, target: done}\n"
    assert error_text(text) == (
        "P01.yaml:5: state 'island' is unreachable from the initial state 'new'"
    )


def test_more_than_one_on_enter_event_from_one_state() -> None:
    text = (
        GOOD_HEAD
        + """\
transitions:
  - {source: new, target: done, event: a}
  - {source: new, target: done, event: b}
events:
  a: {on_enter: true}
  b: {on_enter: true}
"""
    )
    assert error_text(text) == (
        "P01.yaml:3: state 'new' has more than one on_enter event ('a', 'b'); "
        "only one takes effect: chain them or guard one with a condition"
    )


def test_second_unconditional_transition_for_one_event() -> None:
    text = (
        GOOD_HEAD
        + """\
  other: {}
transitions:
  - {source: new, target: done, event: go}
  - {source: new, target: other, event: go}
events:
  go: {}
"""
    )
    assert error_text(text) == (
        "P01.yaml:8: second unconditional transition from 'new' on event 'go' "
        "(first at P01.yaml:7 goes to 'done'); give one of them a condition"
    )


def test_unused_event_is_a_warning() -> None:
    text = GOOD_HEAD + "transitions:\n  - {source: new, target: done}\nevents:\n  return: {}\n"
    assert problems_of(text) == [
        "P01.yaml:8: warning: event 'return' is declared but no transition uses it"
    ]


def test_bad_timeout() -> None:
    text = (
        GOOD_HEAD
        + """\
transitions:
  - {source: new, target: done, event: close}
events:
  close: {timeout: 90}
"""
    )
    assert error_text(text).startswith(
        "P01.yaml:8: bad timeout '90': write 'N unit' with unit second(s)"
    )


def test_missing_include() -> None:
    with pytest.raises(ProcessDefinitionError) as err:
        load_process(INCLUDES / "MissingInclude.yaml")
    assert str(err.value) == (
        f"{INCLUDES / 'MissingInclude.yaml'}:3: included file "
        f"'{INCLUDES / 'sub' / 'DoesNotExist.yaml'}' does not exist"
    )


def test_include_cycle() -> None:
    with pytest.raises(ProcessDefinitionError) as err:
        load_process(INCLUDES / "CycleMain.yaml")
    assert str(err.value) == (
        f"{INCLUDES / 'sub' / 'CycleB.yaml'}:3: include cycle: "
        "CycleMain.yaml -> CycleA.yaml -> CycleB.yaml -> CycleA.yaml"
    )


def test_including_a_main_process_is_an_error() -> None:
    with pytest.raises(ProcessDefinitionError) as err:
        load_process(INCLUDES / "IncludesMain.yaml")
    assert str(err.value) == (
        f"{INCLUDES / 'CrossDuplicate.yaml'}:1: an included file must be a sub-process "
        "('subprocess:')"
    )


def test_loading_a_subprocess_file_as_a_process_is_an_error() -> None:
    with pytest.raises(ProcessDefinitionError, match="this is a sub-process file"):
        load_process(INCLUDES / "sub" / "Shipping.yaml")


def test_condition_timeout_and_manual_on_one_state_is_a_racy_warning() -> None:
    text = (
        GOOD_HEAD
        + """\
  paid: {}
  expired: {}
transitions:
  - {source: new, target: paid, condition: Shop/IsPaid}
  - {source: new, target: expired, event: expire}
  - {source: new, target: done, event: cancel}
events:
  expire: {timeout: 3 days}
  cancel: {manual: true}
"""
    )
    assert problems_of(text) == [
        "P01.yaml:3: warning: state 'new' mixes a polled condition, a timeout and a manual "
        "event; they race each other (check the condition after the timeout instead)"
    ]


def test_all_problems_are_collected_not_just_the_first() -> None:
    text = """\
process: P01
initial: begin
states:
  new: {}
transitions:
  - {source: new, target: shiped, event: ship, happy: yes please}
events:
  ship: {timeout: never}
"""
    assert error_text(text).splitlines() == [
        "P01.yaml:6: 'happy' must be true or false, not a string",
        "P01.yaml:8: bad timeout 'never': write 'N unit' with unit second(s), minute(s), "
        "hour(s), day(s) or week(s) (or s, m, h, d, w), e.g. '90 days', '1 day 2 hours' or '3d'",
        "P01.yaml:2: initial state 'begin' is not a state",
        "P01.yaml:6: transition target 'shiped' is not a state",
    ]


def test_check_files_never_raises_for_missing_or_unreadable_files() -> None:
    Path("binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    found = [p.format() for p in check_files(["missing.yaml", "binary.yaml", "nodir"])]
    assert found == [
        "missing.yaml: error: no such file",
        "binary.yaml: error: not UTF-8 text",
        "nodir: error: no such file",
    ]


def test_unsafe_yaml_tags_are_never_constructed() -> None:
    text = "process: !!python/object/apply:os.system 'touch pwned'\nstates: {new: {}}\n"
    assert problems_of(text) == [
        "P01.yaml:1: error: 'process' must be a name, not a python/object/apply:os.system value"
    ]
    assert not Path("pwned").exists()


def test_one_file_included_twice_without_prefix() -> None:
    write("sub/Ship.yaml", "subprocess: Ship\nstates:\n  shipped: {}\n")
    text = """\
process: P01
include:
  - sub/Ship.yaml
  - sub/Ship.yaml
states:
  new: {}
transitions:
  - {source: new, target: shipped}
"""
    assert error_text(text) == (
        "P01.yaml:4: 'sub/Ship.yaml' is already included at line 3; "
        "to use a sub-process twice give each include its own prefix"
    )


def test_timeouts_longer_than_ten_years_are_refused() -> None:
    text = (
        GOOD_HEAD
        + """\
transitions:
  - {source: new, target: done, event: close}
events:
  close: {timeout: 99999999999999 weeks}
"""
    )
    assert error_text(text) == (
        "P01.yaml:8: bad timeout '99999999999999 weeks': more than 3660 days"
    )
