"""Drawings of a process for people: Graphviz DOT (and SVG/PNG through ``dot``) and Mermaid.

The rules follow Spryker's back-office drawer, because that is what an OMS operator knows:
final states double-bordered, the happy path bold green, event-less (tick-driven) transitions
dashed, and commands or conditions that no plugin implements in red, which makes the drawing a
free lint. ``highlight`` ({state: item count}) shows where items of an order (or of the whole
shop) currently sit.

Mermaid needs no system package, so it is the drawing that always works; DOT is the richer one.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ratepay_oms.process.checks import PluginLookup
from ratepay_oms.process.errors import RenderError
from ratepay_oms.process.loader import format_timeout
from ratepay_oms.process.model import ProcessDefinition, TransitionDef

log = logging.getLogger(__name__)

HAPPY_COLOR = "#2e7d32"
MISSING_COLOR = "#c62828"
HIGHLIGHT_COLOR = "#fff176"
RESERVED_COLOR = "#1565c0"
RENDER_FORMATS = ("svg", "png")
MISSING = "missing plugin"


@dataclass(frozen=True)
class _Edge:
    """What one transition looks like, shared by the DOT and Mermaid writers."""

    transition: TransitionDef
    lines: tuple[str, ...]
    missing_plugin: bool

    @property
    def happy(self) -> bool:
        return self.transition.happy

    @property
    def eventless(self) -> bool:
        return self.transition.event is None


def _edges(definition: ProcessDefinition, registry: PluginLookup | None) -> list[_Edge]:
    edges = []
    for t in definition.transitions:
        lines: list[str] = []
        missing = False
        if t.event is not None:
            event = definition.events.get(t.event)
            head = t.event
            if event is not None:
                if event.manual:
                    head += " (manual)"
                if event.on_enter:
                    head += " (on enter)"
                if event.timeout is not None:
                    head += f" (timeout {format_timeout(event.timeout)})"
            lines.append(head)
            if event is not None and event.command is not None:
                command = f"c: {event.command}"
                if registry is not None and not registry.has_command(event.command):
                    command += f" ({MISSING})"
                    missing = True
                lines.append(command)
        if t.condition is not None:
            condition = f"[{t.condition}]"
            if registry is not None and not registry.has_condition(t.condition):
                condition += f" ({MISSING})"
                missing = True
            lines.append(condition)
        edges.append(_Edge(t, tuple(lines), missing))
    return edges


def _count_label(count: int) -> str:
    return f"{count} item" if count == 1 else f"{count} items"


def _state_lines(
    definition: ProcessDefinition, name: str, highlight: Mapping[str, int]
) -> list[str]:
    lines = [name]
    flags = sorted(definition.states[name].flags)
    if flags:
        lines.append("{" + ", ".join(flags) + "}")
    if name in highlight:
        lines.append(_count_label(highlight[name]))
    return lines


def _warn_unknown(definition: ProcessDefinition, highlight: Mapping[str, int]) -> None:
    for name in highlight:
        if name not in definition.states:
            log.warning("highlighted state %r is not a state of %s", name, definition.name)


# -- DOT --------------------------------------------------------------------------------------
def dot_quote(text: str) -> str:
    """A DOT quoted string; names carry spaces, quotes and (rarely) backslashes."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dot_label(lines: list[str] | tuple[str, ...]) -> str:
    return dot_quote("\n".join(lines))


def _dot_attrs(attrs: Mapping[str, str]) -> str:
    return "[" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + "]"


def to_dot(
    definition: ProcessDefinition,
    *,
    registry: PluginLookup | None = None,
    highlight: Mapping[str, int] | None = None,
) -> str:
    """The process as a Graphviz digraph; node IDs are the state names (quoted)."""
    highlight = highlight or {}
    _warn_unknown(definition, highlight)
    out = [
        f"digraph {dot_quote(definition.name)} {{",
        f"  graph [label={dot_quote(definition.name)}, labelloc=t, fontname=Helvetica];",
        "  node [shape=box, style=rounded, fontname=Helvetica, fontsize=11];",
        "  edge [fontname=Helvetica, fontsize=9];",
    ]
    for name, state in definition.states.items():
        attrs = {"label": _dot_label(_state_lines(definition, name, highlight))}
        if definition.is_final(name):
            attrs["peripheries"] = "2"
        if state.reserved:
            attrs["color"] = dot_quote(RESERVED_COLOR)
        if name in highlight:
            attrs["style"] = '"rounded,filled"'
            attrs["fillcolor"] = dot_quote(HIGHLIGHT_COLOR)
        out.append(f"  {dot_quote(name)} {_dot_attrs(attrs)};")
    for edge in _edges(definition, registry):
        t = edge.transition
        attrs = {"label": _dot_label(edge.lines)} if edge.lines else {}
        styles = []
        if edge.happy:
            styles.append("bold")
            attrs.update(color=dot_quote(HAPPY_COLOR), penwidth="2", weight="10")
        if edge.eventless:
            styles.append("dashed")
        if styles:
            attrs["style"] = dot_quote(",".join(styles))
        if edge.missing_plugin:
            attrs.update(color=dot_quote(MISSING_COLOR), fontcolor=dot_quote(MISSING_COLOR))
        suffix = f" {_dot_attrs(attrs)}" if attrs else ""
        out.append(f"  {dot_quote(t.source)} -> {dot_quote(t.target)}{suffix};")
    out.append("}")
    return "\n".join(out) + "\n"


# -- Mermaid ----------------------------------------------------------------------------------
def mermaid_text(text: str) -> str:
    """Text for inside a Mermaid ``"…"`` label: quotes and markup as entity codes."""
    for char, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, code)
    return text


def _mermaid_label(lines: list[str] | tuple[str, ...]) -> str:
    return '"' + "<br>".join(mermaid_text(line) for line in lines) + '"'


def to_mermaid(
    definition: ProcessDefinition,
    *,
    registry: PluginLookup | None = None,
    highlight: Mapping[str, int] | None = None,
) -> str:
    """The process as a Mermaid flowchart (renders in GitHub, GitLab and most wikis).

    Node IDs are ``s0, s1, …`` because Mermaid IDs cannot hold spaces; the labels carry the
    state names.
    """
    highlight = highlight or {}
    _warn_unknown(definition, highlight)
    ids = {name: f"s{i}" for i, name in enumerate(definition.states)}
    out = ["flowchart TD"]
    for name in definition.states:
        label = _mermaid_label(_state_lines(definition, name, highlight))
        # final states as Mermaid's "subroutine" box: a double border, as in the DOT drawing
        shape = f"[[{label}]]" if definition.is_final(name) else f"({label})"
        out.append(f"  {ids[name]}{shape}")
    styles = []
    for index, edge in enumerate(_edges(definition, registry)):
        t = edge.transition
        arrow = "-.->" if edge.eventless else ("==>" if edge.happy else "-->")
        label = f"|{_mermaid_label(edge.lines)}|" if edge.lines else ""
        source, target = ids.get(t.source, "missing"), ids.get(t.target, "missing")
        out.append(f"  {source} {arrow}{label} {target}")
        if edge.missing_plugin:
            styles.append(f"  linkStyle {index} stroke:{MISSING_COLOR},color:{MISSING_COLOR}")
        elif edge.happy:
            styles.append(f"  linkStyle {index} stroke:{HAPPY_COLOR},stroke-width:3px")
    for name in definition.states:
        if name in highlight:
            styles.append(f"  style {ids[name]} fill:{HIGHLIGHT_COLOR}")
    return "\n".join(out + styles) + "\n"


# -- images -----------------------------------------------------------------------------------
def render(dot_source: str, fmt: str = "svg", *, timeout: float = 60.0) -> bytes:
    """SVG or PNG bytes from DOT source, through the Graphviz ``dot`` program."""
    if fmt not in RENDER_FORMATS:
        raise RenderError(f"cannot render {fmt!r}; choose one of {', '.join(RENDER_FORMATS)}")
    dot = shutil.which("dot")
    if dot is None:
        raise RenderError(
            "Graphviz 'dot' is not installed: apt-get install graphviz "
            "(or draw with --format mermaid, which needs nothing)"
        )
    try:
        done = subprocess.run(
            [dot, f"-T{fmt}"],
            input=dot_source.encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RenderError(f"Graphviz 'dot' took longer than {timeout:g} s") from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise RenderError(f"Graphviz 'dot' failed: {message}")
    return done.stdout


DRAW_FORMATS = ("dot", "mermaid", *RENDER_FORMATS)


def draw(
    definition: ProcessDefinition,
    fmt: str = "dot",
    *,
    registry: PluginLookup | None = None,
    highlight: Mapping[str, int] | None = None,
) -> bytes:
    """One entry for every drawing format (``dot``, ``mermaid``, ``svg``, ``png``), as bytes
    ready for a file or stdout; the console's draw commands all go through here."""
    if fmt == "mermaid":
        return to_mermaid(definition, registry=registry, highlight=highlight).encode("utf-8")
    source = to_dot(definition, registry=registry, highlight=highlight)
    if fmt == "dot":
        return source.encode("utf-8")
    return render(source, fmt)
