"""XML helpers shared by the facade and the sandbox gateway.

One place for the namespace, the hardened parser, money formatting and secret masking, so the
client and our fake gateway can never disagree on them.

The parser is deliberately paranoid: gateway answers (and, for the sandbox, requests) come from
the network. No DTD is loaded, no entity is resolved, nothing is fetched, any DOCTYPE or ENTITY
declaration is refused outright, and documents over a size cap are refused before parsing.
"""

from __future__ import annotations

import logging
import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from lxml import etree

from ratepay_oms.ratepay.errors import MalformedXmlError, XmlSecurityError

log = logging.getLogger(__name__)

RATEPAY_NS = "urn://www.ratepay.com/payment/1_0"
"""The envelope namespace of Payment API 1.8 (never changed since 1.0)."""

ENVELOPE_VERSION = "1.0"
"""The ``version`` attribute of ``request`` / ``response``."""

DEFAULT_MAX_BYTES = 1_000_000
MASK = "********"

_CENT = Decimal("0.01")
_FORBIDDEN_MARKUP = (b"<!DOCTYPE", b"<!ENTITY", b"<!doctype", b"<!entity")


def q(tag: str) -> str:
    """The Clark name of a RatePAY element (``{urn…}tag``) for find()/Element()."""
    return f"{{{RATEPAY_NS}}}{tag}"


def _parser() -> etree.XMLParser:
    # A new parser per call: lxml parsers are not thread-safe and the sandbox is threaded.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_xml(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> etree._Element:
    """Parse an untrusted XML document and return its root element.

    Raises ``XmlSecurityError`` for a document over ``max_bytes`` or with a DOCTYPE / ENTITY
    declaration (checked on the raw bytes before parsing, and on the parsed tree for encodings
    the byte scan cannot see), ``MalformedXmlError`` for anything not well-formed.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > max_bytes:
        raise XmlSecurityError(f"XML document of {len(data)} bytes exceeds the cap of {max_bytes}")
    if not data.strip():
        raise MalformedXmlError("empty XML document")
    if b"<!" in data and any(marker in data for marker in _FORBIDDEN_MARKUP):
        raise XmlSecurityError("XML document with a DOCTYPE or ENTITY declaration refused")
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise MalformedXmlError(f"malformed XML: {exc}") from None
    except ValueError as exc:  # e.g. unicode strings with an encoding declaration
        raise MalformedXmlError(f"malformed XML: {exc}") from None
    docinfo: Any = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise XmlSecurityError("XML document with a DOCTYPE declaration refused")
    if next(root.iter(etree.Entity), None) is not None:  # lxml looks for entity nodes only
        raise XmlSecurityError("XML document with entity references refused")
    return root


def to_bytes(root: etree._Element) -> bytes:
    """Serialise a document as UTF-8 with the XML declaration the gateway samples carry."""
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def format_amount(value: Decimal | int) -> str:
    """Two decimal places, ROUND_HALF_UP, dot separator; never accepts a float."""
    if isinstance(value, float) or not isinstance(value, Decimal | int):
        raise TypeError(f"money must be Decimal, not {type(value).__name__}")
    amount = Decimal(value).quantize(_CENT, rounding=ROUND_HALF_UP)
    if amount == 0:
        amount = abs(amount)  # no "-0.00" on the wire
    return f"{amount:f}"


_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def parse_amount(text: str | None) -> Decimal:
    """A protocol decimal (``"82.45"``, ``"-7.5"``, ``"19"``) as an exact ``Decimal``.

    Not quantised: callers that compare sums compare Decimals, and the sandbox must be able to
    see what was actually sent.
    """
    if text is None:
        raise MalformedXmlError("missing decimal value")
    raw = text.strip()
    if not _DECIMAL.fullmatch(raw):
        raise MalformedXmlError(f"not a decimal amount: {raw[:40]!r}")
    try:
        return Decimal(raw)
    except InvalidOperation:  # pragma: no cover - the pattern already excludes it
        raise MalformedXmlError(f"not a decimal amount: {raw[:40]!r}") from None


_SECURITYCODE = re.compile(
    r"(<(?:[\w.-]+:)?securitycode\b[^>]*(?<!/)>)(.*?)(</(?:[\w.-]+:)?securitycode\s*>)",
    re.DOTALL | re.IGNORECASE,
)
_SECURITYCODE_OPEN = re.compile(r"<(?:[\w.-]+:)?securitycode\b[^>]*(?<!/)>", re.IGNORECASE)


def mask_security_code(xml: str | bytes | None) -> str:
    """The document as text with the content of every ``securitycode`` element replaced.

    Works on text, not on a parsed tree, so it also masks documents that are malformed or
    truncated (those are exactly the ones that end up in logs). An unterminated
    ``<securitycode>`` masks everything after it.
    """
    if xml is None:
        return ""
    text = xml.decode("utf-8", errors="replace") if isinstance(xml, bytes) else xml
    probe = xml if isinstance(xml, bytes) else text.encode("utf-8", errors="replace")
    if b"ycode" not in probe.lower():
        # Every match of either pattern holds "ycode" in ASCII letters of any case (no other
        # character matches y, c, o, d or e case-insensitively), and ASCII stays itself in
        # UTF-8, so there is nothing to mask: the gateway's answers are spared two regex
        # passes. (On bytes: str.lower() is slow on text beyond ASCII, bytes.lower() is not.)
        return text
    masked = _SECURITYCODE.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
    for opening in _SECURITYCODE_OPEN.finditer(masked):
        if not masked.startswith(MASK + "</", opening.end()):
            return masked[: opening.end()] + MASK
    return masked


def security_code_forms(code: str) -> tuple[str, str] | None:
    """The ``securitycode`` element holding ``code`` as our requests carry it (serialised by
    lxml, default namespace, no attributes) and the same element masked: in a request we
    built, replacing the one by the other is what ``mask_security_code`` does to it, without
    its two regex passes (a third of the CPU of a call's own code). ``None`` for an empty
    code (an empty element is serialised self-closed, which the pattern leaves alone)."""
    if not code:
        return None
    element = etree.Element("securitycode")
    element.text = code
    return etree.tostring(element, encoding="unicode"), f"<securitycode>{MASK}</securitycode>"


def mask_secret(text: str, secret: str | None) -> str:
    """Replace every occurrence of ``secret`` in ``text`` (defence in depth for echoes/errors)."""
    if secret and len(secret) >= 4:
        return text.replace(secret, MASK)
    return text
