"""Export tier: every config of an ONNX step declares the dims its graph has (issue 25).

Triton's ONNX Runtime backend refuses to load a model whose config declares another number, or -1, where the
ONNX graph fixes a dim, or another rank (a -1 of the graph accepts any number); the python flavour's configs
follow the same rule. Checked here on really published versions: the graphs read with the onnx package, the
configs as written into the repository.
"""

from __future__ import annotations

import shutil

import onnx
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from amc_contract import signatures as sig
from amc_model.model import AMC, AMCConfig
from export import onnx_export
from export import publish as publish_module
from export.configs import FLAVOURS, ONNX_FILE, TEMPLATE_ROOT, parse_config, template_files
from export.onnx_export import ExportError
from export.publish import publish
from export.repository import init_repository
from tests.parity.test_export import KEYWORDS, checkpoint, quiet, tiny_model  # noqa: F401 - checkpoint: a fixture

# Every step that Triton serves from an ONNX graph (model.onnx; the text step's encoder runs inside Python): the
# networks a publish writes. (The search graph runs inside the search step, a Python step in both flavours.)
ONNX_STEPS = {s.model_name for s in sig.NETWORKS}


def graph_shapes(path) -> dict[str, list[int]]:
    """Each graph input's and output's shape, -1 where the graph leaves the dim symbolic."""
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}


def disagreements(config, shapes: dict[str, list[int]]) -> list[str]:
    """Where ``config`` breaks the backend's rule for a graph of ``shapes``: the same tensors, each of the same
    rank (Triton's batch dim first where max_batch_size > 0), each dim the graph fixes declared as that number."""
    batch = [-1] if config.max_batch_size > 0 else []
    declared = {t.name: batch + list(t.dims) for t in (*config.input, *config.output)}
    out = [] if set(declared) == set(shapes) else [f"{config.name}: tensors {sorted(declared)} vs {sorted(shapes)}"]
    for name, dims in declared.items():
        graph = shapes.get(name)
        if graph is not None and (len(dims) != len(graph) or any(g != -1 and d != g for d, g in zip(dims, graph))):
            out.append(f"{config.name}.{name}: config {dims}, graph {graph}")
    return out


def onnx_steps(repo, version: int) -> dict[str, tuple]:
    """model name -> (its config, its version's graph shapes), for every step of ``version`` with a model.onnx."""
    found = {}
    for onnx_file in sorted(repo.glob(f"*/{version}/{ONNX_FILE}")):
        model_dir = onnx_file.parent.parent
        found[model_dir.name] = (parse_config((model_dir / "config.pbtxt").read_text()), graph_shapes(onnx_file))
    return found


def cpu_only(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def with_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_onnx_step_config_declares_its_graph_dims(tmp_path, checkpoint, monkeypatch, flavour):  # noqa: F811
    """A version published in each flavour by a machine without CUDA: every ONNX step's config agrees with its graph
    (inputs and outputs), with the model's own sizes (the tiny model's, not the templates'); the onnxruntime flavour's
    steps are placed on KIND_CPU."""
    cpu_only(monkeypatch)
    _, path = checkpoint
    repo = tmp_path / "repo"
    version = publish(path, repo, flavour=flavour, keywords=KEYWORDS, log=quiet)
    steps = onnx_steps(repo, version)
    assert set(steps) == ONNX_STEPS
    problems = [p for config, shapes in steps.values() for p in disagreements(config, shapes)]
    assert problems == []
    # The model axes the issue names are fixed by the graphs, to the tiny model's numbers, and so declared.
    sizes = onnx_export.model_sizes(tiny_model().config)
    van_config, van_graph = steps[sig.VAN.model_name]
    assert van_graph[sig.VISUAL_VECTOR.name] == [-1, -1, sizes["hidden"]]
    assert [list(t.dims) for t in van_config.input if t.name == sig.QUERY_EMBEDDING.name] == [[sizes["query_dim"]]]
    # The rule catches what the generator used to write: -1 where the graph fixes the dim.
    stale = parse_config(str(van_config).replace(f"dims: {sizes['query_dim']}", "dims: -1"))
    assert disagreements(stale, van_graph) == [f"amc_van.query_embedding: config [-1, -1], graph "
                                               f"[-1, {sizes['query_dim']}]"]
    if flavour == "onnxruntime":
        kinds = {name: [g.kind for g in config.instance_group] for name, (config, _) in steps.items()}
        assert kinds == {name: [mc.ModelInstanceGroup.KIND_CPU] for name in ONNX_STEPS}


def test_committed_templates_declare_the_default_models_graph_dims(tmp_path):
    """``model_repository/`` holds the configs of the default AMCConfig: they agree with its exported networks."""
    model = AMC(AMCConfig()).eval()
    for name, (signature, _) in onnx_export.GRAPHS.items():
        onnx_export.export_network(model, name, tmp_path / f"{name}.onnx", version=1, fingerprint="fp")
        for flavour in FLAVOURS:
            config = parse_config((TEMPLATE_ROOT / flavour / signature.model_name / "config.pbtxt").read_text())
            assert disagreements(config, graph_shapes(tmp_path / f"{name}.onnx")) == [], (flavour, name)


@pytest.mark.parametrize(("flag", "machine", "kind"), [("cpu", with_cuda, "KIND_CPU"), ("gpu", cpu_only, "KIND_GPU")])
def test_device_kind_places_the_onnxruntime_networks(tmp_path, checkpoint, monkeypatch, flag, machine, kind):  # noqa: F811
    """``--device-kind`` decides, whatever the publishing machine has: cpu writes KIND_CPU, gpu KIND_GPU."""
    machine(monkeypatch)
    repo = tmp_path / "repo"
    assert publish_module.main(["--checkpoint", str(checkpoint[1]), "--repository", str(repo),
                                "--flavour", "onnxruntime", "--device-kind", flag]) == 0
    for step in sig.NETWORKS:
        config = parse_config((repo / step.model_name / "config.pbtxt").read_text())
        assert [mc.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == [kind], step.model_name


def test_a_repository_of_other_dims_is_refused_and_a_fresh_one_rewritten(tmp_path):
    """Steps without a version take the published model's dims and device kind (a repository made from the
    committed templates); a step whose versions have other dims is refused before anything is written."""
    repo = tmp_path / "repo"
    shutil.copytree(TEMPLATE_ROOT / "onnxruntime", repo)
    tiny = onnx_export.model_sizes(tiny_model().config)
    init_repository(repo, "onnxruntime", sizes=tiny, kind="cpu")
    wanted = template_files("onnxruntime", sizes=tiny, kind="cpu")
    assert all((repo / rel).read_text() == text for rel, text in wanted.items() if not rel.startswith("amc/"))
    (repo / sig.VAN.model_name / "1").mkdir()
    before = {p: p.read_text() for p in repo.rglob("config.pbtxt")}
    with pytest.raises(ValueError, match=r"amc_van/config.pbtxt declares query_embedding dims \[400\], but this "
                                         r"model's graph needs \[512\].*publish into a new repository"):
        init_repository(repo, "onnxruntime", kind="cpu")  # the default model's sizes
    assert {p: p.read_text() for p in repo.rglob("config.pbtxt")} == before


def test_the_export_checks_its_graph_against_the_signature(tmp_path):
    """The export refuses a graph whose shapes differ from the signature's with the model's sizes: the sizes the
    configs are written with."""
    model = tiny_model()
    onnx_export.export_network(model, "lan", tmp_path / "lan.onnx", version=1, fingerprint="fp")
    proto = onnx.load(str(tmp_path / "lan.onnx"))
    sizes = onnx_export.model_sizes(model.config)
    onnx_export.check_graph_dims(proto, sig.LAN, sizes, "lan")
    with pytest.raises(ExportError, match=r"lan.keyword_vector: the graph's shape \[\?, \?, 14\] differs"):
        onnx_export.check_graph_dims(proto, sig.LAN, {**sizes, "keyword_hidden": 12}, "lan")
    with pytest.raises(ValueError, match="the model fixes its .query_dim. axis"):
        onnx_export.check_graph_dims(proto, sig.LAN, {}, "lan")
