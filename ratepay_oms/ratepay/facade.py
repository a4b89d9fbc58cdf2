"""``RatepayFacade``: the one door to RatePAY, one method per business operation.

Each method validates its input (``RatepayValidationError`` before anything is sent), builds the
XML, sends it through the transport, evaluates the answer into a ``RatepayResult`` and records
the call in the API log — also when the call failed (timeout, HTTP 500, garbage). Declines
(401) and processing failures (150) are results; only "no usable answer" raises
``RatepayTransportError``, whose ``sent`` flag says whether the gateway may have booked it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import quote

from ratepay_oms.ratepay.api_log import ApiCallRecord, ApiLogSink
from ratepay_oms.ratepay.builders import BuiltRequest, RequestBuilder
from ratepay_oms.ratepay.codes import ChangeSubtype
from ratepay_oms.ratepay.errors import (
    RatepayTransportError,
    RatepayValidationError,
    StatusLookupUnavailable,
)
from ratepay_oms.ratepay.responses import parse_response
from ratepay_oms.ratepay.settings import RatepaySettings
from ratepay_oms.ratepay.transport import RequestsTransport, Transport
from ratepay_oms.ratepay.types import (
    Basket,
    BasketPosition,
    Customer,
    Exchange,
    Invoicing,
    PaymentInfo,
    RatepayResult,
    Tracking,
    TransactionStatus,
)
from ratepay_oms.ratepay.xml import mask_secret, mask_security_code, to_bytes

log = logging.getLogger(__name__)

STATUS_LOOKUP = "TRANSACTION_STATUS"


class RatepayFacade:
    """RatePAY XML API 1.8 client. Thread-safe as far as the transport is (the default
    ``RequestsTransport`` shares one ``requests.Session``; use one facade per thread if unsure).
    """

    def __init__(
        self,
        settings: RatepaySettings,
        *,
        transport: Transport | None = None,
        api_log: ApiLogSink | None = None,
    ) -> None:
        self.settings = settings
        self.transport: Transport = transport or RequestsTransport()
        self.api_log = api_log
        self._builder = RequestBuilder(settings)

    def __repr__(self) -> str:
        return f"RatepayFacade({self.settings!r})"

    # --- checkout ------------------------------------------------------------------------

    def init_payment(self, *, order_ref: str | None = None) -> RatepayResult:
        """PAYMENT_INIT: open a transaction; ``result.transaction_id`` carries the new id.
        ``order_ref`` only files the call under the order in the API log."""
        return self._call(self._builder.payment_init(order_ref))

    def query_payment(
        self,
        transaction_id: str,
        customer: Customer,
        basket: Basket,
        *,
        order_id: str | None = None,
        merchant_consumer_id: str | None = None,
        device_token: str | None = None,
    ) -> RatepayResult:
        """PAYMENT_QUERY (subtype full): which methods would Ratepay accept (``products``)."""
        return self._call(
            self._builder.payment_query(
                transaction_id,
                customer,
                basket,
                order_id=order_id,
                merchant_consumer_id=merchant_consumer_id,
                device_token=device_token,
            )
        )

    def request_payment(
        self,
        transaction_id: str,
        customer: Customer,
        basket: Basket,
        payment: PaymentInfo,
        *,
        order_id: str | None = None,
        merchant_consumer_id: str | None = None,
        device_token: str | None = None,
    ) -> RatepayResult:
        """PAYMENT_REQUEST: the risk decision. ``result.declined`` → show
        ``result.customer_message``; ``result.descriptor`` is the payment reference.

        Never re-sent on a lost answer; after a failure start over with ``init_payment``.
        """
        return self._call(
            self._builder.payment_request(
                transaction_id,
                customer,
                basket,
                payment,
                order_id=order_id,
                merchant_consumer_id=merchant_consumer_id,
                device_token=device_token,
            )
        )

    def confirm_payment(self, transaction_id: str, order_id: str | None = None) -> RatepayResult:
        """PAYMENT_CONFIRM: finalise an accepted request, passing the shop's order id."""
        return self._call(self._builder.payment_confirm(transaction_id, order_id))

    # --- follow-ups (delta baskets) -----------------------------------------------------

    def confirm_delivery(
        self,
        transaction_id: str,
        basket: Basket,
        *,
        order_id: str | None = None,
        invoicing: Invoicing | None = None,
        tracking: Iterable[Tracking] = (),
    ) -> RatepayResult:
        """CONFIRMATION_DELIVER with only the positions shipped now (items, and shipping /
        discount when they are settled with this shipment)."""
        return self._call(
            self._builder.confirmation_deliver(
                transaction_id, basket, order_id=order_id, invoicing=invoicing, tracking=tracking
            )
        )

    def cancel(
        self, transaction_id: str, basket: Basket | None, *, order_id: str | None = None
    ) -> RatepayResult:
        """PAYMENT_CHANGE cancellation of undelivered positions; ``None`` = everything open."""
        return self._change(ChangeSubtype.CANCELLATION, transaction_id, basket, order_id)

    def refund(
        self, transaction_id: str, basket: Basket | None, *, order_id: str | None = None
    ) -> RatepayResult:
        """PAYMENT_CHANGE return of delivered positions; ``None`` = everything delivered."""
        return self._change(ChangeSubtype.RETURN, transaction_id, basket, order_id)

    def credit(
        self,
        transaction_id: str,
        amount: Decimal,
        *,
        tax_rate: Decimal,
        description: str = "Goodwill",
        currency: str = "EUR",
        order_id: str | None = None,
    ) -> RatepayResult:
        """PAYMENT_CHANGE credit: a goodwill credit of ``amount`` (> 0) after delivery, sent as
        a negative basket discount."""
        if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
            raise RatepayValidationError("credit amount must be a positive Decimal")
        basket = Basket(
            currency=currency,
            discount=BasketPosition(unit_price_gross=-amount, tax_rate=tax_rate, name=description),
        )
        return self._change(ChangeSubtype.CREDIT, transaction_id, basket, order_id)

    def change_order(
        self, transaction_id: str, basket: Basket, *, order_id: str | None = None
    ) -> RatepayResult:
        """PAYMENT_CHANGE change-order: ``basket`` is the complete new *open* basket."""
        if basket is None:
            raise RatepayValidationError("change_order needs the complete new open basket")
        return self._change(ChangeSubtype.CHANGE_ORDER, transaction_id, basket, order_id)

    def _change(
        self,
        subtype: ChangeSubtype,
        transaction_id: str,
        basket: Basket | None,
        order_id: str | None,
    ) -> RatepayResult:
        return self._call(
            self._builder.payment_change(subtype, transaction_id, basket, order_id=order_id)
        )

    # --- profile and instalments ------------------------------------------------------------

    def request_profile(self) -> RatepayResult:
        """PROFILE_REQUEST: methods, limits and countries of the profile (``master_data``)."""
        return self._call(self._builder.profile_request())

    def installment_configuration(self) -> RatepayResult:
        """CONFIGURATION_REQUEST: the profile's instalment rules."""
        return self._call(self._builder.configuration_request())

    def installment_calculation(
        self,
        amount: Decimal,
        *,
        rate: Decimal | None = None,
        months: int | None = None,
        payment_firstday: int | None = None,
        order_ref: str | None = None,
    ) -> RatepayResult:
        """CALCULATION_REQUEST by rate (``rate=``) or by time (``months=``); on success
        ``result.installment_plan`` feeds ``InstallmentDetails.from_plan``. ``order_ref`` only
        files the call under the order in the API log."""
        return self._call(
            self._builder.calculation_request(
                amount, rate=rate, months=months, payment_firstday=payment_firstday,
                order_ref=order_ref,
            )
        )

    # --- reconciliation ------------------------------------------------------------------

    def transaction_status(self, transaction_id: str) -> TransactionStatus:
        """What the gateway has booked for a transaction (the Transaction Status lookup).

        The tool to settle an ambiguous follow-up (``RatepayTransportError(sent=True)``)
        instead of re-sending it.
        """
        base = self.settings.status_api_url
        if not base:
            raise StatusLookupUnavailable(
                "transaction status lookup needs RATEPAY_STATUS_API_URL to be configured"
            )
        if not isinstance(transaction_id, str) or not transaction_id.strip():
            raise RatepayValidationError("transaction_status needs a transaction id")
        url = base + quote(transaction_id, safe="")
        started = time.monotonic()
        http_status: int | None = None
        body: bytes | None = None
        error: str | None = None
        try:
            response = self.transport.get(url, timeout=self._timeout)
            http_status, body = response.status, response.body
            if response.status != 200:
                raise RatepayTransportError(
                    f"{STATUS_LOOKUP}: unexpected HTTP status {response.status}",
                    sent=True,
                    operation=STATUS_LOOKUP,
                    http_status=response.status,
                )
            try:
                data = json.loads(body)
            except ValueError:
                raise RatepayTransportError(
                    f"{STATUS_LOOKUP}: answer is not JSON", sent=True, operation=STATUS_LOOKUP
                ) from None
            if not isinstance(data, dict):
                raise RatepayTransportError(
                    f"{STATUS_LOOKUP}: answer is not a JSON object",
                    sent=True,
                    operation=STATUS_LOOKUP,
                )
        except RatepayTransportError as exc:
            error = str(exc)
            raise
        finally:
            exchange = Exchange(
                operation=STATUS_LOOKUP,
                subtype=None,
                request_xml=f"GET {url}",
                response_xml=self._mask(body),
                http_status=http_status,
                duration_ms=self._ms(started),
                transaction_id=transaction_id,
                error=error,
            )
            # An answered lookup is a successful call (the API log's --errors must not list it).
            self._record(exchange, None, success=error is None)
        return TransactionStatus(transaction_id=transaction_id, data=data, exchange=exchange)

    # --- one call ----------------------------------------------------------------------------

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout, self.settings.read_timeout)

    def _mask(self, document: bytes | str | None) -> str | None:
        if document is None:
            return None
        return mask_secret(mask_security_code(document), self.settings.security_code)

    @staticmethod
    def _ms(started: float) -> int:
        return int((time.monotonic() - started) * 1000)

    def _call(self, built: BuiltRequest) -> RatepayResult:
        body = to_bytes(built.root)
        masked_request = self._mask(body) or ""
        op = built.operation
        started = time.monotonic()
        http_status: int | None = None
        response_body: bytes | None = None

        def exchange(error: str | None) -> Exchange:
            return Exchange(
                operation=op.value,
                subtype=built.subtype,
                request_xml=masked_request,
                response_xml=self._mask(response_body),
                http_status=http_status,
                duration_ms=self._ms(started),
                transaction_id=built.transaction_id,
                order_ref=built.order_ref,
                error=error,
            )

        try:
            response = self.transport.post_xml(
                self.settings.api_url, body, operation=op, timeout=self._timeout
            )
            http_status, response_body = response.status, response.body
            if response.status != 200:
                raise RatepayTransportError(
                    f"{op.value}: unexpected HTTP status {response.status}",
                    sent=True,
                    operation=op.value,
                    http_status=response.status,
                )
            result = parse_response(
                response.body,
                operation=op,
                subtype=built.subtype,
                exchange=exchange(None),
                ns=self.settings.xmlns_urn,
            )
        except RatepayTransportError as exc:
            if exc.http_status is not None and http_status is None:
                http_status = exc.http_status
            message = mask_secret(str(exc), self.settings.security_code)
            failed = exchange(message)
            self._record(failed, None)
            log.warning(
                "RatePAY %s%s tx=%s failed after %d ms: %s (sent=%s)",
                op.value,
                f"/{built.subtype}" if built.subtype else "",
                built.transaction_id,
                failed.duration_ms,
                message,
                exc.sent,
            )
            raise
        self._record(result.exchange, result)
        log.info(
            "RatePAY %s%s tx=%s order=%s status=%s reason=%s result=%s success=%s (%d ms)",
            op.value,
            f"/{built.subtype}" if built.subtype else "",
            result.transaction_id or built.transaction_id,
            built.order_ref,
            result.status_code,
            result.reason_code,
            result.result_code,
            result.success,
            result.exchange.duration_ms,
        )
        return result

    def _record(
        self, exchange: Exchange, result: RatepayResult | None, *, success: bool | None = None
    ) -> None:
        if self.api_log is None:
            return
        self.api_log.record(
            ApiCallRecord(
                created_at=datetime.now(UTC),
                operation=exchange.operation,
                subtype=exchange.subtype,
                transaction_id=(result.transaction_id if result else None)
                or exchange.transaction_id,
                order_ref=exchange.order_ref,
                success=success if success is not None else (
                    result.success if result else False
                ),
                status_code=result.status_code if result else None,
                reason_code=result.reason_code if result else None,
                reason_text=result.reason_text if result else None,
                result_code=result.result_code if result else None,
                result_text=result.result_text if result else None,
                http_status=exchange.http_status,
                error=exchange.error,
                duration_ms=exchange.duration_ms,
                request_xml=exchange.request_xml,
                response_xml=exchange.response_xml,
            )
        )
