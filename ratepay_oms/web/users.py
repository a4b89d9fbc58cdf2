"""Console users and their sessions: the only writer of ``oms_web_user`` and ``oms_web_session``.

Used by the web app and by ``ratepay-oms web adduser|deluser|users``; it needs no web
framework, so the CLI manages users on an installation without the ``web`` extra.

A session is a random token in an HttpOnly cookie; the table keeps its SHA-256 only. Logging
out, deleting the user or the session's end (``SESSION_HOURS``) closes it on the server, not
only in the browser.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.web import ROLE_OPERATOR, ROLES, WebSession, WebUser
from ratepay_oms.web.passwords import MIN_LENGTH, burn_time, hash_password, verify_password

SESSION_HOURS = 12
USER_NAME_MAX = 100


class UserError(OmsError):
    """A user name, role or password the console refuses (says which and why)."""


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    created_at: datetime
    last_login_at: datetime | None = None

    @property
    def can_act(self) -> bool:
        """Operators fire events and resolve intents; viewers only look."""
        return self.role == ROLE_OPERATOR

    @classmethod
    def of(cls, row: WebUser) -> User:
        return cls(row.id, row.name, row.role, row.created_at, row.last_login_at)


@dataclass(frozen=True)
class LoginSession:
    """A logged-in browser as a request sees it."""

    id: int
    user: User
    csrf_token: str
    expires_at: datetime
    has_flash: bool = False
    """Messages wait for the next page (``pop_flash`` then writes; otherwise nothing does)."""


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_password(password: str) -> str:
    if len(password) < MIN_LENGTH:
        raise UserError(f"password too short: at least {MIN_LENGTH} characters")
    if password != password.strip():
        raise UserError("password starts or ends with white space (a stray newline?)")
    return password


def check_name(name: str) -> str:
    if not name or len(name) > USER_NAME_MAX or not name.isprintable() or name != name.strip():
        raise UserError(
            f"invalid user name {name!r}: 1 to {USER_NAME_MAX} printable characters, "
            "no leading or trailing space"
        )
    return name


class UserStore:
    """Users and sessions on one database (a ``sessionmaker``, e.g. ``engine.session``)."""

    def __init__(self, sessions: sessionmaker[Session] | Any) -> None:
        self._sessions = sessions

    # -- users ---------------------------------------------------------------------------
    def add(self, name: str, role: str, password: str) -> User:
        check_name(name)
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}: choose {' or '.join(ROLES)}")
        check_password(password)
        row = WebUser(name=name, role=role, password_hash=hash_password(password),
                      created_at=utc_now())
        try:
            with self._sessions() as session, session.begin():
                if session.scalar(select(WebUser.id).where(WebUser.name == name)) is not None:
                    raise UserError(f"user {name!r} exists already (delete it first to replace)")
                session.add(row)
                session.flush()
                return User.of(row)
        except IntegrityError:
            raise UserError(f"user {name!r} exists already (delete it first to replace)") from None

    def delete(self, name: str) -> None:
        """Remove the user and end every session they have open."""
        with self._sessions() as session, session.begin():
            user_id = session.scalar(select(WebUser.id).where(WebUser.name == name))
            if user_id is None:
                raise UserError(f"no user {name!r} (see: ratepay-oms web users)")
            session.execute(delete(WebSession).where(WebSession.user_id == user_id))
            session.execute(delete(WebUser).where(WebUser.id == user_id))

    def users(self) -> list[User]:
        with self._sessions() as session:
            return [User.of(r) for r in session.scalars(select(WebUser).order_by(WebUser.name))]

    # -- sessions ------------------------------------------------------------------------
    def login(self, name: str, password: str, *, hours: int = SESSION_HOURS) -> tuple[str, User]:
        """A new session token for a correct name and password; ``UserError`` otherwise (the
        same message and about the same time whether the name or the password was wrong)."""
        now = utc_now()
        with self._sessions() as session, session.begin():
            row = session.scalar(select(WebUser).where(WebUser.name == name))
            if row is None:
                burn_time(password)
                raise UserError("wrong user name or password")
            if not verify_password(password, row.password_hash):
                raise UserError("wrong user name or password")
            token = secrets.token_urlsafe(32)
            row.last_login_at = now
            session.execute(delete(WebSession).where(WebSession.expires_at < now))
            session.add(
                WebSession(
                    token_hash=_token_hash(token), user_id=row.id,
                    csrf_token=secrets.token_urlsafe(32), created_at=now,
                    expires_at=now + timedelta(hours=hours),
                )
            )
            return token, User.of(row)

    def session(self, token: str | None) -> LoginSession | None:
        """The live session for a cookie's token (``None``: no cookie, unknown or expired)."""
        if not token:
            return None
        with self._sessions() as session:
            found = session.execute(
                select(WebSession, WebUser)
                .join(WebUser, WebUser.id == WebSession.user_id)
                .where(WebSession.token_hash == _token_hash(token))
            ).first()
            if found is None:
                return None
            login, user = found
            if login.expires_at <= utc_now():
                return None
            return LoginSession(
                login.id, User.of(user), login.csrf_token, login.expires_at, bool(login.flash)
            )

    def logout(self, token: str | None) -> None:
        if not token:
            return
        with self._sessions() as session, session.begin():
            session.execute(delete(WebSession).where(WebSession.token_hash == _token_hash(token)))

    # -- messages for the next page --------------------------------------------------------
    def push_flash(self, session_id: int, kind: str, text: str) -> None:
        """Queue a message (``ok`` / ``refused`` / ``error``) for the next page this session
        loads: the answer to a POST survives the redirect after it (and a double click)."""
        with self._sessions() as session, session.begin():
            row = session.get(WebSession, session_id, with_for_update=True)
            if row is None:
                return
            messages = json.loads(row.flash) if row.flash else []
            messages.append({"kind": kind, "text": text})
            row.flash = json.dumps(messages[-20:])

    def pop_flash(self, session_id: int) -> list[dict[str, str]]:
        with self._sessions() as session, session.begin():
            row = session.get(WebSession, session_id, with_for_update=True)
            if row is None or not row.flash:
                return []
            messages: list[dict[str, str]] = json.loads(row.flash)
            row.flash = None
            return messages
