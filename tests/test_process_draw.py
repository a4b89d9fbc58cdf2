"""Drawings: the DOT is real Graphviz input with exactly the process's states and edges."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydot
import pytest

from ratepay_oms.engine.plugins import PluginRegistry
from ratepay_oms.errors import OmsError
from ratepay_oms.process import load_process
from ratepay_oms.process.draw import draw, render, to_dot, to_mermaid
from ratepay_oms.process.model import ProcessDefinition

VALID = Path(__file__).parent / "processes" / "valid"


@pytest.fixture(scope="module")
def invoice() -> ProcessDefinition:
    return load_process(VALID / "Invoice01.yaml")


def _unquote(name: str) -> str:
    assert name.startswith('"') and name.endswith('"'), name
    return name[1:-1].replace('\\"', '"').replace("\\\\", "\\")


def _parse(source: str) -> pydot.Dot:
    graphs = pydot.graph_from_dot_data(source)
    assert graphs is not None and len(graphs) == 1
    return graphs[0]


def _nodes(graph: pydot.Dot) -> dict[str, pydot.Node]:
    """State nodes by name (pydot also lists the ``node``/``edge``/``graph`` defaults)."""
    return {
        _unquote(n.get_name()): n
        for n in graph.get_nodes()
        if n.get_name() not in ("node", "edge", "graph")
    }


def _edges(graph: pydot.Dot) -> dict[tuple[str, str], list[pydot.Edge]]:
    found: dict[tuple[str, str], list[pydot.Edge]] = {}
    for e in graph.get_edges():
        found.setdefault((_unquote(e.get_source()), _unquote(e.get_destination())), []).append(e)
    return found


def test_dot_has_exactly_the_states_and_transitions(invoice: ProcessDefinition) -> None:
    graph = _parse(to_dot(invoice))
    assert set(_nodes(graph)) == set(invoice.states)
    edges = _edges(graph)
    assert sum(len(v) for v in edges.values()) == len(invoice.transitions)
    assert {(t.source, t.target) for t in invoice.transitions} == set(edges)


def test_dot_styles_happy_eventless_final_and_labels(invoice: ProcessDefinition) -> None:
    graph = _parse(to_dot(invoice))
    edges = _edges(graph)
    (ship,) = edges[("ready for shipment", "shipped")]
    assert ship.get("style") == '"bold"'
    assert ship.get("label") == '"ship (manual)"'
    (timeout,) = edges[("Return - ready for refund", "completed")]
    assert "(timeout 90 days)" in timeout.get("label")
    (polled,) = edges[("Return - refund succeeded", 'ready "quoted" state')]
    assert polled.get("style") == '"dashed"'
    assert "[Shop/IsArchived]" in polled.get("label")
    (request, _fallback) = (
        edges[("payment request initialized", "ready for shipment")]
        + edges[("payment request initialized", "payment request invalid")]
    )
    assert "(on enter)" in request.get("label")
    assert "c: Ratepay/PaymentRequest" in request.get("label")
    finals = {name for name, n in _nodes(graph).items() if n.get("peripheries") == "2"}
    assert finals == {s for s in invoice.states if invoice.is_final(s)}
    assert "missing plugin" not in to_dot(invoice)


def test_missing_plugins_are_red_when_a_registry_is_given(invoice: ProcessDefinition) -> None:
    registry = PluginRegistry()
    registry.register_condition("Ratepay/IsRefunded", lambda ctx, order, item: True)
    edges = _edges(_parse(to_dot(invoice, registry=registry)))
    (cancel,) = edges[("ready for shipment", "ready for cancel")]
    assert "c: Ratepay/CancelOrder (missing plugin)" in cancel.get("label")
    assert cancel.get("color") == '"#c62828"'
    refund = edges[("Return - ready for refund", "Return - refund succeeded")][0]
    assert refund.get("label").endswith('\\n[Ratepay/IsRefunded]"')  # registered: not red
    (plain,) = edges[("ready for cancel", "cancelled")]
    assert plain.get("color") is None


def test_highlight_fills_states_with_their_count(invoice: ProcessDefinition) -> None:
    graph = _parse(to_dot(invoice, highlight={"shipped": 3, "new": 1}))
    by_name = _nodes(graph)
    assert by_name["shipped"].get("label") == '"shipped\\n3 items"'
    assert by_name["new"].get("label") == '"new\\n1 item"'
    assert by_name["shipped"].get("fillcolor") == '"#fff176"'
    assert by_name["completed"].get("fillcolor") is None


def test_mermaid_has_every_state_and_transition(invoice: ProcessDefinition) -> None:
    text = to_mermaid(invoice, highlight={"shipped": 2})
    assert text.startswith("flowchart TD\n")
    for name in invoice.states:
        assert f'"{name.replace(chr(34), "#quot;")}' in text
    arrows = [line for line in text.splitlines() if any(a in line for a in ("-->", "==>", "-.->"))]
    assert len(arrows) == len(invoice.transitions)
    assert "shipped<br>2 items" in text
    assert "ready #quot;quoted#quot; state" in text


def test_render_needs_graphviz(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no 'dot' on the PATH
    with pytest.raises(OmsError, match="apt-get install graphviz"):
        render("digraph { a -> b }")


def test_render_refuses_unknown_formats() -> None:
    with pytest.raises(OmsError, match="cannot render 'pdf'"):
        render("digraph { a -> b }", "pdf")


@pytest.mark.skipif(
    shutil.which("dot") is None and os.environ.get("CI") != "true",
    reason="Graphviz is not installed (under CI it must be: .ci/run installs it)",
)
def test_render_svg_and_png(invoice: ProcessDefinition) -> None:
    svg = draw(invoice, "svg")
    assert b"<svg" in svg and b"ready for refund" in svg
    assert draw(invoice, "png").startswith(b"\x89PNG")
    with pytest.raises(OmsError, match="Graphviz 'dot' failed"):
        render("digraph { a -> ")
