"""Response parsing: gateway bytes → ``RatepayResult``, or a ``RatepayTransportError``.

Anything we cannot evaluate with certainty (hostile or malformed XML, wrong root or namespace,
no ``processing`` block, no status, status OK without a result, a non-numeric code, an echoed
operation that is not the one we sent) is a transport error, never a result — a false success
would book goods that Ratepay never accepted.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from lxml import etree

from ratepay_oms.ratepay.codes import SUCCESS_RESULT, Operation, Status, usable_calculation
from ratepay_oms.ratepay.errors import (
    MalformedXmlError,
    RatepayTransportError,
    XmlSecurityError,
)
from ratepay_oms.ratepay.types import Exchange, InstallmentPlan, RatepayResult
from ratepay_oms.ratepay.xml import RATEPAY_NS, parse_amount, parse_xml

log = logging.getLogger(__name__)


class _Names:
    """The Clark names (``{urn…}tag``) of the response elements in one namespace, made once
    per namespace instead of for every lookup."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.response = f"{{{ns}}}response"
        self.head = f"{{{ns}}}head"
        self.processing = f"{{{ns}}}processing"
        self.operation = f"{{{ns}}}operation"
        self.status = f"{{{ns}}}status"
        self.reason = f"{{{ns}}}reason"
        self.result = f"{{{ns}}}result"
        self.customer_message = f"{{{ns}}}customer-message"
        self.transaction_id = f"{{{ns}}}transaction-id"
        self.transaction_short_id = f"{{{ns}}}transaction-short-id"
        self.response_type = f"{{{ns}}}response-type"
        self.content = f"{{{ns}}}content"
        self.payment = f"{{{ns}}}payment"
        self.amount = f"{{{ns}}}amount"
        self.descriptor = f"{{{ns}}}descriptor"
        self.products = f"{{{ns}}}products/{{{ns}}}product"
        self.calculation_result = f"{{{ns}}}installment-calculation-result"
        self.configuration_result = f"{{{ns}}}installment-configuration-result"
        self.master_data = f"{{{ns}}}master-data"


_NAMES: dict[str, _Names] = {}


def _names(ns: str) -> _Names:
    names = _NAMES.get(ns)
    if names is None:
        if len(_NAMES) >= 8:  # one namespace per profile setting: a handful at most
            _NAMES.clear()
        names = _NAMES[ns] = _Names(ns)
    return names


def _text_in(node: etree._Element | None, name: str) -> str | None:
    """The stripped text of ``node``'s child ``name``; ``None`` when there is no such child
    or it holds only whitespace."""
    if node is None:
        return None
    text = node.findtext(name)
    return (text.strip() or None) if text else None


def _code(node: etree._Element | None, what: str, operation: str) -> int | None:
    if node is None:
        return None
    raw = (node.get("code") or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or len(raw) > 6:
        raise RatepayTransportError(
            f"{operation}: gateway answered a non-numeric {what} code",
            sent=True,
            operation=operation,
        )
    return int(raw)


def _text_of(node: etree._Element | None) -> str | None:
    if node is None or node.text is None:
        return None
    return node.text.strip() or None


def parse_response(
    body: bytes,
    *,
    operation: Operation,
    subtype: str | None,
    exchange: Exchange,
    ns: str = RATEPAY_NS,
    max_bytes: int = 1_000_000,
) -> RatepayResult:
    """Evaluate one gateway answer for ``operation``.

    Success = status ``OK`` and the operation's own success result code (``SUCCESS_RESULT``).
    """
    op = operation.value
    try:
        root = parse_xml(body, max_bytes=max_bytes)
    except (XmlSecurityError, MalformedXmlError) as exc:
        raise RatepayTransportError(
            f"{op}: unusable gateway answer: {exc}", sent=True, operation=op
        ) from None
    n = _names(ns)
    if root.tag != n.response:
        raise RatepayTransportError(
            f"{op}: gateway answer is not a RatePAY response (root {root.tag!r})",
            sent=True,
            operation=op,
        )
    head = root.find(n.head)
    processing = head.find(n.processing) if head is not None else None
    if head is None or processing is None:
        raise RatepayTransportError(
            f"{op}: gateway answer has no processing block", sent=True, operation=op
        )
    echoed = _text_in(head, n.operation)
    if echoed is not None and echoed != op:
        raise RatepayTransportError(
            f"{op}: gateway answered for operation {echoed[:40]!r}", sent=True, operation=op
        )
    status_node = processing.find(n.status)
    status_code = (status_node.get("code") or "").strip() if status_node is not None else ""
    if not status_code:
        raise RatepayTransportError(f"{op}: gateway answer has no status", sent=True, operation=op)
    reason_node = processing.find(n.reason)
    result_node = processing.find(n.result)
    reason_code = _code(reason_node, "reason", op)
    result_code = _code(result_node, "result", op)
    if status_code == Status.OK and result_code is None:
        raise RatepayTransportError(
            f"{op}: gateway answered OK without a result code", sent=True, operation=op
        )
    success = status_code == Status.OK and result_code == SUCCESS_RESULT[operation]
    if operation == Operation.CALCULATION_REQUEST:
        # 502 alone is not a plan: only 603 and the "adjusted" reasons are usable (§4.9).
        success = status_code == Status.OK and usable_calculation(result_code, reason_code)
    content = root.find(n.content)
    payment: etree._Element | None = None
    payment_amount: Decimal | None = None
    products: tuple[str, ...] = ()
    plan: InstallmentPlan | None = None
    configuration: dict[str, str] = {}
    master_data: dict[str, str] = {}
    if content is not None:  # PAYMENT_INIT, PAYMENT_CONFIRM and the follow-ups carry none
        payment = content.find(n.payment)
        amount_text = _text_in(payment, n.amount)
        if amount_text is not None:
            try:
                payment_amount = parse_amount(amount_text)
            except MalformedXmlError:
                log.warning("%s: ignoring unparsable payment amount in the response", op)
        products = tuple(
            p.get("method", "") for p in content.iterfind(n.products) if p.get("method")
        )
        if success:
            plan = _plan(content.find(n.calculation_result), op)
        configuration = _flat(content.find(n.configuration_result))
        master_data = _flat(content.find(n.master_data))
    return RatepayResult(
        success=success,
        operation=op,
        subtype=subtype,
        status_code=status_code,
        status_text=_text_of(status_node),
        reason_code=reason_code,
        reason_text=_text_of(reason_node),
        result_code=result_code,
        result_text=_text_of(result_node),
        customer_message=_text_in(processing, n.customer_message),
        transaction_id=_text_in(head, n.transaction_id),
        transaction_short_id=_text_in(head, n.transaction_short_id),
        response_type=_text_in(head, n.response_type),
        exchange=exchange,
        descriptor=_text_in(payment, n.descriptor),
        payment_method=payment.get("method") if payment is not None else None,
        payment_amount=payment_amount,
        products=products,
        installment_plan=plan,
        installment_configuration=configuration,
        master_data=master_data,
    )


def _flat(node: etree._Element | None) -> dict[str, str]:
    """Children of a settings block as ``{local-name: text}`` (values stay strings: their types
    vary between profiles and Ratepay adds fields without notice)."""
    if node is None:
        return {}
    values: dict[str, str] = {}
    for child in node:
        if isinstance(child.tag, str):
            values[etree.QName(child).localname] = (child.text or "").strip()
    return values


def _plan(node: etree._Element | None, op: str) -> InstallmentPlan | None:
    if node is None:
        return None
    values = _flat(node)
    try:

        def dec(key: str) -> Decimal:
            return parse_amount(values.get(key))

        return InstallmentPlan(
            total_amount=dec("total-amount"),
            amount=dec("amount"),
            interest_amount=dec("interest-amount"),
            service_charge=dec("service-charge"),
            interest_rate=dec("interest-rate"),
            annual_percentage_rate=dec("annual-percentage-rate"),
            monthly_debit_interest=dec("monthly-debit-interest"),
            number_of_rates=int(values.get("number-of-rates", "")),
            rate=dec("rate"),
            last_rate=dec("last-rate"),
            payment_firstday=int(values.get("payment-firstday", "")),
        )
    except (MalformedXmlError, ValueError):
        raise RatepayTransportError(
            f"{op}: instalment plan in the gateway answer is incomplete", sent=True, operation=op
        ) from None
