"""How long ``ratepay-oms --help`` takes to start, against the floors it cannot beat.

Each command is run ``--runs`` times as a fresh process (wall clock, median and best):

- ``python -c pass``: the interpreter alone (with this venv's site-packages);
- a bare Click program printing its ``--help``: the strongest baseline for a Click CLI, since
  ``ratepay-oms`` is one;
- ``ratepay-oms --help``, and ``ratepay-oms tick --help`` (loads one command module).

The ratio to the bare Click program is what the CLI adds. The target (issue 11) is
``ratepay-oms --help`` ≤ 0.4 s on the project's machine; the machine is shared, so read the
median next to the floors measured in the same run.

    python bench/cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.4

BARE_CLICK = """
import click

@click.group()
def cli():
    '''A bare Click group.'''

@cli.command()
def hello():
    '''Say hello.'''

cli(["--help"], prog_name="bare")
"""


def _command() -> list[str]:
    script = Path(sys.executable).with_name("ratepay-oms")
    if script.exists():
        return [str(script)]
    found = shutil.which("ratepay-oms")
    return [found] if found else [sys.executable, "-m", "ratepay_oms.cli"]


def _time(argv: list[str], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), min(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    cli = _command()
    rows = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("bare Click --help (baseline)", [sys.executable, "-c", BARE_CLICK]),
        ("ratepay-oms --help", [*cli, "--help"]),
        ("ratepay-oms tick --help", [*cli, "tick", "--help"]),
    ]
    results = {}
    print(f"{'command':32} {'median':>9} {'best':>9}   ({args.runs} runs each)")
    for label, argv in rows:
        median, best = _time(argv, args.runs)
        results[label] = median
        print(f"{label:32} {median:8.3f}s {best:8.3f}s")
    baseline = results["bare Click --help (baseline)"]
    ours = results["ratepay-oms --help"]
    print(f"ratio ratepay-oms --help / bare Click: {ours / baseline:.2f}")
    verdict = "met" if ours <= TARGET_S else "NOT met (a loaded machine? compare the floors)"
    print(f"target ratepay-oms --help <= {TARGET_S} s: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
