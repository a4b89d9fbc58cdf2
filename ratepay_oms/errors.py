"""The base of every error a user of the engine can cause and fix, and the console's exit codes.

The CLI prints an ``OmsError`` as one line (no traceback) and exits with its ``exit_code``;
anything else is a bug and keeps its traceback. Each room subclasses it (process definition
errors, order input errors, RatePAY settings and transport errors, …) with a message that says
what to do.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit statuses of ``ratepay-oms``, defined once (the README's table lists the same).

    A script or supervisor tells "retry later" (the database is away) from "look at the
    orders" (the gateway refused or failed) from "fix the command" without parsing output.
    """

    OK = 0
    """Done; every gateway call the command made succeeded."""
    ERROR = 1
    """Refused or failed: bad input, unknown order or event, a process file error, a
    configuration error, another tick worker holds the SQLite database. Nothing was written."""
    USAGE = 2
    """The command line itself is wrong (unknown option, missing argument)."""
    DATABASE_UNAVAILABLE = 3
    """The database cannot be reached, or its schema was never created or is not upgraded."""
    GATEWAY_FAILED = 4
    """Done, but a gateway call failed or was refused, or a command failed: the items are where
    the next tick retries or a person decides (``order show`` says which)."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C before the command finished."""


class OmsError(Exception):
    """An error caused by input, configuration or the outside world, not by a bug."""

    exit_code: int = ExitCode.ERROR
