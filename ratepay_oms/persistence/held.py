"""Rows a gateway call produces (its API-log rows), held back while the engine sends it and
written by the transaction that settles it.

Written at once, each row costs a connection checkout (with its pre-ping) and a statement that
commits by itself; the engine settles every call in a transaction right after the answer, so
the rows ride along in it as one multi-row INSERT instead. The rows must still survive a
rollback of that transaction (a failed settle is when the log is needed most): whatever the
settling transaction did not commit is written the old way, each row in a transaction of its
own (:meth:`HeldRows.write_apart`).

Per call, never shared: the drive sets a :class:`HeldRows` for the thread that sends the call
(:func:`holding`, a context variable, so calls on the pool's other threads hold their own), and
a writer asks :func:`held_for` whether the current call holds rows for its database.

On PostgreSQL the rows need not even be a statement of their own: a writer that can give them
as one INSERT (:meth:`RidingWriter.rider`) lets them ride on the settle's compare-and-set as a
data-modifying CTE (:meth:`HeldRows.rider`), which PostgreSQL runs to completion whatever the
statement around it returns. Should the database refuse them there, the settle is run again
without them and they are written apart, as when they are refused on their own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Connection, Engine, TextClause

log = logging.getLogger(__name__)


class RowWriter(Protocol):
    """Writes rows of one table held back for a settling transaction."""

    def write_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """All ``rows`` on ``conn`` (inside the settling transaction), as one statement."""
        ...

    def write_each(self, rows: list[dict[str, Any]]) -> None:
        """Each row in a transaction of its own; logs its own failures, never raises."""
        ...


@runtime_checkable
class RidingWriter(RowWriter, Protocol):
    """A writer whose rows can ride on another statement (see the module docstring)."""

    def rider(self, conn: Connection, rows: list[dict[str, Any]]) -> Rider | None:
        """``rows`` as one INSERT and its parameters (named so that no table's column is
        among them), or ``None`` when they do not fit one."""
        ...


@dataclass(frozen=True)
class Rider:
    """Held rows as one INSERT for another statement to carry (a CTE on PostgreSQL)."""

    statement: TextClause
    """The same object for the same shape of rows, so the carrying statement built around it
    is built once (and its compiled form cached once)."""
    params: dict[str, Any]


class HeldRows:
    """The rows one gateway call produced for ``engine``'s database, until they are written.

    Used by one thread at a time (the one sending the call, then the one settling it: the
    same), so no lock."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._rows: dict[RowWriter, list[dict[str, Any]]] = {}

    def add(self, writer: RowWriter, row: dict[str, Any]) -> None:
        self._rows.setdefault(writer, []).append(row)

    def __bool__(self) -> bool:
        return bool(self._rows)

    def write_in(self, conn: Connection) -> bool:
        """Write the rows on ``conn``, first thing in the settling transaction. ``True`` when
        they went in; they count as written only once that transaction committed
        (:meth:`clear`), until then :meth:`write_apart` still writes them. ``False`` (logged)
        when the database refused them: the caller rolls that transaction back and settles in
        a new one without them (nothing else ran in it yet; PostgreSQL could not go on in it),
        so a row the database refuses never costs a booking its settle, and no savepoint is
        paid for on every settle to allow for it."""
        if not self._rows:
            return False
        try:
            for writer, rows in self._rows.items():
                writer.write_rows(conn, rows)
        except Exception:
            log.warning("held API-log rows not written with the settle; writing them apart",
                        exc_info=True)
            return False
        return True

    def rider(self, conn: Connection) -> Rider | None:
        """The rows as one :class:`Rider` for a statement on ``conn`` to carry: only on
        PostgreSQL (its CTEs may insert), only when one writer holds them all and can give
        them so; else ``None`` and :meth:`write_in` writes them. They count as written, as
        there, once the carrying transaction committed (:meth:`clear`). Raises what the
        writer raises (it may read the database to fill the rows in)."""
        if conn.dialect.name != "postgresql" or len(self._rows) != 1:
            return None
        ((writer, rows),) = self._rows.items()
        if not isinstance(writer, RidingWriter):
            return None
        return writer.rider(conn, rows)

    def clear(self) -> None:
        """The settling transaction committed with the rows in it."""
        self._rows.clear()

    def write_apart(self) -> None:
        """Write whatever is still held, each row in a transaction of its own (the settling
        transaction rolled back, or never ran). Never raises."""
        rows, self._rows = self._rows, {}
        for writer, batch in rows.items():
            try:
                writer.write_each(batch)
            except Exception:  # write_each logs its own; this is the last guard
                log.exception("could not write %d held row(s)", len(batch))


_current: ContextVar[HeldRows | None] = ContextVar("ratepay_oms_held_rows", default=None)


@contextmanager
def holding(held: HeldRows | None) -> Iterator[None]:
    """Rows written to ``held.engine`` inside the block are held in ``held`` (``None``: none
    are held, as outside any block)."""
    token = _current.set(held)
    try:
        yield
    finally:
        _current.reset(token)


def held_for(engine: Engine) -> HeldRows | None:
    """Where a row for ``engine``'s database goes instead of being written at once: the
    current call's holder when it is for that very engine, else ``None`` (write at once)."""
    held = _current.get()
    return held if held is not None and held.engine is engine else None
