"""``SandboxGateway``: the state of the offline RatePAY gateway and one request's way through it.

The gateway owns the transactions and their ledgers, the record of every exchange and the
active faults. ``handle`` is what the HTTP server calls with a request body; it decides the
fault, processes the request under the one gateway lock (so concurrent requests see a
consistent ledger) and tells the server what to send — or that it must not answer at all.
"""

from __future__ import annotations

import logging
import random
import string
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ratepay_oms.errors import OmsError
from ratepay_oms.ratepay.codes import PaymentMethod
from ratepay_oms.ratepay.xml import mask_secret, mask_security_code, parse_xml
from ratepay_oms.sandbox import protocol
from ratepay_oms.sandbox.faults import Fault, FaultSet
from ratepay_oms.sandbox.installments import InstallmentConfig
from ratepay_oms.sandbox.ledger import PositionLedger, Transaction

if TYPE_CHECKING:
    from ratepay_oms.sandbox.server import SandboxServer

logger = logging.getLogger(__name__)

DEMO_SECURITY_CODE = "5e7a0c1f9b3d4a6e8c2f0b1d3a5c7e9f"
"""The sandbox's default credential: 32 hex characters like a real one, valid nowhere else."""


@dataclass(frozen=True)
class SandboxConfig:
    """What the sandbox accepts and how it decides."""

    profile_id: str = "INTEGRATION_TE_DACH"
    security_code: str = field(default=DEMO_SECURITY_CODE, repr=False)
    decline_last_name: str = "Ablehnung"
    decline_over: Decimal = Decimal("5000.00")
    max_body_bytes: int = 1_000_000
    seed: int | None = None  # ids, descriptors and fault probabilities become reproducible
    gateway_node: int = 31  # the NN of transaction ids NN-YYYYMMDDnnnnnnn
    merchant_name: str = "Sandbox Merchant GmbH"
    shop_name: str = "ratepay-oms sandbox shop"
    methods: tuple[str, ...] = tuple(m.value for m in PaymentMethod)
    installment: InstallmentConfig = field(default_factory=InstallmentConfig)


@dataclass
class Exchange:
    """One request as the gateway saw it (security code masked) and what it did with it."""

    operation: str | None
    subtype: str | None
    transaction_id: str | None
    request_xml: bytes
    response_xml: bytes | None
    http_status: int | None  # None: the connection was closed without an answer
    fault: str | None
    received_at: datetime
    booked: bool = False


@dataclass
class Reply:
    """What the HTTP server must do for one request."""

    http_status: int | None
    body: bytes | None
    wait_s: float = 0.0  # sleep before answering / before closing
    close_without_answer: bool = False
    content_type: str = "text/xml; charset=UTF-8"


class SandboxGateway:
    """An offline RatePAY 1.8 XML gateway with a per-position ledger and fault injection."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.faults = FaultSet(self.config.seed)
        self._lock = threading.RLock()
        self.stopping = threading.Event()
        self._init_state()

    def _init_state(self) -> None:
        self.transactions: dict[str, Transaction] = {}
        self.received: list[Exchange] = []
        self._rng = random.Random(self.config.seed)
        self._sequence = 1_000_000 + self._rng.randrange(1_000_000)
        self._short_ids: set[str] = set()

    # -- public state -------------------------------------------------------------------

    def ledger(self, transaction_id: str) -> dict[str, PositionLedger]:
        """The per-position ledger of a transaction (a snapshot; KeyError if unknown)."""
        with self._lock:
            tx = self.transactions[transaction_id]
            return {k: PositionLedger(**vars(p)) for k, p in tx.positions.items()}

    def status(self, transaction_id: str) -> dict[str, Any] | None:
        """The Transaction Status equivalent (reference §10.2) as JSON-ready data."""
        with self._lock:
            tx = self.transactions.get(transaction_id)
            return tx.as_dict() if tx is not None else None

    def reset(self) -> None:
        """Forget all transactions, exchanges and faults (the configuration stays)."""
        with self._lock:
            self.faults.clear()
            self.faults.seed(self.config.seed)
            self._init_state()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> SandboxServer:
        """Start the HTTP server in a background thread; ``port=0`` picks a free port."""
        from ratepay_oms.sandbox.server import SandboxServer

        return SandboxServer(self, host, port).start()

    # -- ids ------------------------------------------------------------------------------

    def open_transaction(self, profile_id: str, now: datetime) -> Transaction:
        self._sequence += 1
        tx_id = f"{self.config.gateway_node:02d}-{now:%Y%m%d}{self._sequence % 10_000_000:07d}"
        alphabet = string.ascii_uppercase + string.digits
        while True:
            short = ".".join(
                "".join(self._rng.choice(alphabet) for _ in range(4)) for _ in range(4)
            )
            if short not in self._short_ids:
                break
        self._short_ids.add(short)
        tx = Transaction(tx_id, short, profile_id, now)
        self.transactions[tx_id] = tx
        return tx

    def new_descriptor(self) -> str:
        """A payment reference shaped like RatePAY's (``DG0496020Y0``)."""
        letters = string.ascii_uppercase
        return (
            "".join(self._rng.choice(letters) for _ in range(2))
            + "".join(self._rng.choice(string.digits) for _ in range(7))
            + self._rng.choice(letters)
            + self._rng.choice(string.digits)
        )

    # -- one request ------------------------------------------------------------------------

    def handle(self, body: bytes) -> Reply:
        """Process one request body and say how to answer it (faults included)."""
        now = datetime.now().replace(microsecond=0)
        masked = mask_secret(mask_security_code(body), self.config.security_code).encode()
        root = None
        parse_error: str | None = None
        try:
            root = parse_xml(body, max_bytes=self.config.max_body_bytes)
        except OmsError as exc:
            parse_error = str(exc)
        head = protocol.read_head(root)
        fault = self.faults.pick(head.operation, head.subtype)
        exchange = Exchange(
            head.operation,
            head.subtype,
            head.transaction_id,
            masked,
            None,
            None,
            fault.kind if fault else None,
            now,
        )
        if fault is not None:
            logger.info("sandbox fault %s on %s", fault.kind, head.operation)
        if fault is not None and fault.kind == "drop":
            return self._record(exchange, Reply(None, None, close_without_answer=True))
        if fault is not None and fault.kind == "http_500":
            exchange.http_status = 500
            return self._record(
                exchange, Reply(500, b"Internal Server Error", content_type="text/plain")
            )
        if fault is not None and fault.kind == "delay":
            self.stopping.wait(fault.delay_s)
        with self._lock:
            if parse_error is not None or root is None:
                refusal = protocol.Refusal(200, parse_error or "not an XML document")
                answer, tx = protocol.refusal_answer(head, refusal), None
            elif fault is not None and fault.kind == "result_code":
                refusal = protocol.Refusal(
                    fault.reason_code or 1000, result=fault.result_code or 150
                )
                answer, tx = protocol.refusal_answer(head, refusal), None
            else:
                bookings_before = self._booking_count()
                answer, tx = protocol.process(self, head, now)
                exchange.booked = self._booking_count() != bookings_before
            if tx is not None:
                exchange.transaction_id = tx.transaction_id
            response = protocol.build_response(head, answer, tx, now)
            logger.info(
                "sandbox %s %s -> %s/%s/%s",
                head.operation,
                head.subtype or "",
                answer.status,
                answer.reason_code,
                answer.result_code,
            )
        if fault is not None and fault.kind == "timeout_after_booking":
            exchange.response_xml = response
            return self._record(
                exchange, Reply(None, None, wait_s=fault.delay_s, close_without_answer=True)
            )
        if fault is not None and fault.kind == "malformed_xml":
            response = response[: len(response) // 2] + b"<unclosed"
        exchange.response_xml = response
        exchange.http_status = 200
        return self._record(exchange, Reply(200, response))

    def _booking_count(self) -> int:
        return sum(len(tx.bookings) for tx in self.transactions.values()) + sum(
            1 for tx in self.transactions.values() if tx.positions
        )

    def _record(self, exchange: Exchange, reply: Reply) -> Reply:
        with self._lock:
            self.received.append(exchange)
        return reply

    def add_fault(self, fault: Fault) -> Fault:
        return self.faults.add(fault)

    def wait(self, seconds: float) -> None:
        """Sleep for a fault, but wake up when the server stops."""
        if seconds > 0:
            self.stopping.wait(seconds)
        else:
            time.sleep(0)
