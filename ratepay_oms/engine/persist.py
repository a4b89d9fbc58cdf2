"""Set-based writes of what the runner decided: state moves, history, log, timeouts.

A tick may move thousands of items the same way (same source, event and target), so each such
group goes to the database as a handful of statements per chunk of ids, not as one ORM flush
per row: one ``UPDATE … WHERE id IN (…)``, and the history, transition-log and timeout rows as
``INSERT … SELECT`` from those same item rows. Every value of such a row is either the item's
(``id``, ``order_id``) or the same for the whole group, so the rows never travel through Python
as parameters: no per-row dicts, no per-row bind processing, and on PostgreSQL no pipelined
statement per row (psycopg's ``executemany``). The ids themselves travel as one parameter where
the database can take that: an array on PostgreSQL (``= ANY(%s::INTEGER[])``, so the statement
text stays the same and the server keeps it prepared; sent as its text ``{1,2,3}``, see
:class:`IntArrayText`), a JSON array on SQLite (``IN (SELECT value FROM
json_each(?))``), instead of an ``IN`` list of a thousand placeholders that SQLAlchemy renders
and the database parses anew for every statement. MariaDB gets the ``IN`` list.

The ORM objects the runner still holds get the written values as their *committed* state, so
the session neither re-writes nor re-reads them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    Connection,
    Dialect,
    Executable,
    Integer,
    String,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    delete,
    false,
    func,
    insert,
    literal,
    literal_column,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeEngine, UserDefinedType

from ratepay_oms.engine.verdict import Verdict
from ratepay_oms.ops import instruments
from ratepay_oms.persistence.conditions import ConditionResult
from ratepay_oms.persistence.models import (
    OUTBOX_PENDING,
    EventTimeout,
    Order,
    OrderItem,
    OutboxEntry,
    StateHistory,
    TransitionLog,
)
from ratepay_oms.persistence.statements import execute_rowless
from ratepay_oms.process.model import EventDef, ProcessDefinition

CHUNK = 1000
"""Ids per ``IN (…)`` list: well under every dialect's bind-parameter limit."""

MAX_DETAIL = 4000
"""Characters of a condition's ``read`` kept in ``oms_condition_result.detail``."""

T = TypeVar("T")


def chunked(values: Sequence[T], size: int = CHUNK) -> list[Sequence[T]]:
    """``values`` in consecutive parts of at most ``size`` (none when empty). A list, not a
    generator: nearly every call has one part (an order's items), and a generator costs a
    call to start, one per part and one to end."""
    if len(values) <= size:
        return [values] if values else []
    return [values[start : start + size] for start in range(0, len(values), size)]


def id_in(
    column: InstrumentedAttribute[int], ids: Sequence[int], session: Session
) -> ColumnElement[bool]:
    """``column IN (ids)``, with the ids as one parameter on PostgreSQL and SQLite (see the
    module docstring)."""
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        return column == any_(bindparam(None, _ids_value(ids, "array"), type_=IntArrayText()))
    if dialect.name == "sqlite" and _sqlite_has_json(dialect):
        values = func.json_each(bindparam(None, json.dumps(list(ids)), type_=String))
        return column.in_(select(values.table_valued("value").c.value))
    return column.in_(ids)


def _sqlite_has_json(dialect: Dialect) -> bool:
    """JSON functions are built into SQLite from 3.38 (before, only if compiled in)."""
    version = getattr(dialect.loaded_dbapi, "sqlite_version_info", (0,))
    return bool(version >= (3, 38))


def _table(model: type[Any]) -> Table:
    """A mapped class's table, typed as one (``__table__`` is only a ``FromClause``)."""
    return cast(Table, model.__table__)


@dataclass(frozen=True)
class MoveKey:
    """What a group of moved items share: everything in their history and log rows but the
    item's own ids."""

    process: str
    source: str
    target: str
    event: str | None
    command: str | None = None
    condition: str | None = None
    forced: Forced | None = None


@dataclass(frozen=True)
class Forced:
    """A move a person forced (``order move``): who did it and why, for history and log."""

    actor: str
    reason: str

    def columns(self) -> dict[str, Any]:
        return {"forced": True, "actor": self.actor, "reason": self.reason}


@dataclass(frozen=True)
class Origin:
    """Who wrote a log row: the machine and the program (Spryker's ``hostname``/``path``)."""

    hostname: str
    argv: str

    @classmethod
    def current(cls) -> Origin:
        argv = " ".join([os.path.basename(sys.argv[0]) if sys.argv else "", *sys.argv[1:]])
        return cls(hostname=socket.gethostname()[:255], argv=argv.strip()[:2000])


@dataclass(frozen=True)
class Moves:
    """Items of one order taking one transition together (``key.condition`` is the one that
    let them pass, if any): a whole group when its transition needs no condition, else each
    run of consecutive items the conditions sent the same way. One object per run, not per
    item: a 10,000-unit order moves four times while it is placed, and everything after the
    choice (the writes, the committed values, the next round's groups) is the same for the
    whole run."""

    key: MoveKey
    order: Order
    items: list[OrderItem]
    then: MoveKey | None = None
    """A second transition the run takes on at once (``key.target`` only passes it on:
    ``Runner._passed_on``): written with the first as one statement, a history and a log row
    for each."""


_ConditionRow = tuple[int, int, tuple[str, str, str | None, str], bool, str | None]

_CLEARED_RETRY: dict[str, Any] = {
    "retry_event": None,
    "retry_at": None,
    "attempts": 0,
    "last_error": None,
}

_CLEARED_RETRY_SQL: dict[str, Any] = {
    "retry_event": null(),
    "retry_at": null(),
    "attempts": literal_column("0", Integer),
    "last_error": null(),
}
""":data:`_CLEARED_RETRY` as SQL constants for the prebuilt statements: the same for every
move, so written into the statement's text once, not sent as four parameters each time."""


class StateWriter:
    """Buffers log rows and writes moves for one unit of work (one open transaction)."""

    def __init__(self, session: Session, now: datetime, origin: Origin) -> None:
        self.session = session
        self.now = now
        self.origin = origin
        self._log_rows: list[dict[str, Any]] = []
        self._condition_rows: dict[tuple[int, str], _ConditionRow] = {}
        """Per (item id, condition): (item id, order id, (process, state, event, condition),
        result, detail); the newest answer replaces an older one of the same transaction."""

    # -- transition log ------------------------------------------------------------------

    def log(
        self,
        item: OrderItem,
        *,
        process: str,
        event: str | None,
        source: str,
        target: str | None,
        command: str | None = None,
        condition: str | None = None,
        error: str | None = None,
    ) -> None:
        if error is not None:
            instruments.note_error(self.session, process, event)
        self._log_rows.append(
            {
                "item_id": item.id,
                "order_id": item.order_id,
                "process": process,
                "event": event,
                "source_state": source,
                "target_state": target,
                "command": command,
                "condition": condition,
                "is_error": error is not None,
                "error_message": error,
                "hostname": self.origin.hostname,
                "argv": self.origin.argv,
                "created_at": self.now,
            }
        )

    def flush_log(self) -> None:
        if self._log_rows:
            rows, self._log_rows = self._log_rows, []
            for part in chunked(rows):
                self.session.execute(insert(_table(TransitionLog)), list(part))
        self._flush_conditions()

    # -- condition results ---------------------------------------------------------------

    def record_conditions(
        self,
        item: OrderItem,
        process: str,
        state: str,
        event: str | None,
        checks: Sequence[tuple[str, Verdict]],
    ) -> None:
        """Remember each condition's answer for ``item`` (written with the log): the newest
        per (item, condition) replaces the one before (``oms_condition_result``)."""
        for name, verdict in checks:
            self._condition_rows[(item.id, name)] = (
                item.id, item.order_id, (process, state, event, name), verdict.holds,
                _detail(verdict),
            )

    def record_condition(
        self,
        items: Sequence[OrderItem],
        process: str,
        state: str,
        event: str | None,
        name: str,
        verdicts: Sequence[Verdict],
    ) -> None:
        """Condition ``name``'s answers for ``items`` (one each, in their order): what
        :meth:`record_conditions` remembers, a whole group's at once."""
        shared = (process, state, event, name)
        rows = self._condition_rows
        for item, verdict in zip(items, verdicts, strict=True):
            item_id = item.id
            rows[(item_id, name)] = (
                item_id, item.order_id, shared, verdict.holds, _detail(verdict)
            )

    def _flush_conditions(self) -> None:
        """Forget the older answers of the conditions asked, write the new ones.

        On SQLite with JSON the rows of each run that shares process, state, event and
        condition go in set-based: one ``INSERT … SELECT`` from a JSON array of (item id,
        order id, result, detail) per chunk, the shared values as parameters (a 10,000-unit
        order's two condition rounds bound 180,000 parameters one by one). On PostgreSQL
        each chunk is one upsert from a JSON array (``_upsert_conditions``), not an executemany:
        psycopg runs that in pipeline mode, a statement per row, which cost an order's two
        rows several times the client CPU of one statement. On MariaDB one executemany,
        which PyMySQL already sends as one multi-row INSERT."""
        if not self._condition_rows:
            return
        rows, self._condition_rows = list(self._condition_rows.values()), {}
        by_name: dict[str, list[int]] = defaultdict(list)
        for row in rows:
            by_name[row[2][3]].append(row[0])
        # Prebuilt Core statements on the session's connection (the ORM objects of these
        # rows are never loaded by the engine), after whatever the session holds.
        self.session.flush()
        conn = self.session.connection()
        if conn.dialect.name == "postgresql":  # one statement replaces the older answers
            for rows_part in chunked(rows):
                execute_rowless(conn, _UPSERT_CONDITIONS, self._condition_json(rows_part))
            return
        style = _ids_style(conn.dialect)
        forget = prebuilt("forget conditions", style, _forget_conditions_statement)
        for name, ids in by_name.items():
            for part in chunked(sorted(ids)):
                conn.execute(forget, {"ids": _ids_value(part, style), "name": name})
        if style != "json":
            for rows_part in chunked(rows):
                conn.execute(_INSERT_CONDITIONS, self._condition_params(rows_part))
            return
        statement = prebuilt("conditions from json", style, _conditions_from_json)
        start = 0
        while start < len(rows):  # runs of rows with the same shared values, in order
            shared = rows[start][2]
            end = start + 1
            while end < len(rows) and end - start < CHUNK and rows[end][2] == shared:
                end += 1
            conn.execute(statement, {
                "rows": json.dumps([[r[0], r[1], r[3], r[4]] for r in rows[start:end]]),
                "v_process": shared[0], "v_state": shared[1], "v_event": shared[2],
                "v_condition": shared[3], "v_now": self.now,
            })
            start = end

    def _conditions_riding(self) -> dict[str, Any] | None:
        """The recorded condition answers as the parameters of a move that carries them
        (``"together conditions"``, PostgreSQL), now taken; ``None`` when there are none or
        more than one chunk (those go the usual way, :meth:`_flush_conditions`)."""
        if not self._condition_rows or len(self._condition_rows) > CHUNK:
            return None
        rows, self._condition_rows = list(self._condition_rows.values()), {}
        return self._condition_json(rows)

    def _condition_json(self, rows: Sequence[_ConditionRow]) -> dict[str, Any]:
        """The parameters of ``_UPSERT_CONDITIONS``: the rows as one JSON array."""
        return {
            "rows": json.dumps([
                [item_id, order_id, *shared, result, detail]
                for item_id, order_id, shared, result, detail in rows
            ]),
            "v_now": self.now,
        }

    def _condition_params(self, rows: Iterable[_ConditionRow]) -> list[dict[str, Any]]:
        return [
            {"item_id": item_id, "order_id": order_id, "process": shared[0],
             "state": shared[1], "event": shared[2], "condition": shared[3],
             "result": result, "detail": detail, "evaluated_at": self.now}
            for item_id, order_id, shared, result, detail in rows
        ]

    # -- entering states -----------------------------------------------------------------

    def enter_initial(self, items: Sequence[OrderItem], definition: ProcessDefinition) -> None:
        """History rows from ``None`` and the initial state's timeouts for new items.

        Every value but the item's ids is shared, so the rows are made inside the database
        (``INSERT … SELECT`` per chunk of ids), as for a move: a 10,000-unit order's history
        is a few statements, not 10,000 parameter sets built and bound in Python."""
        if not items:
            return
        initial = definition.initial
        timeouts = definition.timeout_events(initial)
        notify = definition.notifies(initial)
        for part in chunked(sorted(i.id for i in items)):
            self._insert_from_items(
                StateHistory, part, from_state=None, to_state=initial, event=None,
                created_at=self.now,
            )
            for event in timeouts:
                assert event.timeout is not None
                self._insert_from_items(
                    EventTimeout, part, with_order=False, state=initial, event=event.name,
                    due_at=self.now + event.timeout,
                )
            if notify:
                self._notify(part, definition.name, None, initial, None)

    def write_moves(
        self,
        moves: Sequence[Moves],
        definitions: Mapping[str, ProcessDefinition],
        *,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Persist ``moves`` (one transaction with whatever else the caller wrote); ``data``
        (a manual event's) goes on their history rows."""
        if not moves:
            self.flush_log()
            return
        groups: dict[MoveKey, list[int]] = {}
        two_hops: dict[tuple[MoveKey, MoveKey], list[int]] = {}
        for run in moves:
            if run.then is not None:
                two_hops.setdefault((run.key, run.then), []).extend([i.id for i in run.items])
                continue
            ids = groups.get(run.key)
            if ids is None:
                ids = groups[run.key] = []
            ids.extend([item.id for item in run.items])
        for (first, then), ids in two_hops.items():
            self._write_two_hops(first, then, ids, definitions)
        self.write_grouped_moves(groups, definitions, data=data, with_conditions=True)
        for run in moves:
            _committed_moves(run.items, (run.then or run.key).target, self.now)
        self.flush_log()

    def _write_two_hops(
        self,
        first: MoveKey,
        then: MoveKey,
        ids: Sequence[int],
        definitions: Mapping[str, ProcessDefinition],
    ) -> None:
        """Items that take ``first`` and then ``then`` at once (``Moves.then``): one statement
        on PostgreSQL, which writes the state ``then`` leads to and the history and log rows
        of both transitions (each hop's rows in hop order, so ids and ``created_at`` read as
        two moves). Only plain moves pass a state on (no forced move, no event data), and the
        state passed on arms no timeout and notifies nobody (``Runner._passed_on``)."""
        self.session.flush()
        conn = self.session.connection()
        style = _ids_style(conn.dialect)
        assert style == "array", "only PostgreSQL moves two hops at once"
        instruments.note_moves(self.session, first.process, first.event, len(ids))
        instruments.note_moves(self.session, then.process, then.event, len(ids))
        definition = definitions[then.process]
        for part in chunked(sorted(ids)):
            values = {
                "ids": _ids_value(part, style),
                "v_source": first.source,
                "v_target": first.target,
                "v_event": first.event,
                "v_process": first.process,
                "v_command": first.command,
                "v_condition": first.condition,
                "w_target": then.target,
                "w_event": then.event,
                "w_command": then.command,
                "w_condition": then.condition,
                "v_hostname": self.origin.hostname,
                "v_argv": self.origin.argv,
                "v_now": self.now,
            }
            riding = self._conditions_riding()
            if riding is None:
                execute_rowless(conn, _move_statement("two hops", style, True), values)
            else:
                execute_rowless(
                    conn, _move_statement("two hops conditions", style, True),
                    {**values, **riding},
                )
            if definition.notifies(then.target):
                self._notify(part, then.process, then.source, then.target, then.event)
            self._arm_timeouts(conn, values["ids"], then.target,
                               definition.timeout_events(then.target))

    def _arm_timeouts(
        self, conn: Connection, ids: Any, target: str, timeouts: Sequence[EventDef]
    ) -> None:
        """The timeout rows of the items ``ids`` (one chunk) that entered ``target``."""
        style = _ids_style(conn.dialect)
        for event in timeouts:
            assert event.timeout is not None
            conn.execute(
                _move_statement("timeout", style),
                {"ids": ids, "v_target": target, "v_event": event.name,
                 "v_due": self.now + event.timeout},
            )

    def write_grouped_moves(
        self,
        groups: Mapping[MoveKey, Sequence[int]],
        definitions: Mapping[str, ProcessDefinition],
        *,
        data: Mapping[str, Any] | None = None,
        with_conditions: bool = False,
    ) -> None:
        """Move the items ``groups`` names by id, all set-based: state, cleared retry and
        intent mark, history, transition log, old timeouts dropped and the target's armed.
        Holds no ORM objects, so the tick can call it for rows it never loaded; the caller
        updates any it holds. ``with_conditions``: the condition answers recorded so far may
        go with the first move (on PostgreSQL, as one more CTE of its statement: the settle
        of a call writes both, and this is one statement fewer for each).

        The statements are built once per process (:func:`_move_statement`, every value a
        named parameter) and go to the session's connection as Core statements, after one
        flush of whatever the session holds so that they see it: building and caching a
        statement and the ORM's bulk-statement machinery cost more CPU than the database
        does for the handful of rows one order moves."""
        if not groups:
            return
        self.session.flush()
        conn = self.session.connection()
        style = _ids_style(conn.dialect)
        history_data = _data_json(data)
        for key, ids in groups.items():
            timeouts = definitions[key.process].timeout_events(key.target)
            forced = key.forced
            plain = forced is None and history_data is None
            notify = definitions[key.process].notifies(key.target)
            instruments.note_moves(self.session, key.process, key.event, len(ids))
            for part in chunked(sorted(ids)):
                shared = {
                    "ids": _ids_value(part, style),
                    "v_source": key.source,
                    "v_target": key.target,
                    "v_event": key.event,
                    "v_process": key.process,
                    "v_command": key.command,
                    "v_condition": key.condition,
                    "v_hostname": self.origin.hostname,
                    "v_argv": self.origin.argv,
                    "v_now": self.now,
                }
                if not plain:
                    shared["v_forced"] = forced is not None
                    shared["v_actor"] = forced.actor if forced is not None else None
                    shared["v_reason"] = forced.reason if forced is not None else None
                    shared["v_data"] = history_data
                if style == "array":
                    # PostgreSQL: the four as one statement (data-modifying CTEs).
                    riding = self._conditions_riding() if with_conditions else None
                    with_conditions = False
                    if riding is None:
                        execute_rowless(conn, _move_statement("together", style, plain), shared)
                    else:
                        execute_rowless(
                            conn, _move_statement("together conditions", style, plain),
                            {**shared, **riding},
                        )
                else:
                    conn.execute(_move_statement("update", style), shared)
                    conn.execute(_move_statement("history", style, plain), shared)
                    conn.execute(_move_statement("log", style, plain), shared)
                    conn.execute(_move_statement("untime", style), shared)
                if notify:
                    self._notify(part, key.process, key.source, key.target, key.event)
                self._arm_timeouts(conn, shared["ids"], key.target, timeouts)

    def move_resting(
        self,
        order_ids: Sequence[int],
        key: MoveKey,
        definitions: Mapping[str, ProcessDefinition],
    ) -> int:
        """Move every item of ``order_ids`` resting in ``key.source`` of ``key.process`` (no
        retry scheduled, no open intent) to ``key.target``: the same rows as
        :meth:`write_grouped_moves` (history, transition log, outbox, timeouts, state), but
        the items are named by their orders and state, not by id, so no item row travels
        through Python at all. Returns the items moved.

        Every statement picks the items by the same predicate on their *source* state, and the
        state ``UPDATE`` comes last; so all of them see the same rows only if nobody else can
        move these items meanwhile: the caller holds the orders' row locks (``Claims.lock``;
        every writer of item states takes its order's lock first) or, on SQLite, the write
        lock. The history and log inserts are compared with the ``UPDATE``'s count, and a
        difference rolls the batch back (:class:`MoveMismatchError`), so a writer that ever
        broke that rule could not leave a move without its history."""
        if not order_ids:
            return 0
        self.session.flush()
        style = _ids_style(self.session.connection().dialect)
        moved, _orders = self._move_resting(
            {"ids": _ids_value(sorted(order_ids), style)}, style, key, definitions
        )
        return moved

    def move_resting_range(
        self,
        low: int,
        high: int,
        skip: Sequence[int],
        key: MoveKey,
        definitions: Mapping[str, ProcessDefinition],
    ) -> list[int]:
        """:meth:`move_resting` for the orders with ids in ``(low, high]`` but ``skip``, named
        by that range instead of by a list of their ids (SQLite only: :func:`ranged_moves`).
        Returns the order id of every item moved (one per item).

        The caller holds SQLite's write lock (nobody else writes meanwhile) and has put into
        ``skip`` the orders somebody else holds a lease on and those with due work for the
        runner. The statements walk the ``order_id`` index over the range, so a batch costs
        one pass over its range per statement, and no order id travels through Python on the
        way in."""
        self.session.flush()
        _moved, orders = self._move_resting(
            {"low": low, "high": high, "skip": json.dumps(sorted(skip))},
            "range",
            key,
            definitions,
        )
        return orders

    def _move_resting(
        self,
        which: Mapping[str, Any],
        style: str,
        key: MoveKey,
        definitions: Mapping[str, ProcessDefinition],
    ) -> tuple[int, list[int]]:
        """The statements of :meth:`move_resting` (``style`` an ids style, or ``"range"``):
        items moved and, for a range, their order ids."""
        conn = self.session.connection()
        definition = definitions[key.process]
        shared = {
            **which,
            "v_source": key.source,
            "v_target": key.target,
            "v_event": key.event,
            "v_process": key.process,
            "v_command": key.command,
            "v_condition": key.condition,
            "v_hostname": self.origin.hostname,
            "v_argv": self.origin.argv,
            "v_now": self.now,
            "v_forced": False,
            "v_actor": None,
            "v_reason": None,
            "v_data": None,
        }
        history = conn.execute(_resting_statement("history", style), shared).rowcount
        if not history:
            return 0, []
        logged = conn.execute(_resting_statement("log", style), shared).rowcount
        if definition.notifies(key.target):
            conn.execute(_resting_statement("notify", style), {
                **shared, "v_status": OUTBOX_PENDING,
            })
        conn.execute(_resting_statement("untime", style), shared)
        for event in definition.timeout_events(key.target):
            assert event.timeout is not None
            conn.execute(
                _resting_statement("timeout", style),
                {**shared, "v_event": event.name, "v_due": self.now + event.timeout},
            )
        updated = conn.execute(_resting_statement("update", style), shared)
        orders: list[int] = []
        if style == "range":
            orders = list(updated.scalars())
            moved = len(orders)
        else:
            moved = int(updated.rowcount)
        if history != moved or logged != moved:
            raise MoveMismatchError(
                f"{key.process} {key.source} -> {key.target}: {moved} items moved, "
                f"{history} history and {logged} log rows"
            )
        instruments.note_moves(self.session, key.process, key.event, moved)
        return moved, orders

    def write_forced_move(
        self,
        item: OrderItem,
        target: str,
        forced: Forced,
        definitions: Mapping[str, ProcessDefinition],
    ) -> None:
        """Move ``item`` to ``target`` because a person said so: no event, no command; the
        history and log rows carry ``forced``, who and why; timeouts and retries as for any
        move (the old state's dropped, the target's armed)."""
        key = MoveKey(item.process, item.state, target, None, forced=forced)
        self.write_grouped_moves({key: [item.id]}, definitions)  # (refused while it waits)
        set_committed_value(item, "state", target)
        set_committed_value(item, "state_entered_at", self.now)
        for name, value in _CLEARED_RETRY.items():
            set_committed_value(item, name, value)

    def _notify(
        self,
        ids: Sequence[int],
        process: str,
        source: str | None,
        target: str,
        event: str | None,
    ) -> None:
        """Outbox rows for items entering a state that notifies, in this same transaction
        (the transactional outbox: see ``ratepay_oms.engine.outbox``)."""
        self._insert_from_items(
            OutboxEntry,
            ids,
            process=process,
            from_state=source,
            to_state=target,
            event=event,
            created_at=self.now,
            status=OUTBOX_PENDING,
            attempts=0,
            next_attempt_at=self.now,
        )

    def _insert_from_items(
        self, model: type[Any], ids: Sequence[int], *, with_order: bool = True, **same: Any
    ) -> None:
        """``INSERT INTO model (item_id[, order_id], …) SELECT id[, order_id], :same… FROM
        oms_order_item WHERE id IN ids ORDER BY id``: one row per item, values shared."""
        table = model.__table__
        columns = ["item_id", *(["order_id"] if with_order else []), *same]
        values: list[Any] = [OrderItem.id, *([OrderItem.order_id] if with_order else [])]
        for name, value in same.items():
            if value is None:
                values.append(null())
            else:
                values.append(literal(value, table.c[name].type))
        self.session.execute(
            insert(table).from_select(
                columns,
                select(*values)
                .where(id_in(OrderItem.id, ids, self.session))
                .order_by(OrderItem.id),
            )
        )

    def clear_retry(self, items: Iterable[OrderItem]) -> None:
        """Items whose event went through without moving them: the retry is settled."""
        settled = [i for i in items if i.retry_at is not None or i.attempts or i.retry_event]
        for part in chunked([i.id for i in settled]):
            self.session.execute(
                update(OrderItem)
                .where(id_in(OrderItem.id, part, self.session))
                .values(**_CLEARED_RETRY)
                .execution_options(synchronize_session=False)
            )
        for item in settled:
            for key, value in _CLEARED_RETRY.items():
                set_committed_value(item, key, value)

    # -- helpers ---------------------------------------------------------------------------


def _committed_moves(items: Iterable[OrderItem], target: str, now: datetime) -> None:
    """Give ``items`` the values their move wrote (state, since, cleared retry and intent) as
    their committed state. An item with no pending change and nothing expired gets them
    straight into its ``__dict__`` (what ``set_committed_value`` does, without six calls
    through the attribute machinery per item: 10,000 items move several times when a big
    order is placed)."""
    for item in items:
        state = instance_state(item)
        if state.committed_state or state.expired_attributes:
            set_committed_value(item, "state", target)
            set_committed_value(item, "state_entered_at", now)
            for name, value in _CLEARED_RETRY.items():
                set_committed_value(item, name, value)
            set_committed_value(item, "intent_id", None)
            continue
        values = state.dict
        values["state"] = target
        values["state_entered_at"] = now
        values["intent_id"] = None  # the move's UPDATE clears it (see ``_move_statement``)
        values.update(_CLEARED_RETRY)


# -- the statements of a move, built once ---------------------------------------------------

_STATEMENTS: dict[tuple[str, str, bool], Executable] = {}
_PREBUILT: dict[tuple[str, str], Any] = {}


def prebuilt(name: str, style: str, build: Callable[[str], Any]) -> Any:
    """The statement ``name`` for ids style ``style`` (:func:`ids_style`), built by
    ``build(style)`` the first time and kept: every value a named parameter (the ids as
    ``ids``, :func:`ids_value`), so the per-order statements of the drive loop skip building,
    cache-key generation and ORM compilation on every call."""
    statement = _PREBUILT.get((name, style))
    if statement is None:
        statement = _PREBUILT[(name, style)] = build(style)
    return statement


def _ids_style(dialect: Dialect) -> str:
    """How ids travel as the one ``ids`` parameter (see the module docstring)."""
    if dialect.name == "postgresql":
        return "array"
    if dialect.name == "sqlite" and _sqlite_has_json(dialect):
        return "json"
    return "in"


def ids_style(session: Session) -> str:
    """How ids travel in the prebuilt statements of ``session``'s database."""
    return _ids_style(session.get_bind().dialect)


class IntArrayText(UserDefinedType[str]):
    """A PostgreSQL ``INTEGER[]`` parameter that travels as its text form (``{1,2,3}``,
    :func:`ids_value`), rendered ``%(name)s::INTEGER[]``: psycopg dumps a ``str`` in C, a
    Python list element by element in Python (its list dumper looks at every element to
    choose the array's type), and SQLAlchemy's ``ARRAY`` copies the list on the way in. The
    server parses the text as the array."""

    cache_ok = True
    render_bind_cast = True

    def get_col_spec(self, **kw: Any) -> str:
        return "INTEGER[]"


def _ids_value(ids: Sequence[int], style: str) -> Any:
    """The ``ids`` parameter of a statement built with :func:`ids_clause` in ``style``."""
    if style == "array":
        return "{" + ",".join(map(str, ids)) + "}"
    return json.dumps(list(ids)) if style == "json" else list(ids)


def _ids_clause(column: InstrumentedAttribute[int], style: str) -> ColumnElement[bool]:
    """``column IN (:ids)`` in the given style, ``ids`` a named parameter."""
    if style == "array":
        return column == any_(bindparam("ids", type_=IntArrayText()))
    if style == "json":
        values = func.json_each(bindparam("ids", type_=String))
        return column.in_(select(values.table_valued("value").c.value))
    return column.in_(bindparam("ids", expanding=True))


ids_value = _ids_value
ids_clause = _ids_clause


def _param(table: Table, column: str, name: str) -> Any:
    return bindparam(name, type_=table.c[column].type)


_UNFORCED: dict[str, Any] = {"v_forced": false(), "v_actor": null(), "v_reason": null(),
                             "v_data": null()}
"""What the parameters of a forced move or a move with event data are in every other move:
a plain move's statement (``plain``) has them in its text instead of as four parameters."""


def _shared(table: Table, column: str, name: str, plain: bool) -> Any:
    """The value of ``column`` in a move's history or log row: parameter ``name``, or its
    constant in a plain move's statement (:data:`_UNFORCED`)."""
    if plain and name in _UNFORCED:
        return _UNFORCED[name]
    return _param(table, column, name)


_HISTORY_PARAMS = {
    "from_state": "v_source", "to_state": "v_target", "event": "v_event", "created_at": "v_now",
    "forced": "v_forced", "actor": "v_actor", "reason": "v_reason", "data": "v_data",
}
"""A move's history row after its ids: each column and the parameter that gives its value."""

_LOG_COLUMNS = [
    "item_id", "order_id", "process", "event", "source_state", "target_state", "command",
    "condition", "is_error", "error_message", "hostname", "argv", "created_at", "forced",
    "actor", "reason",
]


def _log_values(
    log: Table, item_id: Any, order_id: Any, plain: bool, hop: Mapping[str, str] | None = None
) -> list[Any]:
    """The values of a move's transition-log row, in ``_LOG_COLUMNS`` order: the item's ids
    from ``item_id``/``order_id`` (the items table, or the rows an UPDATE returned), the
    rest shared parameters (no error: a failed move writes its log row elsewhere). ``hop``:
    other parameter names for some of them (the second of two hops, :data:`_SECOND_HOP`)."""
    name = hop.get if hop is not None else (lambda n, default: default)
    return [
        item_id,
        order_id,
        _param(log, "process", "v_process"),
        _param(log, "event", name("v_event", "v_event")),
        _param(log, "source_state", name("v_source", "v_source")),
        _param(log, "target_state", name("v_target", "v_target")),
        _param(log, "command", name("v_command", "v_command")),
        _param(log, "condition", name("v_condition", "v_condition")),
        false(),
        null(),
        _param(log, "hostname", "v_hostname"),
        _param(log, "argv", "v_argv"),
        _param(log, "created_at", "v_now"),
        _shared(log, "forced", "v_forced", plain),
        _shared(log, "actor", "v_actor", plain),
        _shared(log, "reason", "v_reason", plain),
    ]


def _from_items(
    table: Table, with_order: bool, style: str, plain: bool = False, **same: str
) -> Executable:
    """``INSERT INTO table (item_id[, order_id], …) SELECT id[, order_id], :param… FROM
    oms_order_item WHERE id IN :ids ORDER BY id``: one row per item, ``same`` maps each
    further column to the parameter that gives its (shared) value (a constant for a
    ``plain`` move, :func:`_shared`)."""
    columns = ["item_id", *(["order_id"] if with_order else []), *same]
    values: list[Any] = [OrderItem.id, *([OrderItem.order_id] if with_order else [])]
    values += [_shared(table, column, name, plain) for column, name in same.items()]
    return insert(table).from_select(
        columns,
        select(*values).where(_ids_clause(OrderItem.id, style)).order_by(OrderItem.id),
    )


def _move_statement(kind: str, style: str, plain: bool = False) -> Executable:
    """One of the five statements of a move group, with every value a named parameter
    (``ids`` and ``v_…``), so one statement object serves every group and chunk; ``plain``:
    for a move neither forced nor with event data (:data:`_UNFORCED`)."""
    statement = _STATEMENTS.get((kind, style, plain))
    if statement is not None:
        return statement
    items = _table(OrderItem)
    if kind == "together":
        statement = _together_statement(style, plain)
    elif kind == "together conditions":
        statement = _together_statement(style, plain, with_conditions=True)
    elif kind == "two hops":
        statement = _two_hops_statement(style)
    elif kind == "two hops conditions":
        statement = _two_hops_statement(style, with_conditions=True)
    elif kind == "update":
        statement = (
            update(items)
            .where(_ids_clause(OrderItem.id, style))
            .values(
                state=_param(items, "state", "v_target"),
                state_entered_at=_param(items, "state_entered_at", "v_now"),
                # A moving item waits on no call: nothing moves an item with an open intent
                # but the settling of that intent, whose unmark this is (one UPDATE fewer).
                intent_id=null(),
                **_CLEARED_RETRY_SQL,
            )
        )
    elif kind == "history":
        statement = _from_items(_table(StateHistory), True, style, plain, **_HISTORY_PARAMS)
    elif kind == "log":
        log = _table(TransitionLog)
        statement = insert(log).from_select(
            _LOG_COLUMNS,
            select(*_log_values(log, OrderItem.id, OrderItem.order_id, plain))
            .where(_ids_clause(OrderItem.id, style))
            .order_by(OrderItem.id),
        )
    elif kind == "untime":
        statement = delete(_table(EventTimeout)).where(_ids_clause(EventTimeout.item_id, style))
    elif kind == "timeout":
        statement = _from_items(
            _table(EventTimeout), False, style,
            state="v_target", event="v_event", due_at="v_due",
        )
    else:
        raise ValueError(f"no move statement {kind!r}")
    _STATEMENTS[(kind, style, plain)] = statement
    return statement


class MoveMismatchError(SQLAlchemyError):
    """A set-based move wrote a different number of history or log rows than it moved items
    (somebody moved them under us): the batch is rolled back like any database failure."""


_RESTING: dict[tuple[str, str], Executable] = {}


def _resting(style: str) -> ColumnElement[bool]:
    """The items :meth:`StateWriter.move_resting` moves: in the orders ``:ids``, resting in
    ``:v_source`` of ``:v_process`` with no retry scheduled and no open intent (what the
    tick's on-enter and event-less steps find due). Style ``"range"``
    (:meth:`StateWriter.move_resting_range`): in the orders with ids in ``(:low, :high]``
    but those of the JSON array ``:skip``."""
    if style == "range":
        skipped = func.json_each(bindparam("skip", type_=String))
        orders = and_(
            OrderItem.order_id > bindparam("low", type_=Integer),
            OrderItem.order_id <= bindparam("high", type_=Integer),
            OrderItem.order_id.not_in(select(skipped.table_valued("value").c.value)),
        )
    else:
        orders = _ids_clause(OrderItem.order_id, style)
    return and_(
        orders,
        by_order_only(OrderItem.process) == bindparam("v_process", type_=String),
        by_order_only(OrderItem.state) == bindparam("v_source", type_=String),
        by_order_only(OrderItem.retry_at).is_(None),
        by_order_only(OrderItem.intent_id).is_(None),
    )


class _NoIndex(ColumnElement[Any]):
    """See :func:`by_order_only`."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_NoIndex)
def _no_index(element: _NoIndex, compiler: Any, **kw: Any) -> str:
    # ``coalesce(x, x)`` is ``x``, but no planner looks through it for an index.
    column = compiler.process(element.column, **kw)
    return f"coalesce({column}, {column})"


@compiles(_NoIndex, "sqlite")
def _no_index_sqlite(element: _NoIndex, compiler: Any, **kw: Any) -> str:
    # SQLite's documented way to keep a term from using an index: a unary ``+`` (a no-op on
    # any value).
    return "+" + str(compiler.process(element.column, **kw))


def by_order_only(column: InstrumentedAttribute[Any]) -> ColumnElement[Any]:
    """``column`` in a form no index serves, for statements that pick a batch's items by
    order id *and* process, state, retry and intent: given the choice, SQLite (always) and
    PostgreSQL (on a table it has not analysed since a bulk load) prefer the index on one of
    those and read every item resting in that state (or without an intent) for every batch,
    quadratic in a bulk tick. The batch's orders are the selective part, by design."""
    return _NoIndex(column.expression)


def ranged_moves(dialect: Dialect) -> bool:
    """Whether :meth:`StateWriter.move_resting_range` works on ``dialect``: SQLite with JSON
    functions and ``RETURNING`` (3.38 on). Only SQLite: its writers are serialised by the
    database lock, so a range of orders can be worked on without row-locking each order;
    the servers lock the orders one by one (``Claims.lock``)."""
    return (
        dialect.name == "sqlite" and _sqlite_has_json(dialect) and bool(dialect.update_returning)
    )


def _resting_statement(kind: str, style: str) -> Executable:
    """One statement of :meth:`StateWriter.move_resting`, built once per dialect style (or
    ``"range"``): the same columns and parameters as :func:`_move_statement`'s, the items
    picked by :func:`_resting` instead of by id."""
    statement = _RESTING.get((kind, style))
    if statement is not None:
        return statement
    items = _table(OrderItem)
    where = _resting(style)
    if kind == "update":
        statement = (
            update(items)
            .where(where)
            .values(
                state=_param(items, "state", "v_target"),
                state_entered_at=_param(items, "state_entered_at", "v_now"),
                **_CLEARED_RETRY_SQL,
            )
        )
        if style == "range":  # the moved items' orders, for the tick's count of orders
            statement = statement.returning(OrderItem.order_id)
    elif kind == "untime":
        timeouts = _table(EventTimeout)
        statement = delete(timeouts).where(
            EventTimeout.item_id.in_(select(OrderItem.id).where(where))
        )
    else:
        table, with_order, same = {
            "history": (
                _table(StateHistory), True, {
                    "from_state": "v_source", "to_state": "v_target", "event": "v_event",
                    "created_at": "v_now", "forced": "v_forced", "actor": "v_actor",
                    "reason": "v_reason", "data": "v_data",
                },
            ),
            "log": (
                _table(TransitionLog), True, {
                    "process": "v_process", "event": "v_event", "source_state": "v_source",
                    "target_state": "v_target", "command": "v_command",
                    "condition": "v_condition", "is_error": "v_false", "hostname": "v_hostname",
                    "argv": "v_argv", "created_at": "v_now", "forced": "v_forced",
                    "actor": "v_actor", "reason": "v_reason",
                },
            ),
            "notify": (
                _table(OutboxEntry), True, {
                    "process": "v_process", "from_state": "v_source", "to_state": "v_target",
                    "event": "v_event", "created_at": "v_now", "status": "v_status",
                    "attempts": "v_zero", "next_attempt_at": "v_now",
                },
            ),
            "timeout": (
                _table(EventTimeout), False, {
                    "state": "v_target", "event": "v_event", "due_at": "v_due",
                },
            ),
        }[kind]
        columns = ["item_id", *(["order_id"] if with_order else []), *same]
        values: list[Any] = [OrderItem.id, *([OrderItem.order_id] if with_order else [])]
        for column, name in same.items():
            if name in ("v_zero", "v_false"):  # the same for every move: not a parameter
                values.append(literal_column("0", Integer) if name == "v_zero" else false())
            else:
                values.append(_param(table, column, name))
        # SQLite: in (order, item) order, the order its ``order_id`` index gives the rows
        # in, so it needs no sort (``ORDER BY id`` cost a temporary B-tree per statement).
        # The servers keep ``ORDER BY id`` (MariaDB measured slower with the other).
        order = (OrderItem.order_id, OrderItem.id) if style in ("json", "range") else (
            OrderItem.id,
        )
        statement = insert(table).from_select(
            columns, select(*values).where(where).order_by(*order)
        ).execution_options(preserve_rowcount=True)  # else -1 for an INSERT on PostgreSQL
    _RESTING[(kind, style)] = statement
    return statement


_CONDITIONS = _table(ConditionResult)
_INSERT_CONDITIONS = insert(_CONDITIONS)


def _detail(verdict: Verdict) -> str | None:
    """What a condition read, as stored in ``oms_condition_result.detail``."""
    if not verdict.read:
        return None
    detail = verdict.encoded
    if detail is None:
        detail = json.dumps(dict(verdict.read), default=str, sort_keys=True)
    if len(detail) > MAX_DETAIL:  # keep it valid JSON, say it was cut
        detail = json.dumps({"truncated": detail[: MAX_DETAIL - 50]})
    return detail


def _conditions_from_json(style: str) -> Executable:
    """``INSERT INTO oms_condition_result … SELECT`` from the JSON array ``:rows`` of
    ``[item id, order id, result, detail]`` (SQLite), the other columns the ``v_…``
    parameters; the rows in the array's order."""
    rows = func.json_each(bindparam("rows", type_=String)).table_valued("key", "value")

    def at(index: int) -> ColumnElement[Any]:
        return func.json_extract(rows.c.value, literal(f"$[{index}]"))

    table = _CONDITIONS
    return insert(table).from_select(
        ["item_id", "order_id", "process", "state", "event", "condition", "result", "detail",
         "evaluated_at"],
        select(
            at(0), at(1), _param(table, "process", "v_process"),
            _param(table, "state", "v_state"), _param(table, "event", "v_event"),
            _param(table, "condition", "v_condition"), at(2), at(3),
            _param(table, "evaluated_at", "v_now"),
        ).order_by(rows.c.key),
    )


_CONDITION_JSON_TYPES: list[TypeEngine[Any]] = [
    Integer(), Integer(), Text(), Text(), Text(), Text(), Boolean(), Text()
]
"""The types of a condition row's JSON fields (``_upsert_conditions``), in their order."""


def _upsert_conditions() -> Executable:
    """On PostgreSQL the newest answer replaces the older one (unique per item and
    condition) in the INSERT itself (``ON CONFLICT DO UPDATE``): one statement instead of a
    DELETE and an INSERT. Not on MariaDB: its ``ON DUPLICATE KEY UPDATE`` takes a next-key
    lock on the duplicate, a gap lock READ COMMITTED otherwise spares two workers whose items
    are neighbours (see ``persistence.db``). Not on SQLite either: there a large order's
    answers go in set-based from JSON (``_conditions_from_json``) after one DELETE per
    condition, which a per-row upsert would undo.

    The rows come as one JSON array ``:rows`` of ``[item id, order id, process, state,
    event, condition, result, detail]``, taken apart in the array's order (``WITH
    ORDINALITY``), ``evaluated_at`` the one ``v_now``: the statement's text is the same for
    any number of rows, so SQLAlchemy compiles it once and the server keeps it prepared, and
    the rows are one parameter whatever the chunk's size. JSON, not an array per column:
    psycopg dumps a list element by element in Python, which cost more than the
    executemany it replaced. A chunk never holds the same (item, condition) twice
    (``StateWriter`` keeps the newest per key), which ``ON CONFLICT DO UPDATE`` could not
    take in one statement."""
    from sqlalchemy.dialects import postgresql

    keys = ["item_id", "condition"]
    columns = ["item_id", "order_id", "process", "state", "event", "condition", "result",
               "detail"]
    table = _CONDITIONS
    rows = (  # the names as TEXT: the INSERT checks their length as it did (no silent cut)
        func.json_array_elements(sql_cast(bindparam("rows", type_=String), JSON))
        .table_valued("value", with_ordinality="n")
        .render_derived(name="r")
    )
    # Each field as one literal piece of SQL, not a cast of an operator expression: the
    # statement's cache key is hashed on every execution, and eight custom operators in it
    # cost ~40 Python calls each time.
    dialect = cast(Dialect, postgresql.dialect())  # type: ignore[no-untyped-call]
    fields = [
        literal_column(f"CAST(r.value ->> {index} AS {kind.compile(dialect=dialect)})", kind)
        for index, kind in enumerate(_CONDITION_JSON_TYPES)
    ]
    stmt = postgresql.insert(table).from_select(
        [*columns, "evaluated_at"],
        select(*fields, _param(table, "evaluated_at", "v_now"))
        .select_from(rows)
        .order_by(rows.c.n),
    )
    return stmt.on_conflict_do_update(
        index_elements=keys,
        set_={
            c.name: stmt.excluded[c.name]
            for c in table.c
            if c.name not in keys and not c.primary_key
        },
    )


_UPSERT_CONDITIONS = _upsert_conditions()


def _forget_conditions_statement(style: str) -> Executable:
    """The older answers of condition ``:name`` for items ``:ids``."""
    return delete(_CONDITIONS).where(
        _CONDITIONS.c.condition == bindparam("name", type_=_CONDITIONS.c.condition.type),
        _ids_clause(ConditionResult.item_id, style),
    )


def _moved_cte(style: str, target: str) -> Any:
    """The UPDATE of a move's items to parameter ``target`` (intent mark and retry cleared),
    returning their ids, as the CTE ``moved`` the history and log INSERTs read."""
    items = _table(OrderItem)
    return (
        update(items)
        .where(_ids_clause(OrderItem.id, style))
        .values(
            state=_param(items, "state", target),
            state_entered_at=_param(items, "state_entered_at", "v_now"),
            intent_id=null(),
            **_CLEARED_RETRY_SQL,
        )
        .returning(items.c.id, items.c.order_id)
        .cte("moved")
    )


def _untime_carrying(style: str, ctes: list[Any], with_conditions: bool) -> Executable:
    """The moved items' timeout DELETE as the statement carrying ``ctes`` (and the condition
    upsert, ``with_conditions``)."""
    if with_conditions:
        ctes.append(cast(Any, _UPSERT_CONDITIONS).cte("answers"))
    return (
        delete(_table(EventTimeout))
        .where(_ids_clause(EventTimeout.item_id, style))
        .add_cte(*ctes)
    )


def _together_statement(style: str, plain: bool, with_conditions: bool = False) -> Executable:
    """``update``, ``history``, ``log`` and ``untime`` of a move group as one statement, for
    PostgreSQL: the UPDATE's RETURNING rows feed the two INSERTs, the DELETE rides along
    (data-modifying CTEs run once each, to completion, on one snapshot; they touch different
    tables, so none needs to see another's effect). A move costs one round trip and one
    statement execution in the worker instead of four.

    The DELETE is the statement itself, the others its CTEs (which run to completion whether
    or not anything reads them): a statement that returns no rows, so the driver describes
    no result column and SQLAlchemy sets up no result for it (nothing read the count the
    ``SELECT`` returned).

    ``with_conditions``: the upsert of condition answers (``_UPSERT_CONDITIONS``, its
    ``:rows`` and the same ``:v_now``) as one more CTE; it touches a table of its own."""
    moved = _moved_cte(style, "v_target")
    history = _table(StateHistory)
    history_rows = (
        insert(history)
        .from_select(
            ["item_id", "order_id", *_HISTORY_PARAMS],
            select(
                moved.c.id,
                moved.c.order_id,
                *(
                    _shared(history, column, name, plain)
                    for column, name in _HISTORY_PARAMS.items()
                ),
            ).order_by(moved.c.id),
        )
        .cte("moved_history")
    )
    log = _table(TransitionLog)
    log_rows = (
        insert(log)
        .from_select(
            _LOG_COLUMNS,
            select(*_log_values(log, moved.c.id, moved.c.order_id, plain)).order_by(moved.c.id),
        )
        .cte("moved_log")
    )
    ctes = [moved, history_rows, log_rows]
    return _untime_carrying(style, ctes, with_conditions)


_SECOND_HOP = {"v_source": "v_target", "v_target": "w_target", "v_event": "w_event",
               "v_command": "w_command", "v_condition": "w_condition"}
"""The parameters of the second of two hops (``_two_hops_statement``) in place of the first's:
it starts where the first ended."""


def _two_hops_statement(style: str, with_conditions: bool = False) -> Executable:
    """Two plain moves of the same items as one statement (PostgreSQL, like
    :func:`_together_statement`): the UPDATE writes where the second leads (``:w_target``),
    and the history and log INSERTs write two rows per item from its RETURNING rows, the first
    hop's (``v_…``) before the second's (``w_…``, :data:`_SECOND_HOP`), each in item order."""
    moved = _moved_cte(style, "w_target")

    def hops(table: Table, columns: Sequence[str], values: Callable[[int], list[Any]]) -> Any:
        """``INSERT INTO table (columns) SELECT …`` both hops' rows, ordered."""
        both = union_all(*(
            select(*(v.label(c) for v, c in zip(values(hop), columns, strict=True)),
                   literal_column(str(hop), Integer).label("hop"))
            for hop in (0, 1)
        )).subquery("hops")
        return insert(table).from_select(
            list(columns),
            select(*(both.c[c] for c in columns)).order_by(both.c.hop, both.c[columns[0]]),
        )

    history = _table(StateHistory)
    history_columns = ["item_id", "order_id", *_HISTORY_PARAMS]

    def history_values(hop: int) -> list[Any]:
        names = _SECOND_HOP if hop else {}
        return [moved.c.id, moved.c.order_id, *(
            _shared(history, column, names.get(name, name), True)
            for column, name in _HISTORY_PARAMS.items()
        )]

    log = _table(TransitionLog)
    ctes = [
        moved,
        hops(history, history_columns, history_values).cte("moved_history"),
        hops(
            log, _LOG_COLUMNS,
            lambda hop: _log_values(log, moved.c.id, moved.c.order_id, True,
                                    _SECOND_HOP if hop else None),
        ).cte("moved_log"),
    ]
    return _untime_carrying(style, ctes, with_conditions)


def _data_json(data: Mapping[str, Any] | None) -> str | None:
    """A manual event's data as stored on ``oms_state_history.data`` (``None``: no data)."""
    if not data:
        return None
    return json.dumps(dict(data), default=str, ensure_ascii=False, sort_keys=True)
