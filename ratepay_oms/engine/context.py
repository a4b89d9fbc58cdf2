"""The engine's parts, gathered once: what every transaction of the drive loop needs.

``Engine`` builds one :class:`EngineContext` when it is constructed; the drive loop, the runner
and the tick take it as it is, so nothing assembles these parts a second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.engine.claims import Claims
from ratepay_oms.engine.compiler import CompiledProcess
from ratepay_oms.engine.persist import Origin
from ratepay_oms.engine.plugins import PluginRegistry
from ratepay_oms.process.model import ProcessDefinition


@dataclass(frozen=True)
class EngineContext:
    """Sessions, compiled processes, plugins, services, leases and log origin of one engine."""

    sessions: sessionmaker[Session]
    compiled: Mapping[str, CompiledProcess]
    definitions: Mapping[str, ProcessDefinition]
    registry: PluginRegistry
    services: dict[str, Any]
    """The engine's own dict (plugins may keep state in it; never copied)."""
    claims: Claims
    origin: Origin
