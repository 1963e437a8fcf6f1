"""The shipped Grafana dashboard queries only metrics the coordinator exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedgen.coordinator.metrics import FederationMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "fedgen-dashboard.json"
METRIC = re.compile(r"\b((?:fedgen|grpc_server)_[a-z0-9_]+)")
SUFFIX = re.compile(r"_(bucket|count|sum|total)$")


def test_every_panel_queries_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families = {family.name for family in FederationMetrics().registry.collect()}
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {SUFFIX.sub("", name) for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) >= 10
    assert used <= families, used - families
