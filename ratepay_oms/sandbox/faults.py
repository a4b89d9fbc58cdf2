"""Fault injection: make the sandbox misbehave the way networks and gateways do.

A ``Fault`` names *what* goes wrong (``kind``) and *when*: for which operation (+ subtype), on
which call number, every N-th call, with a probability (from a seedable RNG, so a failing run
can be replayed), and how many times at most. ``FaultSet`` picks the fault for one request;
the first matching fault wins, and each fault counts the calls it has seen itself.

Kinds and what the gateway then did with the booking:

=========================  ==========================================================
``delay``                  sleep ``delay_s``, then process and answer normally
``timeout_after_booking``  book, then sleep ``delay_s`` and close without answering
``http_500``               answer HTTP 500 without processing (nothing booked)
``malformed_xml``          process and book, then answer a broken XML document
``result_code``            answer ERROR / ``reason_code`` / ``result_code`` (default
                           1000 / 150), nothing booked
``status_fatal``           answer status FATAL, reason ``reason_code`` (default 1000)
                           and no result element (one only if ``result_code`` is set),
                           nothing booked
``status_warning``         answer status WARNING with the operation's own success
                           reason / result (``result_code`` overrides), nothing booked
``result_warning``         answer status OK with result 405 (warning) and the
                           operation's success reason, nothing booked
``drop``                   close the connection before processing (nothing booked)
``reason_code``            process as usual, but answer with reason ``reason_code``
                           (e.g. CALCULATION_REQUEST 502 with 650: a plan that is
                           not usable); books what the request books
=========================  ==========================================================

The three status/result kinds test the client's evaluation of ``head/processing`` (reference
§2.4, §6.1, §6.2): each changes one field of an otherwise success-shaped answer, and a client
must treat every one of them as a failure (anything but status OK, or a result other than the
operation's success result). The sandbox books nothing for them, so a client that retries
after such an answer books once. ``result_code=405`` answers *ERROR* / 1000 / 405, which a
client already fails on the status; ``result_warning`` is the OK / 405 case.

From the command line (``ratepay-oms sandbox serve --fault SPEC``, see ``Fault.parse``):
``--fault status_fatal:CONFIRMATION_DELIVER``, ``--fault status_warning:PAYMENT_REQUEST:0.5``,
``--fault result_warning:PAYMENT_CHANGE/cancellation``. At run time: ``POST /sandbox/faults``
with ``{"kind": "status_fatal", "operation": "PAYMENT_CHANGE", "times": 1}``.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from ratepay_oms.errors import OmsError

logger = logging.getLogger(__name__)

ANSWER_FAULTS = frozenset({"status_fatal", "status_warning", "result_warning"})
"""Kinds that answer a status/result of their own instead of processing the request."""
FAULT_KINDS = frozenset(
    {"delay", "timeout_after_booking", "http_500", "malformed_xml", "result_code", "drop",
     "reason_code"}
    | ANSWER_FAULTS
)
BOOKING_FAULTS = frozenset({"delay", "timeout_after_booking", "malformed_xml", "reason_code"})
"""Kinds after which the request was processed (and booked) as usual."""


class FaultSpecError(OmsError):
    """A fault description the sandbox can't use; the message says which part is wrong."""


@dataclass
class Fault:
    kind: str
    operation: str | None = None
    subtype: str | None = None
    call_number: int | None = None  # only the n-th matching call (1-based)
    probability: float | None = None  # each matching call with this probability
    times: int | None = None  # at most this many times in total
    delay_s: float = 0.0
    result_code: int | None = None
    every: int | None = None  # every n-th matching call
    reason_code: int | None = None
    seen: int = field(default=0, compare=False)
    applied: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise FaultSpecError(
                f"unknown fault kind {self.kind!r}; use one of {', '.join(sorted(FAULT_KINDS))}"
            )
        if self.operation in ("", "*"):
            self.operation = None
        if self.operation is not None:
            self.operation = self.operation.upper()
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise FaultSpecError(f"fault probability {self.probability} is not within 0..1")
        for name in ("call_number", "times", "every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FaultSpecError(f"fault {name} must be at least 1, not {value}")
        if self.delay_s < 0:
            raise FaultSpecError(f"fault delay_s must not be negative, not {self.delay_s}")

    def matches(self, operation: str | None, subtype: str | None) -> bool:
        if self.operation is not None and self.operation != operation:
            return False
        return self.subtype is None or self.subtype == subtype

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """Build from the JSON of ``POST /sandbox/faults`` (unknown keys are refused)."""
        allowed = {
            "kind",
            "operation",
            "subtype",
            "call_number",
            "probability",
            "times",
            "delay_s",
            "result_code",
            "every",
            "reason_code",
        }
        if not isinstance(data, dict) or "kind" not in data:
            raise FaultSpecError("a fault is a JSON object with at least a 'kind'")
        unknown = set(data) - allowed
        if unknown:
            raise FaultSpecError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise FaultSpecError(f"bad fault: {exc}") from None

    @classmethod
    def parse(cls, spec: str, *, delay_s: float = 0.0) -> Fault:
        """``KIND[:OPERATION[/SUBTYPE][:EVERY_N|:PROBABILITY]]`` as the CLI takes it.

        An integer third part means every N-th call, a decimal with a dot a probability;
        ``*`` as operation matches all operations. ``result_code`` takes ``result_code=NNN``
        style extras after the kind: ``result_code=405:PAYMENT_CHANGE``; so do
        ``status_fatal`` (adds a result element) and ``status_warning`` (replaces the
        success result).
        """
        parts = spec.split(":")
        if not parts[0] or len(parts) > 3:
            raise FaultSpecError(
                f"bad fault {spec!r}: use KIND[:OPERATION[/SUBTYPE][:EVERY_N|:PROBABILITY]]"
            )
        kind, _, code = parts[0].partition("=")
        kwargs: dict[str, Any] = {"kind": kind, "delay_s": delay_s}
        if code:
            try:
                kwargs["result_code"] = int(code)
            except ValueError:
                raise FaultSpecError(f"bad result code in fault {spec!r}") from None
        if len(parts) > 1:
            operation, _, subtype = parts[1].partition("/")
            kwargs["operation"] = operation
            kwargs["subtype"] = subtype or None
        if len(parts) > 2:
            when = parts[2]
            try:
                if "." in when:
                    kwargs["probability"] = float(when)
                else:
                    kwargs["every"] = int(when)
            except ValueError:
                raise FaultSpecError(f"bad EVERY_N / PROBABILITY in fault {spec!r}") from None
        return cls(**kwargs)


class FaultSet:
    """The active faults of one gateway; safe to change while requests are served."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._rng = random.Random(seed)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        logger.info("fault added: %s", fault.kind)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def seed(self, seed: int | None) -> None:
        with self._lock:
            self._rng = random.Random(seed)

    def list(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def pick(self, operation: str | None, subtype: str | None) -> Fault | None:
        """The fault to apply to this call, if any (counts the call for every matching fault)."""
        with self._lock:
            chosen: Fault | None = None
            for fault in self._faults:
                if not fault.matches(operation, subtype):
                    continue
                if fault.times is not None and fault.applied >= fault.times:
                    continue
                fault.seen += 1
                if chosen is not None:
                    continue
                if fault.call_number is not None and fault.seen != fault.call_number:
                    continue
                if fault.every is not None and fault.seen % fault.every != 0:
                    continue
                if fault.probability is not None and self._rng.random() >= fault.probability:
                    continue
                fault.applied += 1
                chosen = fault
            return chosen
