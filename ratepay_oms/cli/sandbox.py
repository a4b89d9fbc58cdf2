"""``ratepay-oms sandbox serve``: run the offline RatePAY gateway on loopback until Ctrl-C."""

from __future__ import annotations

import errno
import logging
import signal
import sys
from decimal import Decimal, InvalidOperation

import click

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import stdout_console
from ratepay_oms.errors import OmsError
from ratepay_oms.sandbox import DEMO_SECURITY_CODE, Fault, SandboxConfig, SandboxGateway
from ratepay_oms.sandbox.faults import FaultSpecError
from ratepay_oms.sandbox.status_api import (
    DEFAULT_AUDIENCE,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    OAuthConfig,
)

logger = logging.getLogger(__name__)


@cli.group()
def sandbox() -> None:
    """The offline RatePAY sandbox gateway: the XML protocol, RatePAY's ledger rules and
    the transaction status lookup on loopback, with fault injection.

    \b
    Example:
      ratepay-oms sandbox serve --port 8899 --fault http_500:CONFIRMATION_DELIVER
    """


class SandboxStartError(OmsError):
    """The sandbox could not listen: the port is taken, the address is not this host's, or a
    port below 1024 needs privileges."""


def _bind_problem(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is in use (another sandbox?); pick another with "
                "--port N, or --port 0 for a free one")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: not an address of this machine (--host)"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port} (below 1024 needs root); use --port N"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def _decimal(ctx: click.Context, param: click.Parameter, value: str) -> Decimal:
    try:
        return Decimal(value).quantize(Decimal("0.01"))
    except InvalidOperation:
        raise click.BadParameter(f"not a decimal amount: {value!r}") from None


@sandbox.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8899, show_default=True, type=int, help="0 picks a free port.")
@click.option("--profile-id", default="INTEGRATION_TE_DACH", show_default=True)
@click.option(
    "--security-code",
    default=DEMO_SECURITY_CODE,
    envvar="RATEPAY_SANDBOX_SECURITY_CODE",
    show_default=False,
    help="Credential to accept (default: the built-in demo code).",
)
@click.option(
    "--oauth-client-id",
    default=DEMO_CLIENT_ID,
    show_default=True,
    help="OAuth client the status API accepts.",
)
@click.option(
    "--oauth-client-secret",
    default=DEMO_CLIENT_SECRET,
    envvar="RATEPAY_SANDBOX_OAUTH_CLIENT_SECRET",
    show_default=False,
    help="Its secret (default: the built-in demo secret; also "
    "$RATEPAY_SANDBOX_OAUTH_CLIENT_SECRET).",
)
@click.option(
    "--oauth-audience",
    default=DEFAULT_AUDIENCE,
    show_default=True,
    help="Audience a token must be asked for (RatePAY's integration audience by default).",
)
@click.option(
    "--processing-offset-hours",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="maximum_processing_offset_in_hours in status answers.",
)
@click.option("--decline-last-name", default="Ablehnung", show_default=True)
@click.option("--decline-over", default="5000.00", show_default=True, callback=_decimal)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KIND:OPERATION[/SUBTYPE][:EVERY_N|:PROBABILITY]",
    help="Inject a fault (repeatable), e.g. timeout_after_booking:CONFIRMATION_DELIVER:2.",
)
@click.option("--fault-delay", default=30.0, show_default=True, help="Seconds for delay faults.")
@click.option("--seed", type=int, default=None, help="Seed ids and fault probabilities.")
def serve(
    host: str,
    port: int,
    profile_id: str,
    security_code: str,
    oauth_client_id: str,
    oauth_client_secret: str,
    oauth_audience: str,
    processing_offset_hours: int,
    decline_last_name: str,
    decline_over: Decimal,
    faults: tuple[str, ...],
    fault_delay: float,
    seed: int | None,
) -> None:
    """Serve the RatePAY XML protocol and the transaction status lookup until Ctrl-C.

    \b
    Example:
      ratepay-oms sandbox serve --port 8899 --fault http_500:PAYMENT_CHANGE:0.2 --seed 7
    """
    try:
        parsed = [Fault.parse(spec, delay_s=fault_delay) for spec in faults]
    except FaultSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    config = SandboxConfig(
        profile_id=profile_id,
        security_code=security_code,
        decline_last_name=decline_last_name,
        decline_over=decline_over,
        seed=seed,
        oauth=OAuthConfig(
            client_id=oauth_client_id,
            client_secret=oauth_client_secret,
            audience=oauth_audience,
            processing_offset_hours=processing_offset_hours,
        ),
    )
    gateway = SandboxGateway(config)
    for fault in parsed:
        gateway.faults.add(fault)
    from ratepay_oms.sandbox.server import SandboxServer

    try:
        server = SandboxServer(gateway, host, port)
    except OSError as exc:
        raise SandboxStartError(_bind_problem(exc, host, port)) from None
    console = stdout_console(soft_wrap=True)
    console.print(f"RatePAY sandbox listening on {server.url}")
    console.print("Settings for the facade:")
    console.print(f"  RATEPAY_API_TEST_URL={server.url}")
    console.print(f"  RATEPAY_PROFILE_ID={profile_id}")
    console.print("  RATEPAY_SECURITY_CODE=******** (the one you passed, or the demo code)")
    console.print("  RATEPAY_MODE=test")
    console.print("Settings for the Transaction Status API (reconciliation of lost answers):")
    console.print(f"  RATEPAY_STATUS_API_URL={server.status_url}")
    console.print(f"  RATEPAY_OAUTH_TOKEN_URL={server.token_url}")
    console.print(f"  RATEPAY_OAUTH_CLIENT_ID={oauth_client_id}")
    console.print(
        "  RATEPAY_OAUTH_CLIENT_SECRET=******** (the one you passed, or the demo secret)"
    )
    console.print(f"  RATEPAY_OAUTH_AUDIENCE={oauth_audience}")
    console.print(f"  RATEPAY_STATUS_PROCESSING_OFFSET_HOURS={processing_offset_hours}")
    console.print(f"Ledger: {server.ledger_url}{{transaction id}} (the sandbox's own view)")
    console.print(f"Faults: {server.faults_url} (GET / POST JSON / DELETE); active: {len(parsed)}")
    sys.stdout.flush()  # a supervising process reads the URL before the first request
    # Ctrl-C (SIGINT) stops the sandbox even when it was started from a shell that ignores
    # SIGINT for its background jobs (Python then leaves it ignored): it is the documented way
    # to stop it, and a test or supervisor that sends it must not wait forever.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("sandbox stopped")
