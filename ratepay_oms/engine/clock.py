"""Time as the engine stores it: naive UTC.

Business time (``now``: state entry, timeouts, retries) can be set by the caller so a test or
``tick --now`` runs a 90-day timeout today. Leases use the wall clock (``wall_now``) always:
a tick pretending to live in three months must not treat every live lease as expired.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def wall_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(moment: datetime | None) -> datetime:
    """``moment`` as naive UTC (aware values are converted); ``None`` means the wall clock."""
    if moment is None:
        return wall_now()
    if moment.tzinfo is not None:
        return moment.astimezone(UTC).replace(tzinfo=None)
    return moment


RETRY_BASE = timedelta(seconds=30)
RETRY_CAP = timedelta(hours=1)


def retry_delay(attempts: int) -> timedelta:
    """Backoff before retry number ``attempts`` (1-based): 30 s × 2^(attempts−1), ≤ 1 hour."""
    exponent = max(attempts - 1, 0)
    if exponent >= 20:  # 30 s × 2^20 is far past the cap; avoid huge numbers
        return RETRY_CAP
    return min(RETRY_BASE * (1 << exponent), RETRY_CAP)
