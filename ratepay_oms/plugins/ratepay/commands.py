"""The RatePAY OMS commands: by order, one booking call per group of items, exactly once.

Every command here books something at RatePAY, so each is an engine ``ExternalCommand``:
``plan`` gathers the order data from the database and decides the call (its JSON summary is
committed as an intent before anything is sent), ``send`` makes every network call of it
(for the payment request also PAYMENT_INIT and, for installments, CALCULATION_REQUEST, which
book nothing), ``apply`` records one outcome row per item (``payment_store.record_outcomes``)
that the conditions read, and ``reconcile`` asks the transaction status lookup what was booked
when the answer was lost.
Kinds of failure are kept apart on purpose:

- a *business* refusal (RatePAY answered, but not with success: decline, 150/2300, …) is
  recorded as a failed outcome, so the conditions route the items to ``… invalid`` (or
  ``payment request declined``), where a person decides (``retry``);
- *no usable answer* (``RatepayTransportError``): when the booking request certainly never left
  (``sent=False``, or a step before it failed) ``send`` raises ``CallNotSentError`` and the
  engine retries with backoff; otherwise the intent stays open and is reconciled — never
  re-sent blindly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar
from zoneinfo import ZoneInfo

from ratepay_oms.engine.plugins import (
    CallContext,
    CallNotSentError,
    ExternalCommand,
    PreparedCall,
    Reconciled,
)
from ratepay_oms.errors import OmsError
from ratepay_oms.orders import Address as OrderAddress
from ratepay_oms.orders import CustomerInput, OrderInput, PositionInput
from ratepay_oms.persistence.payment import (
    ADJ_BOOKED,
    ADJ_PENDING,
    CANCELLATION,
    CANCELLED,
    CREDIT,
    DELIVERED,
    DELIVERY,
    PAYMENT_CONFIRM,
    PAYMENT_REQUEST,
    RETURN,
    RETURNED,
)
from ratepay_oms.plugins.ratepay import adjustments as adj
from ratepay_oms.plugins.ratepay import basket as baskets
from ratepay_oms.plugins.ratepay import installments
from ratepay_oms.plugins.ratepay import payment_store as store
from ratepay_oms.plugins.ratepay import reconcile as recon
from ratepay_oms.plugins.ratepay.event_data import EventDataError, delivery_details
from ratepay_oms.plugins.ratepay.installments import InstallmentQuote, InstallmentUnavailable
from ratepay_oms.plugins.ratepay.profiles import decide_profile, profiles_of
from ratepay_oms.ratepay import (
    Address,
    BankAccount,
    Basket,
    BasketItem,
    BasketPosition,
    Customer,
    InstallmentDetails,
    InstallmentPlan,
    Operation,
    PaymentInfo,
    RatepayFacade,
    RatepayResult,
    RatepayTransportError,
    RatepayValidationError,
)
from ratepay_oms.ratepay.builders import check_invoicing
from ratepay_oms.ratepay.codes import (
    MAX_PAYMENT_ATTEMPTS,
    PAYMENT_ATTEMPT_WINDOW_HOURS,
    RESULT_DECLINED,
)
from ratepay_oms.ratepay.types import Invoicing, Tracking

PayloadT = TypeVar("PayloadT")
R = TypeVar("R")
AnswerT = TypeVar("AnswerT")

if TYPE_CHECKING:
    from ratepay_oms.engine.plugins import CommandContext
    from ratepay_oms.persistence.models import Order, OrderItem
    from ratepay_oms.persistence.payment import RatepayPayment

log = logging.getLogger(__name__)

SERVICE_NAME = "ratepay"
"""Key of the facade in the engine's ``services``."""


class RatepayNotConfiguredError(OmsError):
    """The engine was built without a RatePAY facade (``services={"ratepay": facade}``)."""


def facade_for(services: Any, profile: str | None) -> RatepayFacade:
    """The facade of the order's RatePAY profile (``None``: the default profile); an unknown
    profile raises ``UnknownProfileError`` (its message names the configured ones)."""
    profiles = profiles_of(services)
    if profiles is None:
        facade_in(services)  # raises the not-configured error
    assert profiles is not None
    return profiles.facade(profile)


def facade_in(services: Any) -> RatepayFacade:
    """The engine's RatePAY facade (``services["ratepay"]``), or a clear error."""
    facade = services.get(SERVICE_NAME)
    if not isinstance(facade, RatepayFacade):
        raise RatepayNotConfiguredError(
            "no RatePAY facade configured: set the RATEPAY_* settings (see docs) or pass "
            "services={'ratepay': RatepayFacade(...)} to the Engine"
        )
    return facade


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
        delivery_type=a.delivery_type,
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
        company_id=c.company_id,
        registry_location=c.registry_location,
        company_type=c.company_type,
        homepage=c.homepage,
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


def _booking(call: Callable[[], R]) -> R:
    """Run the booking request ``call()``; a request that certainly never left becomes
    ``CallNotSentError`` (safe to retry), anything else propagates (reconcile)."""
    try:
        return call()
    except RatepayTransportError as exc:
        if not exc.sent:
            raise CallNotSentError(str(exc)) from exc
        raise


class _External(ExternalCommand[PayloadT, AnswerT]):
    """Shared plumbing of the RatePAY external commands."""

    action: str

    def reconcile(self, summary: dict[str, Any], io: CallContext) -> Reconciled | None:
        profiles = profiles_of(io.services)
        facade = profiles.facade(summary.get("profile")) if profiles is not None else None
        if not isinstance(facade, RatepayFacade) or not facade.settings.status_lookup_configured:
            return None  # nobody to ask: a person decides
        status = facade.transaction_status(summary["transaction_id"])
        return recon.verdict(summary, status.report).reconciled()

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


@dataclass(frozen=True)
class PaymentPayload:
    """What the payment request sends, read from the order in ``plan``."""

    data: OrderInput
    customer: Customer
    basket: Basket


@dataclass(frozen=True)
class PaymentAnswer:
    """The answers of one payment request: ``refused`` is the step before PAYMENT_REQUEST that
    was refused (then ``request`` is ``None``); ``plan`` the instalment plan calculated."""

    request: RatepayResult | None
    refused: RatepayResult | None = None
    init: RatepayResult | None = None
    plan: InstallmentPlan | None = None


class PaymentRequestCommand(_External[PaymentPayload, PaymentAnswer]):
    """PAYMENT_INIT + PAYMENT_REQUEST (INSTALLMENT: CALCULATION_REQUEST first).

    Always starts with a fresh PAYMENT_INIT, as RatePAY asks after a failed request, so the
    manual ``retry payment request`` is a clean new attempt. INIT and CALCULATION book
    nothing but are network calls, so they happen in ``send`` like the request; the
    transaction id INIT returns is remembered on the intent before PAYMENT_REQUEST leaves, so
    a lost answer can be reconciled (and an intent without one was certainly never sent).
    """

    action = PAYMENT_REQUEST

    def plan(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall[PaymentPayload] | None:
        facade_in(ctx.services)
        data = store.order_input(order)
        decision = decide_profile(ctx.session, ctx.services, data)  # kept answers: no SQL
        method = data.payment.method
        voucher_rule = decision.facade.settings.voucher_rule if decision.facade else None
        # The order's first plan writes its payment row in one statement (it has none yet);
        # a later one finds it. Attempts are counted only for an order that had a row: this
        # plan writes it before the first PAYMENT_REQUEST can leave, so without one none
        # ever did (a statement saved on every order's first attempt).
        payment, new = store.claim_payment(
            ctx.session, order, method, ctx.now, profile=decision.name,
            voucher_rule=voucher_rule,
        )
        if not new:
            refusal = self._attempts_refusal(ctx, order)
            if refusal is not None:
                store.record_outcomes(
                    ctx.session, order, items, PAYMENT_REQUEST, ctx.now, success=False,
                    operation=Operation.PAYMENT_REQUEST.value, message=refusal,
                )
                return None
            payment = store.ensure_payment(
                ctx.session, order, method, ctx.now, profile=decision.name,
                voucher_rule=voucher_rule,
            )
        if decision.violation is not None:
            self._refused_by_profile(ctx, order, items, payment, decision)
            return None
        basket = to_basket(baskets.full_basket(data, store.units(order.items)))
        summary = {
            "describe": f"PAYMENT_REQUEST of order {order.order_ref}",
            "operation": "PAYMENT_REQUEST",
            "method": data.payment.method,
            "amount": str(basket.amount),
            "profile": decision.name,
            "order_ref": order.order_ref,
            "planned_at": recon.planned_now(),
        }
        return PreparedCall(summary, PaymentPayload(data, to_customer(data.customer), basket))

    @staticmethod
    def _refused_by_profile(
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        payment: RatepayPayment,
        decision: Any,
    ) -> None:
        """The order breaks its profile: refused here like a decline (401, with the reason
        RatePAY would have given), no call — and none of the shopper's attempts used."""
        violation = decision.violation
        message = f"refused before sending (profile {decision.name or '-'}): {violation.text}"
        payment.result_code = str(RESULT_DECLINED)
        payment.reason_code = str(violation.reason_code)
        payment.customer_message = None
        payment.updated_at = ctx.now
        store.record_outcomes(
            ctx.session,
            order,
            items,
            PAYMENT_REQUEST,
            ctx.now,
            success=False,
            operation="PAYMENT_REQUEST",
            message=message,
            result_code=str(RESULT_DECLINED),
            reason_code=str(violation.reason_code),
        )
        log.info("order %s: %s", order.order_ref, message)

    @staticmethod
    def _attempts_refusal(ctx: CommandContext, order: Order) -> str | None:
        """Why a new attempt may not go out now (RatePAY: at most 3 per order in 24 hours)."""
        window = timedelta(hours=PAYMENT_ATTEMPT_WINDOW_HOURS)
        sent = store.payment_attempts(ctx.session, order.id, ctx.now - window)
        if len(sent) < MAX_PAYMENT_ATTEMPTS:
            return None
        next_at = sent[-MAX_PAYMENT_ATTEMPTS] + window
        return (
            f"not sent: RatePAY allows {MAX_PAYMENT_ATTEMPTS} payment attempts per order within "
            f"{PAYMENT_ATTEMPT_WINDOW_HOURS} hours and this order had {len(sent)}; retry after "
            f"{next_at:%Y-%m-%d %H:%M} UTC (event 'retry payment request'), or offer another "
            "payment method"
        )

    def send(self, call: PreparedCall[PaymentPayload], io: CallContext) -> PaymentAnswer:
        data, basket = call.payload.data, call.payload.basket
        try:
            facade = facade_for(io.services, call.summary.get("profile"))
            plan: InstallmentPlan | None = None
            if data.payment.method == "INSTALLMENT":
                try:
                    plan = self._calculate(facade, data, basket).plan
                except InstallmentUnavailable as unavailable:
                    if unavailable.result is None:
                        raise
                    return PaymentAnswer(None, refused=unavailable.result)
            init = facade.init_payment(order_ref=data.order_ref)  # filed under the order
            if not init.success or not init.transaction_id:
                return PaymentAnswer(None, refused=init, plan=plan)
            facts: dict[str, Any] = {
                "transaction_id": init.transaction_id,
                "planned_at": recon.planned_now(),  # the request leaves right after this
            }
            if init.transaction_short_id:
                facts["transaction_short_id"] = init.transaction_short_id
            if plan is not None:
                facts["installment_plan"] = store.plan_json(plan)
            io.remember(facts)
        except CallNotSentError:
            raise
        except Exception as exc:  # nothing was booked before PAYMENT_REQUEST
            raise CallNotSentError(f"before PAYMENT_REQUEST: {type(exc).__name__}: {exc}") from exc
        choice = data.payment.installment
        info = PaymentInfo(
            method=data.payment.method,
            installment=InstallmentDetails.from_plan(plan) if plan is not None else None,
            debit_pay_type=choice.debit_pay_type if choice else None,
        )
        tx_id = init.transaction_id
        result = _booking(
            lambda: facade.request_payment(
                tx_id,
                call.payload.customer,
                basket,
                info,
                order_id=data.order_ref,
                merchant_consumer_id=data.customer.customer_ref,
                device_token=data.device_token,
            )
        )
        return PaymentAnswer(result, init=init, plan=plan)

    @staticmethod
    def _calculate(facade: RatepayFacade, data: OrderInput, basket: Basket) -> InstallmentQuote:
        """The plan through the checkout calculator's own function, so it is the one shown."""
        choice = data.payment.installment
        assert choice is not None  # the order input requires it for INSTALLMENT
        if choice.calculation_type == "calculation-by-rate":
            return installments.quote(
                facade, basket.amount, rate=choice.value, payment_firstday=choice.payment_firstday,
                order_ref=data.order_ref,
            )
        return installments.quote(
            facade, basket.amount, months=int(choice.value),
            payment_firstday=choice.payment_firstday, order_ref=data.order_ref,
        )

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: PaymentAnswer | Reconciled,
    ) -> None:
        payment = store.get_payment(ctx.session, order)
        assert payment is not None  # written by plan
        values: dict[str, Any] = {"updated_at": ctx.now}
        if isinstance(answer, Reconciled):
            found = answer.answer if isinstance(answer.answer, dict) else {}
            accepted = found.get("accepted", True)
            values["transaction_id"] = summary.get("transaction_id") or payment.transaction_id
            values["transaction_short_id"] = (
                summary.get("transaction_short_id") or payment.transaction_short_id
            )
            if summary.get("installment_plan"):
                values["installment_plan"] = summary["installment_plan"]
            values["descriptor"] = found.get("descriptor") or payment.descriptor
            values["result_code"] = result_code = "402" if accepted else "401"
            store.write_payment(ctx.session, payment, values)
            self._record_reconciled(
                ctx, order, items, summary, answer, success=bool(accepted),
                result_code=result_code,
            )
            return
        if answer.plan is not None:
            values["installment_plan"] = store.plan_json(answer.plan)
        transaction_id, short_id = payment.transaction_id, payment.transaction_short_id
        if answer.init is not None and answer.init.transaction_id:
            transaction_id = answer.init.transaction_id
            short_id = answer.init.transaction_short_id
        result = answer.request
        if result is None:
            assert answer.refused is not None
            values["transaction_id"] = transaction_id
            values["transaction_short_id"] = short_id
            self._refused(ctx, order, items, payment, answer.refused, values)
            return
        values["transaction_id"] = result.transaction_id or transaction_id
        values["transaction_short_id"] = result.transaction_short_id or short_id
        values["descriptor"] = result.descriptor
        values["result_code"] = None if result.result_code is None else str(result.result_code)
        values["reason_code"] = None if result.reason_code is None else str(result.reason_code)
        values["customer_message"] = result.customer_message
        store.prime_outcomes(
            ctx.memo, order, PAYMENT_REQUEST,
            store.record_outcomes(
                ctx.session, order, items, PAYMENT_REQUEST, ctx.now, result=result,
                payment=(payment, values),
            ),
        )

    def reconcile(self, summary: dict[str, Any], io: CallContext) -> Reconciled | None:
        if not summary.get("transaction_id"):
            # The id is remembered before PAYMENT_REQUEST leaves: without it, it never did.
            return Reconciled(False, detail="no transaction was initialised; not sent")
        return super().reconcile(summary, io)

    @staticmethod
    def _refused(
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        payment: RatepayPayment,
        result: RatepayResult,
        values: dict[str, Any],
    ) -> None:
        """A step before PAYMENT_REQUEST was refused: the request counts as failed. ``values``:
        what ``apply`` writes to the payment row besides."""
        values["result_code"] = None if result.result_code is None else str(result.result_code)
        values["reason_code"] = None if result.reason_code is None else str(result.reason_code)
        values["customer_message"] = result.customer_message
        store.record_outcomes(
            ctx.session, order, items, PAYMENT_REQUEST, ctx.now, result=result, success=False,
            payment=(payment, values),
        )


def _transaction(
    ctx: CommandContext, order: Order, items: Sequence[OrderItem], action: str, operation: str
) -> RatepayPayment | None:
    """The order's payment with its transaction id, or a recorded failure without a call."""
    payment = store.get_payment(ctx.session, order)
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


class ConfirmPaymentCommand(_External[None, RatepayResult]):
    """PAYMENT_CONFIRM with the order reference."""

    action = PAYMENT_CONFIRM

    def plan(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall[None] | None:
        facade_in(ctx.services)
        payment = _transaction(ctx, order, items, PAYMENT_CONFIRM, "PAYMENT_CONFIRM")
        if payment is None:
            return None
        summary = {
            "describe": f"PAYMENT_CONFIRM of order {order.order_ref}",
            "operation": "PAYMENT_CONFIRM",
            "transaction_id": payment.transaction_id,
            "order_ref": order.order_ref,
            "profile": payment.profile,
            "planned_at": recon.planned_now(),
        }
        facade_for(ctx.services, payment.profile)  # an unknown profile fails here, unsent
        return PreparedCall(summary, None)

    def send(self, call: PreparedCall[None], io: CallContext) -> RatepayResult:
        facade = facade_for(io.services, call.summary.get("profile"))
        return _booking(
            lambda: facade.confirm_payment(
                call.summary["transaction_id"], call.summary["order_ref"]
            )
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
        store.prime_outcomes(
            ctx.memo, order, PAYMENT_CONFIRM,
            store.record_outcomes(
                ctx.session, order, items, PAYMENT_CONFIRM, ctx.now, result=answer
            ),
        )


@dataclass(frozen=True)
class BookingPayload:
    """What a follow-up sends: its basket, and for a delivery the invoicing and tracking."""

    basket: Basket
    invoicing: Invoicing | None = None
    tracking: tuple[Tracking, ...] = ()


class _BookingCommand(_External[BookingPayload, RatepayResult]):
    """A follow-up that books positions (delivery, cancellation, return)."""

    operation: str
    subtype: str | None = None
    settles_as: str
    field: str
    """The gateway ledger column this booking raises: delivered, cancelled or returned."""

    def basket_plan(
        self, data: OrderInput, ledger: baskets.OrderLedger, units: list[baskets.Unit]
    ) -> baskets.BasketPlan:
        raise NotImplementedError

    def call(
        self, facade: RatepayFacade, transaction_id: str, payload: BookingPayload, order_ref: str
    ) -> RatepayResult:
        raise NotImplementedError

    def details(
        self, ctx: CommandContext, items: Sequence[OrderItem], facade: RatepayFacade
    ) -> tuple[Invoicing | None, tuple[Tracking, ...]]:
        """Invoicing and tracking of the call (a delivery's, from the event data)."""
        return None, ()

    def plan(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall[BookingPayload] | None:
        facade_in(ctx.services)
        payment = _transaction(ctx, order, items, self.action, self.operation)
        if payment is None:
            return None
        facade = facade_for(ctx.services, payment.profile)
        try:
            invoicing, tracking = self.details(ctx, items, facade)
        except (EventDataError, RatepayValidationError) as exc:
            # Bad data from a person: refused without a call; fix it and retry the event.
            store.record_outcomes(
                ctx.session,
                order,
                items,
                self.action,
                ctx.now,
                success=False,
                operation=self.operation,
                subtype=self.subtype,
                transaction_id=payment.transaction_id,
                message=f"not sent: {exc}",
            )
            return None
        data = store.order_input(order)
        ledger = store.load_ledger(ctx.session, order)
        plan = self.basket_plan(data, ledger, store.units(items))
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
        summary["profile"] = payment.profile
        if invoicing is not None and invoicing.invoice_id:
            summary["invoice_id"] = invoicing.invoice_id
        if tracking:
            summary["tracking"] = [f"{t.provider} {t.code}" for t in tracking]
        return PreparedCall(summary, BookingPayload(to_basket(plan), invoicing, tracking))

    def send(self, call: PreparedCall[BookingPayload], io: CallContext) -> RatepayResult:
        facade = facade_for(io.services, call.summary.get("profile"))
        return _booking(
            lambda: self.call(
                facade,
                call.summary["transaction_id"],
                call.payload,
                call.summary["order_ref"],
            )
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
        paying: tuple[RatepayPayment, dict[str, Any]] | None = None
        if booked:
            payment = store.get_payment(ctx.session, order)
            assert payment is not None
            values: dict[str, Any] = {}
            if summary.get("shipping"):
                values["shipping_status"] = self.settles_as
            if summary.get("discount"):
                values["discount_status"] = self.settles_as
            values["updated_at"] = ctx.now
            paying = (payment, values)
        if isinstance(answer, Reconciled):
            if paying is not None:
                store.write_payment(ctx.session, *paying)
            self._record_reconciled(ctx, order, items, summary, answer)
            return
        store.prime_outcomes(
            ctx.memo, order, self.action,
            store.record_outcomes(
                ctx.session, order, items, self.action, ctx.now, result=answer, payment=paying
            ),
        )


class ConfirmDeliveryCommand(_BookingCommand):
    """CONFIRMATION_DELIVER of the shipped items (shipping / voucher per basket.py)."""

    action = DELIVERY
    operation = "CONFIRMATION_DELIVER"
    settles_as = DELIVERED
    field = "delivered"

    def basket_plan(
        self, data: OrderInput, ledger: baskets.OrderLedger, units: list[baskets.Unit]
    ) -> baskets.BasketPlan:
        return baskets.delivery_basket(data, ledger, units)

    def details(
        self, ctx: CommandContext, items: Sequence[OrderItem], facade: RatepayFacade
    ) -> tuple[Invoicing | None, tuple[Tracking, ...]]:
        """From the data of the event (``ship --invoice-id …``): given to this command, else
        the newest stored with the move of these items. Checked against RatePAY's window
        here, so a bad date is refused with the reason instead of sent."""
        data = ctx.data or store.latest_event_data(ctx.session, [i.id for i in items])
        invoicing, tracking = delivery_details(data, facade.settings, ctx.now)
        if invoicing is not None:
            check_invoicing(invoicing, ZoneInfo(facade.settings.time_zone), ctx.now)
        return invoicing, tracking

    def call(
        self, facade: RatepayFacade, transaction_id: str, payload: BookingPayload, order_ref: str
    ) -> RatepayResult:
        return facade.confirm_delivery(
            transaction_id,
            payload.basket,
            order_id=order_ref,
            invoicing=payload.invoicing,
            tracking=payload.tracking,
        )


class CancelOrderCommand(_BookingCommand):
    """PAYMENT_CHANGE cancellation of exactly these (undelivered) items."""

    action = CANCELLATION
    operation = "PAYMENT_CHANGE"
    subtype = "cancellation"
    settles_as = CANCELLED
    field = "cancelled"

    def basket_plan(
        self, data: OrderInput, ledger: baskets.OrderLedger, units: list[baskets.Unit]
    ) -> baskets.BasketPlan:
        return baskets.cancellation_basket(data, ledger, units)

    def call(
        self, facade: RatepayFacade, transaction_id: str, payload: BookingPayload, order_ref: str
    ) -> RatepayResult:
        return facade.cancel(transaction_id, payload.basket, order_id=order_ref)


class RefundCommand(_BookingCommand):
    """PAYMENT_CHANGE return of exactly these (delivered) items."""

    action = RETURN
    operation = "PAYMENT_CHANGE"
    subtype = "return"
    settles_as = RETURNED
    field = "returned"

    def basket_plan(
        self, data: OrderInput, ledger: baskets.OrderLedger, units: list[baskets.Unit]
    ) -> baskets.BasketPlan:
        return baskets.return_basket(data, ledger, units)

    def call(
        self, facade: RatepayFacade, transaction_id: str, payload: BookingPayload, order_ref: str
    ) -> RatepayResult:
        return facade.refund(transaction_id, payload.basket, order_id=order_ref)


@dataclass(frozen=True)
class AdjustmentPayload:
    """A credit or debit as ``send`` makes it."""

    kind: str
    amount: Decimal
    tax_rate: Decimal
    description: str
    currency: str


class AdjustmentCommand(_External[AdjustmentPayload, RatepayResult]):
    """PAYMENT_CHANGE credit: a goodwill credit or a debit a person asked for
    (``Engine.credit`` / ``Engine.debit``, run outside any transition by
    ``Engine.run_external``). What to book comes in ``ctx.data`` (kind, amount, tax rate,
    reason, request id); the ``ratepay_adjustment`` row is written here, pending with the
    intent and settled with the answer."""

    action = "adjustment"

    def plan(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall[AdjustmentPayload] | None:
        request = adj.AdjustmentRequest.from_data(ctx.data)
        payment = store.get_payment(ctx.session, order)
        profile = payment.profile if payment is not None else None
        facade_for(ctx.services, profile)  # an unknown profile fails here, unsent
        data = store.order_input(order)
        adj.forget_unsent(ctx.session, order.id)
        existing = adj.adjustments_of(ctx.session, order.id)
        row = adj.open_adjustment(
            ctx.session, order.id, request.request_id, request.kind, request.amount,
            request.tax_rate or adj.default_tax_rate(data), request.reason, ctx.now,
        )
        if row.status != ADJ_PENDING or any(
            e.id == row.id for e in existing
        ):
            return None  # this request was decided before: never book it twice
        try:
            if payment is None or not payment.transaction_id:
                raise adj.AdjustmentError(
                    f"order {order.order_ref} has no accepted RatePAY transaction"
                )
            ledger = store.load_ledger(ctx.session, order)
            now_balance = adj.balance(
                data, ledger, store.units(order.items), [e for e in existing if e.id != row.id]
            )
            adj.check_adjustment(request.kind, request.amount, now_balance, order.order_ref)
        except adj.AdjustmentError as exc:
            adj.settle_adjustment(row, booked=False, now=ctx.now, transaction_id=None,
                                  message=f"refused before sending: {exc}")
            return None
        signed = adj.signed(request.kind, request.amount)
        booked_before = sum(
            (adj.signed(e.kind, e.amount) for e in existing if e.status == ADJ_BOOKED),
            Decimal("0.00"),
        )
        summary = {
            "describe": f"PAYMENT_CHANGE/credit ({request.kind} {request.amount}) of order "
            f"{order.order_ref}",
            "operation": "PAYMENT_CHANGE",
            "subtype": "credit",
            "transaction_id": payment.transaction_id,
            "order_ref": order.order_ref,
            "profile": profile,
            "request_id": request.request_id,
            "kind": request.kind,
            "amount": str(signed),
            "credited_before": str(booked_before),
        }
        description = request.reason or (
            "Goodwill credit" if request.kind == CREDIT else "Adjustment charge"
        )
        return PreparedCall(
            summary,
            AdjustmentPayload(request.kind, request.amount, row.tax_rate, description,
                              data.currency),
        )

    def send(self, call: PreparedCall[AdjustmentPayload], io: CallContext) -> RatepayResult:
        facade = facade_for(io.services, call.summary.get("profile"))
        p = call.payload
        book = facade.credit if p.kind == CREDIT else facade.debit
        return _booking(
            lambda: book(
                call.summary["transaction_id"],
                p.amount,
                tax_rate=p.tax_rate,
                description=p.description,
                currency=p.currency,
                order_id=call.summary["order_ref"],
            )
        )

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: RatepayResult | Reconciled,
    ) -> None:
        row = adj.find(ctx.session, summary["request_id"])
        if row is None:  # pragma: no cover - written with the intent
            log.error("adjustment %s of order %s vanished", summary["request_id"],
                      order.order_ref)
            return
        if isinstance(answer, Reconciled):
            adj.settle_adjustment(
                row, booked=answer.booked, now=ctx.now,
                transaction_id=summary.get("transaction_id"),
                message=answer.detail or "booked at RatePAY (transaction status)",
            )
            return
        adj.settle_adjustment(
            row,
            booked=answer.success,
            now=ctx.now,
            transaction_id=summary.get("transaction_id"),
            result_code=answer.result_code,
            reason_code=answer.reason_code,
            message=" / ".join(p for p in (answer.result_text, answer.reason_text) if p) or None,
        )

    def reconcile(self, summary: dict[str, Any], io: CallContext) -> Reconciled | None:
        """RatePAY's Transaction Status API documents no figure for credits and debits (the
        shape of ``current_special_items`` is unknown, reference status-api §"200 answer"), so
        a lost answer is not guessed at: the intent waits for a person (``intents resolve``)."""
        return None
