"""YAML process files → checked, immutable ``ProcessDefinition`` objects.

The file format is described in ``docs/process-format.md``. We read YAML *nodes*
(``yaml.compose`` with the safe loader) rather than plain Python values, for three reasons: every
problem can name its ``file:line``; a key written twice in one mapping (two states with one
name) is visible instead of silently overwritten; and nothing in the file is ever constructed
as an object, so a hostile or broken file can only produce problems, never code execution.

Loading happens in two steps: first every file of a process (the main file and its includes,
with prefixes applied) is read into declaration lists, then ``checks.check_declarations`` looks
at the merged whole, because a sub-process may name states of the file that includes it and
the other way round.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

import ratepay_oms
from ratepay_oms.process.checks import Declarations, PluginLookup, check_declarations
from ratepay_oms.process.errors import (
    ERROR,
    WARNING,
    ProcessDefinitionError,
    ProcessProblem,
    Severity,
    UnknownProcessError,
    has_errors,
)
from ratepay_oms.process.model import (
    EventDef,
    ProcessDefinition,
    SlaDef,
    SourceLocation,
    StateDef,
    TransitionDef,
)

log = logging.getLogger(__name__)

PROCESS_DIR_ENV = "RATEPAY_OMS_PROCESS_DIR"
DEFAULT_INITIAL = "new"
PREFIX_DELIMITER = " - "  # Spryker's: a prefix "Return" makes "Return - ready for refund"
PROCESS_SUFFIXES = (".yaml", ".yml")
MAX_TIMEOUT = timedelta(days=3660)  # ten years: a due time must stay a storable datetime

_MAIN_KEYS = ("process", "initial", "include", "states", "transitions", "events")
_SUB_KEYS = ("subprocess", "include", "states", "transitions", "events")
_STATE_KEYS = ("display", "flags", "reserved", "sla", "notify")
_SLA_KEYS = ("warn", "breach")
_TRANSITION_KEYS = ("source", "target", "event", "condition", "happy")
_EVENT_KEYS = ("command", "on_enter", "manual", "timeout")
_INCLUDE_KEYS = ("file", "prefix")

_TAG = "tag:yaml.org,2002:"
# plain scalars a name may be written as (``404`` or ``yes`` are names too); explicit tags
# such as ``!!python/object`` are refused, never constructed
_NAME_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "timestamp"))
_TIMEOUT_PART = re.compile(
    r"\s*(\d+)\s*(seconds?|minutes?|hours?|days?|weeks?|min|s|m|h|d|w)(?![a-z])", re.IGNORECASE
)
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
_UNIT_ABBREVIATIONS = {"s": "second", "m": "minute", "min": "minute", "h": "hour", "d": "day",
                       "w": "week"}


def default_process_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where process files live, decided in one place for the CLI and the engine.

    ``override`` (a ``--dir`` option) wins, then ``$RATEPAY_OMS_PROCESS_DIR``, then
    ``./processes`` when it exists, then the ``processes/`` directory shipped with the package.
    """
    if override is not None:
        return Path(override)
    env = os.environ.get(PROCESS_DIR_ENV)
    if env:
        return Path(env)
    local = Path("processes")
    if local.is_dir():
        return local
    return Path(ratepay_oms.__file__).resolve().parent.parent / "processes"


def parse_timeout(text: str, what: str = "timeout") -> timedelta:
    """``"90 days"``, ``"1 day 2 hours"``, ``"90days"`` (Spryker's spelling), ``"3d"``,
    ``"1d 12h"`` → ``timedelta``. Units: second(s)/s, minute(s)/min/m, hour(s)/h, day(s)/d,
    week(s)/w.

    Raises ``ValueError`` with a message fit for a problem report; ``what`` names the value
    in it (``timeout``, ``sla warn``, …).
    """
    pos, total = 0, 0
    stripped = text.strip()
    while pos < len(stripped):
        match = _TIMEOUT_PART.match(stripped, pos)
        if match is None:
            raise ValueError(
                f"bad {what} {text!r}: write 'N unit' with unit second(s), minute(s), hour(s), "
                "day(s) or week(s) (or s, m, h, d, w), e.g. '90 days', '1 day 2 hours' or '3d'"
            )
        unit = match.group(2).lower()
        unit = _UNIT_ABBREVIATIONS.get(unit, unit.rstrip("s") if len(unit) > 1 else unit)
        total += int(match.group(1)) * _UNIT_SECONDS[unit]
        pos = match.end()
    if not stripped:
        raise ValueError(f"bad {what} '': write e.g. '90 days'")
    if total <= 0:
        raise ValueError(f"bad {what} {text!r}: it must be longer than zero")
    if total > MAX_TIMEOUT.total_seconds():
        raise ValueError(f"bad {what} {text!r}: more than {MAX_TIMEOUT.days} days")
    return timedelta(seconds=total)


def format_timeout(duration: timedelta) -> str:
    """The inverse of ``parse_timeout`` for people: ``90 days``, ``1 day 2 hours``."""
    seconds = int(duration.total_seconds())
    parts = []
    for unit in ("day", "hour", "minute", "second"):
        count, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if count:
            parts.append(f"{count} {unit}{'s' if count != 1 else ''}")
    return " ".join(parts) or "0 seconds"


def format_elapsed(duration: timedelta) -> str:
    """A waiting time for people, as precise as it matters: ``4 days 2 hours``, ``3 hours
    12 minutes``, ``45 seconds`` (minutes dropped past a day, seconds past an hour)."""
    seconds = max(int(duration.total_seconds()), 0)
    if seconds >= 86400:
        seconds -= seconds % 3600
    elif seconds >= 3600:
        seconds -= seconds % 60
    return format_timeout(timedelta(seconds=seconds))


@dataclass
class _Fragment:
    """What one file contributes, after its own includes are merged in."""

    states: list[StateDef] = field(default_factory=list)
    events: list[EventDef] = field(default_factory=list)
    transitions: list[TransitionDef] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def extend(self, other: _Fragment) -> None:
        self.states += other.states
        self.events += other.events
        self.transitions += other.transitions
        self.files += [f for f in other.files if f not in self.files]

    def prefixed(self, prefix: str) -> _Fragment:
        """Spryker's ``prefix``: rename this fragment's own states and events, and the
        transition ends that point at them; names declared elsewhere stay as they are."""
        states = {s.name for s in self.states}
        events = {e.name for e in self.events}

        def ren(name: str) -> str:
            return f"{prefix}{PREFIX_DELIMITER}{name}"

        return _Fragment(
            states=[replace(s, name=ren(s.name)) for s in self.states],
            events=[replace(e, name=ren(e.name)) for e in self.events],
            transitions=[
                replace(
                    t,
                    source=ren(t.source) if t.source in states else t.source,
                    target=ren(t.target) if t.target in states else t.target,
                    event=ren(t.event) if t.event in events else t.event,
                )
                for t in self.transitions
            ],
            files=list(self.files),
        )


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null"


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    tag = node.tag.removeprefix(_TAG)
    return {"null": "empty", "str": "a string", "bool": "a boolean"}.get(tag, f"a {tag} value")


class _FileReader:
    """Reads one file's node tree into declarations, reporting shape problems as it goes."""

    def __init__(self, file: str, problems: list[ProcessProblem]) -> None:
        self.file = file
        self.problems = problems

    def loc(self, node: Node) -> SourceLocation:
        return SourceLocation(self.file, node.start_mark.line + 1)

    def report(self, node: Node | None, message: str, severity: Severity = ERROR) -> None:
        line = None if node is None else node.start_mark.line + 1
        self.problems.append(ProcessProblem(self.file, line, message, severity))

    # -- shapes -------------------------------------------------------------------------------
    def pairs(self, node: Node, what: str) -> list[tuple[str, Node, Node]] | None:
        """A mapping's entries as ``(key text, key node, value node)``, duplicates kept."""
        if not isinstance(node, MappingNode):
            self.report(node, f"{what} must be a mapping, not {_kind(node)}")
            return None
        out: list[tuple[str, Node, Node]] = []
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _TAG + "null":
                self.report(key, f"{what}: keys must be names, not {_kind(key)}")
                continue
            out.append((str(key.value), key, value))
        return out

    def fields(
        self, node: Node, what: str, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> dict[str, Node] | None:
        """A mapping with a fixed set of keys; unknown keys are errors (typos like ``targte``)."""
        pairs = self.pairs(node, what)
        if pairs is None:
            return None
        allowed = tuple(allowed)
        found: dict[str, Node] = {}
        for key, key_node, value in pairs:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.report(
                    key_node, f"unknown key {key!r} in {what}{hint}; allowed: {', '.join(allowed)}"
                )
            elif key in found:
                self.report(key_node, f"key {key!r} given twice in {what}")
            else:
                found[key] = value
        for key in required:
            if key not in found:
                self.report(node, f"{what} needs {key!r}")
        return found

    def name(self, node: Node, what: str, *, optional: bool = False) -> str | None:
        """A name is any non-empty scalar, taken as written (``404`` or ``yes`` stay text)."""
        if isinstance(node, ScalarNode):
            if node.tag == _TAG + "null":
                if not optional:
                    self.report(node, f"{what} must be a name, not empty")
                return None
            if node.tag in _NAME_TAGS and node.value.strip():
                return str(node.value)
        self.report(node, f"{what} must be a name, not {_kind(node)}")
        return None

    def boolean(self, node: Node, what: str) -> bool:
        if isinstance(node, ScalarNode) and node.tag == _TAG + "bool":
            return node.value.lower() in ("true", "yes", "on", "y")
        self.report(node, f"{what} must be true or false, not {_kind(node)}")
        return False

    def names(self, node: Node, what: str) -> list[str]:
        if not isinstance(node, SequenceNode):
            self.report(node, f"{what} must be a list, not {_kind(node)}")
            return []
        found = [self.name(item, f"each of {what}") for item in node.value]
        return [n for n in found if n is not None]

    def opt_name(self, spec: dict[str, Node], key: str) -> str | None:
        return self.name(spec[key], repr(key), optional=True) if key in spec else None

    def opt_bool(self, spec: dict[str, Node], key: str) -> bool:
        return self.boolean(spec[key], repr(key)) if key in spec else False

    # -- sections -----------------------------------------------------------------------------
    def states(self, node: Node) -> list[StateDef]:
        out = []
        for name, key, value in self.pairs(node, "'states'") or []:
            if not name.strip():
                self.report(key, "state names must not be empty")
                continue
            state = StateDef(name=name, location=self.loc(key))
            if not _is_null(value):
                spec = self.fields(value, f"state {name!r}", _STATE_KEYS) or {}
                flags = self.names(spec["flags"], "'flags'") if "flags" in spec else []
                state = replace(
                    state,
                    display=self.opt_name(spec, "display"),
                    flags=frozenset(flags),
                    reserved=self.opt_bool(spec, "reserved"),
                    sla=self.sla(spec["sla"], name) if "sla" in spec else None,
                    notify=self.opt_bool(spec, "notify"),
                )
            out.append(state)
        return out

    def events(self, node: Node) -> list[EventDef]:
        out = []
        for name, key, value in self.pairs(node, "'events'") or []:
            if not name.strip():
                self.report(key, "event names must not be empty")
                continue
            event = EventDef(name=name, location=self.loc(key))
            if not _is_null(value):
                spec = self.fields(value, f"event {name!r}", _EVENT_KEYS) or {}
                event = replace(
                    event,
                    command=self.opt_name(spec, "command"),
                    on_enter=self.opt_bool(spec, "on_enter"),
                    manual=self.opt_bool(spec, "manual"),
                    timeout=self.timeout(spec["timeout"]) if "timeout" in spec else None,
                )
            out.append(event)
        return out

    def sla(self, node: Node, state: str) -> SlaDef | None:
        """``sla: {warn: 1d, breach: 3d}``: at least one limit, ``warn`` below ``breach``."""
        spec = self.fields(node, f"'sla' of state {state!r}", _SLA_KEYS)
        if spec is None:
            return None
        limits: dict[str, timedelta | None] = {}
        for key in _SLA_KEYS:
            limits[key] = self.duration(spec[key], f"sla {key}") if key in spec else None
        if not spec:
            self.report(node, f"'sla' of state {state!r} needs 'warn', 'breach' or both")
            return None
        warn, breach = limits["warn"], limits["breach"]
        if warn is not None and breach is not None and warn >= breach:
            self.report(
                spec["warn"],
                f"sla of state {state!r}: warn ({format_timeout(warn)}) must be shorter than "
                f"breach ({format_timeout(breach)})",
            )
        if warn is None and breach is None:
            return None
        return SlaDef(warn=warn, breach=breach, location=self.loc(node))

    def duration(self, node: Node, what: str) -> timedelta | None:
        if not isinstance(node, ScalarNode) or _is_null(node):
            self.report(
                node, f"{what!r} must be a duration like '3d' or '2 days', not {_kind(node)}"
            )
            return None
        try:
            return parse_timeout(node.value, what)
        except ValueError as exc:
            self.report(node, str(exc))
            return None

    def timeout(self, node: Node) -> timedelta | None:
        if not isinstance(node, ScalarNode) or _is_null(node):
            self.report(node, f"'timeout' must be a duration like '90 days', not {_kind(node)}")
            return None
        try:
            return parse_timeout(node.value)
        except ValueError as exc:
            self.report(node, str(exc))
            return None

    def transitions(self, node: Node) -> list[TransitionDef]:
        if not isinstance(node, SequenceNode):
            self.report(node, f"'transitions' must be a list, not {_kind(node)}")
            return []
        out = []
        for item in node.value:
            spec = self.fields(item, "transition", _TRANSITION_KEYS, ("source", "target"))
            if spec is None:
                continue
            source = self.name(spec["source"], "'source'") if "source" in spec else None
            target = self.name(spec["target"], "'target'") if "target" in spec else None
            event = self.opt_name(spec, "event")
            condition = self.opt_name(spec, "condition")
            happy = self.opt_bool(spec, "happy")
            if source is None or target is None:
                continue
            out.append(
                TransitionDef(
                    source=source,
                    target=target,
                    event=event,
                    condition=condition,
                    happy=happy,
                    location=self.loc(item),
                )
            )
        return out


@dataclass(frozen=True)
class _Include:
    file: str
    prefix: str | None
    node: Node


class _Session:
    """One load: parses each file once and collects every problem of every file."""

    def __init__(self) -> None:
        self.problems: list[ProcessProblem] = []
        self._roots: dict[str, Node | None] = {}

    def root(self, file: str) -> Node | None:
        """The file's node tree, or ``None`` after reporting why there is none."""
        if file in self._roots:
            return self._roots[file]
        node: Node | None = None
        try:
            text = Path(file).read_bytes().decode("utf-8")
        except FileNotFoundError:
            self.problems.append(ProcessProblem(file, None, "no such file"))
        except OSError as exc:
            self.problems.append(ProcessProblem(file, None, f"cannot read: {exc.strerror}"))
        except UnicodeDecodeError:
            self.problems.append(ProcessProblem(file, None, "not UTF-8 text"))
        else:
            try:
                node = yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                line = mark.line + 1 if mark is not None else None
                detail = " ".join(x for x in (exc.context, exc.problem) if x)
                self.problems.append(ProcessProblem(file, line, f"YAML syntax error: {detail}"))
            except yaml.YAMLError as exc:
                self.problems.append(ProcessProblem(file, None, f"YAML error: {exc}"))
            else:
                if node is None:
                    self.problems.append(
                        ProcessProblem(
                            file, 1, "file is empty; expected 'process: <Name>' or 'subprocess:'"
                        )
                    )
        self._roots[file] = node
        return node

    def kind(self, file: str) -> str | None:
        """``"process"``, ``"subprocess"`` or ``None`` (neither, or unreadable)."""
        root = self.root(file)
        if not isinstance(root, MappingNode):
            return None
        keys = {k.value for k, _ in root.value if isinstance(k, ScalarNode)}
        if "process" in keys:
            return "process"
        if "subprocess" in keys:
            return "subprocess"
        return None

    def read(
        self, file: str, expect: str, chain: tuple[tuple[str, str], ...]
    ) -> tuple[dict[str, Node], _Fragment] | None:
        """Read ``file`` and, recursively, its includes; ``chain`` holds the (resolved path,
        prefix path) of every file on the way here, to find include cycles."""
        root = self.root(file)
        if root is None:
            return None
        reader = _FileReader(file, self.problems)
        kind = self.kind(file)
        if kind is None:
            reader.report(
                root,
                "a process file starts with 'process: <Name>' (main) or 'subprocess: <Name>'",
            )
            return None
        if kind != expect:
            if expect == "subprocess":
                reader.report(root, "an included file must be a sub-process ('subprocess:')")
            else:
                reader.report(
                    root,
                    "this is a sub-process file: load the main process that includes it",
                )
            return None
        spec = reader.fields(root, "the file", _MAIN_KEYS if kind == "process" else _SUB_KEYS)
        assert spec is not None  # kind() saw a mapping
        sections = {k: v for k, v in spec.items() if not _is_null(v)}
        fragment = _Fragment(files=[file])
        if "states" in sections:
            fragment.states += reader.states(sections["states"])
        if "transitions" in sections:
            fragment.transitions += reader.transitions(sections["transitions"])
        if "events" in sections:
            fragment.events += reader.events(sections["events"])
        included: dict[tuple[str, str | None], Node] = {}
        for inc in self._includes(reader, sections.get("include")):
            key = (str(Path(os.path.dirname(file), inc.file).resolve()), inc.prefix)
            if key in included:
                first = included[key].start_mark.line + 1
                reader.report(
                    inc.node,
                    f"{inc.file!r} is already included at line {first}; "
                    "to use a sub-process twice give each include its own prefix",
                )
                continue
            included[key] = inc.node
            fragment.extend(self._include(reader, file, inc, chain))
        return spec, fragment

    def _includes(self, reader: _FileReader, node: Node | None) -> list[_Include]:
        if node is None:
            return []
        if not isinstance(node, SequenceNode):
            reader.report(node, f"'include' must be a list, not {_kind(node)}")
            return []
        out = []
        for item in node.value:
            if isinstance(item, ScalarNode):
                file = reader.name(item, "an include")
                prefix = None
            else:
                spec = reader.fields(item, "an include", _INCLUDE_KEYS, ("file",))
                if spec is None:
                    continue
                file = reader.name(spec["file"], "'file'") if "file" in spec else None
                prefix = reader.name(spec["prefix"], "'prefix'") if "prefix" in spec else None
            if file is not None:
                out.append(_Include(file, prefix, item))
        return out

    def _include(
        self,
        reader: _FileReader,
        including: str,
        inc: _Include,
        chain: tuple[tuple[str, str], ...],
    ) -> _Fragment:
        path = os.path.normpath(os.path.join(os.path.dirname(including), inc.file))
        resolved = str(Path(path).resolve())
        if resolved in {r for r, _ in chain}:
            cycle = " -> ".join([*(Path(r).name for r, _ in chain), Path(resolved).name])
            reader.report(inc.node, f"include cycle: {cycle}")
            return _Fragment()
        if not Path(path).is_file():
            why = "is not a file" if Path(path).exists() else "does not exist"
            reader.report(inc.node, f"included file {path!r} {why}")
            return _Fragment()
        read = self.read(path, "subprocess", (*chain, (resolved, inc.prefix or "")))
        if read is None:
            return _Fragment()
        _, fragment = read
        return fragment.prefixed(inc.prefix) if inc.prefix else fragment

    def load(self, file: str, registry: PluginLookup | None) -> ProcessDefinition | None:
        """Load one main process file; ``None`` when it has errors (they are in ``problems``)."""
        before = len(self.problems)
        read = self.read(file, "process", ((str(Path(file).resolve()), ""),))
        if read is None:
            return None
        spec, fragment = read
        reader = _FileReader(file, self.problems)
        name = reader.name(spec["process"], "'process'") or Path(file).stem
        initial = DEFAULT_INITIAL
        initial_loc = reader.loc(spec["process"])
        if "initial" in spec:
            initial = reader.name(spec["initial"], "'initial'") or DEFAULT_INITIAL
            initial_loc = reader.loc(spec["initial"])
        if Path(file).stem != name:
            reader.report(
                spec["process"],
                f"process {name!r} is in a file named {Path(file).name!r}; "
                f"name the file {name}.yaml so people find it",
                WARNING,
            )
        decl = Declarations(
            file=file,
            name=name,
            initial=initial,
            initial_location=initial_loc,
            states=fragment.states,
            events=fragment.events,
            transitions=fragment.transitions,
        )
        self.problems += check_declarations(decl, registry=registry)
        if has_errors(self.problems[before:]):
            return None
        return ProcessDefinition(
            name=name,
            initial=initial,
            states={s.name: s for s in fragment.states},
            events={e.name: e for e in fragment.events},
            transitions=tuple(fragment.transitions),
            files=tuple(fragment.files),
        )

    def check_subprocess(self, file: str, registry: PluginLookup | None) -> None:
        """Check a sub-process file without the file that includes it (so no reference,
        reachability or unused-event checks: those names may live in the including file)."""
        read = self.read(file, "subprocess", ((str(Path(file).resolve()), ""),))
        if read is not None:
            spec, fragment = read
            name = _FileReader(file, self.problems).name(spec["subprocess"], "'subprocess'")
            decl = Declarations(
                file=file,
                name=name or Path(file).stem,
                states=fragment.states,
                events=fragment.events,
                transitions=fragment.transitions,
            )
            self.problems += check_declarations(decl, registry=registry, complete=False)

    def unique_problems(self) -> list[ProcessProblem]:
        """A sub-process included by four main processes reports its problems once."""
        return list(dict.fromkeys(self.problems))


def _log_warnings(problems: Iterable[ProcessProblem]) -> None:
    for p in problems:
        if not p.is_error:
            log.warning("%s", p)


def _raise_or_warn(problems: list[ProcessProblem]) -> None:
    if has_errors(problems):
        raise ProcessDefinitionError(problems)
    _log_warnings(problems)


def load_process(
    path: str | os.PathLike[str], registry: PluginLookup | None = None
) -> ProcessDefinition:
    """Load and check one main process file with its includes.

    Raises ``ProcessDefinitionError`` listing every error (warnings are logged). With a
    ``registry`` every command and condition name must be registered there.
    """
    session = _Session()
    definition = session.load(os.fspath(path), registry)
    problems = session.unique_problems()
    _raise_or_warn(problems)
    assert definition is not None
    return definition


def process_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every YAML file under ``directory`` (sorted, recursive), main or sub-process."""
    root = Path(directory)
    return sorted(p for suffix in PROCESS_SUFFIXES for p in root.rglob(f"*{suffix}") if p.is_file())


def _main_files(session: _Session, directory: str | os.PathLike[str]) -> list[str]:
    """Main process files of a directory; files that are neither main nor sub-process files
    (or do not parse) are reported, since nobody can tell what they were meant to be."""
    if not Path(directory).is_dir():
        session.problems.append(
            ProcessProblem(os.fspath(directory), None, "process directory does not exist")
        )
        return []
    mains = []
    for path in process_files(directory):
        file = os.fspath(path)
        kind = session.kind(file)
        if kind == "process":
            mains.append(file)
        elif kind is None and session.root(file) is not None:
            session.problems.append(
                ProcessProblem(
                    file, 1, "not a process file: expected 'process: <Name>' or 'subprocess:'"
                )
            )
    return mains


def _load_all(
    session: _Session, files: Iterable[str], registry: PluginLookup | None
) -> dict[str, ProcessDefinition]:
    loaded: dict[str, ProcessDefinition] = {}
    for file in files:
        definition = session.load(file, registry)
        if definition is None:
            continue
        if definition.name in loaded:
            session.problems.append(
                ProcessProblem(
                    file,
                    1,
                    f"process {definition.name!r} is also defined in "
                    f"{loaded[definition.name].files[0]}",
                )
            )
            continue
        loaded[definition.name] = definition
    return loaded


def load_processes(
    directory: str | os.PathLike[str], registry: PluginLookup | None = None
) -> dict[str, ProcessDefinition]:
    """Every main process under ``directory`` by name; sub-process files are loaded through
    the main files that include them. Raises ``ProcessDefinitionError`` with every error of
    every file, so one broken file cannot hide another."""
    session = _Session()
    loaded = _load_all(session, _main_files(session, directory), registry)
    _raise_or_warn(session.unique_problems())
    return loaded


def load_named_process(
    directory: str | os.PathLike[str], name: str, registry: PluginLookup | None = None
) -> ProcessDefinition:
    """Load only the process called ``name`` from ``directory`` (a broken sibling process does
    not stop you from drawing or running this one). Raises ``UnknownProcessError`` listing the
    names there are, or ``ProcessDefinitionError``."""
    session = _Session()
    mains = _main_files(session, directory)
    names: dict[str, str] = {}
    for file in mains:
        root = session.root(file)
        assert isinstance(root, MappingNode)  # _main_files only returns parsed mappings
        for key, value in root.value:
            if (
                isinstance(key, ScalarNode)
                and key.value == "process"
                and isinstance(value, ScalarNode)
            ):
                names.setdefault(str(value.value), file)
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise UnknownProcessError(
            f"no process {name!r} in {os.fspath(directory)} (processes there: {known})"
        )
    return load_process(names[name], registry)


def check_files(
    paths: Iterable[str | os.PathLike[str]], registry: PluginLookup | None = None
) -> list[ProcessProblem]:
    """Every problem (errors and warnings) in ``paths``; never raises for what is in the files.

    A directory stands for its main process files; a sub-process file given on its own is
    checked for what it can be checked without its including file (shape, duplicates, plugins).
    """
    session = _Session()
    files: list[str] = []
    for raw in paths:
        path = os.fspath(raw)
        files += _main_files(session, path) if Path(path).is_dir() else [path]
    mains = []
    for file in dict.fromkeys(files):
        if session.kind(file) == "subprocess":
            session.check_subprocess(file, registry)
        else:
            mains.append(file)
    _load_all(session, mains, registry)
    return session.unique_problems()
