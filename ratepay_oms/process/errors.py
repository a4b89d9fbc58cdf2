"""Problems found in process files, and the error that carries them.

A process file is written by a person, so one mistake rarely comes alone: the loader collects
every problem (``file:line: message``) and raises them together, the way a compiler does, so
the author fixes a file in one round instead of one error per run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ratepay_oms.errors import OmsError

Severity = Literal["error", "warning"]
ERROR: Severity = "error"
WARNING: Severity = "warning"


@dataclass(frozen=True)
class ProcessProblem:
    """One finding in one file; ``line`` is 1-based, ``None`` when no line applies (missing
    file). Warnings are things that load and run but are probably not what the author meant."""

    file: str
    line: int | None
    message: str
    severity: Severity = ERROR

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    @property
    def where(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"

    def __str__(self) -> str:
        if self.is_error:
            return f"{self.where}: {self.message}"
        return f"{self.where}: warning: {self.message}"

    def format(self) -> str:
        """``file:line: severity: message`` (what ``process check`` prints)."""
        return f"{self.where}: {self.severity}: {self.message}"


class ProcessDefinitionError(OmsError):
    """One or more process files are wrong; ``problems`` holds every finding (errors first).

    ``str()`` is one problem per line, so the CLI's one-line error print stays readable.
    """

    def __init__(self, problems: Iterable[ProcessProblem]) -> None:
        ordered = sorted(problems, key=lambda p: not p.is_error)
        self.problems: tuple[ProcessProblem, ...] = tuple(ordered)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid process definition")

    @property
    def errors(self) -> tuple[ProcessProblem, ...]:
        return tuple(p for p in self.problems if p.is_error)


def has_errors(problems: Sequence[ProcessProblem]) -> bool:
    return any(p.is_error for p in problems)


class ProcessCheckFailed(OmsError):
    """``process check`` found errors (they were printed already; this carries the count)."""


class UnknownProcessError(OmsError):
    """A process name nobody defined (in the processes directory that was searched)."""


class RenderError(OmsError):
    """A drawing could not be rendered to an image (no Graphviz, or Graphviz failed)."""
