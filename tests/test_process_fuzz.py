"""Whatever a file holds, the loader answers with a definition or a ``ProcessDefinitionError``.

Any other exception (a ``KeyError`` on a half-read file, a ``TypeError`` on a list where a
mapping belongs) would be a crash in ``process check`` or in the engine's start-up.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratepay_oms.process import ProcessDefinition, ProcessDefinitionError, check_files, load_process

KEYS = [
    "process", "subprocess", "initial", "include", "states", "transitions", "events",
    "source", "target", "event", "condition", "happy", "display", "flags", "reserved",
    "command", "on_enter", "manual", "timeout", "file", "prefix",
]  # fmt: skip
NAMES = st.sampled_from(["new", "done", "a", "b", "x y", "Sub.yaml", "..", ""]) | st.text(
    max_size=6
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-5, 100)
    | NAMES
    | st.sampled_from(["90 days", "1 day 2 hours", "0 seconds", "soon"])
    | st.integers(0, 10**30).map(lambda n: f"{n} weeks")
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | NAMES, inner, max_size=4)
    ),
    max_leaves=25,
)
DOCUMENTS = st.dictionaries(st.sampled_from(KEYS) | NAMES, VALUES, max_size=7)
MAIN_DOCUMENTS = st.builds(lambda name, doc: {"process": name, **doc}, NAMES, DOCUMENTS)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "Sub.yaml").write_text("subprocess: Sub\nstates: {a: {}}\n")
        yield Path(d)


def _outcome(path: Path) -> ProcessDefinition | ProcessDefinitionError:
    problems = check_files([path])  # never raises either
    assert all(p.file and p.message for p in problems)
    try:
        return load_process(path)
    except ProcessDefinitionError as exc:
        assert exc.problems
        return exc


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(doc=MAIN_DOCUMENTS | DOCUMENTS | VALUES)
def test_random_structures_load_or_raise_a_process_error(workdir: Path, doc: object) -> None:
    path = workdir / "Fuzz.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _outcome(path)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_load_or_raise_a_process_error(workdir: Path, data: bytes) -> None:
    path = workdir / "Garbage.yaml"
    path.write_bytes(data)
    _outcome(path)
