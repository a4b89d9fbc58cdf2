"""Password hashing for console users: scrypt from the standard library, salted, self-describing.

A stored hash reads ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (base64), so the cost can be raised
later without breaking old hashes. n=2**15, r=8, p=1 costs ~32 MiB and ~0.1 s per try on a
small server: cheap for one login, expensive for a stolen table.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
N, R, P = 2**15, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
MIN_LENGTH = 10
"""Shortest password ``web adduser`` accepts."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024,
        dklen=KEY_BYTES,
    )


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    return "$".join(
        (SCHEME, str(N), str(R), str(P), _b64(salt), _b64(_derive(password, salt, N, R, P)))
    )


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; a malformed ``stored`` never matches."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = base64.b64decode(digest)
        actual = _derive(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy() -> str:
    return hash_password(secrets.token_urlsafe(16))


def burn_time(password: str) -> None:
    """Spend what a real check costs, so an unknown user name answers as slowly as a known one."""
    verify_password(password, _dummy())
