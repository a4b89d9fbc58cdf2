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
from ratepay_oms.sandbox.faults import ANSWER_FAULTS, Fault, FaultSet
from ratepay_oms.sandbox.installments import InstallmentConfig
from ratepay_oms.sandbox.ledger import PositionLedger, Transaction
from ratepay_oms.sandbox.status_api import HttpAnswer, OAuthConfig, OAuthServer, status_answer

if TYPE_CHECKING:
    from ratepay_oms.sandbox.server import SandboxServer

logger = logging.getLogger(__name__)

DEMO_SECURITY_CODE = "5e7a0c1f9b3d4a6e8c2f0b1d3a5c7e9f"
"""The sandbox's default credential: 32 hex characters like a real one, valid nowhere else."""


ALL_METHODS: tuple[str, ...] = tuple(m.value for m in PaymentMethod)
B2B_CAPABLE_METHODS: tuple[str, ...] = tuple(
    m for m in ALL_METHODS if m != PaymentMethod.INSTALLMENT
)
"""RatePAY never finances a company: INSTALLMENT for B2B is a validation error (reason 200)."""


@dataclass(frozen=True)
class SandboxConfig:
    """What the sandbox accepts and how it decides.

    The profile's contract (reference §4.7, §5.1, §11.4) is what PROFILE_REQUEST reports and
    PAYMENT_REQUEST enforces, from the same fields, so the two cannot disagree:

    * ``tx_limit_min`` / ``tx_limit_max`` (``tx_limit_max_b2b`` for a customer with a company
      name) bound the basket amount of INVOICE, ELV and PREPAYMENT; INSTALLMENT is bounded by
      ``installment.amount_min`` / ``amount_max``. Outside: ERROR / 2005 or 2006 / 150.
    * ``b2b_methods``: methods a company may use; any other: OK / 2002 / 401 (a decline).
    * ``delivery_address_methods``: methods that accept a delivery address deviating from
      the billing address; any other: ERROR / 2001 / 150.

    ``decline_last_name`` and ``decline_over`` are the sandbox's *risk* rules (703 / 401),
    ``identity_decline_last_name`` its buyer-identity decline (730 / 150),
    checked after the contract: ``decline_over`` below ``tx_limit_max`` declines baskets that
    the contract would allow. The defaults allow every example order, B2B for every method
    but INSTALLMENT and a deviating delivery address for every method.
    """

    profile_id: str = "INTEGRATION_TE_DACH"
    security_code: str = field(default=DEMO_SECURITY_CODE, repr=False)
    decline_last_name: str = "Ablehnung"
    identity_decline_last_name: str = "Unbekannt"
    """Customers with this last name get RatePAY's 730 "Declined - Buyer identity" (result
    150, with a customer message)."""
    decline_over: Decimal = Decimal("5000.00")
    max_body_bytes: int = 1_000_000
    seed: int | None = None  # ids, descriptors and fault probabilities become reproducible
    gateway_node: int = 31  # the NN of transaction ids NN-YYYYMMDDnnnnnnn
    merchant_name: str = "Sandbox Merchant GmbH"
    shop_name: str = "ratepay-oms sandbox shop"
    methods: tuple[str, ...] = ALL_METHODS
    installment: InstallmentConfig = field(default_factory=InstallmentConfig)
    tx_limit_min: Decimal = Decimal("1.00")
    tx_limit_max: Decimal = Decimal("10000.00")
    tx_limit_max_b2b: Decimal = Decimal("10000.00")
    b2b_methods: tuple[str, ...] = B2B_CAPABLE_METHODS
    delivery_address_methods: tuple[str, ...] = ALL_METHODS
    phased_out_methods: tuple[str, ...] = ()
    """Activation status 3: reported, and refused for new orders (120); follow-ups still work."""
    billing_countries: tuple[str, ...] = ("DE", "AT", "CH")
    delivery_countries: tuple[str, ...] = ("DE", "AT", "CH")
    currencies: tuple[str, ...] = ("EUR", "CHF")
    profiles: tuple[SandboxConfig, ...] = ()
    """Further profiles the gateway serves, each with its own credential and contract (only
    their profile fields count: the gateway-wide fields are this config's)."""
    oauth: OAuthConfig = field(default_factory=OAuthConfig)
    """The Transaction Status API's OAuth client and answer timing (``status_api.py``)."""

    def __post_init__(self) -> None:
        for name in ("methods", "b2b_methods", "delivery_address_methods", "phased_out_methods"):
            unknown = set(getattr(self, name)) - set(ALL_METHODS)
            if unknown:
                raise ValueError(f"SandboxConfig.{name}: unknown method(s) {sorted(unknown)}")
        if PaymentMethod.INSTALLMENT in self.b2b_methods:
            raise ValueError("SandboxConfig.b2b_methods: INSTALLMENT is never allowed for B2B")
        if not Decimal("0") <= self.tx_limit_min <= min(self.tx_limit_max, self.tx_limit_max_b2b):
            raise ValueError("SandboxConfig: need 0 <= tx_limit_min <= tx_limit_max(_b2b)")

    def config_for(self, profile_id: str | None) -> SandboxConfig:
        """The configuration of ``profile_id`` (this one when it is not another profile's)."""
        for profile in self.profiles:
            if profile.profile_id == profile_id:
                return profile
        return self

    def tx_limits(self, method: str, *, b2b: bool = False) -> tuple[Decimal, Decimal]:
        """The basket amounts ``method`` accepts (min, max), for a company if ``b2b``."""
        if method == PaymentMethod.INSTALLMENT:
            return self.installment.amount_min, self.installment.amount_max
        return self.tx_limit_min, self.tx_limit_max_b2b if b2b else self.tx_limit_max


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
        self.oauth = OAuthServer(self.config.oauth)
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

    def snapshot(self, transaction_id: str) -> dict[str, Any] | None:
        """The sandbox's own view of a transaction (``Transaction.as_dict``), or None."""
        with self._lock:
            tx = self.transactions.get(transaction_id)
            return tx.as_dict() if tx is not None else None

    def status_request(
        self,
        transaction_id: str,
        *,
        authorization: str | None,
        content_type: str | None,
        accept: str | None,
        include: str | None,
    ) -> HttpAnswer:
        """One Transaction Status API request (RatePAY's shape; ``status_api.py``)."""
        now = datetime.now().replace(microsecond=0)
        with self._lock:
            return status_answer(
                self.oauth,
                self.transactions.get(transaction_id),
                authorization=authorization,
                content_type=content_type,
                accept=accept,
                include=include,
                now=now,
            )

    def token_request(self, content_type: str | None, body: bytes) -> HttpAnswer:
        """``POST /oauth/token`` (client credentials; ``status_api.py``)."""
        return self.oauth.token(content_type, body)

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

    def config_for(self, profile_id: str | None) -> SandboxConfig:
        """The profile configuration the request's credential names."""
        return self.config.config_for(profile_id)

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
        masked_text = mask_security_code(body)
        for profile in (self.config, *self.config.profiles):
            masked_text = mask_secret(masked_text, profile.security_code)
        masked = masked_text.encode()
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
            elif fault is not None and fault.kind in ANSWER_FAULTS:
                answer = protocol.injected_answer(
                    head, fault.kind, result_code=fault.result_code, reason_code=fault.reason_code
                )
                tx = None
            else:
                bookings_before = self._bookings_of(head.transaction_id)
                answer, tx = protocol.process(self, head, now)
                exchange.booked = self._bookings_of(head.transaction_id) != bookings_before
                if fault is not None and fault.kind == "reason_code" and fault.reason_code:
                    answer = protocol.with_reason(answer, fault.reason_code)
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

    def _bookings_of(self, transaction_id: str | None) -> int:
        """Bookings (and an authorised basket) of one transaction. A request can only book on
        the transaction its head names (PAYMENT_INIT opens a new one, which books nothing), so
        this is all ``booked`` needs; counting every transaction's bookings under the lock
        made each call cost O(transactions), and a 10,000-order soak quadratic."""
        tx = self.transactions.get(transaction_id or "")
        return 0 if tx is None else len(tx.bookings) + (1 if tx.positions else 0)

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
