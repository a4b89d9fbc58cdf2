"""A sandbox gateway started in this process, with the settings a client needs to reach it.

The demo, the benchmarks and the tests start the sandbox the same way (``start_sandbox``); this
module needs nothing beyond the package's own dependencies (the pytest fixture that wraps it is
in :mod:`ratepay_oms.sandbox.testing`, which only tests load).
"""

from __future__ import annotations

import requests

from ratepay_oms import __version__
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
        self.token_url = server.token_url
        self.faults_url = server.faults_url
        config = server.gateway.config
        self.settings: dict[str, str] = {
            "PROFILE_ID": config.profile_id,
            "SECURITY_CODE": config.security_code,
            "SHOP_ID": SANDBOX_SHOP_ID,
            "SYSTEM_ID": SANDBOX_SYSTEM_ID,
            "MODE": "test",
            "API_TEST_URL": server.url,
            "STATUS_API_URL": server.status_url,
            "OAUTH_CLIENT_ID": config.oauth.client_id,
            "OAUTH_CLIENT_SECRET": config.oauth.client_secret,
            "OAUTH_TOKEN_URL": server.token_url,
            "OAUTH_AUDIENCE": config.oauth.audience,
            "STATUS_PROCESSING_OFFSET_HOURS": str(config.oauth.processing_offset_hours),
            "CLIENT_NAME": "ratepay-oms",
            "CLIENT_VERSION": __version__,
        }

    def stop(self) -> None:
        self.server.stop()

    def status(self, transaction_id: str, include: str = "all") -> requests.Response:
        """GET the status API over HTTP the way RatePAY requires (token, JSON headers)."""
        oauth = self.gateway.config.oauth
        token = requests.post(
            self.token_url,
            json={
                "client_id": oauth.client_id,
                "client_secret": oauth.client_secret,
                "audience": oauth.audience,
                "grant_type": "client_credentials",
            },
            timeout=5,
        ).json()["access_token"]
        return requests.get(
            f"{self.status_url}/{transaction_id}",
            params={"include": include},
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=5,
        )


def start_sandbox(config: SandboxConfig | None = None) -> RunningSandbox:
    """Start a sandbox outside pytest (the fixture uses it too)."""
    return RunningSandbox(SandboxGateway(config or SandboxConfig(seed=1)).serve("127.0.0.1", 0))
