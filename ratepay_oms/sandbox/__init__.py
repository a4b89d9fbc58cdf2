"""An offline RatePAY-compatible gateway on loopback, for tests, demos and reconcile drills.

It speaks the RatePAY 1.8 XML protocol (reference ``ratepay-xml-api.md``), keeps the
per-position ledger the real gateway keeps (ordered / delivered / cancelled / returned),
refuses what RatePAY refuses, offers a Transaction Status lookup and injects faults on demand.
It imports only the shared XML helpers and code tables of ``ratepay_oms.ratepay``, never the
facade, so facade bugs can't hide behind a sandbox that shares them.
"""

from __future__ import annotations

import logging

from ratepay_oms.sandbox.faults import FAULT_KINDS, Fault, FaultSet, FaultSpecError
from ratepay_oms.sandbox.gateway import DEMO_SECURITY_CODE, Exchange, SandboxConfig, SandboxGateway
from ratepay_oms.sandbox.installments import InstallmentConfig
from ratepay_oms.sandbox.ledger import Booking, PositionLedger, Transaction
from ratepay_oms.sandbox.server import SandboxServer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEMO_SECURITY_CODE",
    "FAULT_KINDS",
    "Booking",
    "Exchange",
    "Fault",
    "FaultSet",
    "FaultSpecError",
    "InstallmentConfig",
    "PositionLedger",
    "SandboxConfig",
    "SandboxGateway",
    "SandboxServer",
    "Transaction",
]
