"""monitoring/: every series the Grafana dashboard (and the HPA's adapter rule) reads exists, with the labels it
expects, on a real tritonserver (that the files are current and consistent: tests/unit/test_metrics.py).

The test publishes two versions of a tiny, untrained AMC model (no training: export and parity
only), serves them with a 50% canary of version 2, ranks through ``AMCClient`` (which follows the canary routing),
sends one invalid request, and scrapes ``/metrics``. Labels that Prometheus attaches at scrape time (``instance``,
``job``, and ``namespace``/``pod`` from prometheus.yml's relabelling) are not on Triton's page; matchers on them
are checked against prometheus.yml instead. GPU series (``nv_gpu_*``) exist only where Triton sees an NVIDIA GPU:
on a machine without one, ``test_dashboard_gpu_series_exist`` is skipped and says so.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amc_client import AMCClient, Candidate, InvalidInputError, Routing
from amc_contract import signatures as sig
from amc_contract.text import TermWeights
from amc_model.checkpoint import save_checkpoint
from amc_model.model import AMC, AMCConfig
from deploy.k8s import render as k8s
from export.publish import publish
from export.repository import STEPS, set_routing
from monitoring import render
from serving import endpoints
from serving.server import TritonServer
from tests.unit.test_metrics import CANARY, SERVING, VALUES, grouping, selectors, targets

# Labels a scrape adds (not on Triton's page): Prometheus's own, and the k8s job's relabelling.
TARGET_LABELS = {"instance", "job", "namespace", "pod"}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
DOCUMENTS = [["cat", "face"], ["grinning face"], ["dog", "pet"], ["red heart", "love"]]
KEYWORDS = sorted({k for d in DOCUMENTS for k in d})


# ---- reading the metrics page ---------------------------------------------------------------------------------
def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, line
            out.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def matching(series, name: str, matchers) -> list[dict[str, str]]:
    def ok(labels: dict[str, str]) -> bool:
        for label, op, value in matchers:
            if label in TARGET_LABELS:
                continue
            have = labels.get(label, "")
            hit = re.fullmatch(value, have) is not None if op in ("=~", "!~") else have == value
            if hit != (op in ("=", "=~")):
                return False
        return True

    return [labels for n, labels, _ in series if n == name and ok(labels)]


# ---- live: a real tritonserver --------------------------------------------------------------------------------
def _tiny_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AMC(AMCConfig(query_dim=16, hidden=12, pca_dim=8)).eval()
    model.set_region_pca(torch.rand(1280), torch.randn(1280, 8) / 30)
    save_checkpoint(path, model, TermWeights.from_documents(DOCUMENTS).to_json(), train_config={"note": "test"},
                    metrics={"test_ndcg@10": 0.5})
    return path


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> dict:
    """Serve versions 1 and 2 with a 50% canary of 2, send traffic through the client, scrape /metrics."""
    root = tmp_path_factory.mktemp("metrics")
    repository = root / "repository"
    for seed in (0, 1):
        publish(_tiny_checkpoint(root / f"tiny{seed}.pt", seed), repository, keywords=KEYWORDS, log=lambda *_: None)
    set_routing(repository, Routing(SERVING, CANARY, 0.5))
    models = [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(v) for v in (SERVING, CANARY)]
    rng = np.random.default_rng(0)
    candidates = [Candidate(id=f"c{i}", regions=rng.random((sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM),
                                                             dtype=np.float32), keywords=["cat", "face"])
                  for i in range(4)]
    with TritonServer(repository, models=[*models, sig.ENSEMBLE_NAME], admin_key="metrics-test",
                      log_file=root / "tritonserver.log") as server:
        health = {path: urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10).status
                  for path in (endpoints.HEALTH_LIVE_PATH, endpoints.HEALTH_READY_PATH)}
        versions = []
        with AMCClient(server.grpc_url, timeout_s=60) as client:
            for i in range(24):
                versions.append(client.rank(f"cat face {i}", candidates)[0].model_version)
            with pytest.raises(InvalidInputError):
                client.rank("", candidates, validate=False)  # the server refuses it: a failure to count
        time.sleep(0.5)
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            text = response.read().decode()
    return {"series": parse_metrics(text), "health": health, "versions": versions}


def _check_targets(series, *, gpu: bool) -> int:
    checked = 0
    for title, target in targets():
        by = grouping(target["expr"]) - TARGET_LABELS
        for name, matchers in selectors(target["expr"]):
            if name.startswith("nv_gpu_") != gpu:
                continue
            found = matching(series, name, matchers)
            assert found, f"panel {title!r}: no series {name}{{{matchers}}} on Triton's metrics page"
            for labels in found:
                assert by <= labels.keys(), f"panel {title!r}: {name} lacks the labels {by - labels.keys()}"
            checked += 1
    return checked


def test_probe_paths_answer(scraped):
    assert scraped["health"] == {endpoints.HEALTH_LIVE_PATH: 200, endpoints.HEALTH_READY_PATH: 200}


def test_dashboard_series_exist(scraped):
    assert _check_targets(scraped["series"], gpu=False) >= 20


def test_dashboard_gpu_series_exist(scraped):
    if not any(name.startswith("nv_gpu_") for name, _, _ in scraped["series"]):
        pytest.skip("no nv_gpu_* series: Triton exports GPU utilisation and memory only where DCGM sees an NVIDIA "
                    "GPU, and this machine has none; the GPU panels are unchecked here")
    assert _check_targets(scraped["series"], gpu=True) >= 3


def test_canary_panels_see_both_versions_and_the_failure(scraped):
    series = scraped["series"]
    assert set(scraped["versions"]) == {SERVING, CANARY}  # the client split the traffic
    probe = {labels["version"]: value for name, labels, value in series
             if name == "nv_inference_request_success" and labels["model"] == render.VERSION_PROBE}
    assert probe[str(SERVING)] > 0 and probe[str(CANARY)] > 0
    assert probe[str(SERVING)] + probe[str(CANARY)] == len(scraped["versions"])
    ensembles = {labels["model"]: value for name, labels, value in series
                 if name == "nv_inference_request_success" and re.fullmatch(render.ENSEMBLES, labels["model"])}
    assert ensembles[sig.ENSEMBLE_NAME] > 0 and ensembles[sig.versioned_ensemble_name(CANARY)] > 0
    # The refused request followed the canary routing too, so it failed on `amc` or on the canary's `amc_v2`.
    failures = sum(value for name, labels, value in series
                   if name == "nv_inference_request_failure" and re.fullmatch(render.ENSEMBLES, labels["model"]))
    assert failures >= 1  # Triton 2.51 counts an ensemble's refused request twice (seen: 2.0 for one request)


def test_hpa_adapter_query_series_exist(scraped):
    """The Prometheus adapter's query for the HPA reads series that exist, with the models it names."""
    rule = yaml.safe_load(k8s.adapter_rules(VALUES)["data"]["config.yaml"])["rules"][0]
    query = rule["metricsQuery"].replace("<<.LabelMatchers>>,", "").replace("<<.GroupBy>>", "pod")
    found = selectors(query)
    assert {name for name, _ in found} == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    for name, matchers in found:
        models = {labels["model"] for labels in matching(scraped["series"], name, matchers)}
        assert models, f"{name}{{{matchers}}}"
        assert models <= {s.model_name for s in STEPS} | {sig.ENSEMBLE_NAME, sig.versioned_ensemble_name(CANARY),
                                                            sig.versioned_ensemble_name(SERVING)}
