"""``ratepay-oms demo`` runs every flow against the in-process sandbox and exits 0."""

from __future__ import annotations

from ratepay_oms.cli import main


def test_demo_runs_every_flow_and_exits_zero(capsys, tmp_path):
    code = main(["demo", "--db", f"sqlite:///{tmp_path / 'demo.sqlite'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "every flow ended where it should" in out
    assert "WRONG" not in out
    for text in ("Worked example 100045", "payment request declined", "PAYMENT_CHANGE",
                 "CONFIRMATION_DELIVER", "CALCULATION_REQUEST"):
        assert text in out
    assert (tmp_path / "demo.sqlite").exists()
