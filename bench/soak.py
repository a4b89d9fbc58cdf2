"""Soak: many orders, tick workers that get SIGKILLed, a gateway that misbehaves.

Not a test: it prints figures and never asserts timing (``tests/test_soak_ci.py`` runs a small
version and asserts the zero-figures). What it does:

1. creates a throw-away PostgreSQL database ``rpoms_soak_<hex>`` (or uses ``--db``), migrates it;
2. starts the offline gateway as its own process (``ratepay-oms sandbox serve``) and injects
   faults on ``--fault-rate`` of all XML calls through its run-time endpoint, in four equal
   shares: timeout after booking, HTTP 500, malformed XML (booked), an ERROR result code
   (result 150 / reason 1000, nothing booked);
3. starts ``--workers`` tick workers as OS processes (``ratepay-oms tick --loop --interval 0.2
   --json``, RATEPAY_* settings pointing at the sandbox, the status lookup included) and kills a
   random one with SIGKILL every ``--kill-every`` seconds, starts a new one and, 5 s later,
   frees the dead worker's order leases (what its supervisor does once the process is gone;
   the engine would wait for them to expire after 60 s);
4. places ``--orders`` orders (INVOICE, ELV, PREPAYMENT, INSTALLMENT; 1-4 lines of 1-3 units, some
   with shipping costs and a voucher, built from ``tests/data/order-invoice.json`` and the
   per-method parts of ``ratepay_oms.demo.example_order``) without firing them, so the workers
   do the payment calls, and picks per order a scenario with a known final state per item
   (ship, two parcels, cancel, partial cancel, ship some + cancel the rest, refund, partial
   refund, refund one by one, decline, prepayment cancelled while waiting);
5. drives the scenarios' manual events through ``Engine.trigger`` (a few driver threads), one
   step at a time per order once nothing automatic is pending for it; items in an ``… invalid``
   state whose last answer was the injected ERROR get the process's manual ``retry …`` event,
   as a person would fire it; retry backoffs (30 s × 2^n) and the reconciliation of open
   gateway-call intents of orders nobody holds are brought forward to "now" so the run is not
   mostly waiting (``--real-backoff`` keeps both);
6. stops when every item is at rest (or ``--deadline`` passes), stops the workers, and compares:
   items placed vs in the database, every item's state vs its scenario, the gateway's ledger
   (status lookup per transaction: positions delivered / cancelled / returned and bookings) vs
   our items' states and ``ratepay_item_outcome`` rows, duplicate bookings at the gateway
   (authorisations we do not know about: every transaction the sandbox opened is looked up;
   units and amounts booked beyond what our successful outcome rows say; units booked beyond
   what was ordered), and the security code in the workers' logs, the sandbox's log, the API
   log table and a dump of the database.

On a PostgreSQL server with autovacuum off (this machine's CI setting), a background thread
runs ``VACUUM (ANALYZE)`` on the soak's database every ``--vacuum-every`` seconds, as autovacuum
would on a shop's server; the report says how often.

Exit status 1 when one of the zero-figures (items lost, items not in their expected state,
orders whose ledger differs, duplicate bookings, secrets found) is not zero. Ctrl-C (or
SIGTERM) stops the drive early and still checks and reports; a second one aborts.

    python3 bench/soak.py
    python3 bench/soak.py --orders 500 --workers 4 --kill-every 2 --seed 7
    python3 bench/soak.py --db postgresql+psycopg://postgres@127.0.0.1:5432/mydb --fault-rate 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a script from anywhere in a checkout
    sys.path.insert(0, str(REPO))

import ratepay_oms  # noqa: E402
from ratepay_oms.persistence.payment import POSITION_STATUSES  # noqa: E402

PACKAGE_ROOT = Path(ratepay_oms.__file__).resolve().parents[1]
"""The checkout the package is imported from: the workers get it on PYTHONPATH and its
``processes/``, so driver and workers run the same code."""
PROCESS_DIR = PACKAGE_ROOT / "processes"
ORDER_TEMPLATE = REPO / "tests" / "data" / "order-invoice.json"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PROFILE_ID = "INTEGRATION_TE_DACH"

METHODS = ("INVOICE", "ELV", "PREPAYMENT", "INSTALLMENT")

# States of the shipped processes the scenarios and the ledger comparison talk about.
NEW = "new"
PAYMENT_WAITING = "payment confirmation initialized"
READY_FOR_SHIPMENT = "ready for shipment"
READY_FOR_REFUND = "ready for refund"
CANCELLED = "cancelled"
COMPLETED = "completed"
DECLINED = "payment request declined"
DELIVERED_STATES = frozenset({READY_FOR_REFUND, "refund succeeded", "refund invalid", COMPLETED})
RETURNED_STATES = frozenset({"refund succeeded", COMPLETED})
"""``completed`` comes from a refund only here: the 90-day ``waiting for return`` never passes."""
CANCELLED_STATES = frozenset({CANCELLED})
INVALID_SUFFIX = " invalid"
DEAD_LEASE_GRACE_S = 5.0
LOCKED_BACKOFF_S = 0.5

# The ERROR answer the sandbox injects; the sandbox never answers reason 1000 otherwise.
INJECTED_RESULT = "150"
INJECTED_REASON = "1000"

# Gateway transaction states in which a PAYMENT_REQUEST was accepted (sandbox ledger).
ACCEPTED_TX_STATES = frozenset(
    {"requested", "confirmed", "partially_delivered", "delivered", "cancelled", "closed"}
)
TX_ID = re.compile(r"^(\d{2})-(\d{8})(\d{7})$")
BOOKING_ACTIONS = ("delivery", "cancellation", "return")

# (sku, name, unit price gross, tax rate, per-unit discount)
CATALOGUE: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("SKU-100", 'Mug "Kaffee & Kuchen"', "12.50", "19", None),
    ("SKU-200", "Tea pot", "49.90", "19", "-4.90"),
    ("SKU-300", "Espresso machine", "249.00", "19", None),
    ("SKU-400", "Coffee beans 1 kg", "16.90", "7", None),
    ("SKU-500", "Milk jug", "19.90", "19", "-2.00"),
)
INSTALLMENT_SKU = "SKU-300"  # RatePAY finances from 200.00 on (the sandbox profile's minimum)

SCENARIO_WEIGHTS: dict[str, int] = {
    "ship": 18,
    "two parcels": 12,
    "cancel": 10,
    "partial cancel": 10,
    "ship some, cancel rest": 10,
    "refund": 10,
    "partial refund": 10,
    "refund one by one": 8,
    "decline": 3,
    "cancel while waiting": 9,  # PREPAYMENT only
}
NEEDS_TWO_UNITS = frozenset(
    {"two parcels", "partial cancel", "ship some, cancel rest", "partial refund",
     "refund one by one"}
)


def naive_utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- orders and scenarios ------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One manual event for some units of an order, fired once they all stand in ``source``."""

    event: str
    units: tuple[int, ...]  # positions in the order's items sorted by (line, id)
    source: str


@dataclass
class Plan:
    """One order: its document, its scenario's steps, and where each unit must end."""

    ref: str
    method: str
    scenario: str
    doc: dict[str, Any]
    units: int
    steps: list[Step]
    expected: list[str]
    order_id: int | None = None
    item_ids: list[int] = field(default_factory=list)
    next_step: int = 0
    fired: list[str] = field(default_factory=list)
    done: bool = False
    """Every step fired and every item at rest with nothing automatic pending: nothing can
    move it any more, so the driver stops looking at it (the final check reads it again)."""


def _base_order() -> dict[str, Any]:
    from ratepay_oms.demo import example_order

    if ORDER_TEMPLATE.exists():
        return json.loads(ORDER_TEMPLATE.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    return example_order("100045")  # the same document, kept in the package


def make_order(
    rng: random.Random, base: dict[str, Any], ref: str, method: str, *, declined: bool
) -> dict[str, Any]:
    """The reference's order 100045 with other lines, quantities and specials, per method."""
    from ratepay_oms.demo import example_order

    per_method = example_order(ref, method)
    doc = copy.deepcopy(base)
    doc["order_ref"] = ref
    doc["process"] = per_method["process"]
    doc["payment"] = per_method["payment"]
    doc["customer"]["customer_ref"] = f"C-{ref}"
    if "bank_account" in per_method["customer"]:
        doc["customer"]["bank_account"] = per_method["customer"]["bank_account"]
    if declined:
        doc["customer"]["last_name"] = "Ablehnung"  # the sandbox declines this customer
    count = rng.randint(1, 4)
    chosen = rng.sample(CATALOGUE, count)
    if method == "INSTALLMENT" and all(c[0] != INSTALLMENT_SKU for c in chosen):
        chosen[-1] = next(c for c in CATALOGUE if c[0] == INSTALLMENT_SKU)
    lines: list[dict[str, Any]] = []
    for sku, name, price, tax, discount in chosen:
        line = {"sku": sku, "name": name, "quantity": rng.randint(1, 3),
                "unit_price_gross": price, "tax_rate": tax}
        if discount:
            line["discount"] = discount
        lines.append(line)
    if len(lines) < 4 and rng.random() < 0.1:
        # A second line with the same SKU at another price: RatePAY needs the
        # unique-article-number to tell the two positions apart.
        first = lines[0]
        cheaper = (Decimal(first["unit_price_gross"]) * Decimal("0.8")).quantize(
            Decimal("0.01"), ROUND_HALF_UP
        )
        lines.append({"sku": first["sku"], "name": f"{first['name']} (B-stock)",
                      "quantity": rng.randint(1, 3), "unit_price_gross": str(cheaper),
                      "tax_rate": first["tax_rate"]})
    doc["items"] = lines
    if rng.random() < 0.3:
        doc.pop("shipping", None)
    if rng.random() < 0.6:
        doc.pop("discount", None)
    return doc


def _scenario(rng: random.Random, method: str, units: int) -> str:
    names = [
        n for n in SCENARIO_WEIGHTS
        if (n != "cancel while waiting" or method == "PREPAYMENT")
        and (units >= 2 or n not in NEEDS_TWO_UNITS)
    ]
    return rng.choices(names, weights=[SCENARIO_WEIGHTS[n] for n in names])[0]


def make_plan(rng: random.Random, base: dict[str, Any], ref: str) -> Plan:
    """An order and its scenario: the manual events to fire and each unit's final state."""
    method = rng.choice(METHODS)
    # The scenario needs the unit count, which needs the order: draw the order first, then
    # make its customer the one the sandbox declines if that is the scenario.
    doc = make_order(rng, base, ref, method, declined=False)
    units = sum(int(line["quantity"]) for line in doc["items"])
    scenario = _scenario(rng, method, units)
    if scenario == "decline":
        doc["customer"]["last_name"] = "Ablehnung"
    everything = tuple(range(units))
    steps: list[Step] = []
    expected = [READY_FOR_REFUND] * units
    if method == "PREPAYMENT" and scenario not in ("decline", "cancel while waiting"):
        steps.append(Step("create payment confirmation", everything, PAYMENT_WAITING))

    def subset() -> tuple[tuple[int, ...], tuple[int, ...]]:
        k = rng.randint(1, units - 1)
        some = tuple(sorted(rng.sample(everything, k)))
        return some, tuple(i for i in everything if i not in some)

    if scenario == "ship":
        steps.append(Step("ship", everything, READY_FOR_SHIPMENT))
    elif scenario == "two parcels":
        first, second = subset()
        steps += [Step("ship", first, READY_FOR_SHIPMENT), Step("ship", second, READY_FOR_SHIPMENT)]
    elif scenario == "cancel":
        steps.append(Step("cancel", everything, READY_FOR_SHIPMENT))
        expected = [CANCELLED] * units
    elif scenario == "partial cancel":
        gone, rest = subset()
        steps += [Step("cancel", gone, READY_FOR_SHIPMENT), Step("ship", rest, READY_FOR_SHIPMENT)]
        for i in gone:
            expected[i] = CANCELLED
    elif scenario == "ship some, cancel rest":
        sent, rest = subset()
        steps += [Step("ship", sent, READY_FOR_SHIPMENT), Step("cancel", rest, READY_FOR_SHIPMENT)]
        for i in rest:
            expected[i] = CANCELLED
    elif scenario == "refund":
        steps += [Step("ship", everything, READY_FOR_SHIPMENT),
                  Step("refund payment", everything, READY_FOR_REFUND)]
        expected = [COMPLETED] * units
    elif scenario == "partial refund":
        back, _ = subset()
        steps += [Step("ship", everything, READY_FOR_SHIPMENT),
                  Step("refund payment", back, READY_FOR_REFUND)]
        for i in back:
            expected[i] = COMPLETED
    elif scenario == "refund one by one":
        steps.append(Step("ship", everything, READY_FOR_SHIPMENT))
        steps += [Step("refund payment", (i,), READY_FOR_REFUND) for i in everything]
        expected = [COMPLETED] * units
    elif scenario == "decline":
        expected = [DECLINED] * units
    elif scenario == "cancel while waiting":
        steps.append(Step("cancel", everything, PAYMENT_WAITING))
        expected = [CANCELLED] * units
    return Plan(ref, method, scenario, doc, units, steps, expected)


# -- processes: the sandbox and the tick workers -------------------------------------------


def cli_command() -> list[str]:
    """``ratepay-oms`` of the running interpreter (not a shell shim, so the pid we hold is the
    worker's own), else the one on PATH, else the same through ``python -c``."""
    beside = Path(sys.executable).with_name("ratepay-oms")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ratepay-oms")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from ratepay_oms.cli import main; sys.exit(main())"]


def _parent_death_signal() -> Any:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)`` for the child to call before exec (Linux only):
    a soak killed from outside then leaves no tick worker looping and no sandbox listening.
    Looked up here, in the parent, so the child does nothing but call it."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = ctypes.c_int(1), ctypes.c_ulong(signal.SIGKILL)
    return lambda: prctl(pr_set_pdeathsig, sigkill)


_DIE_WITH_PARENT = _parent_death_signal()


def spawn(command: list[str], env: dict[str, str], stdout: Any, stderr: Any
          ) -> subprocess.Popen[bytes]:
    """A child in a session of its own (a Ctrl-C is the soak's to handle, not the workers')
    that dies with the soak."""
    return subprocess.Popen(
        command, env=env, stdout=stdout, stderr=stderr, start_new_session=True,
        preexec_fn=_DIE_WITH_PARENT,
    )


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of our children: no stray RATEPAY_* settings, this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATEPAY_")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class SandboxProcess:
    """``ratepay-oms sandbox serve`` as a child process, and the HTTP calls we make to it."""

    def __init__(self, log_path: Path, *, seed: int, fault_delay: float, security_code: str):
        self.log_path = log_path
        self.seed = seed
        self.fault_delay = fault_delay
        self.security_code = security_code
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = self.status_url = self.faults_url = self.ledger_url = ""
        self.oauth: dict[str, str] = {}
        self.oauth_secret = secrets.token_hex(16)
        import requests

        self.http = requests.Session()

    def start(self, timeout: float = 60.0) -> None:
        command = [
            *cli_command(), "sandbox", "serve", "--port", "0", "--profile-id", PROFILE_ID,
            "--seed", str(self.seed), "--fault-delay", str(self.fault_delay),
        ]
        env = child_env({"RATEPAY_SANDBOX_SECURITY_CODE": self.security_code,
                         "RATEPAY_SANDBOX_OAUTH_CLIENT_SECRET": self.oauth_secret,
                         "COLUMNS": "200"})
        with self.log_path.open("wb") as log:
            self.proc = spawn(command, env, log, subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            listening = re.search(r"listening on (\S+)", text)
            status = re.search(r"RATEPAY_STATUS_API_URL=(\S+)", text)
            faults = re.search(r"Faults: (\S+)", text)
            ledger = re.search(r"Ledger: (\S+?)\{", text)
            if listening and status and faults and ledger:
                self.url, self.status_url, self.faults_url, self.ledger_url = (
                    listening.group(1), status.group(1), faults.group(1), ledger.group(1)
                )
                self.oauth = {
                    key: match.group(1)
                    for key in ("OAUTH_TOKEN_URL", "OAUTH_CLIENT_ID", "OAUTH_AUDIENCE",
                                "STATUS_PROCESSING_OFFSET_HOURS")
                    if (match := re.search(rf"RATEPAY_{key}=(\S+)", text))
                }
                self.oauth["OAUTH_CLIENT_SECRET"] = self.oauth_secret
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the sandbox exited at start:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"the sandbox did not say where it listens within {timeout} s")

    def add_faults(self, faults: list[dict[str, Any]]) -> None:
        response = self.http.post(self.faults_url, data=json.dumps(faults), timeout=10,
                                  headers={"Content-Type": "application/json"})
        response.raise_for_status()

    def faults(self) -> list[dict[str, Any]]:
        response = self.http.get(self.faults_url, timeout=10)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def status(self, transaction_id: str) -> dict[str, Any] | None:
        # A new connection per lookup: on a kept-alive one the sandbox's answer waits ~40 ms
        # (it writes headers and body separately; Nagle meets delayed ACK), on a new one 1 ms.
        import requests

        response = requests.get(self.ledger_url + transaction_id, timeout=10)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fault_specs(rate: float, timeout_delay: float) -> list[dict[str, Any]]:
    """Four faults, each on ``rate / 4`` of all XML calls, then one that never fires but
    counts every call (the sandbox counts the calls each fault has seen)."""
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("timeout_after_booking", {"delay_s": timeout_delay}),
        ("http_500", {}),
        ("malformed_xml", {}),
        ("result_code", {"result_code": int(INJECTED_RESULT), "reason_code": int(INJECTED_REASON)}),
    ]
    share = rate / len(kinds)
    specs: list[dict[str, Any]] = []
    for n, (kind, extra) in enumerate(kinds):
        # The first matching fault wins: each one's probability is conditional on the ones
        # before it not firing, so every kind ends up with the same share.
        left = 1.0 - share * n
        specs.append({"kind": kind, "probability": round(share / left, 9) if left > 0 else 0.0,
                      **extra})
    specs.append({"kind": "delay", "probability": 0.0})
    return specs


@dataclass
class WorkerProcess:
    slot: int
    generation: int
    proc: subprocess.Popen[bytes]
    started: float


class Workers:
    """The tick workers: ``ratepay-oms tick --loop`` processes with logs of their own."""

    def __init__(self, count: int, env: dict[str, str], log_dir: Path, interval: float,
                 tick_limit: int | None) -> None:
        self.count = count
        self.env = env
        self.log_dir = log_dir
        self.command = [*cli_command(), "tick", "--loop", "--interval", str(interval), "--json"]
        if tick_limit:
            self.command += ["--limit", str(tick_limit)]
        self.running: dict[int, WorkerProcess] = {}
        self.generations: Counter[int] = Counter()
        self.kills = 0
        self.crashed: list[str] = []
        self.log_files: list[Path] = []

    def start_all(self) -> None:
        for slot in range(self.count):
            self.start(slot)

    def start(self, slot: int) -> None:
        generation = self.generations[slot]
        self.generations[slot] += 1
        out = self.log_dir / f"worker-{slot}-{generation}.out"
        err = self.log_dir / f"worker-{slot}-{generation}.err"
        self.log_files += [out, err]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = spawn(self.command, self.env, stdout, stderr)
        self.running[slot] = WorkerProcess(slot, generation, proc, time.monotonic())

    def check(self) -> None:
        """Restart a worker that died by itself (and remember why, from its stderr)."""
        for slot, worker in list(self.running.items()):
            code = worker.proc.poll()
            if code is not None:
                err = self.log_dir / f"worker-{slot}-{worker.generation}.err"
                tail = err.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                self.crashed.append(f"worker {slot}.{worker.generation} exited {code}: "
                                    + " | ".join(tail))
                self.start(slot)

    def kill_one(self, rng: random.Random) -> int:
        """SIGKILL a random worker, wait for it to be gone; returns its pid."""
        slot = rng.choice(sorted(self.running))
        worker = self.running.pop(slot)
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        self.kills += 1
        self.start(slot)
        return worker.proc.pid

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM (the loop ends after its current tick), SIGKILL whoever is still busy."""
        for worker in self.running.values():
            with suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.running.values():
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        self.running.clear()


# -- the database ----------------------------------------------------------------------------


@contextmanager
def soak_database(db_url: str | None, admin_url: str, keep: bool) -> Iterator[tuple[str, bool]]:
    """``--db`` as it is, or a throw-away ``rpoms_soak_<hex>`` on ``admin_url`` (dropped after,
    unless ``keep``). Yields the URL and whether it is a throw-away one."""
    if db_url:
        yield db_url, False
        return
    admin = sa.engine.make_url(admin_url)
    name = f"rpoms_soak_{secrets.token_hex(4)}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False), True
    finally:
        if not keep:
            with engine.connect() as conn:
                force = " WITH (FORCE)" if admin.get_backend_name() == "postgresql" else ""
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}{force}"))
        engine.dispose()


def safe_url(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


class Tables:
    """The engine's tables as the database has them (reflected, so optional parts such as
    gateway-call intents are used when the schema has them and ignored otherwise)."""

    def __init__(self, db: sa.Engine) -> None:
        meta = sa.MetaData()
        meta.reflect(db)
        self.orders = meta.tables["oms_order"]
        self.items = meta.tables["oms_order_item"]
        self.outcomes = meta.tables["ratepay_item_outcome"]
        self.payments = meta.tables["ratepay_payment"]
        self.api_log = meta.tables["ratepay_api_log"]
        self.intents = meta.tables.get("oms_intent")
        self.all = meta.tables
        self.item_intent = self.items.c.get("intent_id")


def chunks(values: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


# -- the driver ------------------------------------------------------------------------------


@dataclass
class ItemNow:
    id: int
    order_id: int
    process: str
    state: str
    retry_at: datetime | None
    intent_id: int | None


@dataclass
class InFlight:
    """A manual event the driver has handed to a thread for one order."""

    future: Future[tuple[str, str]]
    event: str
    item_ids: list[int]
    step: bool  # a scenario step (the order's next one), else a retry by hand
    cause: str | None = None  # the call that answered the injected ERROR
    state: str = ""


@dataclass
class HandRetry:
    """An item a person (the soak) moved on with a manual ``retry …`` after an injected ERROR."""

    times: int = 0
    states: list[str] = field(default_factory=list)


class Driver:
    """Fires the scenarios' manual events through ``Engine.trigger`` on a few threads, each
    with an engine and a RatePAY facade of its own."""

    def __init__(self, url: str, settings: dict[str, str], threads: int) -> None:
        self.url = url
        self.settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        self._engines: list[Any] = []
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="soak-driver")

    def engine(self) -> Any:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            from ratepay_oms.demo import attach_ratepay
            from ratepay_oms.engine.engine import Engine

            engine = Engine(self.url, process_dir=PROCESS_DIR)
            attach_ratepay(engine, self.settings)
            self._local.engine = engine
            with self._lock:
                self._engines.append(engine)
        return engine

    def submit(self, event: str, ref: str, item_ids: list[int]) -> Future[tuple[str, str]]:
        return self.pool.submit(self._trigger, event, ref, item_ids)

    def _trigger(self, event: str, ref: str, item_ids: list[int]) -> tuple[str, str]:
        from ratepay_oms.engine.errors import ManualEventError, OrderLockedError

        try:
            result = self.engine().trigger(event, ref, item_ids)
        except OrderLockedError:
            return "locked", ""
        except ManualEventError as exc:
            return "refused", str(exc)
        except Exception as exc:  # a database hiccup: the step is tried again later
            return "error", f"{type(exc).__name__}: {exc}"[:300]
        return "fired", "; ".join(result.errors)[:300]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for engine in self._engines:
            engine.close()


@dataclass
class Options:
    orders: int
    workers: int
    fault_rate: float
    kill_every: float
    db: str | None
    admin_url: str
    deadline: float
    seed: int
    interval: float
    read_timeout: float
    driver_threads: int
    tick_limit: int | None
    real_backoff: bool
    keep_dead_leases: bool
    keep_db: bool
    log_dir: Path | None
    progress_every: float
    vacuum_every: float = 60.0


@dataclass
class Report:
    """What a soak run found; ``zero_figures`` must all be 0."""

    options: Options
    run_id: str = ""
    database: str = ""
    throwaway: bool = True
    plans: list[Plan] = field(default_factory=list)
    orders_placed: int = 0
    place_failures: list[str] = field(default_factory=list)
    items_placed: int = 0
    items_in_db: int = 0
    orders_in_db: int = 0
    count_mismatches: list[str] = field(default_factory=list)
    items_miscounted: int = 0
    """Items missing from an order we placed, plus items we did not place (an order stored
    although ``place_order`` raised, or more rows than units)."""
    wrong_items: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    waiting_allowed: int = 0
    hand_retries: dict[int, HandRetry] = field(default_factory=dict)
    hand_retry_causes: Counter[str] = field(default_factory=Counter)
    ledger_diffs: list[str] = field(default_factory=list)
    duplicates: int = 0
    duplicate_kinds: Counter[str] = field(default_factory=Counter)
    duplicate_details: list[str] = field(default_factory=list)
    secrets: Counter[str] = field(default_factory=Counter)
    secret_places: list[str] = field(default_factory=list)
    scanned: dict[str, int] = field(default_factory=dict)
    run_s: float = 0.0
    place_s: float = 0.0
    total_s: float = 0.0
    finished: bool = False
    interrupted: bool = False
    unsettled_orders: int = 0
    still_moving_items: int = 0
    orders_settled: int = 0
    items_settled: int = 0
    ledger_diffs_moving: int = 0
    duplicates_moving: int = 0
    gateway_calls: int = 0
    faults_applied: dict[str, int] = field(default_factory=dict)
    api_log_rows: int = 0
    triggers: Counter[str] = field(default_factory=Counter)
    trigger_outcomes: Counter[str] = field(default_factory=Counter)
    trigger_errors: list[str] = field(default_factory=list)
    kills: int = 0
    worker_crashes: list[str] = field(default_factory=list)
    leases_freed: int = 0
    retries_forwarded: int = 0
    intents_forwarded: int = 0
    gateway_transactions: int = 0
    abandoned_inits: int = 0
    intent_summary: Counter[str] = field(default_factory=Counter)
    log_dir: Path | None = None
    phases: dict[str, float] = field(default_factory=dict)
    autovacuum_off: bool = False
    vacuums: int = 0
    vacuum_s: float = 0.0

    @property
    def items_lost(self) -> int:
        return self.items_miscounted

    @property
    def zero_figures(self) -> dict[str, int]:
        return {
            "items lost": self.items_lost,
            "items not in expected final state": len(self.wrong_items),
            "orders whose gateway ledger differs": len(self.ledger_diffs),
            "duplicate bookings at the gateway": self.duplicates,
            "secrets found": sum(self.secrets.values()),
        }

    @property
    def ok(self) -> bool:
        return not any(self.zero_figures.values())

    def text(self, show: int = 10) -> str:
        o = self.options
        lines: list[str] = []
        add = lines.append
        methods = Counter(p.method for p in self.plans if p.order_id is not None)
        scenarios = Counter(p.scenario for p in self.plans if p.order_id is not None)
        add(f"ratepay-oms soak  run {self.run_id}  seed {o.seed}")
        kind = "throw-away, dropped at the end" if self.throwaway and not o.keep_db else "kept"
        add(f"database         {safe_url(self.database)} ({kind})")
        add(f"orders           {self.orders_placed} placed of {o.orders} ("
            + ", ".join(f"{m} {methods[m]}" for m in METHODS) + f"); {self.items_placed} items")
        add("scenarios        " + ", ".join(f"{s} {n}" for s, n in scenarios.most_common()))
        add(f"workers          {o.workers} x `ratepay-oms tick --loop --interval {o.interval} "
            f"--json{f' --limit {o.tick_limit}' if o.tick_limit else ''}`; "
            f"{self.kills} SIGKILLed and restarted (every {o.kill_every} s), "
            f"{self.leases_freed} leases of dead workers freed, "
            f"{len(self.worker_crashes)} died by themselves")
        applied = sum(self.faults_applied.values())
        share = f" ({applied / self.gateway_calls:.1%})" if self.gateway_calls else ""
        add(f"gateway          {self.gateway_calls} XML calls, {applied} faults injected{share}: "
            + ", ".join(f"{k} {v}" for k, v in self.faults_applied.items()))
        add(f"                 {self.gateway_transactions} transactions at the gateway "
            f"({self.abandoned_inits} only initialised); API log rows {self.api_log_rows}")
        add("driver           triggers "
            + ", ".join(f"{k} {v}" for k, v in self.triggers.most_common())
            + "; " + ", ".join(f"{k} {v}" for k, v in self.trigger_outcomes.most_common()))
        add(f"                 retry backoffs brought forward {self.retries_forwarded}"
            + (" (off: --real-backoff)" if o.real_backoff else "")
            + (f", intent reconciliations brought forward {self.intents_forwarded}"
               if self.intents_forwarded else ""))
        if self.intent_summary:
            add("intents          " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.intent_summary.items())))
        hand_items = len(self.hand_retries)
        hand_events = sum(self.hand_retry_causes.values())
        add(f"by hand          {hand_items} items moved on with a manual retry event after an "
            f"injected ERROR ({hand_events} events fired, after an ERROR on "
            + ", ".join(f"{k} {v}" for k, v in self.hand_retry_causes.most_common()) + ")")
        if self.finished:
            add(f"finished         every item at rest after {self.run_s:.1f} s")
        else:
            why = "interrupted (Ctrl-C)" if self.interrupted else (
                f"deadline {o.deadline:.0f} s passed")
            add(f"finished         NO: {why} after {self.run_s:.1f} s with "
                f"{self.unsettled_orders} orders still moving")
        add("")
        add("zero figures")
        figures = self.zero_figures
        add(f"  items lost                           {figures['items lost']:>6}   "
            f"(placed {self.items_placed}, in the database {self.items_in_db}; orders placed "
            f"{self.orders_placed}, in the database {self.orders_in_db})")
        add(f"  items not in expected final state    "
            f"{figures['items not in expected final state']:>6}"
            + (f"   ({self.still_moving_items} of them on orders still moving when the run "
               "ended)" if self.still_moving_items else ""))
        add(f"  orders whose gateway ledger differs  "
            f"{figures['orders whose gateway ledger differs']:>6}"
            + (f"   ({self.ledger_diffs_moving} of them still moving when the run ended)"
               if self.ledger_diffs_moving else ""))
        add(f"  duplicate bookings at the gateway    "
            f"{figures['duplicate bookings at the gateway']:>6}"
            "   (" + ", ".join(f"{k} {self.duplicate_kinds[k]}" for k in (
                "extra authorisations", "booked beyond our successful outcomes",
                "units booked beyond the order")) + ")"
            + (f"   ({self.duplicates_moving} of them on orders still moving when the run "
               "ended)" if self.duplicates_moving else ""))
        places = ", ".join(f"{k} {self.secrets[k]}" for k in
                           ("worker logs", "sandbox log", "API log rows", "DB dump"))
        scanned = ", ".join(f"{k} {v}" for k, v in self.scanned.items())
        add(f"  secrets found                        {figures['secrets found']:>6}   "
            f"({places}; scanned: {scanned})")
        add("")
        add(f"waiting for a person                   {len(self.waiting):>6}   "
            f"({self.waiting_allowed} caused by an injected fault, so expected)")
        for line in self.waiting[: max(show, 50)]:
            add(f"  {line}")
        if len(self.waiting) > max(show, 50):
            add(f"  ... and {len(self.waiting) - max(show, 50)} more")
        add("")
        add("throughput")
        run = self.run_s or float("nan")
        add(f"  run time          {self.run_s:9.1f} s  (placing the orders took "
            f"{self.place_s:.1f} s; with setup and checks {self.total_s:.1f} s: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()) + ")")
        rest = "" if self.finished else "   (orders at rest only: the run did not finish)"
        add(f"  items/s           {self.items_settled / run:9.1f}{rest}")
        add(f"  orders/s          {self.orders_settled / run:9.1f}{rest}")
        add(f"  gateway calls/s   {self.gateway_calls / run:9.1f}")
        if self.autovacuum_off:
            add(f"  database upkeep   autovacuum is off on this PostgreSQL server; the soak ran "
                f"VACUUM (ANALYZE) {self.vacuums} times ({self.vacuum_s:.1f} s), as autovacuum "
                f"would in a live database")
        for title, rows in (
            ("items not in their expected final state", self.wrong_items),
            ("orders whose gateway ledger differs", self.ledger_diffs),
            ("duplicate bookings", self.duplicate_details),
            ("items lost / miscounted", self.count_mismatches),
            ("orders that could not be placed", self.place_failures),
            ("where the security code was found", self.secret_places),
            ("workers that died by themselves", self.worker_crashes),
            ("driver errors", self.trigger_errors),
        ):
            if rows:
                add("")
                add(f"{title} (first {min(show, len(rows))} of {len(rows)})")
                for row in rows[:show]:
                    add(f"  {row}")
        add("")
        if self.log_dir is not None:
            add(f"logs             {self.log_dir}")
        bad = [k for k, v in figures.items() if v]
        add("result           OK: every zero figure is 0" if not bad
            else "result           FAILED: " + ", ".join(f"{k} {figures[k]}" for k in bad))
        return "\n".join(lines)


class Upkeep:
    """What autovacuum does for a live PostgreSQL database, for a server that has it off.

    This machine's PostgreSQL runs with ``autovacuum = off`` (a CI setting). A soak rewrites
    every item row several times, so without it the tables fill with dead rows and never get
    statistics: after half an hour the planner still thinks the tables are empty, picks nested
    loops over 17,000 items for the tick's timeout scan and the database eats a core. A shop's
    server vacuums and analyzes on its own; the soak stands in for that, every ``every`` s, and
    says so in its report. A server with autovacuum on is left alone.
    """

    def __init__(self, url: str, every: float, report: Report) -> None:
        self.url, self.every, self.report = url, every, report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.every <= 0 or not self.url.startswith("postgresql"):
            return
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                off = conn.scalar(sa.text("SHOW autovacuum")) == "off"
        finally:
            engine.dispose()
        if not off:
            return
        self.report.autovacuum_off = True
        self._thread = threading.Thread(target=self._loop, name="upkeep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def _loop(self) -> None:
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        try:
            while not self._stop.wait(self.every):
                started = time.monotonic()
                try:
                    with engine.connect() as conn:
                        conn.execute(sa.text("VACUUM (ANALYZE)"))
                except sa.exc.SQLAlchemyError as exc:  # the run goes on; the report says it
                    say(f"upkeep: VACUUM (ANALYZE) failed: {exc}")
                    continue
                self.report.vacuums += 1
                self.report.vacuum_s += time.monotonic() - started
        finally:
            engine.dispose()


class Soak:
    """One run: set up, drive until everything rests, check, tear down."""

    def __init__(self, options: Options) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        self.kill_rng = random.Random(options.seed + 1)
        self.run_id = secrets.token_hex(4)
        self.security_code = secrets.token_hex(16)
        self.report = Report(options, run_id=self.run_id)
        self.plans: list[Plan] = []
        self.by_order: dict[int, Plan] = {}
        self.placed = threading.Event()
        self.stop_placing = threading.Event()
        self.place_lock = threading.Lock()
        self.hand: dict[int, HandRetry] = {}
        self.in_flight: dict[str, InFlight] = {}
        self.not_before: dict[str, float] = {}
        self.kill_log: list[tuple[datetime, int]] = []
        self.moving_refs: set[str] = set()
        self.refs: dict[str, Plan] = {}
        self.round_s = 0.0

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> Report:
        started = self._mark = time.monotonic()
        tmp = None
        log_dir = self.o.log_dir
        if log_dir is None:
            tmp = tempfile.mkdtemp(prefix=f"rpoms-soak-{self.run_id}-")
            log_dir = Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.report.log_dir = log_dir
        with soak_database(self.o.db, self.o.admin_url, self.o.keep_db) as (url, throwaway):
            self.url = url
            self.report.database, self.report.throwaway = url, throwaway
            self._run(url, log_dir)
        self._phase("drop the database")
        self.report.total_s = time.monotonic() - started
        self._write_hand_retries(log_dir)
        if tmp is not None and self.report.ok:
            shutil.rmtree(tmp, ignore_errors=True)
            self.report.log_dir = None
        return self.report

    def _run(self, url: str, log_dir: Path) -> None:
        from ratepay_oms.persistence.db import create_db_engine, upgrade

        upgrade(url)
        self.db = create_db_engine(url, pool_size=4)
        self.tables = Tables(self.db)
        upkeep = Upkeep(url, self.o.vacuum_every, self.report)
        upkeep.start()
        base = _base_order()
        self.plans = [make_plan(self.rng, base, f"SOAK-{self.run_id}-{n:06d}")
                      for n in range(self.o.orders)]
        self.report.plans = self.plans
        self.refs = {p.ref: p for p in self.plans}
        sandbox = SandboxProcess(log_dir / "sandbox.log", seed=self.o.seed,
                                 fault_delay=self.o.read_timeout + 1.0,
                                 security_code=self.security_code)
        workers: Workers | None = None
        driver: Driver | None = None
        interrupted = False
        try:
            sandbox.start()
            self.sandbox = sandbox
            sandbox.add_faults(fault_specs(self.o.fault_rate, self.o.read_timeout + 1.0))
            settings = {
                "PROFILE_ID": PROFILE_ID,
                "SECURITY_CODE": self.security_code,
                "MODE": "test",
                "API_TEST_URL": sandbox.url,
                "STATUS_API_URL": sandbox.status_url,
                **sandbox.oauth,
                "SYSTEM_ID": "ratepay-oms-soak",
                "CONNECT_TIMEOUT": "2",
                "READ_TIMEOUT": str(self.o.read_timeout),
            }
            env = child_env({f"RATEPAY_{k}": v for k, v in settings.items()}
                            | {"RATEPAY_OMS_DATABASE_URL": url,
                               "RATEPAY_OMS_PROCESS_DIR": str(PROCESS_DIR)})
            workers = Workers(self.o.workers, env, log_dir, self.o.interval, self.o.tick_limit)
            workers.start_all()
            driver = Driver(url, settings, self.o.driver_threads)
            from ratepay_oms.engine.engine import Engine

            reader = Engine(url, process_dir=PROCESS_DIR)
            self.definitions = reader.definitions()
            reader.close()
            self._phase("setup")
            t0 = time.monotonic()
            placer = threading.Thread(target=self._place_all, args=(url, t0), daemon=True)
            placer.start()
            self._drive(driver, workers, t0)
            self.report.run_s = time.monotonic() - t0
            placer.join(timeout=60)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self._phase("setup" if not self.report.run_s else "drive")
            if workers is not None:
                workers.stop_all()
                self.report.kills = workers.kills
                self.report.worker_crashes = workers.crashed
            if driver is not None:
                driver.close()
            self._phase("stop")
            upkeep.stop()
            try:
                if not interrupted and sandbox.proc is not None and sandbox.proc.poll() is None:
                    self._gateway_counts()
                    self._check(workers.log_files if workers else [])
            finally:
                sandbox.stop()
                self.db.dispose()
        self._scan_file_secrets(workers.log_files if workers else [], log_dir / "sandbox.log")
        self._phase("secrets in files")

    def _write_hand_retries(self, log_dir: Path) -> None:
        """Per item: which manual retry events the soak fired after an injected ERROR."""
        where = {i: (p.ref, n) for p in self.plans for n, i in enumerate(p.item_ids)}
        lines = []
        for item_id, record in sorted(self.hand.items()):
            ref, index = where.get(item_id, ("?", -1))
            plan = self.refs.get(ref)
            want = plan.expected[index] if plan is not None and index >= 0 else "?"
            lines.append(f"{ref} item {item_id}: injected ERROR, retried by hand {record.times}x "
                         f"from {', '.join(record.states)}; expected to end in {want!r}")
        (log_dir / "hand-retries.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _phase(self, name: str) -> None:
        """Book the time since the last mark to ``name`` (the report lists where time went)."""
        now = time.monotonic()
        self.report.phases[name] = self.report.phases.get(name, 0.0) + now - self._mark
        self._mark = now

    # -- placing ---------------------------------------------------------------------------

    def _place_all(self, url: str, t0: float) -> None:
        from ratepay_oms.engine.engine import Engine

        engine = Engine(url, process_dir=PROCESS_DIR)
        try:
            for plan in self.plans:
                if self.stop_placing.is_set():
                    break
                try:
                    view = engine.place_order(plan.doc, fire=False)
                except Exception as exc:
                    self.report.place_failures.append(f"{plan.ref}: {type(exc).__name__}: {exc}")
                    continue
                items = sorted(view.items, key=lambda i: (i.line_no, i.id))
                with self.place_lock:
                    plan.item_ids = [i.id for i in items]
                    with engine.session() as session:
                        plan.order_id = session.scalar(
                            sa.select(self.tables.orders.c.id).where(
                                self.tables.orders.c.order_ref == plan.ref)
                        )
                    if plan.order_id is not None:
                        self.by_order[plan.order_id] = plan
        finally:
            engine.close()
            self.report.place_s = time.monotonic() - t0
            self.placed.set()

    # -- driving ---------------------------------------------------------------------------

    def _busy_states(self) -> dict[str, set[str]]:
        """States where the engine still has automatic work: an on-enter event or event-less
        transitions."""
        busy: dict[str, set[str]] = {}
        for name, definition in self.definitions.items():
            states = {t.source for t in definition.transitions} | {
                t.target for t in definition.transitions}
            busy[name] = {
                s for s in states
                if definition.on_enter_event(s) is not None or definition.has_eventless(s)
            }
        return busy

    def _retry_event(self, process: str, state: str) -> str | None:
        manual = self.definitions[process].manual_events(state)
        return next((e for e in manual if e.startswith("retry")), None)

    def _snapshot(self) -> tuple[dict[int, ItemNow], dict[int, str], set[int]]:
        t = self.tables
        cols = [t.items.c.id, t.items.c.order_id, t.items.c.process, t.items.c.state,
                t.items.c.retry_at]
        if t.item_intent is not None:
            cols.append(t.item_intent)
        with self.place_lock:
            active = {oid for oid, plan in self.by_order.items() if not plan.done}
        items: dict[int, ItemNow] = {}
        intents: dict[int, str] = {}
        leased: set[int] = set()
        if not active:
            return items, intents, leased
        orders = t.orders
        with self.db.connect() as conn:
            leased = set(conn.scalars(sa.select(orders.c.id).where(
                orders.c.id >= min(active), orders.c.claimed_by.is_not(None),
                orders.c.claim_expires_at > naive_utc_now())))
            # Orders finish roughly in the order they were placed: reading from the oldest
            # active one on keeps the snapshot small as the run goes on.
            for row in conn.execute(sa.select(*cols).where(t.items.c.order_id >= min(active))):
                if row.order_id in active:
                    items[row.id] = ItemNow(row.id, row.order_id, row.process, row.state,
                                            row.retry_at,
                                            row.intent_id if t.item_intent is not None else None)
            if t.intents is not None:
                for row in conn.execute(sa.select(t.intents.c.id, t.intents.c.status).where(
                        t.intents.c.status != "settled")):
                    intents[row.id] = row.status
        return items, intents, leased

    def _latest_outcomes(self, item_ids: Sequence[int]) -> dict[int, Any]:
        t = self.tables.outcomes
        latest: dict[int, Any] = {}
        with self.db.connect() as conn:
            for part in chunks(list(item_ids)):
                for row in conn.execute(sa.select(t).where(t.c.item_id.in_(part)).order_by(t.c.id)):
                    latest[row.item_id] = row
        return latest

    def _drive(self, driver: Driver, workers: Workers, t0: float) -> None:
        """Drive until every order rests, the deadline passes or Ctrl-C; then let the
        triggers already started finish."""
        try:
            self._drive_rounds(driver, workers, t0)
        except KeyboardInterrupt:
            say("interrupted: the drive stops here and what is there gets checked "
                "(Ctrl-C again to abort)")
            self.report.interrupted = True
        self.stop_placing.set()
        if not self.report.finished:
            self.report.unsettled_orders = len(self.moving_refs | set(self.in_flight))
        for flight in self.in_flight.values():
            with suppress(Exception):
                flight.future.result(timeout=60)
        self._collect(driver)

    def _drive_rounds(self, driver: Driver, workers: Workers, t0: float) -> None:
        busy = self._busy_states()
        deadline = t0 + self.o.deadline
        next_kill = t0 + self.o.kill_every if self.o.kill_every > 0 else float("inf")
        dead: list[tuple[float, int]] = []  # (when to free its leases, pid)
        next_forward = t0
        next_progress = t0 + self.o.progress_every
        quiet_rounds = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            workers.check()
            if now >= next_kill:
                pid = workers.kill_one(self.kill_rng)
                self.kill_log.append((naive_utc_now(), pid))
                dead.append((now + DEAD_LEASE_GRACE_S, pid))
                next_kill = now + self.o.kill_every
            while dead and dead[0][0] <= now:
                self._free_leases(dead.pop(0)[1])
            if not self.o.real_backoff and now >= next_forward:
                self._bring_forward()
                next_forward = now + 1.0
            self._collect(driver)
            items, intents, leased = self._snapshot()
            settled, moving = self._step_orders(driver, items, intents, leased, busy)
            if now >= next_progress:
                next_progress = now + self.o.progress_every
                say(f"[{now - t0:7.1f} s] placed {len(self.by_order)}/{self.o.orders} orders, "
                    f"{settled} at rest, {moving} moving, {len(self.in_flight)} triggers in "
                    f"flight, {sum(self.report.triggers.values())} fired, "
                    f"{workers.kills} workers killed, round {self.round_s:.2f} s")
            if self.placed.is_set() and not self.in_flight and moving == 0 and (
                    settled == len(self.by_order)):
                quiet_rounds += 1
                if quiet_rounds >= 3:
                    self.report.finished = True
                    break
            else:
                quiet_rounds = 0
            # Never more than about half of one core for the driver's own bookkeeping.
            self.round_s = time.monotonic() - now
            time.sleep(max(0.3, self.round_s))

    def _collect(self, driver: Driver) -> None:
        for ref, flight in list(self.in_flight.items()):
            if not flight.future.done():
                continue
            del self.in_flight[ref]
            outcome, detail = flight.future.result()
            self.report.trigger_outcomes[outcome] += 1
            plan = self.refs[ref]
            if outcome == "fired":
                self.report.triggers[flight.event] += 1
                if flight.step:
                    plan.next_step += 1
                    plan.fired.append(flight.event)
                if flight.cause is not None:
                    self.report.hand_retry_causes[flight.cause] += 1
                    plan.fired.append(flight.event)
                    for item_id in flight.item_ids:
                        record = self.hand.setdefault(item_id, HandRetry())
                        record.times += 1
                        record.states.append(flight.state)
            elif outcome == "locked":
                # A tick worker holds the order (for the rest of its batch): look again later.
                self.not_before[ref] = time.monotonic() + LOCKED_BACKOFF_S
            elif outcome == "error":
                self.report.trigger_errors.append(f"{ref} {flight.event!r}: {detail}")

    def _step_orders(
        self, driver: Driver, items: dict[int, ItemNow], intents: dict[int, str],
        leased: set[int], busy: dict[str, set[str]],
    ) -> tuple[int, int]:
        """Fire what can be fired; returns (orders at rest, orders with work pending).

        An order a tick worker holds is left alone (``Engine.trigger`` would refuse it), and
        no more triggers are queued than the driver threads get through until the next round
        (a trigger takes a few tenths of a second), so each one is decided on a recent
        snapshot and the threads never run dry while a round of a big run takes a while.
        """
        now = time.monotonic()
        per_thread = max(2, math.ceil(4 * self.round_s))
        room = per_thread * self.o.driver_threads - len(self.in_flight)
        self.moving_refs = set()
        with self.place_lock:
            plans = list(self.by_order.values())
        invalid = [i.id for i in items.values() if i.state.endswith(INVALID_SUFFIX)]
        latest = self._latest_outcomes(invalid) if invalid else {}
        settled = moving = 0
        for plan in plans:
            if plan.done:
                settled += 1
                continue
            units = [items.get(i) for i in plan.item_ids]
            if any(u is None for u in units):
                moving += 1
                self.moving_refs.add(plan.ref)
                continue
            present: list[ItemNow] = [u for u in units if u is not None]
            pending = [u for u in present
                       if u.retry_at is not None or u.state in busy[u.process]
                       or (u.intent_id is not None and intents.get(u.intent_id, "settled")
                           not in ("settled", "unknown"))]
            injected = [u for u in present if u.state.endswith(INVALID_SUFFIX)
                        and _is_injected(latest.get(u.id))]
            if pending or plan.ref in self.in_flight:
                moving += 1
                self.moving_refs.add(plan.ref)
                continue
            wait = (self.not_before.get(plan.ref, 0.0) > now or plan.order_id in leased
                    or room <= 0)
            if injected:
                moving += 1
                self.moving_refs.add(plan.ref)
                state = injected[0].state
                ids = [u.id for u in injected if u.state == state]
                event = self._retry_event(injected[0].process, state)
                if event is None or wait:
                    continue
                last = latest[ids[0]]
                cause = f"{last.operation}{'/' + last.subtype if last.subtype else ''}"
                self.in_flight[plan.ref] = InFlight(
                    driver.submit(event, plan.ref, ids), event, ids, step=False, cause=cause,
                    state=state)
                room -= 1
                continue
            if plan.next_step < len(plan.steps):
                step = plan.steps[plan.next_step]
                if all(present[i].state == step.source for i in step.units):
                    moving += 1
                    self.moving_refs.add(plan.ref)
                    if not wait:
                        ids = [plan.item_ids[i] for i in step.units]
                        self.in_flight[plan.ref] = InFlight(
                            driver.submit(step.event, plan.ref, ids), step.event, ids, step=True)
                        room -= 1
                    continue
            settled += 1
            if plan.next_step == len(plan.steps) and not any(
                    u.state.endswith(INVALID_SUFFIX) or u.intent_id is not None for u in present):
                plan.done = True
        return settled, moving

    def _free_leases(self, pid: int) -> None:
        """The supervisor's part after a worker died: free the order leases it held (worker id
        ``host:pid:hex``) instead of leaving them to expire in a minute.

        Done ``DEAD_LEASE_GRACE_S`` after the kill, not at once: a request the worker had
        written into its socket still reaches the gateway after the process is gone, and
        whoever takes the order over must find it booked.
        """
        if self.o.keep_dead_leases:
            return
        orders = self.tables.orders
        prefix = f"{socket.gethostname()}:{pid}:"
        with self.db.begin() as conn:
            result = conn.execute(
                sa.update(orders)
                .where(orders.c.claimed_by.like(prefix.replace("%", r"\%") + "%"))
                .values(claimed_by=None, claim_expires_at=None)
            )
            self.report.leases_freed += int(result.rowcount or 0)

    def _bring_forward(self) -> None:
        """Retry backoffs (30 s, 1 min, 2 min, …) become due now, so a run with faults is not
        mostly waiting. Rows a worker holds are skipped (SKIP LOCKED): never block on a tick.

        Intent reconciliations scheduled for later (the engine waits a lease length, in case
        the sender is still at it) are brought forward too, but only for orders nobody holds: a
        live sender keeps its lease until its call is settled, and a killed one's leases are
        freed only after ``DEAD_LEASE_GRACE_S``, so no call can still be in flight.
        """
        t = self.tables
        now = naive_utc_now()
        with self.db.begin() as conn:
            ids = list(conn.scalars(
                sa.select(t.items.c.id).where(t.items.c.retry_at > now)
                .with_for_update(skip_locked=True)))
            for part in chunks(ids):
                conn.execute(sa.update(t.items).where(t.items.c.id.in_(part))
                             .values(retry_at=now))
        self.report.retries_forwarded += len(ids)
        intents = t.intents
        if intents is None or "reconcile_at" not in intents.c or "created_at" not in intents.c:
            return
        free = sa.select(t.orders.c.id).where(t.orders.c.claimed_by.is_(None))
        with self.db.begin() as conn:
            ids = list(conn.scalars(
                sa.select(intents.c.id).where(
                    intents.c.status == "pending", intents.c.reconcile_at > now,
                    intents.c.order_id.in_(free),
                ).with_for_update(skip_locked=True)))
            for part in chunks(ids):
                conn.execute(sa.update(intents).where(intents.c.id.in_(part))
                             .values(reconcile_at=now))
        self.report.intents_forwarded += len(ids)

    # -- checking --------------------------------------------------------------------------

    def _gateway_counts(self) -> None:
        faults = self.sandbox.faults()
        self.report.gateway_calls = max((int(f.get("seen") or 0) for f in faults), default=0)
        self.report.faults_applied = {
            f["kind"] + ("" if f["kind"] != "result_code" else " (ERROR 150/1000)"):
                int(f.get("applied") or 0)
            for f in faults if f["kind"] != "delay"
        }

    def _check(self, worker_logs: list[Path]) -> None:
        r = self.report
        t = self.tables
        placed = [p for p in self.plans if p.order_id is not None]
        r.orders_placed = len(placed)
        moving = set() if r.finished else self.moving_refs | set(self.in_flight)
        r.orders_settled = sum(1 for p in placed if p.ref not in moving)
        r.items_settled = sum(p.units for p in placed if p.ref not in moving)
        r.items_placed = sum(p.units for p in placed)
        r.hand_retries = self.hand
        order_ids = [p.order_id for p in placed if p.order_id is not None]
        with self.db.connect() as conn:
            # Every order of the run by its reference, placed or not as far as we know: an
            # order stored although place_order raised would show up here.
            stored: dict[str, int] = {}
            for part in chunks([p.ref for p in self.plans]):
                stored.update((ref, oid) for oid, ref in conn.execute(
                    sa.select(t.orders.c.id, t.orders.c.order_ref)
                    .where(t.orders.c.order_ref.in_(part))))
            r.orders_in_db = len(stored)
            items_by_order: dict[int, list[Any]] = defaultdict(list)
            for part in chunks(sorted(stored.values())):
                for row in conn.execute(sa.select(t.items).where(t.items.c.order_id.in_(part))
                                        .order_by(t.items.c.id)):
                    items_by_order[row.order_id].append(row)
            outcomes_by_order: dict[int, list[Any]] = defaultdict(list)
            for part in chunks(order_ids):
                for row in conn.execute(sa.select(t.outcomes)
                                        .where(t.outcomes.c.order_id.in_(part))
                                        .order_by(t.outcomes.c.id)):
                    outcomes_by_order[row.order_id].append(row)
            payments: dict[int, Any] = {}
            for part in chunks(order_ids):
                for row in conn.execute(sa.select(t.payments)
                                        .where(t.payments.c.order_id.in_(part))):
                    payments[row.order_id] = row
            intents: dict[int, Any] = {}
            if t.intents is not None:
                for row in conn.execute(sa.select(t.intents)):
                    if row.order_id in self.by_order:
                        intents[row.id] = row
                        r.intent_summary[f"{row.status}/{row.resolution or '-'}"] += 1
            api_tx = {row[0] for row in conn.execute(
                sa.select(t.api_log.c.transaction_id).where(
                    t.api_log.c.transaction_id.is_not(None)).distinct())}
            r.api_log_rows = int(conn.scalar(sa.select(sa.func.count()).select_from(t.api_log))
                                 or 0)
            r.secrets["API log rows"] = self._api_log_secrets(conn)
        r.items_in_db = sum(len(v) for v in items_by_order.values())
        for plan in self.plans:
            if plan.order_id is None and plan.ref in stored:
                extra = len(items_by_order.get(stored[plan.ref], []))
                r.items_miscounted += extra
                r.count_mismatches.append(
                    f"{plan.ref}: {extra} items stored although placing the order failed")
        for plan in placed:
            have = len(items_by_order.get(plan.order_id or -1, []))
            if have != plan.units:
                r.items_miscounted += abs(plan.units - have)
                r.count_mismatches.append(f"{plan.ref}: {plan.units} items placed, {have} stored")

        known = {p.transaction_id for p in payments.values() if p.transaction_id} | api_tx
        self._phase("read the database")
        gateway = sweep_gateway(self.sandbox, known)
        self._phase("status lookups")
        r.gateway_transactions = len(gateway)
        r.abandoned_inits = sum(1 for g in gateway.values() if g.get("state") == "initialized")
        by_ref: dict[str, list[dict[str, Any]]] = defaultdict(list)
        ours = {p.ref for p in self.plans}
        for data in gateway.values():
            ref = data.get("order_id")
            if ref in ours:
                by_ref[ref].append(data)
            elif ref is None and data.get("state") in ACCEPTED_TX_STATES:
                r.duplicates += 1
                r.duplicate_kinds["extra authorisations"] += 1
                r.duplicate_details.append(
                    f"transaction {data['transaction_id']}: accepted without an order id")

        for plan in placed:
            assert plan.order_id is not None
            rows = items_by_order.get(plan.order_id, [])
            self._check_states(plan, rows, outcomes_by_order.get(plan.order_id, []), intents)
            dups_before = r.duplicates
            self._check_ledger(plan, rows, outcomes_by_order.get(plan.order_id, []),
                               payments.get(plan.order_id), by_ref.get(plan.ref, []))
            if r.duplicates != dups_before and r.duplicate_details:
                r.duplicate_details[-1] += "\n    timeline: " + _timeline(
                    [i for i in intents.values() if i.order_id == plan.order_id],
                    by_ref.get(plan.ref, []), self.kill_log)
        self._phase("compare")
        self._scan_db_dump()
        self._phase("database dump")

    def _check_states(self, plan: Plan, rows: list[Any], outcomes: list[Any],
                      intents: dict[int, Any]) -> None:
        r = self.report
        by_id = {row.id: row for row in rows}
        latest: dict[int, Any] = {}
        for o in outcomes:
            latest[o.item_id] = o
        for index, item_id in enumerate(plan.item_ids):
            row = by_id.get(item_id)
            if row is None:
                continue  # counted as lost
            want = plan.expected[index]
            if row.state == want:
                continue
            last = latest.get(item_id)
            intent = intents.get(getattr(row, "intent_id", None) or -1)
            what = (f"{plan.ref} item {item_id} {row.sku} ({plan.method}, {plan.scenario}; "
                    f"fired: {', '.join(plan.fired) or 'nothing'}): state {row.state!r}, expected "
                    f"{want!r}")
            why = _explain(row, last, intent)
            if intent is not None and intent.status == "unknown":
                r.waiting.append(f"{what}; waits on intent {intent.id} whose outcome is unknown "
                                 f"(timeout after booking or a killed worker): {why}")
                r.waiting_allowed += 1
            elif row.state.endswith(INVALID_SUFFIX) and _is_injected(last):
                r.waiting.append(f"{what}; injected ERROR not retried before the end: {why}")
                r.waiting_allowed += 1
            elif row.state.endswith(INVALID_SUFFIX) and _attempts_used_by_faults(
                    item_id, last, outcomes):
                r.waiting.append(f"{what}; every payment attempt RatePAY allows in 24 hours "
                                 f"was answered by an injected ERROR, so the engine sends no "
                                 f"more (a person offers another payment method): {why}")
                r.waiting_allowed += 1
            elif row.state.endswith(INVALID_SUFFIX):
                r.waiting.append(f"{what}; NOT an injected ERROR: {why}")
                r.wrong_items.append(f"{what}; {why}")
            elif not r.finished and plan.ref in self.moving_refs | set(self.in_flight):
                r.still_moving_items += 1
                r.wrong_items.append(f"{what}; still moving when the run ended: {why}")
            else:
                r.wrong_items.append(f"{what}; {why}")

    def _check_ledger(self, plan: Plan, rows: list[Any], outcomes: list[Any],
                      payment: Any, txs: list[dict[str, Any]]) -> None:
        """Compare the gateway's ledger of the order with our states and outcome rows."""
        from ratepay_oms.orders import parse_order
        from ratepay_oms.plugins.ratepay.basket import unique_numbers

        r = self.report
        diffs: list[str] = []
        our_tx = payment.transaction_id if payment is not None else None
        # Authorisations at the gateway that we do not hold: booked twice (or lost).
        for data in txs:
            if data["transaction_id"] != our_tx and data.get("state") in ACCEPTED_TX_STATES:
                r.duplicates += 1
                r.duplicate_kinds["extra authorisations"] += 1
                r.duplicate_details.append(
                    f"{plan.ref}: transaction {data['transaction_id']} ({data['state']}) is "
                    f"accepted at the gateway, ours is {our_tx or 'none'}")
        states = [row.state for row in rows]
        paid_states = set(states) - {NEW, "payment request initialized", DECLINED,
                                     "payment request invalid"}
        g = next((d for d in txs if d["transaction_id"] == our_tx), None)
        if g is None and our_tx is not None:
            g = self.sandbox.status(our_tx)
        if our_tx is None or g is None:
            if paid_states:
                diffs.append(f"items in {sorted(paid_states)} but transaction "
                             f"{our_tx or 'none'} is unknown at the gateway")
            if diffs:
                r.ledger_diffs.append(f"{plan.ref}: " + "; ".join(diffs))
            return
        accepted = g.get("state") in ACCEPTED_TX_STATES
        if paid_states and not accepted:
            diffs.append(f"items in {sorted(paid_states)} but the gateway's transaction is "
                         f"{g.get('state')}")
        if not paid_states and accepted:
            diffs.append(
                f"the gateway accepted the payment, our items are in {sorted(set(states))}")
        if DECLINED in states and g.get("state") != "declined":
            diffs.append(f"items declined, the gateway's transaction is {g.get('state')}")

        uniques = unique_numbers(parse_order(plan.doc))
        key_of = {
            row.id: row.sku + (f"/{uniques[row.line_no]}" if uniques.get(row.line_no) else "")
            for row in rows
        }
        success: dict[str, set[int]] = defaultdict(set)
        twice: Counter[tuple[int, str]] = Counter()
        for o in outcomes:
            if o.success and o.action in BOOKING_ACTIONS:
                success[o.action].add(o.item_id)
                twice[(o.item_id, o.action)] += 1
        for (item_id, action), n in twice.items():
            if n > 1:
                diffs.append(f"item {item_id} has {n} successful {action} outcomes")
        by_state = {
            "delivery": {row.id for row in rows if row.state in DELIVERED_STATES},
            "cancellation": {row.id for row in rows if row.state in CANCELLED_STATES},
            "return": {row.id for row in rows if row.state in RETURNED_STATES},
        }
        field_of = {"delivery": "delivered", "cancellation": "cancelled", "return": "returned"}
        positions: dict[str, dict[str, Any]] = g.get("positions") or {}
        bookings = g.get("bookings") or []
        item_keys = sorted(set(key_of.values()))
        unknown_to_us: list[str] = []  # booked at the gateway, not booked as far as we know
        beyond = 0
        for key in item_keys:
            pos = positions.get(key)
            if pos is None:
                if accepted:
                    diffs.append(f"position {key} is not at the gateway")
                continue
            for action, name in field_of.items():
                gw = int(pos[name])
                by_outcome = sum(1 for i in success[action] if key_of.get(i) == key)
                by_states = sum(1 for i in by_state[action] if key_of.get(i) == key)
                if not gw == by_outcome == by_states:
                    diffs.append(f"{key} {name}: gateway {gw}, our outcomes {by_outcome}, "
                                 f"our states {by_states}")
                if gw > by_outcome:
                    unknown_to_us.append(f"{key} {name} {gw - by_outcome}")
                    beyond += gw - by_outcome
            over = int(pos["delivered"]) + int(pos["cancelled"]) - int(pos["ordered"])
            back = int(pos["returned"]) - int(pos["delivered"])
            if over > 0 or back > 0:
                r.duplicates += max(over, 0) + max(back, 0)
                r.duplicate_kinds["units booked beyond the order"] += max(over, 0) + max(back, 0)
                r.duplicate_details.append(f"{plan.ref}: {key} {pos}")
        for key in positions:
            if key not in item_keys and key not in ("shipping", "discount"):
                diffs.append(f"the gateway has a position {key} we do not")
        for special, status in (("shipping", payment.shipping_status),
                                ("discount", payment.discount_status)):
            pos = positions.get(special)
            if pos is None:
                continue
            got = {n: Decimal(str(pos[n])) for n in ("ordered", "delivered", "cancelled",
                                                      "returned")}
            full, zero = got["ordered"], Decimal("0")
            ours = {
                "open": (zero, zero, zero),
                "delivered": (full, zero, zero),
                "cancelled": (zero, full, zero),
                "returned": (full, zero, full),
            }.get(status, (zero, zero, zero))
            have = (got["delivered"], got["cancelled"], got["returned"])
            if status not in POSITION_STATUSES or ours != have:
                diffs.append(f"{special}: ours {status}, gateway delivered/cancelled/returned "
                             f"{'/'.join(str(v) for v in have)}")
            for name, at_gateway, mine in zip(("delivered", "cancelled", "returned"), have,
                                              ours, strict=True):
                if abs(at_gateway) > abs(mine):
                    unknown_to_us.append(f"{special} {name} {at_gateway - mine}")
                    beyond += 1
        moving = not r.finished and plan.ref in self.moving_refs | set(self.in_flight)
        if unknown_to_us:
            r.duplicates += beyond
            r.duplicate_kinds["booked beyond our successful outcomes"] += beyond
            r.duplicates_moving += beyond if moving else 0
            repeats = sum(_repeated_bookings(bookings, (op, sub)) for op, sub in
                          {(b["operation"], b.get("subtype")) for b in bookings})
            r.duplicate_details.append(
                f"{plan.ref}: booked at the gateway beyond what our outcomes say was booked"
                + (" (still moving when the run ended: its call may wait for reconciliation)"
                   if moving else "") + ": "
                + ", ".join(unknown_to_us)
                + (f" ({repeats} booking(s) repeat an earlier one exactly)" if repeats else "")
                + "; gateway bookings: " + "; ".join(
                    f"{b['operation']}{'/' + b['subtype'] if b.get('subtype') else ''} "
                    f"{b.get('positions')}" for b in bookings))
        if diffs:
            r.ledger_diffs_moving += moving
            r.ledger_diffs.append(f"{plan.ref} ({plan.method}, {plan.scenario}; fired: "
                                  f"{', '.join(plan.fired) or 'nothing'}"
                                  f"{'; still moving when the run ended' if moving else ''}): "
                                  + "; ".join(diffs))

    # -- secrets ---------------------------------------------------------------------------

    def _api_log_secrets(self, conn: sa.Connection) -> int:
        t = self.tables.api_log
        texts = [c for c in t.c if isinstance(c.type, sa.String | sa.Text)]
        return int(conn.scalar(sa.select(sa.func.count()).select_from(t).where(
            sa.or_(*[c.contains(self.security_code, autoescape=True) for c in texts]))) or 0)

    def _scan_db_dump(self) -> None:
        """Dump the whole database and count the security code in it: ``pg_dump`` for
        PostgreSQL when it is installed, else every text column of every table."""
        dump = self.log_dir / "db-dump.sql"
        url = sa.engine.make_url(self.url)
        pg_dump = shutil.which("pg_dump")
        if url.get_backend_name() == "postgresql" and pg_dump:
            env = dict(os.environ)
            if url.password:
                env["PGPASSWORD"] = str(url.password)
            command = [pg_dump, "--data-only", "--no-owner", "-f", str(dump),
                       "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432),
                       "-U", url.username or "postgres", url.database or ""]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode == 0:
                self.report.secrets["DB dump"] = count_in_file(dump, self.security_code)
                self.report.scanned["DB dump (pg_dump)"] = dump.stat().st_size
                dump.unlink()
                return
            say(f"pg_dump failed ({done.stderr.strip()[:200]}); scanning the tables instead")
        found = 0
        size = 0
        with self.db.connect() as conn:
            for table in self.tables.all.values():
                texts = [c for c in table.c if isinstance(c.type, sa.String | sa.Text)]
                if not texts:
                    continue
                size += int(conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)
                found += int(conn.scalar(sa.select(sa.func.count()).select_from(table).where(
                    sa.or_(*[c.contains(self.security_code, autoescape=True) for c in texts])))
                    or 0)
        self.report.secrets["DB dump"] = found
        self.report.scanned["DB rows"] = size

    def _scan_file_secrets(self, worker_logs: list[Path], sandbox_log: Path) -> None:
        r = self.report
        total = 0
        for path in worker_logs:
            if path.exists():
                n = count_in_file(path, self.security_code)
                total += n
                if n:
                    r.secret_places.append(f"{path.name}: {n}")
        r.secrets["worker logs"] = total
        r.scanned["worker log files"] = len(worker_logs)
        n = count_in_file(sandbox_log, self.security_code) if sandbox_log.exists() else 0
        r.secrets["sandbox log"] = n
        if n:
            r.secret_places.append(f"{sandbox_log.name}: {n}")
        if r.secrets["API log rows"]:
            r.secret_places.append(f"ratepay_api_log: {r.secrets['API log rows']} rows")
        if r.secrets["DB dump"]:
            r.secret_places.append(f"database dump: {r.secrets['DB dump']}")


def _is_injected(outcome: Any) -> bool:
    return (outcome is not None and not outcome.success
            and str(outcome.result_code) == INJECTED_RESULT
            and str(outcome.reason_code) == INJECTED_REASON)


def _attempts_used_by_faults(item_id: int, last: Any, outcomes: list[Any]) -> bool:
    """The engine refused another PAYMENT_REQUEST because RatePAY's 3 attempts per order in
    24 hours were used, and each attempt that counted (one with a transaction id) was
    answered by an injected ERROR: the soak's faults used them up, not the engine."""
    if last is None or last.success or "payment attempts per order" not in (last.message or ""):
        return False
    tries = [o for o in outcomes if o.item_id == item_id and o.operation == "PAYMENT_REQUEST"
             and o.transaction_id is not None]
    return bool(tries) and all(_is_injected(o) for o in tries)


def _explain(row: Any, outcome: Any, intent: Any) -> str:
    parts = []
    if outcome is not None:
        parts.append(
            f"last outcome {outcome.action} {'ok' if outcome.success else 'failed'} "
            f"{outcome.operation}{'/' + outcome.subtype if outcome.subtype else ''} "
            f"result {outcome.result_code} reason {outcome.reason_code} "
            f"({(outcome.message or '')[:120]})")
    if row.retry_at is not None:
        parts.append(f"retry of {row.retry_event!r} at {row.retry_at:%H:%M:%S}")
    if row.last_error:
        parts.append(f"last error: {row.last_error[:200]}")
    if intent is not None:
        parts.append(f"intent {intent.id} {intent.status} {intent.command}"
                     + (f" ({intent.last_error[:120]})" if intent.last_error else ""))
    return "; ".join(parts) or "no outcome, no error"


def _timeline(intents: list[Any], txs: list[dict[str, Any]],
              kills: list[tuple[datetime, int]]) -> str:
    """What happened to one order, in time order: its intents, the gateway's transactions and
    bookings, and the worker kills around them — to tell a bug from a race. (Intent times are
    the engine's ``now`` of the run that wrote them; the sandbox's are its local clock.)"""
    events: list[tuple[str, str]] = []

    def at(moment: Any) -> str:
        return moment.isoformat(sep=" ", timespec="milliseconds") if moment else ""

    for i in intents:
        worker = (i.worker or "").split(":")
        pid = worker[1] if len(worker) > 1 else "?"
        events.append((at(i.created_at),
                       f"intent {i.id} {i.command} by pid {pid}: {i.status}/{i.resolution}"))
        if i.settled_at:
            events.append((at(i.settled_at), f"intent {i.id} settled"))
    for tx in txs:
        events.append((str(tx.get("created", "")).replace("T", " "),
                       f"tx {tx['transaction_id']} {tx.get('state')} (gateway clock)"))
        for b in tx.get("bookings") or []:
            events.append((str(b.get("time", "")).replace("T", " "),
                           f"booked {b['operation']}/{b.get('subtype')} {b.get('positions')}"))
    moments = [m for i in intents for m in (i.created_at, i.settled_at) if m is not None]
    margin = timedelta(seconds=30)
    for when, pid in kills:
        if not moments or min(moments) - margin <= when <= max(moments) + margin:
            events.append((at(when), f"SIGKILL pid {pid}"))
    return " | ".join(f"{t[11:23]} {what}" for t, what in sorted(events))


def _repeated_bookings(bookings: list[dict[str, Any]], call: tuple[str, str | None]) -> int:
    seen: set[str] = set()
    repeats = 0
    for b in bookings:
        if (b["operation"], b.get("subtype")) != call:
            continue
        key = json.dumps(b.get("positions"), sort_keys=True)
        if key in seen:
            repeats += 1
        seen.add(key)
    return repeats


def count_in_file(path: Path, needle: str) -> int:
    """Occurrences of ``needle`` in a file of any size (read in chunks that overlap)."""
    target = needle.encode()
    count = 0
    tail = b""
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            data = tail + chunk
            count += data.count(target)
            # Keep the last len-1 bytes: a match across the boundary is counted next round,
            # one wholly inside them was counted already and cannot be counted again.
            tail = data[-(len(target) - 1):] if len(target) > 1 else b""
    return count


def sweep_gateway(sandbox: SandboxProcess, known: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Every transaction the sandbox opened, through its status lookup.

    Its ids are ``NN-YYYYMMDD`` + a 7-digit sequence that grows by one per PAYMENT_INIT, so
    from the ids we know (our payments, the API log) we walk the whole range and beyond it
    until 50 numbers in a row are unknown: a transaction whose answer we lost with a killed
    worker is found as well.
    """
    known = set(known)
    found: dict[str, dict[str, Any]] = {}
    parsed = [m for m in (TX_ID.match(t) for t in known) if m]
    prefixes = {f"{m.group(1)}-{m.group(2)}" for m in parsed}
    today = datetime.now()
    for node in {m.group(1) for m in parsed}:
        for day in (today - timedelta(days=1), today):
            prefixes.add(f"{node}-{day:%Y%m%d}")

    ordered = sorted(prefixes, key=lambda p: (p not in {f"{m.group(1)}-{m.group(2)}"
                                                        for m in parsed}, p))

    def probe(seq: int) -> dict[str, Any] | None:
        for prefix in ordered:
            data = sandbox.status(f"{prefix}{seq:07d}")
            if data is not None:
                return data
        return None

    with ThreadPoolExecutor(8) as pool:
        if parsed:
            seqs = sorted(int(m.group(3)) for m in parsed)
            for data in pool.map(probe, range(seqs[0], seqs[-1] + 1)):
                if data is not None:
                    found[data["transaction_id"]] = data
            for start, direction in ((seqs[0] - 1, -1), (seqs[-1] + 1, 1)):
                misses, seq = 0, start
                while misses < 50 and seq > 0:
                    data = probe(seq)
                    if data is None:
                        misses += 1
                    else:
                        misses = 0
                        found[data["transaction_id"]] = data
                    seq += direction
        for tid in known - set(found):
            data = sandbox.status(tid)
            if data is not None:
                found[tid] = data
    return found


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Soak the engine: many orders, killed tick workers, a faulty gateway; "
        "prints what got lost, stuck, booked twice or leaked (exit 1 if anything did).")
    parser.add_argument("--orders", type=int, default=10_000, help="orders to place (10000)")
    parser.add_argument("--workers", type=int, default=8, help="tick worker processes (8)")
    parser.add_argument("--fault-rate", type=float, default=0.10,
                        help="share of gateway calls with a fault (0.10)")
    parser.add_argument("--kill-every", type=float, default=5.0, metavar="S",
                        help="SIGKILL a random worker every S seconds, 0 = never (5)")
    parser.add_argument("--db", default=None, metavar="URL",
                        help="database to use as it is (default: a throw-away one, see "
                        "--admin-url)")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, metavar="URL",
                        help=f"server on which the throw-away database is created "
                        f"({DEFAULT_ADMIN_URL})")
    parser.add_argument("--keep-db", action="store_true",
                        help="do not drop the throw-away database")
    parser.add_argument("--deadline", type=float, default=3600.0, metavar="S",
                        help="give up after S seconds of driving (3600)")
    parser.add_argument("--seed", type=int, default=None, help="seed (orders, scenarios, "
                        "kills, faults); default random, printed")
    parser.add_argument("--interval", type=float, default=0.2,
                        help="tick --loop --interval of the workers (0.2)")
    parser.add_argument("--read-timeout", type=float, default=2.0, metavar="S",
                        help="RATEPAY_READ_TIMEOUT; a timeout fault holds the answer 1 s "
                        "longer (2)")
    parser.add_argument("--driver-threads", type=int, default=8,
                        help="threads firing manual events (8)")
    parser.add_argument("--tick-limit", type=int, default=None, metavar="N",
                        help="pass --limit N to the workers' tick (default: none)")
    parser.add_argument("--real-backoff", action="store_true",
                        help="keep the engine's retry backoff (30 s x 2^n) instead of bringing "
                        "due retries forward")
    parser.add_argument("--keep-dead-leases", action="store_true",
                        help="leave a killed worker's leases to expire (60 s) instead of freeing "
                        "them at once")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where worker and sandbox logs go (default: a temp dir, removed "
                        "when the run is OK)")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="S",
                        help="print a progress line every S seconds to stderr (10)")
    parser.add_argument("--vacuum-every", type=float, default=60.0, metavar="S",
                        help="on a PostgreSQL server with autovacuum off, VACUUM (ANALYZE) the "
                        "soak's database every S seconds, as autovacuum would (60; 0: never)")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.workers < 1:
        parser.error("--orders and --workers must be at least 1")
    if not 0.0 <= args.fault_rate <= 1.0:
        parser.error("--fault-rate must be within 0..1")
    return Options(
        orders=args.orders, workers=args.workers, fault_rate=args.fault_rate,
        kill_every=args.kill_every, db=args.db, admin_url=args.admin_url,
        deadline=args.deadline,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31),
        interval=args.interval, read_timeout=args.read_timeout,
        driver_threads=args.driver_threads, tick_limit=args.tick_limit,
        real_backoff=args.real_backoff, keep_dead_leases=args.keep_dead_leases,
        keep_db=args.keep_db, log_dir=args.log_dir, progress_every=args.progress_every,
        vacuum_every=args.vacuum_every,
    )


def run(options: Options) -> Report:
    return Soak(options).run()


def _stop_gracefully_on_signals() -> None:
    """Ctrl-C or SIGTERM (also when started in the background, where SIGINT comes ignored):
    the drive stops and what is there is checked and reported; a second one aborts."""

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    _stop_gracefully_on_signals()
    say(f"soak: {options.orders} orders, {options.workers} workers, fault rate "
        f"{options.fault_rate:.0%}, kill every {options.kill_every} s, seed {options.seed}")
    report = run(options)
    text = report.text()
    if report.log_dir is not None:
        (report.log_dir / "report.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
