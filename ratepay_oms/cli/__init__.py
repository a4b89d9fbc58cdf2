"""The ``ratepay-oms`` console: thin commands over the public API.

Each command group lives in its own module and is mounted here. User errors (``OmsError``)
print one line and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from ratepay_oms.errors import OmsError

app = typer.Typer(
    name="ratepay-oms",
    help="Order state machine engine for RatePAY payments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.command("version")
def version() -> None:
    """Print the installed version. Example: ratepay-oms version"""
    from ratepay_oms import __version__

    print(__version__)


def _mount() -> None:
    """Mount the command groups (imported here so ``--help`` lists all of them)."""
    # Each group module registers itself on ``app`` when imported.
    import importlib

    for module in ("db", "orders", "process", "tick", "sandbox", "demo", "console"):
        try:
            importlib.import_module(f"ratepay_oms.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ratepay_oms.cli.{module}":
                raise


def main(argv: list[str] | None = None) -> int:
    _mount()
    try:
        app(args=argv, standalone_mode=False)
    except OmsError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None)
        if code is None:
            code = getattr(exc, "code", 0)
        return int(code or 0)
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
