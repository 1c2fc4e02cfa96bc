"""meterline.anomaly_demo: what `make demo` prints about injected abuse."""

from __future__ import annotations

from meterline.anomaly_demo import inject_and_report
from meterline.core.anomaly import AnomalySettings


def test_report_says_what_was_caught_with_explanations() -> None:
    lines = inject_and_report()
    text = "\n".join(lines)
    assert lines[-1] == "anomalies: 5 of 5 incidents caught, 0 false alert(s) over 630 series-days"
    for what in ("abuse spike", "slow abuse ramp", "went silent"):
        assert f"caught  {what}" in text
    assert text.count("early warning") >= 3  # spikes flagged before their window was final
    explained = [line for line in lines if line.startswith("          ")]
    assert len(explained) == 5
    assert all("expected" in line and "normal" in line and "score" in line
               for line in explained)
    assert any(" down " in line and "observed 0" in line for line in explained)


def test_report_names_what_was_missed() -> None:
    lines = inject_and_report(settings=AnomalySettings(min_abs_deviation=1e9))
    assert sum(line.startswith("  MISSED") for line in lines) == 5
    assert lines[-1].startswith("anomalies: 0 of 5 incidents caught")
