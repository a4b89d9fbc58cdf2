"""``--older-than``: an age such as ``365d``, ``12h``, ``2w`` or ``90 days``.

The compact form is turned into the process files' spelling and read by the one duration
parser (``process.loader.parse_timeout``), so units mean the same everywhere.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import click

_COMPACT = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week"}


def parse_age(text: str) -> timedelta:
    """``365d`` / ``12h`` / ``30m`` / ``2w`` / ``45s``, or ``1 day 2 hours``; ``ValueError``
    with a message for the user otherwise."""
    from ratepay_oms.process.loader import parse_timeout

    match = _COMPACT.match(text)
    spelled = f"{match.group(1)} {_UNITS[match.group(2).lower()]}" if match else text
    try:
        return parse_timeout(spelled)
    except ValueError:
        raise ValueError(
            f"not an age: {text!r} (e.g. 365d, 12h, 2w, or '90 days')"
        ) from None


class Age(click.ParamType):
    name = "AGE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_age(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
