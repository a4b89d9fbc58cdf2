"""The RatePAY room: facade, typed inputs/results, settings, transport and API log.

Import from here; the modules behind it (builders, responses, transport) may move.
"""

from ratepay_oms.ratepay.api_log import (
    ApiCallRecord,
    ApiLogSink,
    MemoryApiLogSink,
    SqlApiLogSink,
)
from ratepay_oms.ratepay.codes import (
    SUCCESS_RESULT,
    CalculationSubtype,
    ChangeSubtype,
    DebitPayType,
    Operation,
    PaymentMethod,
)
from ratepay_oms.ratepay.errors import (
    MalformedXmlError,
    RatepayError,
    RatepaySettingsError,
    RatepayTransportError,
    RatepayValidationError,
    StatusLookupUnavailable,
    XmlSecurityError,
)
from ratepay_oms.ratepay.facade import RatepayFacade
from ratepay_oms.ratepay.settings import RatepaySettings
from ratepay_oms.ratepay.status_api import (
    PositionFigures,
    StatusApiAuthError,
    StatusReport,
)
from ratepay_oms.ratepay.transport import HttpResponse, RequestsTransport, Transport
from ratepay_oms.ratepay.types import (
    Address,
    BankAccount,
    Basket,
    BasketItem,
    BasketPosition,
    Customer,
    Exchange,
    InstallmentDetails,
    InstallmentPlan,
    Invoicing,
    PaymentInfo,
    RatepayResult,
    Tracking,
    TransactionStatus,
)

__all__ = [
    "SUCCESS_RESULT",
    "Address",
    "ApiCallRecord",
    "ApiLogSink",
    "BankAccount",
    "Basket",
    "BasketItem",
    "BasketPosition",
    "CalculationSubtype",
    "ChangeSubtype",
    "Customer",
    "DebitPayType",
    "Exchange",
    "HttpResponse",
    "InstallmentDetails",
    "InstallmentPlan",
    "Invoicing",
    "MalformedXmlError",
    "MemoryApiLogSink",
    "Operation",
    "PaymentInfo",
    "PaymentMethod",
    "PositionFigures",
    "RatepayError",
    "RatepayFacade",
    "RatepayResult",
    "RatepaySettings",
    "RatepaySettingsError",
    "RatepayTransportError",
    "RatepayValidationError",
    "RequestsTransport",
    "SqlApiLogSink",
    "StatusApiAuthError",
    "StatusLookupUnavailable",
    "StatusReport",
    "Tracking",
    "TransactionStatus",
    "Transport",
    "XmlSecurityError",
]
