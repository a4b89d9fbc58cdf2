"""The process drawing for the order page: Graphviz SVG, inline, with the order's states marked.

Rendering runs ``dot`` (~0.1 s), so drawings are cached per process and marking; the marking
is item counts per state, so an order whose items move gets a new drawing. Without Graphviz
the page shows the Mermaid text instead (``process draw`` needs nothing either).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from markupsafe import Markup

from ratepay_oms.process.draw import render, to_dot, to_mermaid
from ratepay_oms.process.errors import RenderError
from ratepay_oms.process.model import ProcessDefinition

_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.DOTALL)


@functools.lru_cache(maxsize=128)
def _svg(dot_source: str) -> str:
    svg = render(dot_source, "svg").decode("utf-8")
    # Inline in HTML: drop the XML declaration, DOCTYPE and the comments before <svg>.
    return _PROLOG.sub("", svg, count=1)


def process_svg(
    definition: ProcessDefinition, highlight: Mapping[str, int]
) -> tuple[Markup | None, str | None]:
    """(inline SVG, ``None``) or, without Graphviz, (``None``, Mermaid text to show instead).

    The SVG is Graphviz's output for our own DOT source: labels are state and event names from
    the process files, escaped by Graphviz; nothing from an order reaches it but counts.
    """
    counts = {k: v for k, v in highlight.items() if k in definition.states}
    source = to_dot(definition, highlight=counts)
    try:
        return Markup(_svg(source)), None  # Graphviz output of our own DOT
    except RenderError:
        return None, to_mermaid(definition, highlight=counts)
