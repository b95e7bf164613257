"""The static-shape copy of the search graph for one IOBinding bucket (``serving.backends.static_shapes``): nothing left that
computes on shapes on the host (what kept onnxruntime from capturing the graph as a CUDA graph), and the same
outputs as the original graph (onnxruntime, CPU provider both).

The helpers below (:func:`cuda_placement`, a replay of onnxruntime's CPU fallback for the CUDA provider,
``GetCpuPreferredNodes`` in ``onnxruntime/core/framework/fallback_cpu_capability.cc``; on the original graph as
onnxruntime's basic level leaves it, it gives the 98 CPU-provider nodes of ``reports/gpu.md`` run 9) came from
``benchmarks/search_static_shapes.py``, which wrote ``reports/search_static_shapes.json`` and is last present at commit
448fa56."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from amc_contract.text import LexicalMatcher, TermWeights
from export.store import build_store, export_search_graph
from serving.backends import static_shapes as ss
from tests.parity.test_export import TERM_WEIGHTS, _gallery, tiny_model

BUCKET = {"batch": 3, "tokens": 16, "words": 8, "candidates": 7, "k": 5}
SMALL_INITIALIZER = 100  # onnxruntime's kSmallInitializerThreshold (elements)


def optimized(model: onnx.ModelProto, level: str, dims: dict[str, int] | None = None) -> onnx.ModelProto:
    """``model`` as onnxruntime's CPU provider leaves it at ``level`` (``basic``, ``extended``), with free-dimension
    overrides ``dims`` (symbolic dim name -> size)."""
    with tempfile.TemporaryDirectory(prefix="amc-static-shapes-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
        options.optimized_model_filepath = f"{tmp}/optimized.onnx"
        options.intra_op_num_threads = 1
        for name, size in (dims or {}).items():
            options.add_free_dimension_override_by_name(name, size)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(f"{tmp}/optimized.onnx")


def cuda_placement(model: onnx.ModelProto) -> dict:
    """onnxruntime's CPU fallback for the CUDA provider, replayed: from the outputs the CUDA kernels write in host
    memory (Shape, Size), each consumer goes to the CPU provider when every input is a small initializer, a graph
    input, or such a host tensor that its CUDA kernel does not read on the host anyway (:data:`ss.HOST_INPUTS`);
    then the tensors that cross between host and device (a Memcpy node each)."""
    graph = model.graph
    nodes = list(graph.node)  # by index: protobuf hands out new wrappers, so no id() of a node is stable
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    consumers: dict[str, list[int]] = {}
    for j, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(j)
    host: set[str] = set()
    cpu: set[int] = set()
    seen: set[int] = set()
    queue: list[int] = []
    for node in nodes:
        if node.op_type in ("Shape", "Size"):
            host.update(node.output)
            queue.extend(c for o in node.output for c in consumers.get(o, []))
    while queue:
        queue.sort(reverse=True)  # the first in the graph's (topological) order last, popped first
        j = queue.pop()
        if j in seen:
            continue
        seen.add(j)
        node = nodes[j]
        movable = True
        for i, name in enumerate(node.input):
            if not name or sizes.get(name, SMALL_INITIALIZER + 1) <= SMALL_INITIALIZER or name in inputs:
                continue
            if name not in host or i in ss.HOST_INPUTS.get(node.op_type, ()):
                movable = False
                break
        if movable:
            cpu.add(j)
            host.update(node.output)
            queue.extend(c for o in node.output for c in consumers.get(o, []))
    producers = {o: j for j, n in enumerate(nodes) for o in n.output}
    to_device, to_host = set(), set()
    for j, node in enumerate(nodes):
        for i, name in enumerate(node.input):
            p = producers.get(name)
            if p is None:
                continue
            on_host = p in cpu or nodes[p].op_type in ("Shape", "Size")
            read_on_host = j in cpu or i in ss.HOST_INPUTS.get(node.op_type, ())
            if on_host and not read_on_host:
                to_device.add(name)
            elif read_on_host and not on_host:
                to_host.add(name)
    return {"nodes": len(graph.node), "cpu_provider_nodes": len(cpu),
            "memcpy_from_host_after": sorted(to_device), "memcpy_to_host_before": sorted(to_host)}


def random_feeds(model: onnx.ModelProto, batch: int, tokens: int, words: int, candidates: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid inputs of the search graph: [CLS] ids [SEP] then 0 pads; distinct word numbers (some past the store's
    words), -1 pads weighing 0; distinct store rows."""
    store = next(t for t in model.graph.initializer if t.name == "projected").dims[0]
    ids = np.zeros((batch, tokens), np.int64)
    numbers, weights = np.full((batch, words), -1, np.int64), np.zeros((batch, words), np.float32)
    for b in range(batch):
        n = int(rng.integers(1, tokens - 1))
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = 101, rng.integers(999, 30522, n), 102
        w = int(rng.integers(1, words + 1))
        numbers[b, :w] = rng.choice(64, w, replace=False)
        weights[b, :w] = rng.uniform(0.1, 4.0, w)
    rows = np.stack([rng.choice(store, candidates, replace=False) for _ in range(batch)]).astype(np.int64)
    return dict(zip(ss.SEARCH_INPUTS[:4], (ids, numbers, weights, rows), strict=True))


def compare(original: ort.InferenceSession, static: ort.InferenceSession, feeds: dict[str, np.ndarray],
            k: int) -> float:
    """Largest absolute difference over the float outputs; the integer outputs must be equal."""
    want = original.run(None, {**feeds, ss.SEARCH_INPUTS[4]: np.full((len(feeds[ss.SEARCH_INPUTS[0]]), 1), k,
                                                                        np.int64)})
    got = static.run([o.name for o in original.get_outputs()], feeds)
    worst = 0.0
    for out, a, b in zip(original.get_outputs(), want, got, strict=True):
        if a.shape != b.shape:
            raise AssertionError(f"{out.name}: shape {b.shape}, the original's {a.shape}")
        if a.dtype.kind == "f":
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
        elif not np.array_equal(a, b):
            raise AssertionError(f"{out.name} differs from the original's")
    return worst


@pytest.fixture(scope="module")
def search_graph(tmp_path_factory):
    """A tiny AMC's search graph over a store of 12 gallery images, as a publish exports it."""
    out = tmp_path_factory.mktemp("search")
    regions, keywords = _gallery()
    model = tiny_model()
    store = build_store(model, regions, keywords)
    export_search_graph(model, store, LexicalMatcher(TermWeights.from_json(TERM_WEIGHTS)), out, version=1,
                        fingerprint="fp")
    return out / "search_store.onnx"


def test_the_static_copy_computes_nothing_on_shapes_and_answers_as_the_original(search_graph):
    original = onnx.load(str(search_graph))
    assert len(ss.host_computed_nodes(original)) > 20  # the check means something: the original has them
    assert cuda_placement(optimized(original, "basic"))["cpu_provider_nodes"] > 20
    static = ss.static_search_graph(original, **BUCKET)
    assert ss.host_computed_nodes(static) == []
    assert not {"Shape", "Size", "ConstantOfShape", "Range"} & set(ss.op_counts(static))
    assert cuda_placement(static) == {"nodes": len(static.graph.node), "cpu_provider_nodes": 0,
                                      "memcpy_from_host_after": [], "memcpy_to_host_before": []}
    # What onnxruntime's later (extended-level) fusions make of it on the CPU provider adds none either.
    assert ss.host_computed_nodes(optimized(static, "extended")) == []
    b, n, k = BUCKET["batch"], BUCKET["candidates"], BUCKET["k"]
    assert {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in static.graph.input} == {
        "query_tokens": [b, 16], "query_words": [b, 8], "query_word_weights": [b, 8], "candidate_ids": [b, n]}
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in static.graph.output}
    assert dims["scores"] == [b, k] and dims["candidate_index"] == [b, k] and dims["model_version"] == [b, 1]
    assert {p.key: p.value for p in static.metadata_props} == {p.key: p.value for p in original.metadata_props}
    assert {p.key for p in static.metadata_props} >= {"amc_version", "amc_fingerprint"}
    before = ort.InferenceSession(str(search_graph), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(static.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = max(compare(before, after, random_feeds(original, b, 16, 8, n, rng), k) for _ in range(4))
    assert worst < 1e-6
    assert len(original.graph.node) > 700  # the caller's model is not changed


def test_k_must_be_a_constant_of_the_copy(search_graph):
    """Fixed shapes alone (search_k kept as an input, or only onnxruntime's free-dimension overrides) fold every
    shape, but TopK's k is still gathered from search_k on the device: a MemcpyToHost, so no CUDA graph."""
    original = onnx.load(str(search_graph))
    b, n = BUCKET["batch"], BUCKET["candidates"]
    kept = ss.make_static(original, {"query_tokens": (b, 16), "query_words": (b, 8), "query_word_weights": (b, 8),
                                     "candidate_ids": (b, n), "search_k": (b, 1)})
    [topk] = ss.host_computed_nodes(kept)
    assert topk.startswith("TopK ") and ": input 1 " in topk
    assert cuda_placement(kept)["memcpy_to_host_before"] != []
    overridden = optimized(original, "basic", {"batch": b, "tokens": 16, "query_words": 8, "candidates": n})
    assert [x.split(":")[0] for x in ss.host_computed_nodes(overridden)] == [topk.split(":")[0]]


def test_bad_shapes_are_refused(search_graph):
    original = onnx.load(str(search_graph))
    with pytest.raises(ValueError, match="k must be from 1 to the 7 candidates"):
        ss.static_search_graph(original, **{**BUCKET, "k": 8})
    with pytest.raises(ValueError, match=r"missing \['candidate_ids'\]"):
        ss.make_static(original, {"query_tokens": (1, 16), "query_words": (1, 8), "query_word_weights": (1, 8)},
                       {"search_k": np.ones((1, 1), np.int64)})
    with pytest.raises(ValueError, match="search_k has 1 at a fixed dim, not 2"):
        ss.make_static(original, {"query_tokens": (1, 16), "query_words": (1, 8), "query_word_weights": (1, 8),
                                  "candidate_ids": (1, 7)}, {"search_k": np.ones((1, 2), np.int64)})
    with pytest.raises(ValueError, match="search_k is int64 in the graph"):
        ss.make_static(original, {"query_tokens": (1, 16), "query_words": (1, 8), "query_word_weights": (1, 8),
                                  "candidate_ids": (1, 7)}, {"search_k": np.ones((1, 1), np.int32)})


def test_the_steps_static_graphs_answer_as_the_dynamic_graph_and_fall_back_past_their_limit(search_graph):
    """serving.backends.search_graph.StaticGraphs (what the search step runs on CUDA graphs), here on the CPU
    provider: one copy per bucket, the dynamic graph's answers, None (the caller runs the dynamic graph) beyond its
    limit or where a copy fails, and the failure named."""
    from serving.backends.onnx_runner import BoundSession
    from serving.backends.search_graph import StaticGraphs

    names = ["query_tokens", "query_words", "query_word_weights", "candidate_ids", "search_k"]
    graphs = StaticGraphs(search_graph, names, lambda model: ort.InferenceSession(model, providers=["CPUExecutionProvider"]),
                          # cuda_graph: outputs of the copy's fixed shapes are given buffers before the first run
                          lambda s: BoundSession(s, device="cpu", cuda_graph=True), ss, limit=2)
    dynamic = ort.InferenceSession(str(search_graph), providers=["CPUExecutionProvider"])
    original = onnx.load(str(search_graph))
    rng = np.random.default_rng(3)
    for b, n in ((3, 7), (3, 7), (2, 5)):
        feeds = random_feeds(original, b, 16, 8, n, rng)
        feeds["search_k"] = np.full((b, 1), 4, np.int64)
        got = graphs.run(feeds)
        want = dict(zip([o.name for o in dynamic.get_outputs()], dynamic.run(None, feeds), strict=True))
        assert got is not None and got.keys() == want.keys()
        assert np.array_equal(got["candidate_index"], want["candidate_index"])
        assert np.allclose(got["scores"], want["scores"], atol=1e-6)
        assert np.array_equal(got["model_version"], want["model_version"])  # a constant of the copy, answered aside
    [(bound, constant)] = [graphs.copies[k] for k in list(graphs.copies)[:1]]
    assert list(constant) == ["model_version"] and "model_version" not in bound.output_names
    assert len(graphs.copies) == 2 and graphs.describe() == "2 of at most 2 built"
    assert graphs.run(random_feeds(original, 1, 16, 8, 7, rng) | {"search_k": np.full((1, 1), 4, np.int64)}) is None
    broken = StaticGraphs(search_graph, names, lambda model: 1 / 0, lambda s: s, ss, limit=2)
    assert broken.run(random_feeds(original, 1, 16, 8, 7, rng) | {"search_k": np.full((1, 1), 4, np.int64)}) is None
    assert broken.describe().startswith("0 of at most 2 built; stopped: ZeroDivisionError")


def test_a_copy_whose_capture_failed_stops_the_copies(search_graph):
    """BoundSession runs a bucket uncaptured where its capture fails (graph_error); StaticGraphs then drops that copy
    and builds no more (each holds the store again), and the caller runs the dynamic graph."""
    from serving.backends.onnx_runner import BoundSession
    from serving.backends.search_graph import StaticGraphs

    class Uncaptured(BoundSession):  # as BoundSession leaves a bucket whose capture onnxruntime refused
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.graph_error = "Fail: capture refused"

    names = ["query_tokens", "query_words", "query_word_weights", "candidate_ids", "search_k"]
    graphs = StaticGraphs(search_graph, names, lambda model: ort.InferenceSession(model, providers=["CPUExecutionProvider"]),
                          lambda s: Uncaptured(s, device="cpu"), ss, limit=4)
    feeds = random_feeds(onnx.load(str(search_graph)), 2, 16, 8, 7, np.random.default_rng(5))
    assert graphs.run(feeds | {"search_k": np.full((2, 1), 3, np.int64)}) is None
    assert graphs.copies == {} and "capture failed: Fail: capture refused" in graphs.describe()
