"""The ``ratepay-oms`` console: thin commands over the public API.

Each command group lives in its own module (``ratepay_oms.cli.<group>``) and attaches itself to
``cli`` when imported. The group imports a module only when its command runs (``COMMANDS`` says
which module holds which command), so ``ratepay-oms --help`` and a command's ``--help`` start
without SQLAlchemy, the sandbox or the engine (``bench/cli_startup.py`` measures it).

User errors (``OmsError``) print one line and exit with their status (``ExitCode`` in
``ratepay_oms.errors``, the README's table); they never show a traceback. Output to a pipe
that closes early (``| head``) ends the command quietly.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from ratepay_oms.errors import ExitCode, OmsError

COMMANDS: dict[str, tuple[str, str]] = {
    "alerts": ("operator", "Items in a state longer than its SLA, by process and state."),
    "credit": ("adjustments", "Grant a goodwill credit on a delivered order."),
    "db": ("db", "Database schema: upgrade, current revision."),
    "debit": ("adjustments", "Charge an adjustment on a delivered order."),
    "demo": ("demo", "Every RatePAY flow against the built-in sandbox, no setup needed."),
    "event": ("orders", "Fire a manual event (ship, cancel, …) on an order or a CSV."),
    "explain": ("operator", "Why the items of an order are where they are, and not moving."),
    "installment": ("installment", "The RatePAY instalment calculator for checkout."),
    "intents": ("intents", "Gateway calls whose answer was lost or is unknown."),
    "locks": ("console", "Order leases held by tick workers: list, clear."),
    "log": ("console", "The RatePAY API log, newest first; the security code masked."),
    "matrix": ("console", "Items per process and state, by age; '!' needs a person."),
    "metrics": ("metrics", "Prometheus metrics of the engine: show once, or serve over HTTP."),
    "order": ("orders", "Place orders, show their items, states and history."),
    "outbox": ("outbox", "State-change notifications: list, deliver, retry, purge."),
    "process": ("process,console", "List, check, draw and migrate the YAML processes."),
    "profile": ("profiles", "RatePAY profiles: refresh them from RatePAY, show what is kept."),
    "prune": ("prune", "Remove (and archive) old rows of finished orders."),
    "sandbox": ("sandbox", "The offline RatePAY sandbox gateway with fault injection."),
    "tick": ("tick", "Advance every due item: retries, timeouts, automatic steps."),
    "web": ("web", "The back-office web console: serve it, manage its users."),
}
"""Top-level command → (its modules under ``ratepay_oms.cli``, comma separated; the one line
``--help`` lists). ``process migrate`` lives in ``console`` and joins ``process`` from there."""

GROUP_MODULES = (
    "db", "orders", "process", "tick", "sandbox", "demo", "console", "intents", "installment",
    "operator", "profiles", "adjustments", "outbox", "prune", "metrics", "web",
)
"""Every command module. One that ``COMMANDS`` does not name is imported for the listing."""

LOG_LEVELS = ("debug", "info", "warning", "error")


class LazyGroup(click.Group):
    """A Click group that imports a command's module when the command is looked up."""

    def _load(self, modules: str) -> None:
        for module in modules.split(","):
            try:
                importlib.import_module(f"ratepay_oms.cli.{module}")
            except ModuleNotFoundError as exc:
                if exc.name != f"ratepay_oms.cli.{module}":
                    raise

    def _load_unmapped(self) -> None:
        mapped = {m for modules, _ in COMMANDS.values() for m in modules.split(",")}
        for module in GROUP_MODULES:
            if module not in mapped:
                self._load(module)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_unmapped()
        return sorted(set(self.commands) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            entry = COMMANDS.get(cmd_name)
            if entry is not None:
                self._load(entry[0])
            else:
                self._load_unmapped()
        command = self.commands.get(cmd_name)
        if command is not None and cmd_name in COMMANDS:
            command.short_help = COMMANDS[cmd_name][1]
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in COMMANDS:
                rows.append((name, COMMANDS[name][1]))
            else:
                command = self.commands[name]
                if not command.hidden:
                    rows.append((name, command.get_short_help_str(limit=60)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ratepay-oms")
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    default=None,
    help="Config file ([oms] and [ratepay] tables; default: $RATEPAY_OMS_CONFIG, "
    "else ./ratepay-oms.toml when present).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="error",
    show_default=True,
    help="Log messages of this level and above go to stderr (a tick worker: info).",
)
@click.option(
    "--log-format",
    type=click.Choice(("text", "json")),
    default="text",
    show_default=True,
    help="json: one JSON object per log line (for a tick worker under a log collector).",
)
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str, log_format: str) -> None:
    """Order state machine engine for RatePAY payments.

    \b
    Example:
      ratepay-oms db upgrade && ratepay-oms order place order.json && ratepay-oms tick
    """
    ctx.ensure_object(dict)
    ctx.obj["config_file"] = config_file
    from ratepay_oms.cli._logging import configure_logging

    configure_logging(log_level, log_format)


def _mount() -> None:
    """Import every command module (tests and docs tools that walk all commands use it)."""
    for module in GROUP_MODULES:
        cli._load(module)  # type: ignore[attr-defined]


def _print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[red]error:[/red] {escape(message)}", markup=True
    )


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush is
    silent too (Python's own advice for SIGPIPE-free programs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover - stdout without a descriptor
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        # Without standalone mode Click returns ``ctx.exit(n)``'s code instead of exiting.
        rv: Any = cli.main(args=argv, prog_name="ratepay-oms", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):
            return rv
    except BrokenPipeError:
        _quiet_stdout()
        return ExitCode.OK
    except OmsError as exc:
        _print_error(str(exc))
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return ExitCode.INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    finally:
        if "ratepay_oms.cli._logging" in sys.modules:
            sys.modules["ratepay_oms.cli._logging"].reset_logging()
    return ExitCode.OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
