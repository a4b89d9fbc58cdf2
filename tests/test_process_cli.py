"""``ratepay-oms process list|check|draw`` through Click, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pydot
import pytest
from click.testing import CliRunner, Result

import ratepay_oms.cli.process  # noqa: F401  (attaches the group to ``cli``)
from ratepay_oms.cli import cli, main
from ratepay_oms.errors import OmsError

VALID = Path(__file__).parent / "processes" / "valid"

PLAIN = """\
process: Plain01
states:
  new: {}
  done: {}
transitions:
  - {source: new, target: done, event: finish, happy: true}
events:
  finish: {manual: true}
"""


@pytest.fixture
def plain_dir(tmp_path: Path) -> Path:
    (tmp_path / "Plain01.yaml").write_text(PLAIN)
    return tmp_path


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["process", *args], env=env)


def test_list_prints_a_table(plain_dir: Path) -> None:
    result = run("list", "--dir", str(plain_dir))
    assert result.exit_code == 0, result.output
    assert "Plain01" in result.output
    assert "Plain01.yaml" in result.output


def test_list_json_uses_the_environment_directory(plain_dir: Path) -> None:
    result = run("list", "--json", env={"RATEPAY_OMS_PROCESS_DIR": str(plain_dir)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [
        {
            "name": "Plain01",
            "initial": "new",
            "states": 2,
            "transitions": 1,
            "events": 1,
            "files": [str(plain_dir / "Plain01.yaml")],
        }
    ]


def test_list_json_of_the_fixture_process_lists_its_included_files() -> None:
    result = run("list", "--json", "--dir", str(VALID))
    (row,) = json.loads(result.output)
    assert row["name"] == "Invoice01"
    assert len(row["files"]) == 3


def test_check_ok_prints_a_summary(plain_dir: Path) -> None:
    result = run("check", "--dir", str(plain_dir))
    assert result.exit_code == 0, result.output
    assert result.output == f"OK: {plain_dir} has no errors (0 warning(s))\n"


def test_check_warnings_alone_pass(plain_dir: Path) -> None:
    f = plain_dir / "Plain01.yaml"
    f.write_text(PLAIN + "  unused: {}\n")
    result = run("check", str(f))
    assert result.exit_code == 0, result.output
    assert f"{f}:9: warning: event 'unused' is declared but no transition uses it" in result.output


def test_check_errors_print_each_problem_and_exit_1(plain_dir: Path) -> None:
    f = plain_dir / "Plain01.yaml"
    f.write_text(
        PLAIN.replace("target: done", "targte: done").replace(
            "{manual: true}", "{command: Test/NoSuchCommand}"
        )
    )
    result = run("check", str(f))
    assert result.exit_code == 1
    assert isinstance(result.exception, OmsError)
    lines = result.output.splitlines()
    assert f"{f}:6: error: transition needs 'target'" in lines
    assert f"{f}:8: error: unknown command plugin 'Test/NoSuchCommand' (event 'finish')" in lines


def test_check_through_main_prints_one_error_line(
    plain_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (plain_dir / "Broken01.yaml").write_text("process: Broken01\ninitial: x\nstates: {new: {}}\n")
    assert main(["process", "check", "--dir", str(plain_dir)]) == 1
    out, err = capsys.readouterr()
    assert f"{plain_dir / 'Broken01.yaml'}:2: error: initial state 'x' is not a state" in out
    assert "error: 1 error(s), 0 warning(s)" in err
    assert "Traceback" not in err


def test_draw_dot_to_stdout_parses(plain_dir: Path) -> None:
    result = run("draw", "Plain01", "--dir", str(plain_dir))
    assert result.exit_code == 0, result.output
    (graph,) = pydot.graph_from_dot_data(result.output)
    assert len(graph.get_edges()) == 1


def test_draw_mermaid_to_a_file(plain_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain.mmd"
    result = run("draw", "Plain01", "--dir", str(plain_dir), "-o", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("flowchart TD")
    assert '"new"' in text and '"done"' in text


@pytest.mark.skipif(
    shutil.which("dot") is None and os.environ.get("CI") != "true",
    reason="Graphviz is not installed (under CI it must be: .ci/run installs it)",
)
def test_draw_svg_by_suffix(plain_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain.svg"
    result = run("draw", "Plain01", "--dir", str(plain_dir), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert b"<svg" in out.read_bytes()


def test_draw_unknown_process_names_the_known_ones(plain_dir: Path) -> None:
    result = run("draw", "Nope01", "--dir", str(plain_dir))
    assert result.exit_code == 1
    assert "no process 'Nope01'" in str(result.exception)
    assert "Plain01" in str(result.exception)


@pytest.mark.parametrize("command", ["list", "check", "draw"])
def test_every_command_help_has_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "ratepay-oms process" in result.output
