"""Monitoring: the Prometheus endpoints of every process, the gRPC status counters, the targets files, the
alert rules (promtool), the Grafana dashboard, and a real Prometheus scraping a real training run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client import generate_latest

from learners.config import ConfigError, TrainConfig
from learners.peer.client import PeerClient
from learners.peer.endpoint import PeerEndpoint
from learners.peer.service import serve
from learners.learner import Learner
from learners.peer.sync import SyncPoint
from learners.telemetry.coordinator import CoordinatorTelemetry, RunProgress
from learners.telemetry.actor import ActorTelemetry, EvaluatorTelemetry
from learners.telemetry.learner import LearnerTelemetry
from learners.telemetry.metrics import metrics_port, ports_needed
from tests.helpers import free_port, synthetic_rollout, system_tool

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "provisioning" / "dashboards" / "mdpo-training.json"
ROLES = ("coordinator", "learner", "actor", "evaluator")


def tool(name: str) -> str:
    return system_tool(name, "Debian package prometheus")


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    """Value of the first exposition line of `name` whose labels include `labels`."""
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if match and match.group(1) == name:
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
            if all(have.get(k) == str(v) for k, v in labels.items()):
                return float(match.group(4))
    return None


# ------------------------------------------------------------------------------ dashboard & rules
def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def rule_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    return [(rule.get("alert") or rule.get("record"), rule["expr"]) for g in groups for rule in g["rules"]]


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                   "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and durations left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                    # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)                             # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)                            # range windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)   # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group(0).lower() in PROMQL_KEYWORDS:
            continue                                                   # a function call or a keyword
        names.add(match.group(0))
    return names


def all_telemetry(tmp_path: Path) -> list:
    cfg = TrainConfig(metrics_port=-1, run_id="t")
    return [CoordinatorTelemetry(cfg, tmp_path / "run"), LearnerTelemetry(cfg, 0), ActorTelemetry(cfg, 0, 0),
            EvaluatorTelemetry(cfg, 0)]


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
            "info": ("_info",), "gauge": ("",), "unknown": ("",)}


def exported_names(telemetry: list) -> set[str]:
    """Every sample name the code's registries can expose (prometheus_client's families plus their suffixes)."""
    names = set()
    for t in telemetry:
        for family in t.registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def test_promql_metric_name_extraction():
    assert metric_names('sum by (le, run_id) (rate(a_bucket{x="y(z)"}[$__rate_interval])) / on (j) b') == {"a_bucket", "b"}
    assert metric_names("time() - c > 300 or d != d or abs(e) == Inf") == {"c", "d", "e"}
    assert metric_names("histogram_quantile(0.5, f) offset 5m") == {"f"}


def test_every_metric_in_the_dashboard_and_the_rules_is_exported_by_the_code(tmp_path):
    exported = exported_names(all_telemetry(tmp_path))
    generated_by_prometheus = {"up"}
    used = {name: expr for _, expr in dashboard_queries() + rule_queries() for name in metric_names(expr)}
    assert len(used) > 30, used
    missing = {name: expr for name, expr in used.items() if name not in exported | generated_by_prometheus}
    assert not missing, f"queries name metrics the code does not export: {missing}"
    roles_shown = {name.split("_")[1] for name in used if name.startswith("mdpo_")}
    assert roles_shown == {"coordinator", "learner", "actor", "evaluator", "distill", "grpc", "probe"}


def test_metric_names_follow_prometheus_conventions(tmp_path):
    for t in all_telemetry(tmp_path):
        for family in t.registry.collect():
            if not family.name.startswith("mdpo_"):
                assert family.name.startswith("process_"), family.name     # prometheus_client's process metrics
                continue
            assert re.fullmatch(r"mdpo_[a-z0-9_]+", family.name), family.name
            assert family.name.split("_")[1] in ("coordinator", "learner", "actor", "evaluator", "distill", "grpc",
                                                 "probe", "run"), family.name
            if family.type == "counter":
                assert not family.name.endswith("_total")   # prometheus_client appends it to the sample
            else:
                assert not family.name.endswith("_total"), f"only counters end in _total: {family.name}"
            if family.type == "histogram":
                assert family.name.endswith(("_seconds", "_steps")), f"histogram without a unit: {family.name}"
            assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", family.name), f"not a base unit: {family.name}"
            for s in family.samples:
                assert s.labels["run_id"] == "t" and s.labels["role"] == t.role, (family.name, s.labels)
                if t.role in ("learner", "actor", "evaluator"):
                    assert s.labels["learner_id"] == "0"


def dashboard_module():
    spec = importlib.util.spec_from_file_location("mdpo_dashboard", GRAFANA_DIR / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_generated_and_complete():
    from grafana_foundation_sdk.models.dashboard import Dashboard

    module = dashboard_module()
    assert isinstance(module.build(), Dashboard), "built with Grafana's SDK"
    assert DASHBOARD.read_text() == module.render(), "run `python deploy/grafana/dashboard.py` after editing it"
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] == "MDPO training" and board["uid"] == "mdpo-training"
    assert (board["refresh"], board["time"], board["graphTooltip"]) == ("10s", {"from": "now-1h", "to": "now"}, 1)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for topic in ("steps per second", "train vs test return", "generalization gap", "policy and value loss",
                  "kl to peer", "sync latency", "sync traffic", "processes up", "live workers", "restarts"):
        assert topic in titles, topic
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run_id"]["allValue"] == ".*"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"] and panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert set(re.findall(r"\$\w+", target["expr"])) <= {"$run_id", "$__rate_interval"}, target["expr"]
            assert '{run_id=~"$run_id"' in target["expr"], target["expr"]


def test_dashboard_is_the_panels_table_laid_out_on_the_grid():
    """The JSON is PANELS, row by row in order: every title, type, unit, description and query (refIds A, B...), the
    rows open with their panels after them, no two panels overlapping on Grafana's 24-column grid."""
    module, board = dashboard_module(), json.loads(DASHBOARD.read_text())
    expected = []
    for row_title, row in module.PANELS:
        expected.append(("row", row_title, None, None, []))
        expected += [(kind, title, unit, description, [(chr(ord("A") + i), expr, legend, True, False)
                                                       for i, (expr, legend) in enumerate(targets)])
                     for title, kind, unit, description, targets in row]
    assert [(p["type"], p["title"], p.get("fieldConfig", {}).get("defaults", {}).get("unit"), p.get("description"),
             [(t["refId"], t["expr"], t["legendFormat"], t["range"], t["instant"]) for t in p.get("targets", [])])
            for p in board["panels"]] == expected
    assert all(not p["collapsed"] and p["panels"] == [] for p in board["panels"] if p["type"] == "row")
    cells = {}
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]}"
            cells[cell] = panel["title"]
    by_title = {p["title"]: p for p in board["panels"]}
    (override,) = by_title["Actors: rollout time and inference share"]["fieldConfig"]["overrides"]
    assert override == {"matcher": {"id": "byRegexp", "options": "inference share.*"}, "properties": [
        {"id": "custom.axisPlacement", "value": "right"}, {"id": "unit", "value": "percentunit"}]}
    thresholds = by_title["Seconds since last progress"]["fieldConfig"]["defaults"]["thresholds"]
    assert thresholds == {"mode": "absolute", "steps": [
        {"color": "green", "value": None}, {"color": "orange", "value": 120}, {"color": "red", "value": 300}]}
    run_id = board["templating"]["list"][1]
    assert run_id["name"] == "run_id" and run_id["type"] == "query" and run_id["multi"] and run_id["includeAll"]
    assert run_id["query"]["query"] == "label_values(mdpo_coordinator_iteration, run_id)"
    assert [a["name"] for a in board["annotations"]["list"] if a.get("builtIn") == 1] == ["Annotations & Alerts"]


def test_mechanism_row_shows_every_probe_metric_the_coordinator_exports(tmp_path):
    """The "Mechanism (probe set)" row queries the coordinator's mdpo_probe_* gauges, all of them, and nothing else."""
    board = json.loads(DASHBOARD.read_text())
    rows = [i for i, p in enumerate(board["panels"]) if p["type"] == "row"] + [len(board["panels"])]
    (start, end), = [(a, b) for a, b in zip(rows, rows[1:]) if board["panels"][a]["title"] == "Mechanism (probe set)"]
    panels = board["panels"][start + 1:end]
    queried = {name for p in panels for t in p["targets"] for name in metric_names(t["expr"])}
    coordinator = CoordinatorTelemetry(TrainConfig(metrics_port=-1, run_id="t"), tmp_path / "run")
    exported = {family.name for family in coordinator.registry.collect() if family.name.startswith("mdpo_probe_")}
    assert queried == exported == {"mdpo_probe_robustness_tv", "mdpo_probe_render_cka", "mdpo_probe_agreement_tv",
                                   "mdpo_probe_cka", "mdpo_probe_weights_version"}
    legends = {t["expr"]: t["legendFormat"] for p in panels for t in p["targets"]}
    assert "{{learner_id}}" in legends[f'mdpo_probe_robustness_tv{{run_id=~"$run_id"}}']
    assert "{{variant}}" in legends[f'mdpo_probe_render_cka{{run_id=~"$run_id"}}']
    assert "{{learner_a}}" in legends[f'mdpo_probe_cka{{run_id=~"$run_id"}}']
    assert "{{learner_b}}" in legends[f'mdpo_probe_agreement_tv{{run_id=~"$run_id"}}']


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    sources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    by_uid = {s["uid"]: s for s in sources["datasources"]}
    assert by_uid["mdpo-prometheus"]["type"] == "prometheus"
    assert by_uid["mdpo-prometheus"]["url"] == "http://prometheus:9090" and by_uid["mdpo-prometheus"]["isDefault"]
    assert by_uid["mdpo-prometheus-local"]["url"] == "http://localhost:9090"
    board = json.loads(DASHBOARD.read_text())
    assert board["templating"]["list"][0]["current"]["value"] in by_uid
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "mdpo.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/etc/grafana/provisioning/dashboards"   # where DASHBOARD is mounted


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_check_config(config):
    proc = subprocess.run([tool("promtool"), "check", "config", config], cwd=PROM_DIR, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout and "alerts.yml" in proc.stdout


def test_promtool_check_rules():
    proc = subprocess.run([tool("promtool"), "check", "rules", "alerts.yml"], cwd=PROM_DIR, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"SUCCESS: \d+ rules found", proc.stdout)
    alerts = {name for name, _ in rule_queries()}
    assert {"MDPONoTrainingProgress", "MDPOLearnerDown", "MDPONonFiniteLoss", "MDPOKLToPeerExploding",
            "MDPOActorRestartsRising"} <= alerts


def test_promtool_unit_tests_of_the_alert_rules():
    """Each alert fires on a synthetic series of its failure, and not before (deploy/prometheus/alerts_test.yml)."""
    proc = subprocess.run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM_DIR, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM_DIR / "alerts_test.yml").read_text()))
    assert tested == {name for name, _ in rule_queries()}, "every alert rule needs a unit test"


# ------------------------------------------------------------------------------------ endpoints
def test_port_scheme_is_contiguous_per_run_and_zero_means_free_ports():
    cfg = TrainConfig(num_learners=2, num_actors=3, metrics_port=9500)
    ports = [metrics_port(cfg, "coordinator")]
    ports += [metrics_port(cfg, "learner", i) for i in range(2)] + [metrics_port(cfg, "evaluator", i) for i in range(2)]
    ports += [metrics_port(cfg, "actor", i, a) for i in range(2) for a in range(3)]
    assert ports == list(range(9500, 9500 + ports_needed(cfg)))
    assert (ports[0], ports[1], ports[3], ports[5], ports[8]) == (9500, 9501, 9503, 9505, 9508)
    free = TrainConfig(metrics_port=0)
    assert {metrics_port(free, role, 1, 1) for role in ROLES} == {0}
    for bad in (-2, 65535):
        with pytest.raises(ConfigError, match="--metrics-port"):
            TrainConfig(env_id="CartPole-v1", metrics_port=bad).validate()


def test_endpoints_survive_repeated_runs_in_one_process_and_a_taken_port(tmp_path):
    cfg = TrainConfig(metrics_port=0, run_id="again")
    first = LearnerTelemetry(cfg, 0)
    second = LearnerTelemetry(cfg, 0)            # same names and labels: a second run in this process
    try:
        first.samples.inc(3)
        second.samples.inc(5)
        assert sample(scrape(first.address), "mdpo_learner_samples_trained_total", run_id="again") == 3
        assert sample(scrape(second.address), "mdpo_learner_samples_trained_total", run_id="again") == 5
    finally:
        first.close()
        second.close()
    with socket.socket() as taken:                # a fixed port that is in use falls back to a free one
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        coordinator = CoordinatorTelemetry(TrainConfig(metrics_port=port, run_id="busy"), tmp_path / "run").serve()
        try:
            assert coordinator.address.startswith("127.0.0.1:") and coordinator.address != f"127.0.0.1:{port}"
            assert sample(scrape(coordinator.address), "mdpo_coordinator_iteration", run_id="busy") is not None
        finally:
            coordinator.close()


PROBE = {"weights_version": 12, "states": 256, "training_level_fraction": 0.0,
         "robustness_tv": {"no_backgrounds": [0.12, 0.10], "monochrome_assets": [0.2, 0.18]},
         "render_cka": {"no_backgrounds": [0.9, 0.92], "monochrome_assets": [0.7, 0.75]},
         "agreement_tv": {"0-1": 0.05}, "cka": {"0-1": 0.8}}


def probe_samples(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Every mdpo_probe_* sample of an exposition text: name -> [(labels, value)]."""
    found: dict[str, list] = {}
    for line in text.splitlines():
        match = re.match(r"^(mdpo_probe_\w+)\{(.*)\} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2)))
            found.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return found


def test_coordinator_exports_the_probe_measurements_once_one_is_made(tmp_path):
    """No mdpo_probe_* series before the first measurement (a 0 would read as perfect robustness); a record's
    "probe" block sets one gauge per agent and variant, one per pair of agents, and the weights version; an
    iteration without a measurement leaves the last one showing."""
    coordinator = CoordinatorTelemetry(TrainConfig(metrics_port=-1, run_id="probe"), tmp_path / "run")
    progress = RunProgress(iteration=1, env_steps=[512, 512], failures=0, learner_endpoints=[], actors=[],
                           evaluators=0)
    learners = [{"id": 0, "train_return": 1.0}, {"id": 1, "train_return": 2.0}]
    coordinator.on_iteration(progress, {"iteration": 1, "learners": learners})
    text = generate_latest(coordinator.registry).decode()
    assert probe_samples(text) == {}
    assert "# HELP mdpo_probe_robustness_tv Mean total-variation distance, in [0, 1]" in text   # described already

    coordinator.on_iteration(progress, {"iteration": 2, "learners": learners, "probe": PROBE})
    run = {"run_id": "probe", "role": "coordinator"}
    expected = {
        "mdpo_probe_weights_version": [(run, 12.0)],
        "mdpo_probe_robustness_tv": [({**run, "learner_id": str(i), "variant": variant}, value)
                                     for variant, values in PROBE["robustness_tv"].items()
                                     for i, value in enumerate(values)],
        "mdpo_probe_render_cka": [({**run, "learner_id": str(i), "variant": variant}, value)
                                  for variant, values in PROBE["render_cka"].items() for i, value in enumerate(values)],
        "mdpo_probe_agreement_tv": [({**run, "learner_a": "0", "learner_b": "1"}, 0.05)],
        "mdpo_probe_cka": [({**run, "learner_a": "0", "learner_b": "1"}, 0.8)],
    }
    exposed = probe_samples(generate_latest(coordinator.registry).decode())
    assert {name: sorted(s, key=str) for name, s in exposed.items()} == \
        {name: sorted(s, key=str) for name, s in expected.items()}
    assert coordinator.registry.get_sample_value("mdpo_probe_robustness_tv", {
        **run, "learner_id": "1", "variant": "monochrome_assets"}) == 0.18

    coordinator.on_iteration(progress, {"iteration": 3, "learners": learners})
    assert probe_samples(generate_latest(coordinator.registry).decode()) == exposed


def test_probe_gauges_take_every_pair_of_more_than_two_agents_and_envs_without_renderings(tmp_path):
    """Three agents on a non-Procgen env: no robustness block, a gauge for each of the three pairs."""
    coordinator = CoordinatorTelemetry(TrainConfig(metrics_port=-1, run_id="three"), tmp_path / "run")
    progress = RunProgress(iteration=1, env_steps=[0, 0, 0], failures=0, learner_endpoints=[], actors=[],
                           evaluators=0)
    probe = {"weights_version": 3, "states": 64, "training_level_fraction": 0.0, "robustness_tv": {},
             "agreement_tv": {"0-1": 0.1, "0-2": 0.2, "1-2": 0.3}, "cka": {"0-1": 0.9, "0-2": 0.8, "1-2": 0.7}}
    coordinator.on_iteration(progress, {"iteration": 1, "learners": [], "probe": probe})
    get = coordinator.registry.get_sample_value
    run = {"run_id": "three", "role": "coordinator"}
    for pair, value in probe["agreement_tv"].items():
        a, b = pair.split("-")
        assert get("mdpo_probe_agreement_tv", {**run, "learner_a": a, "learner_b": b}) == value
        assert get("mdpo_probe_cka", {**run, "learner_a": a, "learner_b": b}) == probe["cka"][pair]
    exposed = probe_samples(generate_latest(coordinator.registry).decode())
    assert set(exposed) == {"mdpo_probe_weights_version", "mdpo_probe_agreement_tv", "mdpo_probe_cka"}


def test_grpc_calls_are_counted_by_status_code_on_both_ends():
    cfg = TrainConfig(env_id="CartPole-v1", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1,
                      metrics_port=-1, run_id="grpc", rpc_timeout_s=10, sync_timeout_s=2)
    b = PeerEndpoint(Learner(cfg, 1, (4,), "float32", 2))
    server_tel, client_tel = LearnerTelemetry(cfg, 1), LearnerTelemetry(cfg, 0)
    server, port = serve(b, "127.0.0.1", 0, interceptors=(server_tel.grpc_server_interceptor(),))
    client = PeerClient(1, 0, f"127.0.0.1:{port}", 10, interceptors=client_tel.grpc_client_interceptors())
    dead = PeerClient(1, 0, f"127.0.0.1:{port}", 1, interceptors=client_tel.grpc_client_interceptors())
    try:
        client.wait_ready(10)
        b.connect([PeerClient(0, 1, "127.0.0.1:1", 10)])     # b accepts syncs from peer 0 (never calls it)
        rollout = synthetic_rollout(0, (4,), "float32", 2, 8, 4, seed=0)
        b.hold_frames(0, 0, [rollout])                        # peer 0's batch of iteration 0
        rows = np.arange(6)
        logits, _, _ = client.fetch_logits(SyncPoint(0, 0, 0, 0), rollout.digest, rows, keep_graph=False)
        assert logits.shape == (6, 2)
        with pytest.raises(grpc.RpcError) as refused:
            client.fetch_logits(SyncPoint(7, 0, 0, 0), rollout.digest, rows, keep_graph=False)   # unknown peer id
        code = refused.value.code().name
        assert code == "FAILED_PRECONDITION"
        server.stop(None).wait(5)
        with pytest.raises(grpc.RpcError) as unreachable:
            dead.fetch_logits(SyncPoint(0, 0, 0, 0), rollout.digest, rows, keep_graph=False)
        assert unreachable.value.code() == grpc.StatusCode.UNAVAILABLE

        def count(tel, metric, method, code):
            return tel.registry.get_sample_value(metric, {**tel.labels, "grpc_service": "mdpo.v2.Distill",
                                                            "grpc_method": method, "grpc_code": code})

        assert count(server_tel, "mdpo_grpc_server_handled_total", "PeerLogits", "OK") == 1
        assert count(server_tel, "mdpo_grpc_server_handled_total", "PeerLogits", "FAILED_PRECONDITION") == 1
        assert server_tel.registry.get_sample_value("mdpo_grpc_server_handled_total", {
            **server_tel.labels, "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_code": "OK"}) == 1
        assert server_tel.registry.get_sample_value("mdpo_grpc_server_handling_seconds_count", {
            **server_tel.labels, "grpc_service": "mdpo.v2.Distill", "grpc_method": "PeerLogits"}) == 2
        assert count(client_tel, "mdpo_grpc_client_handled_total", "PeerLogits", "OK") == 1
        assert count(client_tel, "mdpo_grpc_client_handled_total", "PeerLogits", "FAILED_PRECONDITION") == 1
        assert count(client_tel, "mdpo_grpc_client_handled_total", "PeerLogits", "UNAVAILABLE") == 1
    finally:
        for c in (client, dead):
            c.close()
        server.stop(None)
        b.close()


# ------------------------------------------------------------------------- Ray actors (slow)
@pytest.mark.slow
def test_killed_actor_is_restarted_counted_and_its_new_endpoint_listed(tmp_path):
    """A rollout actor killed by the OS comes back under Ray: its restart counter says 1, the targets file
    lists its new endpoint, and the coordinator's GCS view counts every worker live again."""
    import ray

    from learners.coordinator.loop import Coordinator

    cfg = TrainConfig(env_id="CartPole-v1", num_envs=4, num_steps=32, num_minibatches=2, update_epochs=1,
                      total_steps=256, eval_every=1, eval_episodes=2, eval_max_episode_steps=50, checkpoint_every=10,
                      actor_cpus=0.5, learner_cpus=0.5, metrics_port=0, progress=False)
    coordinator = Coordinator(cfg, tmp_path / "runs" / "restart")
    try:
        coordinator.start()
        telemetry = coordinator.telemetry
        assert telemetry.labels["run_id"] == "restart"
        printed = telemetry.describe_endpoints()
        for instance in ("coordinator", "learner-0", "learner-1", "actor-0-0", "actor-1-0", "evaluator-0", "evaluator-1"):
            assert f"{instance} " in printed and f"http://{telemetry.endpoints[instance]['address']}/metrics" in printed
        groups = json.loads((tmp_path / "runs" / "prometheus" / "restart.json").read_text())
        assert groups == json.loads((tmp_path / "runs" / "restart" / "prometheus_targets.json").read_text())
        assert {g["labels"]["role"] for g in groups} == set(ROLES) and len(groups) == 7
        victim = telemetry.endpoints["actor-0-0"]
        # The first actor of each learner hosts that learner's evaluator: same process, an endpoint of its own.
        for i in range(2):
            hosted = telemetry.endpoints[f"evaluator-{i}"]
            assert hosted["pid"] == telemetry.endpoints[f"actor-{i}-0"]["pid"]
            assert hosted["address"] != telemetry.endpoints[f"actor-{i}-0"]["address"]
        assert sample(scrape(victim["address"]), "mdpo_actor_restarts_total", learner_id=0, actor_id=0) == 0
        os.kill(victim["pid"], signal.SIGKILL)
        coordinator.run()
        reborn = telemetry.endpoints["actor-0-0"]
        assert reborn["pid"] != victim["pid"]
        groups = json.loads((tmp_path / "runs" / "prometheus" / "restart.json").read_text())
        assert reborn["address"] in [g["targets"][0] for g in groups if g["labels"]["instance"] == "actor-0-0"]
        # The evaluator came back with its host, and evaluated the final weights there.
        evaluator = telemetry.endpoints["evaluator-0"]
        assert evaluator["pid"] == reborn["pid"]
        assert evaluator["address"] in [g["targets"][0] for g in groups if g["labels"]["instance"] == "evaluator-0"]
        assert sample(scrape(evaluator["address"]), "mdpo_evaluator_evaluations_total", learner_id=0) >= 1
        actor = scrape(reborn["address"])
        assert sample(actor, "mdpo_actor_restarts_total", run_id="restart", role="actor", learner_id=0, actor_id=0) == 1
        assert sample(actor, "mdpo_actor_env_steps_total", learner_id=0) > 0
        assert sample(scrape(telemetry.endpoints["actor-1-0"]["address"]), "mdpo_actor_restarts_total") == 0
        main = scrape(telemetry.address)
        for kind, n in (("learner", 2), ("actor", 2), ("evaluator", 2)):
            assert sample(main, "mdpo_coordinator_live_workers", kind=kind) == n
            assert sample(main, "mdpo_coordinator_expected_workers", kind=kind) == n
        assert sample(main, "mdpo_coordinator_iteration") == cfg.num_iterations
        assert sample(main, "mdpo_coordinator_env_steps_total", learner_id=1) == cfg.num_iterations * cfg.batch_size
    finally:
        coordinator.shutdown()
        ray.shutdown()
    assert not (tmp_path / "runs" / "prometheus" / "restart.json").exists()    # a clean end withdraws the targets
    assert (tmp_path / "runs" / "restart" / "prometheus_targets.json").exists()


# ------------------------------------------------------------------ a real Prometheus (slow)
def _api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:          # 400/422 carry the PromQL error as JSON
        return json.loads(err.read())


def _finite_series(result: dict) -> int:
    if result.get("status") != "success":
        return 0
    data = result["data"]
    if data["resultType"] == "scalar":
        return int(math.isfinite(float(data["result"][1])))
    return sum(math.isfinite(float(series["value"][1])) for series in data["result"])


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> int | None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)        # the process group this test started
        return proc.wait(10)


@pytest.mark.slow
def test_real_prometheus_scrapes_a_smoke_training_and_every_dashboard_and_rule_query_works(tmp_path):
    """Prometheus (scrape and rule interval 1 s) discovers a running `mdpo train --preset smoke` through the
    file_sd file it writes, with the deploy config's job; then every dashboard query returns at least one
    finite series and every alert rule evaluates without error (and none fires on a healthy run)."""
    prometheus = tool("prometheus")
    run_dir = tmp_path / "runs" / "smoke-monitored"
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "mdpo" and job["honor_labels"] is True
    job["file_sd_configs"][0]["files"] = [str(tmp_path / "runs" / "prometheus" / "*.json")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{free_port()}"
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={base[7:]}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "w"),
                            start_new_session=True)
    out, err = open(tmp_path / "train.out", "w+"), open(tmp_path / "train.err", "w+")
    t0, timeline = time.monotonic(), []
    # 12 iterations at most: the test stops it (SIGINT) as soon as every query has been answered.
    train = subprocess.Popen([sys.executable, "-m", "learners.cli", "train", "--preset", "smoke", "--run-dir",
                              str(run_dir), "--total-steps", str(12 * 512), "--checkpoint-every", "100",
                              "--metrics-port", "0", "--progress", "false"], cwd=REPO, stdout=out, stderr=err,
                             start_new_session=True)

    def logs() -> str:
        out.seek(0), err.seek(0)
        return f"timeline: {timeline}\nstdout:\n{out.read()[-3000:]}\nstderr:\n{err.read()[-5000:]}\nprometheus:\n" \
               f"{(tmp_path / 'prom.log').read_text()[-2000:]}"

    try:
        deadline = time.monotonic() + 240
        while True:                                 # `mdpo train` prints the endpoints it serves
            out.seek(0)
            printed = dict(re.findall(r"^  (\S+)\s+http://(\S+)/metrics$", out.read(), re.M))
            if len(printed) == 7 or train.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(printed) == 7, logs()
        timeline.append(("endpoints printed", round(time.monotonic() - t0, 1)))
        assert {name.split("-")[0] for name in printed} == set(ROLES)

        queries = {f"{title}: {expr}": expr.replace("$run_id", "smoke-monitored").replace("$__rate_interval", "2m")
                   for title, expr in dashboard_queries()}
        # The probe row has data only once a probe measurement has completed (at an evaluation, not every
        # iteration): its queries must always answer, and return data once metrics.jsonl has a "probe" block.
        probe_queries = {name for name, expr in queries.items()
                         if all(metric.startswith("mdpo_probe_") for metric in metric_names(expr))}
        pending, answers = dict(queries), {}

        def without_data() -> list[str]:
            probed = (run_dir / "metrics.jsonl").exists() and '"probe":' in (run_dir / "metrics.jsonl").read_text()
            return [name for name in pending if probed or name not in probe_queries]

        while without_data() and train.poll() is None and time.monotonic() < deadline:
            for name, expr in list(pending.items()):
                answers[name] = _api(base, "/api/v1/query", query=expr)
                if _finite_series(answers[name]):
                    del pending[name]
            time.sleep(2)
        for name, expr in list(pending.items()):    # a last round: Prometheus keeps what it scraped before the end
            answers[name] = _api(base, "/api/v1/query", query=expr)
            if _finite_series(answers[name]):
                del pending[name]
        timeline.append(("dashboard queries answered", round(time.monotonic() - t0, 1)))
        assert '"probe":' in (run_dir / "metrics.jsonl").read_text(), "the smoke run measured no probe set\n" + logs()
        assert not pending, "dashboard queries without data:\n" + "\n".join(
            f"{name}\n  -> {json.dumps(answers.get(name))[:300]}" for name in pending) + "\n" + logs()

        targets = _api(base, "/api/v1/targets")["data"]["activeTargets"]
        scraped = {t["labels"]["instance"]: t for t in targets if t["labels"].get("run_id") == "smoke-monitored"}
        assert {name: t["scrapeUrl"] for name, t in scraped.items()} == {
            name: f"http://{address}/metrics" for name, address in printed.items()}
        assert all(t["health"] == "up" for t in scraped.values()), targets
        for name, expr in rule_queries():
            answer = _api(base, "/api/v1/query", query=expr)
            assert answer["status"] == "success", (name, expr, answer)
        rules = [r for g in _api(base, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {name for name, _ in rule_queries()}
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule
            assert not rule["lastEvaluation"].startswith("0001"), rule          # evaluated at least once
        firing = [a for a in _api(base, "/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]
        assert not firing, f"alerts firing on a healthy run: {firing}"
        assert train.poll() is None, "the run ended before every query was answered; give it more steps"
    finally:
        code = _stop(train, signal.SIGINT, 120)
        _stop(prom, signal.SIGTERM, 30)
        timeline.append(("stopped", round(time.monotonic() - t0, 1)))
        print("timeline:", timeline)
    assert code in (0, 130), f"exit {code}\n{logs()}"
    assert not (tmp_path / "runs" / "prometheus" / "smoke-monitored.json").exists()   # withdrawn at the end
    assert json.loads((run_dir / "prometheus_targets.json").read_text())
