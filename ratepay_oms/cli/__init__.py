"""The ``ratepay-oms`` console: thin commands over the public API.

Each command group lives in its own module (``ratepay_oms.cli.<group>``) and attaches itself to
``cli`` when imported; ``main`` imports them all. User errors (``OmsError``) print one line and
exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click
from rich.console import Console
from rich.markup import escape

from ratepay_oms.errors import OmsError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

GROUP_MODULES = (
    "db", "orders", "process", "tick", "sandbox", "demo", "console", "intents", "installment",
    "operator", "profiles", "adjustments", "outbox", "prune", "metrics", "web",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ratepay-oms")
def cli() -> None:
    """Order state machine engine for RatePAY payments.

    \b
    Example:
      ratepay-oms db upgrade && ratepay-oms order place order.json && ratepay-oms tick
    """


def _mount() -> None:
    for module in GROUP_MODULES:
        try:
            importlib.import_module(f"ratepay_oms.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ratepay_oms.cli.{module}":
                raise


def main(argv: list[str] | None = None) -> int:
    _mount()
    try:
        # Without standalone mode Click returns ``ctx.exit(n)``'s code instead of exiting.
        rv = cli.main(args=argv, prog_name="ratepay-oms", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):
            return rv
    except OmsError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", markup=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        err_console.print("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
