"""The console's logging: the library only logs (``logging.getLogger("ratepay_oms…")`` with a
``NullHandler``); the command line decides where it goes.

``--log-level`` (default warning) and ``--log-format text|json`` put one handler on stderr.
JSON lines carry ``time`` (UTC ISO 8601), ``level``, ``logger``, ``message`` and, for an
exception, ``exc_type`` and ``exc`` (the one-line message, no traceback).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_HANDLER_NAME = "ratepay-oms-cli"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log collectors (journald, Loki, CloudWatch)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            data["exc_type"] = type(record.exc_info[1]).__name__
            data["exc"] = str(record.exc_info[1]).splitlines()[0] if str(record.exc_info[1]) else ""
        return json.dumps(data, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message``; an exception adds its one-line message, not a traceback
    (the console never shows one for what a user can fix; ``--log-level debug`` keeps them)."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.tracebacks = tracebacks

    def formatException(self, ei):  # type: ignore[no-untyped-def]
        if self.tracebacks:
            return super().formatException(ei)
        return f"  {type(ei[1]).__name__}: {str(ei[1]).splitlines()[0] if str(ei[1]) else ''}"


class _OursOrWarnings(logging.Filter):
    """Our records at the chosen level; other libraries' (Alembic, SQLAlchemy, urllib3) at
    warning and above, so ``--log-level info`` shows the engine's lines, not theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("ratepay_oms") or record.levelno >= logging.WARNING


_installed: dict[str, Any] = {}
"""What ``configure_logging`` changed: the handler, and the root level it replaced (if any)."""


def configure_logging(level: str, fmt: str) -> None:
    """Install (or replace) the console's stderr handler on the root logger; ``reset_logging``
    takes it away again (``main()`` does, so an application that calls ``main()`` in-process
    keeps its own logging as it was)."""
    reset_logging()
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    numeric = getattr(logging, level.upper())
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter(tracebacks=numeric <= logging.DEBUG)
    )
    handler.setLevel(numeric)
    handler.addFilter(_OursOrWarnings())
    root.addHandler(handler)
    _installed["handler"] = handler
    if root.level == logging.NOTSET or root.level > numeric:
        _installed["previous_level"] = root.level
        _installed["level"] = numeric
        root.setLevel(numeric)


def reset_logging() -> None:
    """Remove the handler; put the root level back if it is still the one we set (someone
    else may have changed it since, e.g. a test's caplog)."""
    root = logging.getLogger()
    handler = _installed.pop("handler", None)
    if handler is not None:
        root.removeHandler(handler)
    previous = _installed.pop("previous_level", None)
    ours = _installed.pop("level", None)
    if previous is not None and root.level == ours:
        root.setLevel(previous)
