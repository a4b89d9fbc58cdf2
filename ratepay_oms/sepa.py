"""SEPA bank data checks: IBAN (ISO 13616), BIC (ISO 9362) and the mandate reference.

Checked at intake so a typo is refused with a message naming the field instead of being
answered by RatePAY with 150 / 2110 ("IBAN not valid") after the order was placed. Each
function returns ``None`` for a good value and otherwise what is wrong, in words a shop can
show; none of them echoes the value (bank data is personal data).
"""

from __future__ import annotations

import re

IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
    "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GI": 23, "GR": 27, "HR": 21, "HU": 28,
    "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
    "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "VA": 22,
}  # fmt: skip
"""IBAN length per country of the SEPA area (ISO 13616 registry). Other countries are checked
by format and check digits only."""

_IBAN = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}")
_BIC = re.compile(r"[A-Z]{4}[A-Z]{2}[A-Z0-9]{2}([A-Z0-9]{3})?")
_MANDATE = re.compile(r"[A-Za-z0-9/?:().,'+ -]{1,35}")


def normalise_iban(iban: str) -> str:
    """Without spaces, upper case (the paper form ``DE89 3704 …`` is common)."""
    return "".join(iban.split()).upper()


def iban_problem(iban: str) -> str | None:
    """What is wrong with ``iban`` (normalised), or ``None``: format, length, mod-97."""
    if not _IBAN.fullmatch(iban):
        return "not an IBAN (two letters, two check digits, up to 30 letters or digits)"
    expected = IBAN_LENGTHS.get(iban[:2])
    if expected is not None and len(iban) != expected:
        return f"an IBAN from {iban[:2]} has {expected} characters, this one {len(iban)}"
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    if int(number) % 97 != 1:
        return "IBAN check digits do not match (a typo?)"
    return None


def bic_problem(bic: str) -> str | None:
    """What is wrong with ``bic`` (upper case, no spaces), or ``None``."""
    if not _BIC.fullmatch(bic):
        return "not a BIC (8 or 11 characters: bank, country, location[, branch])"
    return None


def mandate_reference_problem(reference: str) -> str | None:
    """SEPA mandate id: 1–35 characters of the SEPA set, not starting with ``//``."""
    if not _MANDATE.fullmatch(reference) or reference.startswith("//"):
        return "not a SEPA mandate reference (1-35 of A-Z a-z 0-9 / ? : ( ) . , ' + - space)"
    return None
