"""The RatePAY OMS commands: by order, one booking call per group of items, exactly once.

Every command here books something at RatePAY, so each is an engine ``ExternalCommand``:
``prepare`` gathers the order data and decides the call (its JSON summary is committed as an
intent before anything is sent), ``send`` makes the one booking call, ``apply`` records one
outcome row per item (``payment_store.record_outcomes``) that the conditions read, and
``reconcile`` asks the transaction status lookup what was booked when the answer was lost.
Kinds of failure are kept apart on purpose:

- a *business* refusal (RatePAY answered, but not with success: decline, 150/2300, …) is
  recorded as a failed outcome, so the conditions route the items to ``… invalid`` (or
  ``payment request declined``), where a person decides (``retry``);
- *no usable answer* (``RatepayTransportError``): when the request certainly never left
  (``sent=False``) the engine retries with backoff; otherwise the intent stays open and is
  reconciled — never re-sent blindly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ratepay_oms.engine.plugins import PreparedCall, Reconciled
from ratepay_oms.errors import OmsError
from ratepay_oms.orders import Address as OrderAddress
from ratepay_oms.orders import CustomerInput, OrderInput, PositionInput
from ratepay_oms.persistence.payment import (
    CANCELLATION,
    CANCELLED,
    DELIVERED,
    DELIVERY,
    PAYMENT_CONFIRM,
    PAYMENT_REQUEST,
    RETURN,
    RETURNED,
)
from ratepay_oms.plugins.ratepay import basket as baskets
from ratepay_oms.plugins.ratepay import payment_store as store
from ratepay_oms.plugins.ratepay import reconcile as recon
from ratepay_oms.ratepay import (
    Address,
    BankAccount,
    Basket,
    BasketItem,
    BasketPosition,
    Customer,
    InstallmentDetails,
    PaymentInfo,
    RatepayFacade,
    RatepayResult,
)

if TYPE_CHECKING:
    from ratepay_oms.engine.plugins import CommandContext
    from ratepay_oms.persistence.models import Order, OrderItem
    from ratepay_oms.persistence.payment import RatepayPayment

log = logging.getLogger(__name__)

SERVICE_NAME = "ratepay"
"""Key of the facade in the engine's ``services``."""


class RatepayNotConfiguredError(OmsError):
    """The engine was built without a RatePAY facade (``services={"ratepay": facade}``)."""


def facade_of(ctx: CommandContext) -> RatepayFacade:
    facade = ctx.services.get(SERVICE_NAME)
    if facade is None:
        raise RatepayNotConfiguredError(
            "no RatePAY facade configured: set the RATEPAY_* settings (see docs) or pass "
            "services={'ratepay': RatepayFacade(...)} to the Engine"
        )
    return facade  # type: ignore[no-any-return]


# --- mapping our order onto the facade's types ----------------------------------------------


def _address(a: OrderAddress) -> Address:
    return Address(
        street=a.street,
        zip_code=a.zip_code,
        city=a.city,
        country_code=a.country_code,
        street_number=a.street_number,
        street_additional=a.street_additional,
        first_name=a.first_name,
        last_name=a.last_name,
        company=a.company,
    )


def to_customer(c: CustomerInput) -> Customer:
    bank = c.bank_account
    return Customer(
        first_name=c.first_name,
        last_name=c.last_name,
        email=c.email,
        billing_address=_address(c.billing_address),
        gender=c.gender,
        date_of_birth=c.date_of_birth,
        phone=c.phone,
        mobile=c.mobile,
        ip_address=c.ip_address,
        language=c.language,
        delivery_address=_address(c.delivery_address) if c.delivery_address else None,
        bank_account=BankAccount(bank.owner, bank.iban, bank.bic, bank.bank_name) if bank else None,
        company_name=c.company_name,
        vat_id=c.vat_id,
    )


def _position(p: PositionInput | None) -> BasketPosition | None:
    if p is None:
        return None
    return BasketPosition(unit_price_gross=p.unit_price_gross, tax_rate=p.tax_rate, name=p.name)


def to_basket(plan: baskets.BasketPlan) -> Basket:
    return Basket(
        items=tuple(
            BasketItem(
                article_number=line.article_number,
                name=line.name,
                quantity=line.quantity,
                unit_price_gross=line.unit_price_gross,
                tax_rate=line.tax_rate,
                discount=line.discount,
                unique_article_number=line.unique_article_number,
                category=line.category,
            )
            for line in plan.lines
        ),
        currency=plan.currency,
        shipping=_position(plan.shipping),
        discount=_position(plan.discount),
    )


# --- commands ---------------------------------------------------------------------------------


def _facade(services: dict[str, Any]) -> RatepayFacade:
    facade = services.get(SERVICE_NAME)
    if facade is None:
        raise RatepayNotConfiguredError("no RatePAY facade configured")
    return facade  # type: ignore[no-any-return]


class _External:
    """Shared plumbing of the RatePAY external commands."""

    by_order = True
    external = True
    action: str

    def prepare(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall | None:
        raise NotImplementedError

    def send(self, services: dict[str, Any], call: PreparedCall) -> RatepayResult:
        raise NotImplementedError

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: RatepayResult | Reconciled,
    ) -> None:
        raise NotImplementedError

    def reconcile(self, services: dict[str, Any], summary: dict[str, Any]) -> Reconciled | None:
        facade = services.get(SERVICE_NAME)
        if facade is None or not facade.settings.status_api_url:
            return None  # nobody to ask: a person decides
        status = facade.transaction_status(summary["transaction_id"])
        return recon.verdict(summary, status.data)

    def _record_reconciled(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: Reconciled,
        *,
        success: bool = True,
        message: str | None = None,
        result_code: str | None = None,
    ) -> None:
        store.record_outcomes(
            ctx.session,
            order,
            items,
            self.action,
            ctx.now,
            success=success,
            operation=summary["operation"],
            subtype=summary.get("subtype"),
            transaction_id=summary.get("transaction_id"),
            message=message or answer.detail or "booked at RatePAY (transaction status)",
            result_code=result_code,
        )


class PaymentRequestCommand(_External):
    """PAYMENT_INIT + PAYMENT_REQUEST (INSTALLMENT: CALCULATION_REQUEST first).

    Always starts with a fresh PAYMENT_INIT, as RatePAY asks after a failed request, so the
    manual ``retry payment request`` is a clean new attempt. INIT and CALCULATION book
    nothing, so they run in ``prepare``; the intent covers the PAYMENT_REQUEST.
    """

    action = PAYMENT_REQUEST

    def prepare(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall | None:
        facade = facade_of(ctx)
        data = store.order_input(order)
        payment = store.ensure_payment(ctx.session, order, data.payment.method, ctx.now)
        basket = to_basket(baskets.full_basket(data, store.units(order.items)))

        details: InstallmentDetails | None = None
        if data.payment.method == "INSTALLMENT":
            details = self._calculate(ctx, facade, data, basket, order, items, payment)
            if details is None:
                return None
        init = facade.init_payment(order_ref=order.order_ref)
        if not init.success or not init.transaction_id:
            self._refused(ctx, order, items, payment, init)
            return None
        payment.transaction_id = init.transaction_id
        payment.transaction_short_id = init.transaction_short_id
        payment.updated_at = ctx.now
        info = PaymentInfo(
            method=data.payment.method,
            installment=details,
            debit_pay_type=data.payment.installment.debit_pay_type
            if data.payment.installment
            else None,
        )
        summary = {
            "describe": f"PAYMENT_REQUEST of order {order.order_ref}",
            "operation": "PAYMENT_REQUEST",
            "transaction_id": init.transaction_id,
            "method": data.payment.method,
            "amount": str(basket.amount),
        }
        payload = (init.transaction_id, to_customer(data.customer), basket, info, data)
        return PreparedCall(summary, payload)

    def send(self, services: dict[str, Any], call: PreparedCall) -> RatepayResult:
        tx_id, customer, basket, info, data = call.payload
        return _facade(services).request_payment(
            tx_id,
            customer,
            basket,
            info,
            order_id=data.order_ref,
            merchant_consumer_id=data.customer.customer_ref,
            device_token=data.device_token,
        )

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: RatepayResult | Reconciled,
    ) -> None:
        payment = store.get_payment(ctx.session, order.id)
        assert payment is not None  # written by prepare
        payment.updated_at = ctx.now
        if isinstance(answer, Reconciled):
            found = answer.answer if isinstance(answer.answer, dict) else {}
            accepted = found.get("accepted", True)
            payment.descriptor = found.get("descriptor") or payment.descriptor
            payment.result_code = "402" if accepted else "401"
            self._record_reconciled(
                ctx, order, items, summary, answer, success=bool(accepted),
                result_code=payment.result_code,
            )
            return
        payment.transaction_id = answer.transaction_id or summary["transaction_id"]
        payment.transaction_short_id = (
            answer.transaction_short_id or payment.transaction_short_id
        )
        payment.descriptor = answer.descriptor
        payment.result_code = None if answer.result_code is None else str(answer.result_code)
        payment.reason_code = None if answer.reason_code is None else str(answer.reason_code)
        payment.customer_message = answer.customer_message
        store.record_outcomes(ctx.session, order, items, PAYMENT_REQUEST, ctx.now, result=answer)

    def _calculate(
        self,
        ctx: CommandContext,
        facade: RatepayFacade,
        data: OrderInput,
        basket: Basket,
        order: Order,
        items: Sequence[OrderItem],
        payment: RatepayPayment,
    ) -> InstallmentDetails | None:
        choice = data.payment.installment
        assert choice is not None  # the order input requires it for INSTALLMENT
        if choice.calculation_type == "calculation-by-rate":
            calc = facade.installment_calculation(
                basket.amount, rate=choice.value, payment_firstday=choice.payment_firstday,
                order_ref=order.order_ref,
            )
        else:
            calc = facade.installment_calculation(
                basket.amount, months=int(choice.value), payment_firstday=choice.payment_firstday,
                order_ref=order.order_ref,
            )
        if not calc.success or calc.installment_plan is None:
            self._refused(ctx, order, items, payment, calc)
            return None
        payment.installment_plan = store.plan_json(calc.installment_plan)
        return InstallmentDetails.from_plan(calc.installment_plan)

    @staticmethod
    def _refused(
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        payment: RatepayPayment,
        result: RatepayResult,
    ) -> None:
        """A step before PAYMENT_REQUEST was refused: the request counts as failed."""
        payment.result_code = None if result.result_code is None else str(result.result_code)
        payment.reason_code = None if result.reason_code is None else str(result.reason_code)
        payment.customer_message = result.customer_message
        payment.updated_at = ctx.now
        store.record_outcomes(
            ctx.session, order, items, PAYMENT_REQUEST, ctx.now, result=result, success=False
        )


def _transaction(
    ctx: CommandContext, order: Order, items: Sequence[OrderItem], action: str, operation: str
) -> RatepayPayment | None:
    """The order's payment with its transaction id, or a recorded failure without a call."""
    payment = store.get_payment(ctx.session, order.id)
    if payment is None or not payment.transaction_id:
        store.record_outcomes(
            ctx.session,
            order,
            items,
            action,
            ctx.now,
            success=False,
            operation=operation,
            message="no accepted RatePAY transaction for this order",
        )
        return None
    return payment


class ConfirmPaymentCommand(_External):
    """PAYMENT_CONFIRM with the order reference."""

    action = PAYMENT_CONFIRM

    def prepare(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall | None:
        facade_of(ctx)
        payment = _transaction(ctx, order, items, PAYMENT_CONFIRM, "PAYMENT_CONFIRM")
        if payment is None:
            return None
        summary = {
            "describe": f"PAYMENT_CONFIRM of order {order.order_ref}",
            "operation": "PAYMENT_CONFIRM",
            "transaction_id": payment.transaction_id,
            "order_ref": order.order_ref,
        }
        return PreparedCall(summary)

    def send(self, services: dict[str, Any], call: PreparedCall) -> RatepayResult:
        return _facade(services).confirm_payment(
            call.summary["transaction_id"], call.summary["order_ref"]
        )

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: RatepayResult | Reconciled,
    ) -> None:
        if isinstance(answer, Reconciled):
            self._record_reconciled(ctx, order, items, summary, answer)
            return
        store.record_outcomes(ctx.session, order, items, PAYMENT_CONFIRM, ctx.now, result=answer)


class _BookingCommand(_External):
    """A follow-up that books positions (delivery, cancellation, return)."""

    operation: str
    subtype: str | None = None
    settles_as: str
    field: str
    """The gateway ledger column this booking raises: delivered, cancelled or returned."""

    def plan(
        self, data: OrderInput, ledger: baskets.OrderLedger, units: list[baskets.Unit]
    ) -> baskets.BasketPlan:
        raise NotImplementedError

    def call(
        self, facade: RatepayFacade, transaction_id: str, basket: Basket, order_ref: str
    ) -> RatepayResult:
        raise NotImplementedError

    def prepare(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall | None:
        facade_of(ctx)
        payment = _transaction(ctx, order, items, self.action, self.operation)
        if payment is None:
            return None
        data = store.order_input(order)
        ledger = store.load_ledger(ctx.session, order)
        plan = self.plan(data, ledger, store.units(items))
        everything = baskets.full_basket(data, store.units(order.items))
        summary = recon.booking_summary(
            operation=self.operation,
            subtype=self.subtype,
            field=self.field,
            transaction_id=payment.transaction_id or "",
            order_ref=order.order_ref,
            plan=plan,
            everything=everything,
            ledger=ledger,
        )
        return PreparedCall(summary, to_basket(plan))

    def send(self, services: dict[str, Any], call: PreparedCall) -> RatepayResult:
        return self.call(
            _facade(services),
            call.summary["transaction_id"],
            call.payload,
            call.summary["order_ref"],
        )

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: RatepayResult | Reconciled,
    ) -> None:
        booked = answer.booked if isinstance(answer, Reconciled) else answer.success
        if booked:
            payment = store.get_payment(ctx.session, order.id)
            assert payment is not None
            if summary.get("shipping"):
                payment.shipping_status = self.settles_as
            if summary.get("discount"):
                payment.discount_status = self.settles_as
            payment.updated_at = ctx.now
        if isinstance(answer, Reconciled):
            self._record_reconciled(ctx, order, items, summary, answer)
            return
        store.record_outcomes(ctx.session, order, items, self.action, ctx.now, result=answer)


class ConfirmDeliveryCommand(_BookingCommand):
    """CONFIRMATION_DELIVER of the shipped items (shipping / voucher per basket.py)."""

    action = DELIVERY
    operation = "CONFIRMATION_DELIVER"
    settles_as = DELIVERED
    field = "delivered"

    def plan(self, data, ledger, units):  # type: ignore[no-untyped-def]
        return baskets.delivery_basket(data, ledger, units)

    def call(self, facade, transaction_id, basket, order_ref):  # type: ignore[no-untyped-def]
        return facade.confirm_delivery(transaction_id, basket, order_id=order_ref)


class CancelOrderCommand(_BookingCommand):
    """PAYMENT_CHANGE cancellation of exactly these (undelivered) items."""

    action = CANCELLATION
    operation = "PAYMENT_CHANGE"
    subtype = "cancellation"
    settles_as = CANCELLED
    field = "cancelled"

    def plan(self, data, ledger, units):  # type: ignore[no-untyped-def]
        return baskets.cancellation_basket(data, ledger, units)

    def call(self, facade, transaction_id, basket, order_ref):  # type: ignore[no-untyped-def]
        return facade.cancel(transaction_id, basket, order_id=order_ref)


class RefundCommand(_BookingCommand):
    """PAYMENT_CHANGE return of exactly these (delivered) items."""

    action = RETURN
    operation = "PAYMENT_CHANGE"
    subtype = "return"
    settles_as = RETURNED
    field = "returned"

    def plan(self, data, ledger, units):  # type: ignore[no-untyped-def]
        return baskets.return_basket(data, ledger, units)

    def call(self, facade, transaction_id, basket, order_ref):  # type: ignore[no-untyped-def]
        return facade.refund(transaction_id, basket, order_id=order_ref)
