"""What the static-shape copy of the search graph (``serving.backends.static_shapes``) leaves of its shape arithmetic, on the
CPU: nodes by op type before and after, every node that still computes on shapes or feeds a value the CUDA
provider reads on the host, and the outputs against the original graph's on random valid inputs (onnxruntime, CPU
provider both). Writes ``reports/search_static_shapes.json``.

    python -m export.publish --checkpoint runs/amc/checkpoint.pt --repository /tmp/static-repo \\
        --store-candidates runs/amc/example_candidates.npz --device-kind gpu
    python -m benchmarks.search_static_shapes --graph /tmp/static-repo/amc_search_step/1/search_store.onnx

Beside the brief's figures it records:

- ``cuda_placement``: onnxruntime's CPU fallback for the CUDA provider (``GetCpuPreferredNodes`` in
  ``onnxruntime/core/framework/fallback_cpu_capability.cc``) replayed on the graph as onnxruntime's basic level
  leaves it (the level that runs before the graph is partitioned): the nodes it would place on the CPU provider and
  the tensors that would need a Memcpy node. On the original graph this gives the 98 CPU-provider nodes of
  ``reports/gpu.md`` run 9 (its log, onnxruntime 1.31 on an H100); it is a replay, not the CUDA provider.
- ``variants``: the same bucket with ``search_k`` kept as an input; with only onnxruntime's free-dimension
  overrides (no edit of the file); and the static copy after onnxruntime's extended level on the CPU provider
  (what later fusions could add; the CUDA provider's own extended-level fusions are not run here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from serving.backends import static_shapes as ss

ROOT = Path(__file__).resolve().parent.parent
SMALL_INITIALIZER = 100  # onnxruntime's kSmallInitializerThreshold (elements)
# Buckets measured: (batch, tokens, words, candidates, k); candidates and k are capped by the store's size.
BUCKETS = ((1, 16, 8, 30, 16), (8, 32, 16, 30, 30), (64, 48, 8, 30, 10))
PUBLISH = ("python -m export.publish --checkpoint runs/amc/checkpoint.pt --repository /tmp/static-repo "
           "--store-candidates runs/amc/example_candidates.npz --device-kind gpu")
# Where the MemcpyFromHost after /encoder/Gather_output_0 of run 9's log comes from (read off the graphs here).
ENCODER_GATHER = (
    "/encoder/Gather is Gather(Shape(query_tokens), 1): the token count L, not token ids. It feeds Cast -> "
    "Range(0, L) -> Gather(encoder.position.weight) (position embeddings). onnxruntime's CPU fallback puts "
    "Shape's consumers on the CPU provider (the 98 nodes), then its extended-level GatherToSliceFusion, run after "
    "partitioning on nodes already given to CUDA, rewrites Range -> Gather as Slice(encoder.position.weight, "
    "Unsqueeze(0), Unsqueeze(L), axes, Unsqueeze(1)) with the three new Unsqueeze nodes on CUDA: L is copied to the "
    "device (MemcpyFromHost after /encoder/Gather_output_0) and the three back to the host for Slice's starts, ends "
    "and steps (MemcpyToHost before unsqueeze_output_0..2). The word-embedding Gather(encoder.word.weight, "
    "query_tokens) reads its int64 indices on the device and never crossed. In the static copy Shape, Gather, Cast "
    "and Range fold to a constant [0..L) (the remaining Gather(encoder.position.weight, constant) has only "
    "initializer inputs, which onnxruntime's basic level folds in the serving session), so neither the Memcpy nor "
    "the fusion's Unsqueeze nodes can arise; the fifth Memcpy (before /Reshape_4_output_0, TopK's k from "
    "search_k) goes with search_k becoming a constant.")


def optimized(model: onnx.ModelProto, level: str, dims: dict[str, int] | None = None) -> onnx.ModelProto:
    """``model`` as onnxruntime's CPU provider leaves it at ``level`` (``basic``, ``extended``), with free-dimension
    overrides ``dims`` (symbolic dim name -> size)."""
    with tempfile.TemporaryDirectory(prefix="amc-static-report-") as tmp:
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


def report(graph: Path, buckets=BUCKETS, seed: int = 0) -> dict:
    model = onnx.load(str(graph))
    store = next(t for t in model.graph.initializer if t.name == "projected").dims[0]
    rng = np.random.default_rng(seed)
    original = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    meta = {p.key: p.value for p in model.metadata_props}
    out: dict = {"command": "", "graph": str(graph), "graph_made_by": PUBLISH,
                 "fingerprint": meta.get("amc_fingerprint", ""), "store_rows": int(store),
                 "onnxruntime": ort.__version__, "onnx": onnx.__version__, "machine": "the 2-core CPU machine, CPU "
                 "provider only (no GPU: cuda_placement is a replay, see the module's docstring)", "buckets": []}
    worst = 0.0
    for batch, tokens, words, candidates, k in buckets:
        candidates = min(candidates, store)
        k = min(k, candidates)
        static = ss.static_search_graph(model, batch=batch, tokens=tokens, words=words, candidates=candidates, k=k)
        session = ort.InferenceSession(static.SerializeToString(), providers=["CPUExecutionProvider"])
        diff = max(compare(original, session, random_feeds(model, batch, tokens, words, candidates, rng), k)
                   for _ in range(3))
        worst = max(worst, diff)
        entry = {"batch": batch, "tokens": tokens, "words": words, "candidates": candidates, "k": k,
                 "nodes_after": len(static.graph.node), "shape_nodes_after": ss.host_computed_nodes(static),
                 "max_abs_diff": diff}
        out["buckets"].append(entry)
        if len(out["buckets"]) == 1:  # the first bucket in detail
            shapes = {"batch": batch, "tokens": tokens, "query_words": words, "candidates": candidates}
            kept = ss.make_static(model, {"query_tokens": (batch, tokens), "query_words": (batch, words),
                                          "query_word_weights": (batch, words), "candidate_ids": (batch, candidates),
                                          "search_k": (batch, 1)})
            extended = optimized(static, "extended")
            overrides = optimized(model, "basic", shapes)
            out.update({
                "bucket": entry,
                "before": ss.op_counts(model), "after": ss.op_counts(static),
                "before_ort_basic": ss.op_counts(optimized(model, "basic")),
                "shape_nodes_before": len(ss.host_computed_nodes(model)),
                "shape_nodes_before_ort_basic": ss.host_computed_nodes(optimized(model, "basic")),
                "shape_nodes_after": entry["shape_nodes_after"],
                "cuda_placement": {"original": cuda_placement(optimized(model, "basic")),
                                   "static": cuda_placement(static)},
                "variants": {
                    "search_k_kept_as_input": {"shape_nodes": ss.host_computed_nodes(kept),
                                               "cuda_placement": cuda_placement(kept)},
                    "free_dimension_overrides_only": {"shape_nodes": ss.host_computed_nodes(overrides),
                                                      "cuda_placement": cuda_placement(overrides)},
                    "static_after_ort_extended_cpu": {"ops": ss.op_counts(extended),
                                                      "shape_nodes": ss.host_computed_nodes(extended)},
                }})
    out["max_abs_diff"] = worst
    out["encoder_gather"] = ENCODER_GATHER
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", type=Path, required=True, help="a published search_store.onnx")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "search_static_shapes.json")
    args = parser.parse_args(argv)
    result = report(args.graph)
    result["command"] = "python -m benchmarks.search_static_shapes " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("before", "after", "shape_nodes_after", "max_abs_diff")}))


if __name__ == "__main__":
    main()
