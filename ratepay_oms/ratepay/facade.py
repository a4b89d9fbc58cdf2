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

from ratepay_oms.ops import instruments
from ratepay_oms.ops.tracing import span
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
from ratepay_oms.ratepay.status_api import (
    INCLUDE,
    OAUTH_OPERATION,
    StatusApiAuthError,
    StatusReport,
    TokenCache,
    mask_token_answer,
    read_status,
    read_token,
    token_request_body,
)
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
from ratepay_oms.ratepay.xml import (
    mask_secret,
    mask_security_code,
    security_code_forms,
    to_bytes,
)

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
        self._tokens = TokenCache(self._fetch_token)
        self._processing_offset: Decimal | None = None
        """``maximum_processing_offset_in_hours`` of the last status answer that had one."""
        self._code_forms: tuple[RatepaySettings, tuple[str, str] | None] | None = None
        self._settings_secrets: tuple[RatepaySettings, tuple[str, ...]] | None = None

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
        a negative basket discount (RatePAY's sample: ``<discount unit-price-gross="-10.00">``,
        basket amount −10.00)."""
        return self._adjust(
            transaction_id, -self._positive(amount, "credit"), tax_rate, description, currency,
            order_id,
        )

    def debit(
        self,
        transaction_id: str,
        amount: Decimal,
        *,
        tax_rate: Decimal,
        description: str = "Adjustment charge",
        currency: str = "EUR",
        order_id: str | None = None,
    ) -> RatepayResult:
        """PAYMENT_CHANGE credit with a positive discount: an adjustment charge of ``amount``
        (> 0) after delivery (reference §4.6: "positive = debit if contracted")."""
        return self._adjust(
            transaction_id, self._positive(amount, "debit"), tax_rate, description, currency,
            order_id,
        )

    @staticmethod
    def _positive(amount: Decimal, what: str) -> Decimal:
        if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
            raise RatepayValidationError(f"{what} amount must be a positive Decimal")
        return amount

    def _adjust(
        self,
        transaction_id: str,
        signed: Decimal,
        tax_rate: Decimal,
        description: str,
        currency: str,
        order_id: str | None,
    ) -> RatepayResult:
        basket = Basket(
            currency=currency,
            discount=BasketPosition(unit_price_gross=signed, tax_rate=tax_rate, name=description),
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
        """What RatePAY has booked for a transaction (the Transaction Status API).

        The tool to settle an ambiguous booking (``RatepayTransportError(sent=True)``) instead
        of re-sending it. Asks ``GET {status url}/{id}?include=all`` with an OAuth2
        client-credentials token (cached; on a 401 renewed and asked once more). A 404 is an
        answer (``status.report.found`` False), not an error; anything else unusable raises
        ``RatepayTransportError``, a refused client ``StatusApiAuthError``.
        """
        if not self.settings.status_lookup_configured:
            raise StatusLookupUnavailable(
                "transaction status lookup needs RATEPAY_OAUTH_CLIENT_ID and "
                "RATEPAY_OAUTH_CLIENT_SECRET (the Transaction Status API client RatePAY issues)"
            )
        if not isinstance(transaction_id, str) or not transaction_id.strip():
            raise RatepayValidationError("transaction_status needs a transaction id")
        url = f"{self.settings.status_url}/{quote(transaction_id, safe='')}?include={INCLUDE}"
        for attempt in (1, 2):
            token = self._tokens.get()
            with span(f"ratepay {STATUS_LOOKUP}", {"ratepay.operation": STATUS_LOOKUP}):
                http_status, body, exchange = self._status_get(url, token, transaction_id)
            if http_status == 401 and attempt == 1:
                self._tokens.drop(token)  # expired or revoked early: one fresh token, once
                continue
            break
        if http_status == 401:
            raise StatusApiAuthError(
                f"{STATUS_LOOKUP}: HTTP 401 even with a fresh token; check "
                "RATEPAY_OAUTH_AUDIENCE and the client's permissions at RatePAY"
            )
        if http_status == 404:
            # A 404 carries no processing window: the last one RatePAY told us, else the setting.
            offset = self._processing_offset
            if offset is None:
                offset = Decimal(str(self.settings.status_processing_offset_hours))
            report = StatusReport(
                transaction_id=transaction_id, found=False, processing_offset_hours=offset
            )
            return TransactionStatus(transaction_id, {}, exchange, report)
        if http_status != 200 or body is None:
            raise RatepayTransportError(
                f"{STATUS_LOOKUP}: unexpected HTTP status {http_status}",
                sent=True,
                operation=STATUS_LOOKUP,
                http_status=http_status,
            )
        report = read_status(transaction_id, body)
        if report.processing_offset_hours is not None:
            self._processing_offset = report.processing_offset_hours
        return TransactionStatus(transaction_id, json.loads(body), exchange, report)

    def _status_get(
        self, url: str, token: str, transaction_id: str
    ) -> tuple[int | None, bytes | None, Exchange]:
        """One GET of the status API, recorded in the API log (token never recorded)."""
        started = time.monotonic()
        http_status: int | None = None
        body: bytes | None = None
        error: str | None = None
        try:
            response = self.transport.get(
                url,
                timeout=self._timeout,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                },
                operation=STATUS_LOOKUP,
            )
            http_status, body = response.status, response.body
            if http_status not in (200, 401, 404):
                error = f"{STATUS_LOOKUP}: unexpected HTTP status {http_status}"
        except RatepayTransportError as exc:
            error = self._mask(str(exc))
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
            self._record(exchange, None, success=error is None and http_status == 200)
        return http_status, body, exchange

    def _fetch_token(self) -> tuple[str, float]:
        """POST the client credentials to the token URL (the body is never logged)."""
        settings = self.settings
        assert settings.oauth_client_id and settings.oauth_client_secret
        body = token_request_body(
            settings.oauth_client_id, settings.oauth_client_secret, settings.audience
        )
        started = time.monotonic()
        http_status: int | None = None
        answer: bytes | None = None
        error: str | None = None
        try:
            response = self.transport.post_json(
                settings.oauth_token_url, body, operation=OAUTH_OPERATION, timeout=self._timeout
            )
            http_status, answer = response.status, response.body
            if http_status in (400, 401, 403):
                error = (
                    f"{OAUTH_OPERATION}: token refused (HTTP {http_status}); check "
                    "RATEPAY_OAUTH_CLIENT_ID, RATEPAY_OAUTH_CLIENT_SECRET and "
                    "RATEPAY_OAUTH_AUDIENCE"
                )
                raise StatusApiAuthError(error)
            if http_status != 200:
                error = f"{OAUTH_OPERATION}: unexpected HTTP status {http_status}"
                raise RatepayTransportError(
                    error, sent=True, operation=OAUTH_OPERATION, http_status=http_status
                )
            return read_token(answer)
        except RatepayTransportError as exc:
            error = self._mask(str(exc))
            raise
        finally:
            self._record(
                Exchange(
                    operation=OAUTH_OPERATION,
                    subtype=None,
                    request_xml=(
                        f"POST {settings.oauth_token_url} (client_id={settings.oauth_client_id}, "
                        f"audience={settings.audience}, grant_type=client_credentials)"
                    ),
                    response_xml=self._mask(mask_token_answer(answer)),
                    http_status=http_status,
                    duration_ms=self._ms(started),
                    error=error,
                ),
                None,
                success=error is None,
            )

    # --- one call ----------------------------------------------------------------------------

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout, self.settings.read_timeout)

    def _mask(self, document: bytes | str | None) -> str | None:
        """``document`` as text without the security code, the client secret or the token."""
        if document is None:
            return None
        return self._mask_secrets(mask_security_code(document))

    def _mask_secrets(self, text: str) -> str:
        """``text`` without the settings' secrets and the current token (the settings'
        secrets looked up once per settings object)."""
        known = self._settings_secrets
        if known is None or known[0] is not self.settings:
            known = self._settings_secrets = (self.settings, self.settings.secrets())
        for secret in (*known[1], self._tokens.current):
            text = mask_secret(text, secret)
        return text

    def _mask_request(self, body: bytes) -> str:
        """``_mask`` of a request document the builder made: its one ``securitycode``
        element (the settings' code, as lxml serialises it) is replaced by the masked one,
        which is what the pattern of ``mask_security_code`` does to it; a document where
        that element is not found is masked by the pattern after all."""
        forms = self._code_forms
        if forms is None or forms[0] is not self.settings:
            forms = self._code_forms = (
                self.settings, security_code_forms(self.settings.security_code)
            )
        text = body.decode("utf-8", errors="replace")
        element = forms[1]
        if element is not None and element[0] in text:
            text = text.replace(element[0], element[1])
        else:
            text = mask_security_code(text)
        return self._mask_secrets(text)

    @staticmethod
    def _ms(started: float) -> int:
        return int((time.monotonic() - started) * 1000)

    def _call(self, built: BuiltRequest) -> RatepayResult:
        name = built.operation.value
        attributes = {"ratepay.operation": name}
        if built.subtype:
            attributes["ratepay.subtype"] = built.subtype
        with span(f"ratepay {name}", attributes):
            return self._send(built)

    def _send(self, built: BuiltRequest) -> RatepayResult:
        body = to_bytes(built.root)
        masked_request = self._mask_request(body)
        op = built.operation
        name = op.value  # an enum member's value is a property: read once
        started = time.monotonic()
        http_status: int | None = None
        response_body: bytes | None = None

        def exchange(error: str | None) -> Exchange:
            return Exchange(
                operation=name,
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
                    f"{name}: unexpected HTTP status {response.status}",
                    sent=True,
                    operation=name,
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
            message = self._mask(str(exc)) or ""
            failed = exchange(message)
            self._record(failed, None)
            log.warning(
                "RatePAY %s%s tx=%s failed after %d ms: %s (sent=%s)",
                name,
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
            name,
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
        if exchange.error is not None:
            outcome = "error"
        elif success is not None:
            outcome = "success" if success else "declined"
        elif result is None or result.success:
            outcome = "success"
        else:
            outcome = "declined"
        instruments.gateway_call(exchange.operation, outcome, exchange.duration_ms / 1000)
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
