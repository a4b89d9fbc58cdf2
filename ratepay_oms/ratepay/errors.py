"""Typed errors of the RatePAY room, all ``OmsError``s so the CLI prints them as one line.

None of them ever carries the security code: messages are built from codes, names and masked
documents only.
"""

from __future__ import annotations

from ratepay_oms.errors import OmsError


class RatepayError(OmsError):
    """Base of everything the RatePAY facade raises on purpose."""


class XmlSecurityError(RatepayError):
    """A document we refuse to parse: DOCTYPE/entity declarations or over the size cap.

    Raised before any entity could be expanded, so an XXE or billion-laughs payload is never
    resolved.
    """


class MalformedXmlError(RatepayError):
    """A document that is not well-formed XML (or an amount that is not a decimal)."""


class RatepaySettingsError(RatepayError):
    """Missing or invalid configuration; the message names the key to fix."""


class RatepayValidationError(RatepayError):
    """Input refused before anything was sent: fix the order data and call again."""


class StatusLookupUnavailable(RatepayError):
    """``transaction_status`` was asked but ``STATUS_API_URL`` is not configured."""


class RatepayTransportError(RatepayError):
    """The call did not produce a usable gateway answer.

    Timeouts, refused connections, unexpected HTTP statuses, malformed or hostile XML and a
    response without its ``processing`` block all end here, never in a false success.

    ``sent`` tells the caller whether the request may have reached the gateway: when it is
    ``True`` a booking operation (delivery, cancellation, refund) may have been booked and must be
    reconciled (e.g. through ``transaction_status``) before anything is re-sent.
    """

    def __init__(
        self,
        message: str,
        *,
        sent: bool,
        operation: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.sent = sent
        self.operation = operation
        self.http_status = http_status
