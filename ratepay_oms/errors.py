"""The base of every error a user of the engine can cause and fix.

The CLI prints an ``OmsError`` as one line (no traceback) and exits non-zero; anything else is
a bug and keeps its traceback. Each room subclasses it (process definition errors, order input
errors, RatePAY settings and transport errors, …) with a message that says what to do.
"""

from __future__ import annotations


class OmsError(Exception):
    """An error caused by input, configuration or the outside world, not by a bug."""

    exit_code: int = 1
