"""RatePAY commands and conditions under Spryker's names (``Ratepay/ConfirmDelivery``, …).

``register(registry)`` is called by ``ratepay_oms.plugins.build_default_registry``. The
commands need a ``RatepayFacade`` in the engine's services under ``"ratepay"``;
``services.ratepay_services`` builds it from the settings.
"""

from __future__ import annotations

from typing import Any

from ratepay_oms.engine.plugins import ExternalCommand, PluginRegistry
from ratepay_oms.plugins.ratepay.commands import (
    AdjustmentCommand,
    CancelOrderCommand,
    ConfirmDeliveryCommand,
    ConfirmPaymentCommand,
    PaymentRequestCommand,
    RefundCommand,
)
from ratepay_oms.plugins.ratepay.conditions import CONDITIONS

COMMANDS: dict[str, ExternalCommand[Any, Any]] = {
    "Ratepay/PaymentRequest": PaymentRequestCommand(),
    "Ratepay/ConfirmPayment": ConfirmPaymentCommand(),
    "Ratepay/ConfirmDelivery": ConfirmDeliveryCommand(),
    "Ratepay/CancelOrder": CancelOrderCommand(),
    "Ratepay/Refund": RefundCommand(),
    "Ratepay/Credit": AdjustmentCommand(),
}


def register(registry: PluginRegistry) -> None:
    for name, command in COMMANDS.items():
        registry.register_external(name, command)
    for name, condition in CONDITIONS.items():
        registry.register_condition(name, condition)


__all__ = ["COMMANDS", "CONDITIONS", "register"]
