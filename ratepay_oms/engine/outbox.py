"""State-change notifications: delivering the transactional outbox by signed HTTP POST.

The rows are written by the state writer in the transaction that moves the items
(``persist.StateWriter``), for states marked ``notify: true`` (or every state, with
``RATEPAY_OMS_NOTIFY_STATES=all``). Delivery never holds a transaction open across the
network (the engine's rule for every outside call):

1. **claim** — one short transaction leases due rows to this worker (``claimed_by``, a lease
   of ``lease_seconds``) and fixes each row's idempotency key; commit;
2. **send** — POST each row's JSON, outside any transaction;
3. **record** — one short transaction per row stores the outcome, only if the lease is still
   ours (compare-and-set), and releases the lease.

A worker killed between 1 and 3 leaves leased rows; once the lease expires another worker
sends them again. So delivery is *at least once*: a receiver that saw the request but whose
answer was lost gets it again, with the same ``Idempotency-Key`` and body, and drops it.
Nothing is lost: the row is only marked delivered after a 2xx answer.

Per order, notifications leave in the order the moves happened: a row is not due while an
older row of the same order is still pending (a failing one holds back the later ones until
it is delivered or dead). A row that failed ``max_attempts`` times is *dead*: kept for a
person (``ratepay-oms outbox list --status dead``, ``outbox retry``), and no longer holds its
order back.

Signature: ``X-Ratepay-Oms-Signature: sha256=<hex>`` is HMAC-SHA256 with the configured
secret over ``<timestamp>.<body>``, the timestamp (Unix seconds) in
``X-Ratepay-Oms-Timestamp``; :func:`verify_signature` is the receiver's check. The secret
is never logged, stored, shown or put in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import ColumnElement, and_, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from ratepay_oms.engine.clock import naive_utc, wall_now
from ratepay_oms.errors import OmsError
from ratepay_oms.ops import instruments
from ratepay_oms.ops.tracing import span
from ratepay_oms.persistence.models import (
    OUTBOX_DEAD,
    OUTBOX_DELIVERED,
    OUTBOX_PENDING,
    Order,
    OutboxEntry,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "RATEPAY_OMS_NOTIFY_"
SIGNATURE_HEADER = "X-Ratepay-Oms-Signature"
TIMESTAMP_HEADER = "X-Ratepay-Oms-Timestamp"
ATTEMPT_HEADER = "X-Ratepay-Oms-Attempt"
KEY_HEADER = "Idempotency-Key"
MASK = "********"


class NotificationSettingsError(OmsError):
    """A ``RATEPAY_OMS_NOTIFY_*`` value is missing or malformed."""


@dataclass(frozen=True)
class NotificationSettings:
    """Where and how notifications are delivered. ``url`` unset: rows are still written (the
    outbox keeps them) but nothing is sent until a URL is configured.

    Environment (:meth:`from_env`): ``RATEPAY_OMS_NOTIFY_URL``, ``…_SECRET`` (required with a
    URL), ``…_STATES`` (``marked``, default, or ``all``), ``…_MAX_ATTEMPTS`` (10),
    ``…_BACKOFF`` (first retry delay in seconds, 30; doubles per attempt), ``…_MAX_BACKOFF``
    (3600), ``…_TIMEOUT`` (read timeout in seconds, 10), ``…_LEASE`` (seconds, 60),
    ``…_BATCH`` (rows per claim, 100).
    """

    url: str | None = None
    secret: str = field(default="", repr=False)
    all_states: bool = False
    max_attempts: int = 10
    backoff_s: float = 30.0
    max_backoff_s: float = 3600.0
    connect_timeout_s: float = 5.0
    timeout_s: float = 10.0
    lease_s: float = 60.0
    batch: int = 100

    def __post_init__(self) -> None:
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise NotificationSettingsError(
                    f"{ENV_PREFIX}URL must be an http(s) URL, got {_safe_url(self.url)!r}"
                )
            if not self.secret:
                raise NotificationSettingsError(
                    f"{ENV_PREFIX}SECRET is required with {ENV_PREFIX}URL: receivers check the "
                    "signature made with it"
                )
        for name in ("max_attempts", "backoff_s", "max_backoff_s", "timeout_s", "lease_s",
                     "batch", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise NotificationSettingsError(f"notification setting {name} must be positive")

    def __repr__(self) -> str:
        url = _safe_url(self.url) if self.url else None
        return (
            f"NotificationSettings(url={url!r}, secret={MASK if self.secret else ''!r}, "
            f"all_states={self.all_states}, max_attempts={self.max_attempts})"
        )

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NotificationSettings:
        env = os.environ if env is None else env

        def get(key: str) -> str | None:
            value = env.get(ENV_PREFIX + key)
            return value.strip() if value is not None and value.strip() else None

        def number(key: str, default: float, kind: type = float) -> Any:
            raw = get(key)
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise NotificationSettingsError(
                    f"{ENV_PREFIX}{key} must be a number, got {raw!r}"
                ) from None

        states = (get("STATES") or "marked").lower()
        if states not in ("marked", "all"):
            raise NotificationSettingsError(
                f"{ENV_PREFIX}STATES must be 'marked' (states with notify: true) or 'all', "
                f"got {states!r}"
            )
        return cls(
            url=get("URL"),
            secret=env.get(ENV_PREFIX + "SECRET", ""),
            all_states=states == "all",
            max_attempts=number("MAX_ATTEMPTS", 10, int),
            backoff_s=number("BACKOFF", 30.0),
            max_backoff_s=number("MAX_BACKOFF", 3600.0),
            timeout_s=number("TIMEOUT", 10.0),
            lease_s=number("LEASE", 60.0),
            batch=number("BATCH", 100, int),
        )

    def backoff(self, attempts: int) -> timedelta:
        """Delay before attempt ``attempts + 1``: doubling from ``backoff_s``, capped, with
        up to 10 % jitter so that rows failed together do not retry in lockstep."""
        base = min(self.backoff_s * 2 ** min(max(attempts - 1, 0), 40), self.max_backoff_s)
        return timedelta(seconds=base * (1 + random.random() / 10))


def _safe_url(url: str | None) -> str:
    """The URL without user info (a password in it is as secret as the secret)."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host).geturl()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """The receiver's check: the signature matches and the timestamp is within
    ``tolerance_s`` (a replayed old request is refused). ``headers`` is case-insensitive when
    it is (``requests``' and ``http.server``'s are); otherwise pass the names as we send them."""
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    given = headers.get(SIGNATURE_HEADER, "")
    if not timestamp.isdigit() or not given:
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), given)


@dataclass(frozen=True)
class Notification:
    """One outbox row as sent: the JSON body and what the sender needs to record the result."""

    id: int
    order_id: int
    key: str
    attempt: int
    body: dict[str, Any]

    def encoded(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), sort_keys=True).encode()


def body_of(row: OutboxEntry, order_ref: str, key: str) -> dict[str, Any]:
    """The JSON a receiver gets: the same for every attempt of one row."""
    return {
        "idempotency_key": key,
        "order": order_ref,
        "item": row.item_id,
        "process": row.process,
        "from": row.from_state,
        "to": row.to_state,
        "event": row.event,
        "at": row.created_at.isoformat(timespec="microseconds") + "Z",
    }


@dataclass
class DeliveryResult:
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return self.delivered + self.failed + self.dead

    def summary(self) -> str:
        return (
            f"notifications: {self.delivered} delivered, {self.failed} failed (retried later), "
            f"{self.dead} dead"
        )

    def to_json(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "failed": self.failed, "dead": self.dead,
                "errors": list(self.errors)}


class OutboxDelivery:
    """Claims, sends and records outbox rows for one worker (see the module docstring)."""

    def __init__(
        self,
        sessions: Callable[[], Session],
        settings: NotificationSettings,
        worker_id: str,
        http: requests.Session | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.worker_id = worker_id
        self.http = http or requests.Session()

    def deliver(self, now: datetime | None = None, *, rounds: int | None = None) -> DeliveryResult:
        """Deliver what is due (``next_attempt_at`` ≤ ``now``), batch after batch until
        nothing due is left (or ``rounds`` batches). Does nothing without a URL."""
        result = DeliveryResult()
        if not self.settings.enabled:
            return result
        done = 0
        with span("ratepay_oms.outbox.deliver"):
            while rounds is None or done < rounds:
                batch = self.claim(naive_utc(now))
                if not batch:
                    break
                self._send_batch(batch, result)
                done += 1
        if result.attempted:
            log.info("%s", result.summary())
        return result

    # -- 1. claim ----------------------------------------------------------------------------

    def _due(self, now: datetime) -> Any:
        older = aliased(OutboxEntry)
        held_back = exists().where(
            older.order_id == OutboxEntry.order_id,
            older.id < OutboxEntry.id,
            older.status == OUTBOX_PENDING,
        )
        lease_now = wall_now()
        return and_(
            OutboxEntry.status == OUTBOX_PENDING,
            OutboxEntry.next_attempt_at <= now,
            or_(OutboxEntry.claim_expires_at.is_(None), OutboxEntry.claim_expires_at < lease_now),
            ~held_back,
        )

    def claim(self, now: datetime) -> list[Notification]:
        """Lease up to ``batch`` due rows (one short transaction) and fix their keys."""
        with self.sessions() as session, session.begin():
            stmt = (
                select(OutboxEntry, Order.order_ref)
                .join(Order, Order.id == OutboxEntry.order_id)
                .where(self._due(now))
                .order_by(OutboxEntry.id)
                .limit(self.settings.batch)
            )
            dialect = session.get_bind().dialect.name
            if dialect == "postgresql":
                # Two workers never take the same row, and never wait for each other.
                stmt = stmt.with_for_update(skip_locked=True, of=OutboxEntry)
            elif dialect != "sqlite":  # MariaDB has no FOR UPDATE OF
                stmt = stmt.with_for_update(skip_locked=True)
            rows = session.execute(stmt).all()
            if not rows:
                return []
            expires = wall_now() + timedelta(seconds=self.settings.lease_s)
            out: list[Notification] = []
            for row, order_ref in rows:
                if row.idempotency_key is None:
                    row.idempotency_key = uuid.uuid4().hex
                row.claimed_by = self.worker_id
                row.claim_expires_at = expires
                out.append(
                    Notification(
                        id=row.id,
                        order_id=row.order_id,
                        key=row.idempotency_key,
                        attempt=row.attempts + 1,
                        body=body_of(row, order_ref, row.idempotency_key),
                    )
                )
            return out

    # -- 2. send ---------------------------------------------------------------------------

    def _send_batch(self, batch: Sequence[Notification], result: DeliveryResult) -> None:
        blocked: set[int] = set()
        for note in batch:
            if note.order_id in blocked:
                # An older notification of this order failed just now: keep the order.
                self._release(note)
                continue
            error, status = self.send(note)
            if error is None:
                self._record_success(note, status)
                result.delivered += 1
                instruments.NOTIFICATIONS.labels("delivered").inc()
                continue
            blocked.add(note.order_id)
            dead = self._record_failure(note, status, error)
            if dead:
                result.dead += 1
                instruments.NOTIFICATIONS.labels("dead").inc()
            else:
                result.failed += 1
                instruments.NOTIFICATIONS.labels("failed").inc()
            result.errors.append(f"notification {note.id}: {error}")

    def send(self, note: Notification) -> tuple[str | None, int | None]:
        """POST one notification; ``(None, status)`` on a 2xx answer, else ``(error, status)``.
        The error text never holds the URL's user info, the secret or the body."""
        assert self.settings.url is not None
        body = note.encoded()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "ratepay-oms",
            KEY_HEADER: note.key,
            ATTEMPT_HEADER: str(note.attempt),
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self.settings.secret, timestamp, body),
        }
        with span("ratepay_oms.outbox.post", {"ratepay_oms.outbox.id": note.id}):
            try:
                response = self.http.post(
                    self.settings.url,
                    data=body,
                    headers=headers,
                    timeout=(self.settings.connect_timeout_s, self.settings.timeout_s),
                    allow_redirects=False,
                )
            except requests.Timeout as exc:
                return f"timeout ({type(exc).__name__})", None
            except requests.RequestException as exc:
                return f"connection failed ({type(exc).__name__})", None
        with response:
            status = response.status_code
        if 200 <= status < 300:
            return None, status
        return f"HTTP {status}", status

    # -- 3. record ---------------------------------------------------------------------------

    def _mine(self, note: Notification) -> Any:
        return and_(OutboxEntry.id == note.id, OutboxEntry.claimed_by == self.worker_id)

    def _record_success(self, note: Notification, status: int | None) -> None:
        with self.sessions() as session, session.begin():
            session.execute(
                update(OutboxEntry)
                .where(self._mine(note))
                .values(
                    status=OUTBOX_DELIVERED,
                    attempts=OutboxEntry.attempts + 1,
                    delivered_at=wall_now(),
                    last_http_status=status,
                    last_error=None,
                    claimed_by=None,
                    claim_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )

    def _record_failure(self, note: Notification, status: int | None, error: str) -> bool:
        """Store a failed attempt; returns whether the row is now dead."""
        dead = note.attempt >= self.settings.max_attempts
        with self.sessions() as session, session.begin():
            session.execute(
                update(OutboxEntry)
                .where(self._mine(note))
                .values(
                    status=OUTBOX_DEAD if dead else OUTBOX_PENDING,
                    attempts=OutboxEntry.attempts + 1,
                    next_attempt_at=wall_now() + self.settings.backoff(note.attempt),
                    last_http_status=status,
                    last_error=f"attempt {note.attempt}: {error}"[:2000],
                    claimed_by=None,
                    claim_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
        log.warning(
            "notification %d (attempt %d) failed: %s%s",
            note.id, note.attempt, error, " — dead, a person must retry it" if dead else "",
        )
        return dead

    def _release(self, note: Notification) -> None:
        with self.sessions() as session, session.begin():
            session.execute(
                update(OutboxEntry)
                .where(self._mine(note))
                .values(claimed_by=None, claim_expires_at=None)
                .execution_options(synchronize_session=False)
            )


# -- what a person does with the outbox ---------------------------------------------------------


class OutboxError(OmsError):
    """A retry or purge that cannot be done as asked (unknown id, delivered row, …)."""


@dataclass(frozen=True)
class OutboxView:
    """One outbox row, detached (for ``outbox list`` and the Python API)."""

    id: int
    order_ref: str
    item_id: int
    process: str
    from_state: str | None
    to_state: str
    event: str | None
    created_at: datetime
    status: str
    attempts: int
    next_attempt_at: datetime
    idempotency_key: str | None
    claimed_by: str | None
    last_error: str | None
    last_http_status: int | None
    delivered_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": self.id,
            "order": self.order_ref,
            "item": self.item_id,
            "process": self.process,
            "from": self.from_state,
            "to": self.to_state,
            "event": self.event,
            "at": iso(self.created_at),
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at) if self.status == OUTBOX_PENDING else None,
            "idempotency_key": self.idempotency_key,
            "claimed_by": self.claimed_by,
            "last_error": self.last_error,
            "last_http_status": self.last_http_status,
            "delivered_at": iso(self.delivered_at),
        }


class Outbox:
    """Listing, retrying and purging notifications: the operator's side of the outbox."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.sessions = sessions

    def list(
        self,
        *,
        status: str | None = None,
        order_ref: str | None = None,
        limit: int | None = 100,
    ) -> list[OutboxView]:
        """Rows newest first (``status`` ``None``: every status)."""
        with self.sessions() as session:
            stmt = (
                select(OutboxEntry, Order.order_ref)
                .join(Order, Order.id == OutboxEntry.order_id)
                .order_by(OutboxEntry.id.desc())
            )
            if status is not None:
                stmt = stmt.where(OutboxEntry.status == status)
            if order_ref is not None:
                stmt = stmt.where(Order.order_ref == order_ref)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [_view(row, ref) for row, ref in session.execute(stmt).all()]

    def counts(self) -> dict[str, int]:
        """Rows per status (every status present, zero when none)."""
        from sqlalchemy import func

        found = dict.fromkeys((OUTBOX_PENDING, OUTBOX_DELIVERED, OUTBOX_DEAD), 0)
        with self.sessions() as session:
            for status, count in session.execute(
                select(OutboxEntry.status, func.count()).group_by(OutboxEntry.status)
            ):
                found[status] = int(count)
        return found

    def retry(self, ids: Sequence[int] = (), *, all_dead: bool = False) -> int:
        """Put dead rows (``ids``, or every dead row with ``all_dead``) back to pending with a
        fresh attempt budget, due now; pending rows named in ``ids`` are made due now. Keeps
        the idempotency key, so a receiver that did get an earlier attempt still de-duplicates.
        Returns how many rows were reset."""
        if not ids and not all_dead:
            raise OutboxError("name the notifications to retry (IDs) or pass --all-dead")
        now = wall_now()
        with self.sessions() as session, session.begin():
            if ids:
                rows = {
                    r.id: r
                    for r in session.scalars(select(OutboxEntry).where(OutboxEntry.id.in_(ids)))
                }
                missing = sorted(set(ids) - set(rows))
                if missing:
                    raise OutboxError(f"no notification with id {', '.join(map(str, missing))}")
                delivered = sorted(i for i, r in rows.items() if r.status == OUTBOX_DELIVERED)
                if delivered:
                    raise OutboxError(
                        f"notification {', '.join(map(str, delivered))} was delivered already; "
                        "nothing to retry"
                    )
                where: Any = OutboxEntry.id.in_(ids)
            else:
                where = OutboxEntry.status == OUTBOX_DEAD
            result = session.execute(
                update(OutboxEntry)
                .where(where, OutboxEntry.status != OUTBOX_DELIVERED)
                .values(
                    status=OUTBOX_PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    claimed_by=None,
                    claim_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def purge(
        self,
        *,
        statuses: Sequence[str] = (OUTBOX_DELIVERED,),
        older_than: datetime | None = None,
        dry_run: bool = False,
    ) -> int:
        """Delete delivered (and, if asked, dead) rows created before ``older_than``; never a
        pending one (it has not been delivered). Returns how many rows were (or would be)
        deleted."""
        from sqlalchemy import delete, func

        if OUTBOX_PENDING in statuses:
            raise OutboxError("pending notifications are never purged: they are not delivered")
        unknown = sorted(set(statuses) - {OUTBOX_DELIVERED, OUTBOX_DEAD})
        if unknown:
            raise OutboxError(f"unknown status {', '.join(unknown)} (delivered or dead)")
        where: list[ColumnElement[bool]] = [OutboxEntry.status.in_(list(statuses))]
        if older_than is not None:
            where.append(OutboxEntry.created_at < older_than)
        with self.sessions() as session, session.begin():
            if dry_run:
                return int(
                    session.scalar(select(func.count()).select_from(OutboxEntry).where(*where))
                    or 0
                )
            result = session.execute(
                delete(OutboxEntry).where(*where).execution_options(synchronize_session=False)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _view(row: OutboxEntry, order_ref: str) -> OutboxView:
    return OutboxView(
        id=row.id,
        order_ref=order_ref,
        item_id=row.item_id,
        process=row.process,
        from_state=row.from_state,
        to_state=row.to_state,
        event=row.event,
        created_at=row.created_at,
        status=row.status,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        idempotency_key=row.idempotency_key,
        claimed_by=row.claimed_by,
        last_error=row.last_error,
        last_http_status=row.last_http_status,
        delivered_at=row.delivered_at,
    )
