"""The Grafana dashboards' shape: what Grafana needs to load them as provisioned, and
what it needs to interpolate their queries. Their queries against real data:
tests/integration/test_dashboards.py."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.helpers import DEPLOY
from tests.helpers import REPO_ROOT as ROOT

GRAFANA = DEPLOY / "grafana"
BOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}")
BUILTIN_VARIABLES = {"__field", "__data", "__url_time_range"}


def datasource_uid() -> str:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/influxdb.yaml").read_text())
    [source] = provisioned["datasources"]
    return source["uid"]


def queries(board: dict):
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            yield f"variable {var['name']}", var["query"]
    for annotation in board["annotations"]["list"]:
        if "target" in annotation:
            yield f"annotation {annotation['name']}", annotation["target"]["query"]
    for panel in board["panels"]:
        for target in panel["targets"]:
            yield f"panel {panel['title']}", target["query"]


def test_the_three_dashboards_exist_with_unique_uids():
    uids = [json.loads(p.read_text())["uid"] for p in BOARDS]
    assert sorted(uids) == ["mlpe-fleet", "mlpe-job", "mlpe-node"]


def test_compose_mounts_the_folder_the_provider_reads():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/mlpe.yaml").read_text())
    [entry] = provider["providers"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1)
                  for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == entry["options"]["path"]


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_every_query_uses_the_provisioned_datasource_and_known_variables(path):
    board = json.loads(path.read_text())
    uid = datasource_uid()
    defined = {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
    for where, query in queries(board):
        used = set(VARIABLE.findall(query)) - BUILTIN_VARIABLES
        assert used <= defined, f"{where}: undefined {used - defined}"
        assert "range(start: v.timeRangeStart, stop: v.timeRangeStop)" in query or \
            "start: v.timeRangeStart" in query, f"{where}: not bound to the time range"


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_panels_have_unique_ids_and_do_not_overlap(path):
    board = json.loads(path.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in board["panels"]]
    assert len(titles) == len(set(titles)), "titles name panels in the query test"
    taken: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_alerts_are_annotations(path):
    board = json.loads(path.read_text())
    [alerts] = [a for a in board["annotations"]["list"] if a["name"] == "Alerts"]
    assert alerts["enable"] and alerts["datasource"]["uid"] == datasource_uid()
    assert 'r._measurement == "alert"' in alerts["target"]["query"]
    assert {k: m["value"] for k, m in alerts["mappings"].items()} == {
        "time": "_time", "text": "text", "tags": "tags"}
