"""Pytest fixtures for the sandbox gateway (loaded by ``tests/conftest.py``).

``sandbox`` starts a fresh gateway on a free loopback port for one test and stops it after.
Its ``.settings`` are the facade's configuration keys pointing at it, so a facade test reads
``RatepaySettings.from_mapping(sandbox.settings)`` and talks real HTTP to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ratepay_oms.sandbox.gateway import SandboxConfig, SandboxGateway
from ratepay_oms.sandbox.server import SandboxServer

SANDBOX_SHOP_ID = "shop01"
SANDBOX_SYSTEM_ID = "sandbox.ratepay-oms.test"


class RunningSandbox:
    """A started sandbox server plus the settings a client needs to reach it."""

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.gateway: SandboxGateway = server.gateway
        self.url = server.url
        self.status_url = server.status_url
        self.faults_url = server.faults_url
        config = server.gateway.config
        self.settings: dict[str, str] = {
            "PROFILE_ID": config.profile_id,
            "SECURITY_CODE": config.security_code,
            "SHOP_ID": SANDBOX_SHOP_ID,
            "SYSTEM_ID": SANDBOX_SYSTEM_ID,
            "MODE": "test",
            "API_TEST_URL": server.url,
            "CLIENT_NAME": "ratepay-oms",
            "CLIENT_VERSION": "0.1.0",
        }

    def stop(self) -> None:
        self.server.stop()


def start_sandbox(config: SandboxConfig | None = None) -> RunningSandbox:
    """Start a sandbox outside pytest (the fixture uses it too)."""
    return RunningSandbox(SandboxGateway(config or SandboxConfig(seed=1)).serve("127.0.0.1", 0))


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    """A running sandbox gateway for one test (seeded, so ids repeat from run to run)."""
    running = start_sandbox()
    try:
        yield running
    finally:
        running.stop()
