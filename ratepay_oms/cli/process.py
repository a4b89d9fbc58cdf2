"""``ratepay-oms process list|check|draw``: look at process files without a database.

``check`` is meant for CI and pre-commit: it prints every problem as ``file:line: severity:
message`` (the format editors and CI annotators understand) and exits 1 on any error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import stdout_console
from ratepay_oms.process.draw import DRAW_FORMATS, draw
from ratepay_oms.process.errors import ProcessCheckFailed
from ratepay_oms.process.loader import (
    check_files,
    load_named_process,
    load_processes,
)
from ratepay_oms.process.model import ProcessDefinition

if TYPE_CHECKING:
    from ratepay_oms.engine.plugins import PluginRegistry

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".dot": "dot", ".gv": "dot", ".mmd": "mermaid", ".svg": "svg", ".png": "png"}

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Processes directory (default: $RATEPAY_OMS_PROCESS_DIR, [oms] process_dir, "
    "./processes, the shipped one).",
)


def _process_dir(directory: Path | None) -> Path:
    """``--dir``, else what the environment or the config file say (``OmsConfig``)."""
    from ratepay_oms.cli._common import current_config

    return current_config().resolve_process_dir(directory)


def _registry() -> PluginRegistry:
    """Our plugins plus the entry-point ones; imported late so ``--help`` stays fast."""
    from ratepay_oms.plugins import build_default_registry

    return build_default_registry()


@cli.group("process")
def process_group() -> None:
    """Inspect, check and draw the YAML process definitions.

    \b
    Example:
      ratepay-oms process check && ratepay-oms process draw RatepayInvoice01 -o invoice.svg
    """


def _row(definition: ProcessDefinition) -> dict[str, object]:
    return {
        "name": definition.name,
        "initial": definition.initial,
        "states": len(definition.states),
        "transitions": len(definition.transitions),
        "events": len(definition.events),
        "files": list(definition.files),
    }


@process_group.command("list")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_processes(directory: Path | None, as_json: bool) -> None:
    """List the main processes (versions) in the processes directory.

    \b
    Example:
      ratepay-oms process list --dir processes --json
    """
    root = _process_dir(directory)
    definitions = load_processes(root)
    ordered = [d for _, d in sorted(definitions.items())]
    if as_json:
        click.echo(json.dumps([_row(d) for d in ordered], indent=2))
        return
    table = Table(title=f"processes in {root}")
    for column in ("name", "initial", "states", "transitions", "files"):
        numeric = column in ("states", "transitions")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for d in ordered:
        table.add_row(
            d.name,
            d.initial,
            str(len(d.states)),
            str(len(d.transitions)),
            "\n".join(os.path.relpath(f, root) for f in d.files),  # short: the title has root
        )
    stdout_console(soft_wrap=True).print(table)


@process_group.command("check")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@dir_option
def check(files: tuple[Path, ...], directory: Path | None) -> None:
    """Check process files: shape, names, includes, reachability, plugins.

    FILES may be main or sub-process files or directories; without FILES every main process
    of the processes directory is checked. Exit status 1 when there is any error (warnings
    alone pass).

    \b
    Example:
      ratepay-oms process check processes/RatepayInvoice01.yaml
    """
    targets = list(files) or [_process_dir(directory)]
    problems = check_files(targets, registry=_registry())
    for problem in problems:
        click.echo(problem.format())
    errors = sum(1 for p in problems if p.is_error)
    warnings = len(problems) - errors
    checked = ", ".join(str(t) for t in targets)
    if errors:
        raise ProcessCheckFailed(f"{errors} error(s), {warnings} warning(s) in {checked}")
    click.echo(f"OK: {checked} has no errors ({warnings} warning(s))")


def write_drawing(
    definition: ProcessDefinition,
    fmt: str | None,
    output: Path | None,
    highlight: Mapping[str, int] | None = None,
) -> None:
    """Draw to ``output`` (format from ``fmt`` or its suffix) or to stdout; the console's other
    draw commands (an order's current states) reuse this with their ``highlight``."""
    if fmt is None:
        fmt = _SUFFIX_FORMATS.get(output.suffix.lower(), "dot") if output else "dot"
    data = draw(definition, fmt, registry=_registry(), highlight=highlight)
    if output is not None:
        output.write_bytes(data)
        click.echo(f"wrote {output} ({fmt})", err=True)
    elif fmt in ("svg", "png") and sys.stdout.isatty():
        raise click.UsageError(f"{fmt} is binary: write it to a file with -o FILE.{fmt}")
    else:
        click.get_binary_stream("stdout").write(data)


@process_group.command("draw")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(DRAW_FORMATS),
    default=None,
    help="Output format (default: from the -o suffix, else dot).",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE."
)
@dir_option
@click.option(
    "--order",
    "order_ref",
    metavar="REF",
    default=None,
    help="Highlight the states where the items of order REF stand, with their counts.",
)
@click.option("--db", "db_url", metavar="URL", default=None, help="Database for --order.")
def draw_process(
    name: str,
    fmt: str | None,
    output: Path | None,
    directory: Path | None,
    order_ref: str | None,
    db_url: str | None,
) -> None:
    """Draw process NAME: happy path green, event-less transitions dashed, missing plugins red.

    SVG and PNG need Graphviz (apt-get install graphviz); dot and mermaid need nothing.

    \b
    Example:
      ratepay-oms process draw RatepayInvoice01 --format mermaid > invoice.mmd
      ratepay-oms process draw RatepayInvoice01 --order 100045 -o order.svg
    """
    definition = load_named_process(_process_dir(directory), name)
    highlight = None
    if order_ref is not None:
        from ratepay_oms.cli.console import open_session
        from ratepay_oms.console.inspect import order_state_counts

        with open_session(db_url) as session:
            highlight = order_state_counts(session, order_ref, definition.name)
    write_drawing(definition, fmt, output, highlight)
