"""What every console query shares: the clock and getting a session from what the caller has."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from ratepay_oms.errors import OmsError


class ConsoleError(OmsError):
    """An operator request the console refuses (unknown order, bad map file, …)."""


def utc_now() -> datetime:
    """Naive UTC, like every timestamp in the tables."""
    return datetime.now(UTC).replace(tzinfo=None)


@contextmanager
def session_of(source: Any) -> Iterator[Session]:
    """A session from an ``Engine`` (ours: ``.session()``), a ``sessionmaker`` or a ``Session``.

    A session handed in stays the caller's: it is neither committed nor closed here, so the
    queries can run inside the caller's unit of work.
    """
    if isinstance(source, Session):
        yield source
        return
    if hasattr(source, "session") and callable(source.session):
        with source.session() as session:
            yield session
        return
    if callable(source):
        with source() as session:
            yield session
        return
    raise TypeError(f"cannot get a database session from {type(source).__name__}")
