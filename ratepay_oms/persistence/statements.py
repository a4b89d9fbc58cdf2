"""Prebuilt statements that return no rows, sent as the SQL text the driver takes.

The drive loop runs about twenty statements per order, each built once (every value a named
parameter). ``Connection.execute`` would still hash each one's cache key, look its compiled
form up and build its parameters anew on every call: about a quarter of a statement's client
CPU, and the statements are most of the engine's. Where the driver takes named parameters
(psycopg, PyMySQL), a qualifying statement is compiled once per dialect and its text sent with
``exec_driver_sql``; events (the statement counters, tracing), error wrapping and ``rowcount``
are the same. Everything else goes through ``execute`` as before, so a caller never has to
know which path ran.

A statement qualifies when it is an INSERT, UPDATE or DELETE without RETURNING (a textual one
too) and SQLAlchemy would do nothing to its values on the way: every parameter a plain named
one or a constant of the statement's (sent along), no value or bind processing (a boolean's
check that it is a bool aside, where the database has booleans), nothing rendered per
execution (expanding ``IN``), no translated schema. Statements that return rows stay with
``execute``: sent as text, their result would be described anew from the cursor on every
call, which costs what the text saves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from weakref import WeakKeyDictionary

from sqlalchemy import Boolean, Connection, CursorResult, Dialect, Executable, TextClause


@dataclass(frozen=True)
class DriverText:
    """A statement as the driver takes it."""

    sql: str
    names: frozenset[str]
    """The parameters the caller gives (the ones without a value of their own): exactly these,
    as the text was compiled for them."""
    constants: dict[str, Any]
    """The values written into the statement (``status = 'pending'``), by parameter name."""


_DRIVER_SQL: WeakKeyDictionary[Dialect, dict[Executable, DriverText | None]] = (
    WeakKeyDictionary()
)
"""Per dialect (engine), the driver's form of each prebuilt statement, or ``None`` for one left
to ``Connection.execute``. Bounded: one entry per prebuilt statement, gone with the engine's
dialect."""

_WRITES = re.compile(r"\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
_RETURNING = re.compile(r"\bRETURNING\b", re.IGNORECASE)


def execute_rowless(
    conn: Connection, statement: Executable, params: dict[str, Any]
) -> CursorResult[Any]:
    """Run a prebuilt INSERT, UPDATE or DELETE that returns no rows, ``params`` naming its
    values (see the module docstring)."""
    dialect = conn.dialect
    texts = _DRIVER_SQL.get(dialect)
    if texts is None:
        texts = _DRIVER_SQL.setdefault(dialect, {})
    if statement in texts:
        found = texts[statement]
    else:
        found = texts[statement] = _driver_sql(statement, dialect, params)
    if (
        found is None
        # Other names than its text's: ``execute`` would compile it for those columns.
        or params.keys() != found.names
        or conn.get_execution_options().get("schema_translate_map")
    ):
        return conn.execute(statement, params)
    return conn.exec_driver_sql(
        found.sql, {**params, **found.constants} if found.constants else params
    )


def _driver_sql(
    statement: Executable, dialect: Dialect, params: Mapping[str, Any]
) -> DriverText | None:
    """The SQL text to send for ``statement`` as it is and the parameters it names, or
    ``None`` when it does not qualify (the module docstring)."""
    compiled = cast(Any, statement).compile(dialect=dialect, column_keys=list(params))
    if (
        dialect.positional
        or compiled.positional
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or compiled.escaped_bind_names
    ):
        return None
    if isinstance(statement, TextClause):
        if not _WRITES.match(statement.text) or _RETURNING.search(statement.text):
            return None
    elif not (compiled.isinsert or compiled.isupdate or compiled.isdelete) or compiled.returning:
        return None
    native_bool = dialect.supports_native_boolean
    names: set[str] = set()
    constants: dict[str, Any] = {}
    for bind, name in compiled.bind_names.items():
        if bind.callable is not None or (
            bind.type._cached_bind_processor(dialect) is not None
            # SQLAlchemy's Boolean only checks a value is a bool (or 0/1) where the database
            # has booleans; the driver takes a bool as it is.
            and not (native_bool and isinstance(bind.type, Boolean))
        ):
            return None
        if bind.required:
            names.add(name)
        else:
            constants[name] = bind.value
    return DriverText(str(compiled.string), frozenset(names), constants)
