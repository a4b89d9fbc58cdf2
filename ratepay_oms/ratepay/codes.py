"""The RatePAY 1.8 vocabulary: operations, subtypes, status/reason/result codes.

One place for every code (reference ``ratepay-xml-api.md`` §2, §4, §6), imported by the facade,
the sandbox gateway and the OMS conditions. Evaluate result *codes*, never texts.
"""

from __future__ import annotations

from enum import StrEnum


class Operation(StrEnum):
    PAYMENT_INIT = "PAYMENT_INIT"
    PAYMENT_QUERY = "PAYMENT_QUERY"
    PAYMENT_REQUEST = "PAYMENT_REQUEST"
    PAYMENT_CONFIRM = "PAYMENT_CONFIRM"
    CONFIRMATION_DELIVER = "CONFIRMATION_DELIVER"
    PAYMENT_CHANGE = "PAYMENT_CHANGE"
    PROFILE_REQUEST = "PROFILE_REQUEST"
    CONFIGURATION_REQUEST = "CONFIGURATION_REQUEST"
    CALCULATION_REQUEST = "CALCULATION_REQUEST"


class ChangeSubtype(StrEnum):
    """PAYMENT_CHANGE subtypes of the 1.8 delta model (legacy names are refused)."""

    CANCELLATION = "cancellation"
    RETURN = "return"
    CREDIT = "credit"
    CHANGE_ORDER = "change-order"


class DeliveryType(StrEnum):
    """``address/@delivery-type`` (reference §3.1); anything but ADDRESS must be contracted."""

    ADDRESS = "ADDRESS"
    IN_STORE_COLLECT = "IN_STORE_COLLECT"
    PICK_UP_BOX = "PICK_UP_BOX"
    PICK_UP_SHOP = "PICK_UP_SHOP"


class CalculationSubtype(StrEnum):
    BY_RATE = "calculation-by-rate"
    BY_TIME = "calculation-by-time"


QUERY_SUBTYPE_FULL = "full"

SUBTYPES: dict[Operation, frozenset[str]] = {
    Operation.PAYMENT_QUERY: frozenset({QUERY_SUBTYPE_FULL}),
    Operation.PAYMENT_CHANGE: frozenset(s.value for s in ChangeSubtype),
    Operation.CALCULATION_REQUEST: frozenset(s.value for s in CalculationSubtype),
}
"""Operations that need a subtype, and the subtypes they admit (missing ⇒ reason 214/234)."""

WITHOUT_TRANSACTION: frozenset[Operation] = frozenset(
    {
        Operation.PAYMENT_INIT,
        Operation.PROFILE_REQUEST,
        Operation.CONFIGURATION_REQUEST,
        Operation.CALCULATION_REQUEST,
    }
)
"""Operations that must not carry a transaction-id; every other one must."""

WITHOUT_CONTENT: frozenset[Operation] = frozenset(
    {
        Operation.PAYMENT_INIT,
        Operation.PAYMENT_CONFIRM,
        Operation.PROFILE_REQUEST,
        Operation.CONFIGURATION_REQUEST,
    }
)

IDEMPOTENT: frozenset[Operation] = frozenset(
    {
        Operation.PAYMENT_INIT,
        Operation.PROFILE_REQUEST,
        Operation.CONFIGURATION_REQUEST,
        Operation.CALCULATION_REQUEST,
    }
)
"""Operations a client may re-send after a connection failure before anything was sent.

PAYMENT_INIT only opens an unused transaction; the other three book nothing. Everything else
books (or may book) on the gateway and the XML API has no idempotency key.
"""


class PaymentMethod(StrEnum):
    INVOICE = "INVOICE"
    ELV = "ELV"
    PREPAYMENT = "PREPAYMENT"
    INSTALLMENT = "INSTALLMENT"


class DebitPayType(StrEnum):
    DIRECT_DEBIT = "DIRECT-DEBIT"
    BANK_TRANSFER = "BANK-TRANSFER"


TRACKING_PROVIDERS: frozenset[str] = frozenset(
    {"DHL", "DPD", "GLS", "HLG", "HVS", "OTH", "TNT", "UPS"}
)
CURRENCIES: frozenset[str] = frozenset({"AUD", "CAD", "CHF", "EUR", "GBP", "JPY", "RUB", "USD"})
GENDERS: frozenset[str] = frozenset({"M", "F", "U"})


class Status(StrEnum):
    OK = "OK"
    ERROR = "ERROR"
    WARNING = "WARNING"  # legacy XSD only
    FATAL = "FATAL"  # legacy XSD only


STATUS_TEXTS: dict[str, str] = {"OK": "Successfully", "ERROR": "Error"}

# --- result codes (§6.2) -------------------------------------------------------------------

RESULT_PROCESSING_FAILED = 150
RESULT_INITIALIZED = 350
RESULT_CONFIRMED = 400
RESULT_DECLINED = 401
RESULT_PENDING = 402
RESULT_CHANGED = 403
RESULT_DELIVERED = 404
RESULT_WARNING = 405
RESULT_CONFIGURATION = 500
RESULT_CALCULATED = 502
RESULT_CALCULATION_FAILED = 503

RESULT_TEXTS: dict[int, str] = {
    150: "Processing failed",
    350: "Transaction initialized",
    400: "Transaction result successful",
    401: "Transaction result error",
    402: "Transaction result pending",
    403: "Payment change successful",
    404: "Confirmation deliver successful",
    405: "Transaction result warning",
    500: "Calculation configuration processed",
    502: "Calculation successful",
    503: "Calculation failed",
}
PROFILE_RESULT_TEXT = "Profile processed"

SUCCESS_RESULT: dict[Operation, int] = {
    Operation.PAYMENT_INIT: RESULT_INITIALIZED,
    Operation.PAYMENT_QUERY: RESULT_PENDING,
    Operation.PAYMENT_REQUEST: RESULT_PENDING,
    Operation.PAYMENT_CONFIRM: RESULT_CONFIRMED,
    Operation.CONFIRMATION_DELIVER: RESULT_DELIVERED,
    Operation.PAYMENT_CHANGE: RESULT_CHANGED,
    Operation.PROFILE_REQUEST: RESULT_CONFIGURATION,
    Operation.CONFIGURATION_REQUEST: RESULT_CONFIGURATION,
    Operation.CALCULATION_REQUEST: RESULT_CALCULATED,
}
"""The operation's own success result; success = status OK **and** this result (§4)."""

SUCCESS_REASON: dict[Operation, int] = {
    Operation.PAYMENT_INIT: 300,
    Operation.PAYMENT_QUERY: 700,
    Operation.PAYMENT_REQUEST: 700,
    Operation.PAYMENT_CONFIRM: 303,
    Operation.CONFIRMATION_DELIVER: 303,
    Operation.PAYMENT_CHANGE: 700,
    Operation.PROFILE_REQUEST: 306,
    Operation.CONFIGURATION_REQUEST: 306,
    Operation.CALCULATION_REQUEST: 603,
}
"""The reason a real gateway sends with the success result (used by the sandbox)."""

RESPONSE_TYPE: dict[Operation, str] = {
    Operation.PAYMENT_INIT: "STATUS_RESPONSE",
    Operation.PAYMENT_QUERY: "PAYMENT_PRODUCTS",
    Operation.PAYMENT_REQUEST: "PAYMENT_PERMISSION",
    Operation.PAYMENT_CONFIRM: "PAYMENT_PERMISSION",
    Operation.CONFIRMATION_DELIVER: "STATUS_RESPONSE",
    Operation.PAYMENT_CHANGE: "PAYMENT_PERMISSION",
    Operation.PROFILE_REQUEST: "PROFILE_SETTINGS",
    Operation.CONFIGURATION_REQUEST: "CONFIGURATION_SETTINGS",
    Operation.CALCULATION_REQUEST: "INSTALLMENT_PLAN",
}
"""Response type on success; every failure is ``STATUS_ERROR``."""
RESPONSE_TYPE_ERROR = "STATUS_ERROR"

# --- reason codes (§6.3) -------------------------------------------------------------------

REASON_TEXTS: dict[int, str] = {
    # success / informational
    300: "Processing successful",
    303: "No RMS reason code",
    306: "Profile read successful",
    603: "Calculation reason: FULFILLED_CONDITION: The payment plan fulfilled the conditions",
    700: "Request successful",
    # rejections
    701: "merchant limit exceeded",
    703: "Request not successful",
    720: "Declined - Payment attribute",
    721: "Declined - Transaction risk",
    730: "Declined - Buyer identity",
    800: "B2B customer not identified, manual check necessary",
    2002: "B2B not allowed for current product",
    # technical / validation
    100: "Internal server error",
    101: "Database access error",
    102: "Risk Management processing error",
    120: "Authentification failed: Merchant or product not active",
    121: "request must contain credential",
    200: "Validation failed",
    201: "Operation missing. Please check request.",
    202: "Illegal operation type. Please check request.",
    203: "Validation of business rules failed",
    206: "PAYMENT_INIT request may not contain transaction-id",
    208: "PAYMENT_INIT request may not contain content element",
    209: "request must contain content element",
    210: "content must contain shopping basket",
    211: "PAYMENT_QUERY content must contain customer if classification is requested",
    212: "PAYMENT_REQUEST content must contain payment",
    213: "PAYMENT_REQUEST content must contain payment method",
    214: "request must contain operation subtype",
    216: "content must contain customer data",
    217: "Installment details mandatory for payment method",
    219: "Installment amount mandatory for payment method",
    220: "Customer parameter contacts is mandatory for request",
    221: "Customer parameter email is mandatory for request",
    222: "Customer parameter first name is mandatory for request",
    223: "Customer parameter last name is mandatory for request",
    224: "Customer parameter addresses is mandatory for request",
    225: "Customer parameter customer-allow-credit-inquiry is mandatory for request",
    226: "Customer parameter gender is mandatory for request",
    227: "Customer parameter date-of-birth is mandatory for B2C request",
    229: "Amount mandatory for payment method",
    230: "Bank account data mandatory",
    231: "Debit pay type is allowed for INSTALLMENT only",
    232: "CALCULATION_REQUEST request must contain credential",
    233: "CALCULATION_REQUEST request must contain content element",
    234: "CALCULATION_REQUEST request must contain operation subtype",
    242: "No more than 10 numerical characters allowed for bank-account-number",
    260: "Shop-id in external block is mandatory for this product",
    261: "All items must contain a shop-id",
    262: (
        "Merchant consumer id and payment method 'ELV' are mandatory for using stored bank "
        "account information"
    ),
    1000: "technical error",
    2000: "Validation failed",
    2001: "Different delivery address for current product not allowed",
    2003: "Date of Birth invalid",
    2004: "Due date parameter(s) not valid",
    2005: "Shopping basket amount too low for current product",
    2006: "Shopping basket amount too high for current product",
    2100: "Billing address not valid",
    2101: "Delivery address not valid",
    2110: "IBAN not valid",
    2300: "Request basket not valid",
    # instalment calculator
    601: "Merchant not eligible for product installment",
    650: "The condition of amount is not passed. The amount is too low.",
    651: "The condition of amount is not passed. The amount is too high.",
    652: "CONFIGURATION_NOT_VALID",
    671: "The condition of the last rate is not passed",
    688: "Rate was too low for long runtime amount",
    689: "Rate was too low for short runtime amount",
    695: "Rate was too high to match minimum installment runtime",
    696: "Rate was too low to match maximum allowed installment runtime",
    697: "Rate or runtime did not match allowed runtime - rate has been adjusted",
    698: "Runtime was too long to match maximum allowed installment runtime",
    699: "Runtime was too short to match minimum allowed installment runtime",
}

REASON_BASKET_NOT_VALID = 2300
REASON_VALIDATION_FAILED = 200
REASON_DECLINED = 703

USABLE_CALCULATION_REASONS: frozenset[int] = frozenset(
    {603, 671, 688, 689, 695, 696, 697, 698, 699}
)
"""With result 502 these reasons still give a usable (possibly adjusted) instalment plan."""

METHOD_LOCKING_REASONS: frozenset[int] = frozenset({703, 720, 721})
"""Declines after which shops hide the method for this customer."""

REASON_DECLINED_BUYER_IDENTITY = 730
DECLINES_UNDER_150: frozenset[int] = frozenset({REASON_DECLINED_BUYER_IDENTITY})
"""Reasons that are declines although RatePAY sends them with result 150 (reference §6.3:
730 "Declined - Buyer identity"): a risk decision with a customer message, not a data error,
so the order takes the declined path instead of being retried."""

MAX_PAYMENT_ATTEMPTS = 3
PAYMENT_ATTEMPT_WINDOW_HOURS = 24
"""RatePAY's guidance: at most 3 payment attempts per order within 24 hours (§1.4)."""


def is_decline(result_code: int | None, reason_code: int | None) -> bool:
    """A risk or contract decline: result 401, or result 150 with a decline reason (730)."""
    return result_code == RESULT_DECLINED or (
        result_code == RESULT_PROCESSING_FAILED and reason_code in DECLINES_UNDER_150
    )


def usable_calculation(result_code: int | None, reason_code: int | None) -> bool:
    """A CALCULATION_REQUEST answer whose plan can be offered and sent (502 + usable reason)."""
    return result_code == SUCCESS_RESULT[Operation.CALCULATION_REQUEST] and (
        reason_code in USABLE_CALCULATION_REASONS
    )


def result_text(code: int) -> str:
    return RESULT_TEXTS.get(code, "unknown result")


def reason_text(code: int) -> str:
    return REASON_TEXTS.get(code, "unknown reason")
