"""deploy/k8s: the rendered manifests are current, validate offline against the Kubernetes schemas, and agree with
what the server and the client use (ports, probe paths, model names, flags). No cluster needed.

Validation: ``kubernetes_validate.validate(resource, version, strict=True)`` against the JSON schemas the package
ships (no download): strict schemas refuse unknown fields. It has no schema for custom resources (it raises
``SchemaNotFoundError``; its CLI only warns), so the KServe InferenceService is checked against a hand-written
schema of KServe's fields (``deploy/k8s/schemas/``) and its pod-level fields as a core v1 Pod.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from amc_client import AMCClient
from amc_contract import signatures as sig
from deploy.k8s import render
from export.repository import STEPS, parse_config, template_files
from serving import endpoints

VALUES = render.load_values()
KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim",
         "ConfigMap"}
ISVC_SCHEMA = Path(render.HERE / "schemas" / "inferenceservice-v1beta1.json")


def _committed() -> dict[str, list[dict]]:
    return {str(p.relative_to(render.RENDERED)): [r for r in yaml.safe_load_all(p.read_text()) if r]
            for p in sorted(render.RENDERED.rglob("*.yaml"))}


def _resources(variant: str | None = None) -> list[dict]:
    return [r for rel, rs in _committed().items() if variant is None or rel.startswith(f"{variant}/") for r in rs
            if r["kind"] != "Kustomization"]


def _one(variant: str, kind: str, name: str | None = None) -> dict:
    found = [r for r in _resources(variant) if r["kind"] == kind and name in (None, r["metadata"]["name"])]
    assert len(found) == 1, f"{variant}: {len(found)} {kind} named {name}"
    return found[0]


def _container(variant: str) -> dict:
    if variant == "triton":
        return _one("triton", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return _one("kserve", "InferenceService")["spec"]["predictor"]["containers"][0]


# ---- the files ---------------------------------------------------------------------------------------------
def test_rendered_files_equal_the_renderer():
    files = render.rendered_files()
    on_disk = {str(p.relative_to(render.RENDERED)) for p in render.RENDERED.rglob("*") if p.is_file()}
    assert on_disk == set(files), "run `make k8s` (python -m deploy.k8s.render)"
    for rel, text in files.items():
        assert (render.RENDERED / rel).read_text() == text, f"{rel} differs: run `make k8s`"


def test_each_kustomization_lists_every_file_of_its_folder():
    for variant in render.VARIANTS:
        folder = render.RENDERED / variant
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert kustomization["namespace"] == VALUES["namespace"]
        assert sorted(kustomization["resources"]) == sorted(
            p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


# ---- schemas ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [VALUES["kubernetes_version"], kubernetes_validate.latest_version()])
def test_every_builtin_resource_validates_strictly(version):
    validated = set()
    for resource in _resources():
        if resource["kind"] == "InferenceService":
            continue  # a custom resource: test_inference_service_validates
        kubernetes_validate.validate(resource, version, strict=True)  # raises ValidationError
        assert resource["metadata"]["name"] and resource["metadata"]["namespace"] == VALUES["namespace"]
        validated.add(resource["kind"])
    assert validated == KINDS


def test_strict_validation_refuses_what_a_cluster_would():
    """The check has teeth offline: an unknown field, a wrong type and a misspelt kind are all refused."""
    version = VALUES["kubernetes_version"]
    deployment = _one("triton", "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(typo, version, strict=True)
    wrong_type = copy.deepcopy(_one("triton", "HorizontalPodAutoscaler"))
    wrong_type["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, version, strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({**deployment, "kind": "Deploymnet"}, version, strict=True)


def test_inference_service_validates():
    isvc = _one("kserve", "InferenceService")
    schema = json.loads(ISVC_SCHEMA.read_text())
    jsonschema.Draft202012Validator(schema).validate(isvc)
    # The predictor's pod-level fields and containers, as the Pod KServe will make of them.
    fields = schema["properties"]["spec"]["properties"]["predictor"]["properties"]
    predictor = isvc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if fields[k].get("x-pod-field")}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": render.kserve_predictor_name(VALUES), "namespace": VALUES["namespace"],
                        "labels": predictor["labels"], "annotations": predictor["annotations"]},
           "spec": {**pod_spec, "containers": predictor["containers"]}}
    kubernetes_validate.validate(pod, VALUES["kubernetes_version"], strict=True)
    assert predictor["containers"][0]["name"] == render.KSERVE_CONTAINER
    # An unknown predictor field is refused by the KServe schema.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(
            {**isvc, "spec": {"predictor": {**predictor, "minReplica": 1}}})


# ---- agreement with the server and the client --------------------------------------------------------------
@pytest.mark.parametrize("variant", render.VARIANTS)
def test_ports_and_probes_are_the_servers(variant):
    c = _container(variant)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == endpoints.DEFAULT_PORTS
    assert c["ports"][0]["name"] == "grpc"  # KServe's raw mode exposes the first port: what the client speaks
    assert c["readinessProbe"]["httpGet"] == {"path": endpoints.HEALTH_READY_PATH, "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": endpoints.HEALTH_LIVE_PATH, "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == endpoints.HEALTH_LIVE_PATH
    args = c["args"]
    for kind, port in endpoints.DEFAULT_PORTS.items():
        assert f"--{kind}-port={port}" in args
    # The client's default URL is the gRPC port the pods listen on.
    default_url = inspect.signature(AMCClient).parameters["url"].default
    assert default_url.endswith(f":{endpoints.DEFAULT_PORTS['grpc']}")
    annotations = (_one("triton", "Deployment")["spec"]["template"]["metadata"]["annotations"] if variant == "triton"
                   else _one("kserve", "InferenceService")["metadata"]["annotations"])
    assert str(endpoints.DEFAULT_PORTS["metrics"]) in annotations.values()
    assert endpoints.METRICS_PATH in annotations.values()


@pytest.mark.parametrize("variant", render.VARIANTS)
def test_models_flags_and_resources(variant):
    c = _container(variant)
    args = c["args"]
    loaded = [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")]
    version = VALUES["serving_version"]
    assert loaded == [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(version), sig.ENSEMBLE_NAME]
    # Every loaded model has a config in the onnxruntime flavour the image serves, the networks on KIND_GPU.
    configs = template_files("onnxruntime")
    for step in STEPS:
        config = parse_config(configs[f"{step.model_name}/config.pbtxt"])
        if step in sig.NETWORKS:
            assert config.platform == "onnxruntime_onnx"
            assert config.instance_group and all(g.kind == g.KIND_GPU for g in config.instance_group)
    assert f"{sig.ENSEMBLE_NAME}/config.pbtxt" in configs
    assert "--model-control-mode=explicit" in args
    assert f"--model-repository={VALUES['model_repository']['mount_path']}" in args
    for flag in endpoints.METRICS_ARGS:
        assert flag in args
    rule = f"model-repository:{endpoints.ADMIN_KEY_HEADER}=$({render.ADMIN_KEY_ENV})"
    assert f"--grpc-restricted-protocol={rule}" in args and f"--http-restricted-api={rule}" in args
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env[render.ADMIN_KEY_ENV] == {"name": VALUES["admin_key_secret"]["name"],
                                         "key": VALUES["admin_key_secret"]["key"]}
    gpus = str(VALUES["resources"]["gpus"])
    assert c["resources"]["limits"][render.GPU_RESOURCE] == c["resources"]["requests"][render.GPU_RESOURCE] == gpus
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts[render.REPOSITORY_VOLUME]["readOnly"] is True
    assert mounts[render.SHM_VOLUME]["mountPath"] == "/dev/shm"


def test_services_hpa_pdb_and_adapter_fit_together():
    deployment = _one("triton", "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in _container("triton")["ports"]}
    services = [r for r in _resources("triton") if r["kind"] == "Service"]
    assert {s["spec"].get("clusterIP") for s in services} == {None, "None"}  # ClusterIP + headless
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == endpoints.DEFAULT_PORTS
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    for variant, target in (("triton", VALUES["name"]), ("kserve", render.kserve_predictor_name(VALUES))):
        hpa = _one(variant, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}
        metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        adapter = yaml.safe_load(_one(variant, "ConfigMap")["data"]["config.yaml"])
        assert [r["name"]["as"] for r in adapter["rules"]] == [metric] == [VALUES["hpa"]["metric"]]
        assert "<<.LabelMatchers>>" in adapter["rules"][0]["metricsQuery"]
        assert _one(variant, "PodDisruptionBudget")["spec"]["maxUnavailable"] == VALUES["pdb"]["max_unavailable"]
    assert _one("triton", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The KServe PDB selects the pods KServe labels with the InferenceService's name.
    isvc = _one("kserve", "InferenceService")
    assert _one("kserve", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    claim = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}[render.REPOSITORY_VOLUME]
    assert claim["persistentVolumeClaim"]["claimName"] == _one("triton", "PersistentVolumeClaim")["metadata"]["name"]
    assert _one("triton", "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dockerfile_pins_what_the_text_step_imports():
    text = (render.RENDERED / "Dockerfile").read_text()
    assert f"FROM nvcr.io/nvidia/tritonserver:{VALUES['image']['triton_release']}-py3" in text
    requirements = (render.ROOT / "requirements.txt").read_text().splitlines()
    for package in ("numpy", "tokenizers"):
        pin = next(line for line in requirements if line.startswith(f"{package}=="))
        assert pin in text
    assert f"onnxruntime-gpu=={VALUES['image']['onnxruntime_gpu']}" in text
