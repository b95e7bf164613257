"""The static-shape copy of the search graph for one IOBinding bucket (``serving.backends.static_shapes``): nothing left that
computes on shapes on the host (what kept onnxruntime from capturing the graph as a CUDA graph), and the same
outputs as the original graph (onnxruntime, CPU provider both)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from amc_contract.text import LexicalMatcher, TermWeights
from benchmarks.search_static_shapes import compare, cuda_placement, optimized, random_feeds
from export.store import build_store, export_store_graphs
from serving.backends import static_shapes as ss
from tests.parity.test_export import TERM_WEIGHTS, _gallery, tiny_model

BUCKET = {"batch": 3, "tokens": 16, "words": 8, "candidates": 7, "k": 5}


@pytest.fixture(scope="module")
def search_graph(tmp_path_factory):
    """A tiny AMC's search graph over a store of 12 gallery images, as a publish exports it."""
    out = tmp_path_factory.mktemp("search")
    regions, keywords = _gallery()
    model = tiny_model()
    store = build_store(model, regions, keywords)
    export_store_graphs(model, store, LexicalMatcher(TermWeights.from_json(TERM_WEIGHTS)), out, version=1,
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
