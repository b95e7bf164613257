"""monitoring/: the Prometheus config and the Grafana dashboard are current and consistent (that every series they
read exists on a real tritonserver: tests/integration/test_metrics.py, which reads the dashboard's queries with
the helpers here)."""

from __future__ import annotations

import json
import re

import yaml

from deploy.k8s import render as k8s
from monitoring import render
from serving import endpoints

VALUES = k8s.load_values()
# What the dashboard's variables stand for in the check: everything, and the versions the integration test serves.
SERVING, CANARY = 1, 2
SUBSTITUTE = {"$__rate_interval": "1m", "$model": ".*", "$version": ".*", "$instance": ".*",
              "$serving": str(SERVING), "$canary": str(CANARY)}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^{}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
BY = re.compile(r"\bby \(([^)]*)\)")


# ---- reading the dashboard's expressions ------------------------------------------------------------------------
def targets() -> list[tuple[str, dict]]:
    """``(panel title, target)`` for every query of the committed dashboard."""
    dashboard = json.loads(render.DASHBOARD.read_text())
    return [(p["title"], t) for p in dashboard["panels"] for t in p.get("targets", [])]


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """``[(metric, [(label, op, value)])]`` of every ``metric{...}`` in a PromQL expression."""
    for key, value in SUBSTITUTE.items():
        expr = expr.replace(key, value)
    found = []
    for name, body in SELECTOR.findall(expr):
        matchers = MATCHER.findall(body)
        assert "".join(f'{k}{op}"{v}",' for k, op, v in matchers).rstrip(",") == re.sub(r"\s", "", body), body
        found.append((name, matchers))
    return found


def grouping(expr: str) -> set[str]:
    return {label.strip() for labels in BY.findall(expr) for label in labels.split(",") if label.strip()}


# ---- static: files and consistency ----------------------------------------------------------------------------
def test_monitoring_files_equal_the_renderer():
    for path, text in render.rendered_files().items():
        assert path.read_text() == text, f"{path} differs: run `make k8s`"


def test_prometheus_config_scrapes_the_servers_metrics_port_and_the_pods_of_deploy_k8s():
    config = yaml.safe_load(render.PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    local, pods = jobs[render.LOCAL_JOB], jobs[render.K8S_JOB]
    metrics_port = endpoints.DEFAULT_PORTS["metrics"]
    assert local["static_configs"][0]["targets"] == [f"{VALUES['prometheus']['local_host']}:{metrics_port}"]
    assert local["metrics_path"] == pods["metrics_path"] == endpoints.METRICS_PATH
    relabel = pods["relabel_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in relabel if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == VALUES["name"]
    # The port the pods' containers name "metrics" is Triton's metrics port, in both variants.
    for variant in k8s.VARIANTS:
        for doc in (k8s.RENDERED / variant).glob("*.yaml"):
            for r in yaml.safe_load_all(doc.read_text()):
                if r and r["kind"] in ("Deployment", "InferenceService"):
                    spec = r["spec"]["template"]["spec"] if r["kind"] == "Deployment" else r["spec"]["predictor"]
                    labels = (r["spec"]["template"]["metadata"]["labels"] if r["kind"] == "Deployment"
                              else r["spec"]["predictor"]["labels"])
                    assert labels["app.kubernetes.io/name"] == VALUES["name"]
                    ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
                    assert ports[keep["__meta_kubernetes_pod_container_port_name"]] == metrics_port
    # The labels the Prometheus adapter maps to pods are the ones the relabelling writes.
    written = {r["target_label"] for r in relabel if "target_label" in r}
    assert {"namespace", "pod"} <= written
    adapter = yaml.safe_load(k8s.adapter_rules(VALUES)["data"]["config.yaml"])["rules"][0]
    assert set(adapter["resources"]["overrides"]) <= written


def test_dashboard_is_well_formed():
    dashboard = json.loads(render.DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "model", "version", "serving", "canary"} <= variables
    for title, target in targets():
        used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
        assert used <= variables, f"{title}: undefined variables {used - variables}"
        assert target["datasource"]["uid"] == "${datasource}"
        # A legend names only labels the query keeps.
        legend = set(re.findall(r"\{\{(\w+)\}\}", target["legendFormat"]))
        assert legend <= grouping(target["expr"]), f"{title}: legend {legend} not in by ({grouping(target['expr'])})"
        assert selectors(target["expr"]), title
    titles = " ".join(t for t, _ in targets()).lower()
    for needed in ("requests", "failures", "queue time p50", "queue time p99", "compute time p50",
                   "compute time p99", "gpu utilisation", "gpu memory", "canary"):
        assert needed in titles, needed
